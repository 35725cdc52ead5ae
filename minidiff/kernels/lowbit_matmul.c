/* lowbit_matmul.c -- the routed experts' products with 4-bit weights, on the CPU, without widening
 * the weights into memory first.
 *
 *     Y[t, out_col + r] = sum_k X[t, k] * W[r, k]          W[r, k] = VALUES[code(r, k)] * scale(r, k / group)
 *
 * for both 4-bit formats minidiff reads, which store two codes per byte, the even input in the low nibble:
 *   - compressed-tensors int4:  VALUES[c] = c - 8,  a float32 or bf16 scale per group of `group` inputs;
 *   - NVFP4:                    VALUES[c] = the 16 FP4 E2M1 numbers, an FP8 E4M3 scale per 16 inputs,
 *                               divided by a global scale (compressed-tensors) or times scale_2 (ModelOpt).
 * W[r, k] is computed exactly as formats.dequant_int4 / formats.dequant_nvfp4 compute it (the same float32
 * operations), so only the order of the additions differs from "dequantize, then X @ W.T"
 * (tests/test_native.py compares the two).
 *
 * Order of the inputs: a byte holds inputs 2j and 2j + 1, so a decoded row is laid out as the even inputs,
 * then the odd ones; X's columns come in the same order (KernelView.columns arranges them), which leaves
 * every product W[r, k] * X[t, k] as it was.
 *
 * Why: NumPy needs several passes over memory to turn 4-bit codes into float32 (split the nibbles, cast,
 * scale), more time than a bf16 weight takes to widen; here each weight row is decoded once into a small
 * buffer that stays in cache and used at once by all the expert's tokens.
 *
 * The work is a list of items, one (matrix, block of rows, run of tokens) each; items write disjoint parts
 * of Y, so the caller splits the list over threads and every Y element is summed in one fixed order.
 * Built and loaded by lowbit_matmul.py beside it; lowbit_matmul_reference.py states what it computes.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));     /* 16 floats; loads need not be aligned */
typedef float v8 __attribute__((vector_size(32), aligned(4)));
typedef int32_t i16 __attribute__((vector_size(64)));                 /* 16 int32 lanes */
typedef uint32_t u16 __attribute__((vector_size(64)));                /* 16 uint32 lanes */

enum { SCALE_F32 = 0, SCALE_BF16 = 1, SCALE_E4M3 = 2 };

enum { ROWS = 4, TOKENS = 4 };  /* the register tile: 4 weight rows x 4 tokens x 16 lanes = 16 vectors */

typedef struct {
    const float *e4m3;            /* [256] the FP8 E4M3 numbers (SCALE_E4M3) */
    int32_t fp4;                  /* 1: codes are FP4 E2M1 (NVFP4); 0: int4, code - 8 */
    int32_t scale_kind;
    int64_t k, kp;                /* inputs per row; the row length of X and of the decode buffer (kp >= k, kp % 16 == 0) */
    int64_t group;                /* inputs per scale (a multiple of 16 that divides k) */
} Format;

typedef struct {                  /* one weight matrix [rows, k] (an expert's gate, up or down projection) */
    const uint8_t *codes;         /* [rows, code_stride] */
    const void *scales;           /* [rows, k / group] */
    int64_t code_stride;          /* bytes per row (int4 pads rows to whole 32-bit words) */
    int64_t out_col;              /* where its rows land in a row of Y */
    float scale_div, scale_mul;   /* NVFP4's second-level scale: s / scale_div if scale_div != 0, else s * scale_mul */
} Matrix;

static float group_scale(const Format *f, const Matrix *m, int64_t row, int64_t g)
{
    int64_t i = row * (f->k / f->group) + g;
    float s;
    if (f->scale_kind == SCALE_F32) {
        s = ((const float *)m->scales)[i];
    } else if (f->scale_kind == SCALE_BF16) {            /* bf16 = the top half of a float32 */
        uint32_t bits = (uint32_t)((const uint16_t *)m->scales)[i] << 16;
        memcpy(&s, &bits, 4);
    } else {
        s = f->e4m3[((const uint8_t *)m->scales)[i]];
    }
    return m->scale_div != 0.0f ? s / m->scale_div : s * m->scale_mul;
}

/* 8 bytes of codes -> 16 code values: lanes 0-7 the low nibbles (even inputs), lanes 8-15 the high ones */
static inline i16 nibbles(const uint8_t *c)
{
    static const i16 shift = {0, 8, 16, 24, 0, 8, 16, 24, 4, 12, 20, 28, 4, 12, 20, 28};
    static const i16 from_hi = {0, 0, 0, 0, -1, -1, -1, -1, 0, 0, 0, 0, -1, -1, -1, -1};
    int32_t lo, hi;
    memcpy(&lo, c, 4);                                   /* bytes 0-3 */
    memcpy(&hi, c + 4, 4);                               /* bytes 4-7 */
    i16 words = (((i16){} + lo) & ~from_hi) | (((i16){} + hi) & from_hi);
    return (i16)((u16)words >> (u16)shift) & 15;
}

/* the numbers the codes stand for, computed without branches or tables (both vectorise) */
static inline v16 int4_values(i16 q) { return __builtin_convertvector(q - 8, v16); }

static inline v16 fp4_values(i16 q)                      /* FP4 E2M1: sign, 2 exponent bits, 1 mantissa bit */
{
    i16 e = (q >> 1) & 3, m = q & 1;
    v16 normal = __builtin_convertvector((2 + m) << e, v16) * 0.25f;  /* 1.m x 2^(e-1) */
    v16 subnormal = __builtin_convertvector(m, v16) * 0.5f;           /* e = 0: 0 or 0.5 */
    i16 is_normal = e != 0;                                            /* all ones or zero, per lane */
    i16 bits = ((i16)normal & is_normal) | ((i16)subnormal & ~is_normal);
    return (v16)(bits | (q >> 3) << 31);                               /* the sign bit (code 8 is -0) */
}

/* inputs 2j .. 2j + 15 of row `row` (bytes j .. j + 7): lanes 0-7 the even inputs, lanes 8-15 the odd ones.
 * Every group size is a multiple of 16, so the 16 share one scale. */
static inline v16 decode16(const Format *f, const Matrix *m, int64_t row, int64_t j)
{
    i16 q = nibbles(m->codes + row * m->code_stride + j);
    return (f->fp4 ? fp4_values(q) : int4_values(q)) * group_scale(f, m, row, j / (f->group / 2));
}

/* row `row` of matrix m, decoded into w[0 .. kp): the even inputs first (the low nibbles), then the odd
 * ones (the high nibbles), then zeros; X's columns come in the same order */
static void decode_row(const Format *f, const Matrix *m, int64_t row, float *w)
{
    const int64_t half = f->k / 2;                        /* bytes per row */
    for (int64_t j = 0; j < half; j += 8) {
        v16 v = decode16(f, m, row, j);
        *(v8 *)(w + j) = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);             /* even inputs */
        *(v8 *)(w + half + j) = __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15); /* odd inputs */
    }
    for (int64_t i = f->k; i < f->kp; i++)
        w[i] = 0.0f;
}

static float lane_sum(v16 a)                             /* lanes added in one fixed order */
{
    float s = 0.0f;
    for (int i = 0; i < 16; i++)
        s += a[i];
    return s;
}

/* rows [r0, r1) of matrix m times tokens [t0, t0 + n) of X (n a multiple of TOKENS) into Y */
static void item(const Format *f, const Matrix *m, int64_t r0, int64_t r1, int64_t t0, int64_t n,
                 const float *X, float *Y, int64_t ldy, float *w /* [ROWS * kp] */)
{
    const int64_t kp = f->kp;
    for (int64_t r = r0; r < r1; r += ROWS) {
        for (int i = 0; i < ROWS; i++)                    /* past r1: repeat the last row, store nothing */
            decode_row(f, m, r + i < r1 ? r + i : r1 - 1, w + i * kp);
        for (int64_t t = t0; t < t0 + n; t += TOKENS) {
            v16 acc[ROWS][TOKENS];
            memset(acc, 0, sizeof acc);
            for (int64_t k = 0; k < kp; k += 16) {
                v16 wv[ROWS], xv[TOKENS];
                for (int i = 0; i < ROWS; i++)
                    wv[i] = *(const v16 *)(w + i * kp + k);
                for (int j = 0; j < TOKENS; j++)
                    xv[j] = *(const v16 *)(X + (t + j) * kp + k);
                for (int i = 0; i < ROWS; i++)
                    for (int j = 0; j < TOKENS; j++)
                        acc[i][j] += wv[i] * xv[j];
            }
            for (int i = 0; i < ROWS && r + i < r1; i++)
                for (int j = 0; j < TOKENS; j++)
                    Y[(t + j) * ldy + m->out_col + r + i] = lane_sum(acc[i][j]);
        }
    }
}

/* rows [r0, r1) of matrix m widened into out [r1 - r0, k] float32, inputs in their own order: the same
 * values as formats.dequant_int4 / dequant_nvfp4, for the products that stay with the BLAS (the dense
 * layers, long prefills) */
void lowbit_widen(const Matrix *m, const Format *f, int64_t r0, int64_t r1, float *out)
{
    for (int64_t r = r0; r < r1; r++) {
        float *o = out + (r - r0) * f->k;
        for (int64_t j = 0; j < f->k / 2; j += 8) {
            v16 v = decode16(f, m, r, j);                 /* interleaved back: even, odd, even, ... */
            *(v16 *)(o + 2 * j) = __builtin_shufflevector(v, v, 0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        }
    }
}

/* items [n_items, 5] int64: (matrix, first row, end row, first token, tokens) -- returns 0; 1 when out of
 * memory; 2 when an item's tokens are not a whole number of tiles (the caller pads each expert's run) */
int lowbit_matmul(int64_t n_items, const int64_t *items, const Matrix *matrices, const Format *f,
                  const float *X, float *Y, int64_t ldy)
{
    for (int64_t i = 0; i < n_items; i++)
        if (items[5 * i + 4] % TOKENS)
            return 2;
    float *w = aligned_alloc(64, sizeof(float) * ROWS * f->kp);     /* kp % 16 == 0: whole cache lines */
    if (!w)
        return 1;
    for (int64_t i = 0; i < n_items; i++) {
        const int64_t *it = items + 5 * i;
        item(f, matrices + it[0], it[1], it[2], it[3], it[4], X, Y, ldy, w);
    }
    free(w);
    return 0;
}
