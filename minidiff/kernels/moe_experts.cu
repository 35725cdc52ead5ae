// Grouped MoE expert GEMMs on tensor cores: one launch for every expert's gate|up (GELU-tanh fused),
// one for every expert's down (routing weight fused). Loaded by minidiff/gpu.py with cupy.RawModule;
// the NumPy reference of what each kernel computes is minidiff/gpu.py:moe_reference, and
// tests/test_gpu_kernels.py checks the two against each other (docs/gpu.md explains the design).
//
// Work layout. The T·k (token, expert) assignments are sorted by expert on the host side: expert e owns
// the rows offsets[e] .. offsets[e+1]-1 of the sorted list, and row r reads token row_token[r].
// A thread block owns (expert e = blockIdx.y, 64 output features from blockIdx.x·64); each of its 4
// warps owns 16 features. The warp walks ALL of its expert's rows, 64 at a time (8 tiles of 8 rows kept
// in registers), so each weight byte is read from memory once per 64 rows (about 16 rows per expert at
// canvas 256 × top-8 / 128 experts: once).
//
// Operand swap. With so few rows per expert, the weights are the MMA's A operand (16 features = the m16
// side, used as stored: W[feature][k], k contiguous) and the token rows its B operand (8 rows = the n8
// side): mma.sync.m16n8k16 with bf16 inputs and float32 accumulation.
//
// Fragments of mma.m16n8k16 (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4·g + t:
//   A (16×16, row-major)  a0 = A[g][2t, 2t+1]   a1 = A[g+8][2t, 2t+1]   a2 = A[g][2t+8, 2t+9]   a3 = A[g+8][2t+8, 2t+9]
//   B (16×8, column)      b0 = B[2t, 2t+1][g]   b1 = B[2t+8, 2t+9][g]
//   C (16×8, float32)     c0, c1 = C[g][2t, 2t+1]                       c2, c3 = C[g+8][2t, 2t+1]
// so thread (g, t) loads two adjacent k of one weight row (a 32-bit word of two bf16) and of one token
// row, and ends with outputs for features g and g+8, rows 2t and 2t+1 of the 8-row tile.
//
// Weight formats (template parameter FMT):
//   FMT_BF16  W: uint16 [E, N, K] raw bfloat16 bits.
//   FMT_INT4  W: uint32 [E, N, K/8] compressed-tensors pack-quantized words (nibble i of word w = input
//             8w + i, code = q + 8) and float32 scales [E, N, K/G]. q - 8 is exact in bf16, so the MMA
//             multiplies the integer codes, and each group's partial sum is scaled in float32: the
//             result is W' = q·s times the bf16 activations, W' never rounded (docs/quantization.md).
//
// Determinism: no atomics, no split-K; every output element is written by one thread, summed in a fixed
// order. The same inputs give the same bits.

#define FMT_BF16 0
#define FMT_INT4 1

typedef unsigned int u32;
typedef unsigned short u16;

// float32 -> bfloat16 bits, round to nearest even (minidiff/tensors.py: f32_to_bf16_bits)
__device__ __forceinline__ u32 bf16_bits(float x) {
    u32 u = __float_as_uint(x);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0u;          // NaN
    return (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
}

__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {  // two bf16 in one word, lo in the low half
    return bf16_bits(lo) | (bf16_bits(hi) << 16);
}

__device__ __forceinline__ float gelu_tanh(float x) {            // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))
    return 0.5f * x * (1.0f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// D = A·B + D on tensor cores (bf16 in, float32 accumulate)
__device__ __forceinline__ void mma_bf16(float d[4], const u32 a[4], const u32 b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two int4 codes at nibbles i, i+1 of a word -> their q = code - 8 as a bf16 pair (exact small integers)
__device__ __forceinline__ u32 int4_pair(u32 word, int i) {
    float lo = (float)((int)((word >> (4 * i)) & 15u) - 8);
    float hi = (float)((int)((word >> (4 * i + 4)) & 15u) - 8);
    return pack_bf16(lo, hi);
}

// The A fragment of weight rows f+g and f+g+8 at k0 .. k0+15 (see the table above): f is the warp's first
// feature, g this thread's group, so the warp's 8 groups together load its 16 rows.
template <int FMT>
__device__ __forceinline__ void load_a(u32 a[4], const void* W, int f, int K, int k0, int g, int t) {
    f += g;
    if (FMT == FMT_BF16) {
        const u32* w = (const u32*)W;                                  // 2 bf16 per word; K is even
        int row0 = (f * K + k0) / 2 + t, row8 = ((f + 8) * K + k0) / 2 + t;
        a[0] = __ldg(w + row0);     a[1] = __ldg(w + row8);
        a[2] = __ldg(w + row0 + 4); a[3] = __ldg(w + row8 + 4);
    } else {
        const u32* w = (const u32*)W;                                  // 8 codes per word; k0 % 16 == 0
        int words = K / 8, q0 = f * words + k0 / 8, q8 = (f + 8) * words + k0 / 8;
        u32 w00 = __ldg(w + q0), w01 = __ldg(w + q0 + 1), w80 = __ldg(w + q8), w81 = __ldg(w + q8 + 1);
        a[0] = int4_pair(w00, 2 * t); a[1] = int4_pair(w80, 2 * t);
        a[2] = int4_pair(w01, 2 * t); a[3] = int4_pair(w81, 2 * t);
    }
}

// The B fragment of 8 token rows at k0 .. k0+15: row (tile base + g) of X [rows, K] (bf16 bits), 0 past the end.
__device__ __forceinline__ void load_b(u32 b[2], const u16* X, long row, int K, int k0, int t, bool valid) {
    if (!valid) { b[0] = b[1] = 0u; return; }
    const u32* x = (const u32*)(X + row * (long)K + k0);
    b[0] = __ldg(x + t);
    b[1] = __ldg(x + t + 4);
}

#define TILES 8          // 8 tiles of 8 rows: 64 rows per pass over the weights
#define WARPS 4          // 4 warps × 16 features = 64 features per block

// act[r, f] = gelu_tanh(gate_f · x_r) · (up_f · x_r) for every sorted assignment r of expert e, f < Ie.
//   W      gate_up weights [E, 2·Ie, H]: rows 0..Ie-1 gate, Ie..2Ie-1 up (int4: + scales [E, 2Ie, H/G])
//   X      [T, H] token activations as bf16 bits; row_token [A] the token of each sorted assignment
//   act    [A, Ie] output, bf16 bits (the input of the down GEMM)
// H % 16 == 0, Ie % 16 == 0, G % 16 == 0 (the host checks); grid (ceil(Ie / 64), E), block 128.
template <int FMT>
__device__ void gate_up_kernel(const void* W, const float* scales, const u16* X, const int* row_token,
                               const int* offsets, int H, int Ie, int G, u16* act) {
    const int e = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int f = blockIdx.x * (16 * WARPS) + warp * 16;             // this warp's first feature
    if (f >= Ie) return;
    const int begin = offsets[e], rows = offsets[e + 1] - begin;
    const long N = 2L * Ie;
    const void* We = FMT == FMT_BF16 ? (const void*)((const u16*)W + (long)e * N * H)
                                     : (const void*)((const u32*)W + (long)e * N * (H / 8));
    const float* Se = FMT == FMT_INT4 ? scales + (long)e * N * (H / G) : 0;
    const int step = FMT == FMT_INT4 ? G : H;                         // k per scale group (bf16: one group)

    for (int r0 = 0; r0 < rows; r0 += 8 * TILES) {
        float gate[TILES][4], up[TILES][4];
        #pragma unroll
        for (int i = 0; i < TILES; i++)
            #pragma unroll
            for (int j = 0; j < 4; j++) gate[i][j] = up[i][j] = 0.f;
        for (int k1 = 0; k1 < H; k1 += step) {                        // one scale group at a time
            float pg[TILES][4], pu[TILES][4];                         // the group's partial sums
            #pragma unroll
            for (int i = 0; i < TILES; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) pg[i][j] = pu[i][j] = 0.f;
            for (int k0 = k1; k0 < k1 + step; k0 += 16) {
                u32 ag[4], au[4];
                load_a<FMT>(ag, We, f, H, k0, g, t);
                load_a<FMT>(au, We, Ie + f, H, k0, g, t);
                #pragma unroll
                for (int i = 0; i < TILES; i++) {
                    if (r0 + 8 * i >= rows) break;                    // warp-uniform
                    int r = r0 + 8 * i + g;
                    u32 b[2];
                    load_b(b, X, r < rows ? row_token[begin + r] : 0, H, k0, t, r < rows);
                    mma_bf16(pg[i], ag, b);
                    mma_bf16(pu[i], au, b);
                }
            }
            // scales of features f+g and f+g+8 (gate rows f.., up rows Ie+f..) for this group
            float sg0 = 1.f, sg8 = 1.f, su0 = 1.f, su8 = 1.f;
            if (FMT == FMT_INT4) {
                int groups = H / G, q = k1 / G;
                sg0 = Se[(long)(f + g) * groups + q];       sg8 = Se[(long)(f + g + 8) * groups + q];
                su0 = Se[(long)(Ie + f + g) * groups + q];  su8 = Se[(long)(Ie + f + g + 8) * groups + q];
            }
            #pragma unroll
            for (int i = 0; i < TILES; i++) {
                gate[i][0] += sg0 * pg[i][0]; gate[i][1] += sg0 * pg[i][1];
                gate[i][2] += sg8 * pg[i][2]; gate[i][3] += sg8 * pg[i][3];
                up[i][0] += su0 * pu[i][0];   up[i][1] += su0 * pu[i][1];
                up[i][2] += su8 * pu[i][2];   up[i][3] += su8 * pu[i][3];
            }
        }
        #pragma unroll
        for (int i = 0; i < TILES; i++) {                             // epilogue: GELU(gate) · up, bf16 out
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                int r = r0 + 8 * i + 2 * t + (j & 1), feature = f + g + (j >= 2 ? 8 : 0);
                if (r < rows)
                    act[(long)(begin + r) * Ie + feature] = (u16)bf16_bits(gelu_tanh(gate[i][j]) * up[i][j]);
            }
        }
    }
}

// out[r, f] = route_weight[r] · (down_f · act_r) for every sorted assignment r of expert e, f < H.
//   W      down weights [E, H, Ie] (int4: + scales [E, H, Ie/G]);  act [A, Ie] bf16 bits
//   out    [A, H] float32, one row per sorted assignment (the host sums each token's k rows in order)
// grid (ceil(H / 64), E), block 128.
template <int FMT>
__device__ void down_kernel(const void* W, const float* scales, const u16* act, const float* route_weight,
                            const int* offsets, int H, int Ie, int G, float* out) {
    const int e = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int f = blockIdx.x * (16 * WARPS) + warp * 16;
    if (f >= H) return;
    const int begin = offsets[e], rows = offsets[e + 1] - begin;
    const void* We = FMT == FMT_BF16 ? (const void*)((const u16*)W + (long)e * H * Ie)
                                     : (const void*)((const u32*)W + (long)e * H * (Ie / 8));
    const float* Se = FMT == FMT_INT4 ? scales + (long)e * H * (Ie / G) : 0;
    const int step = FMT == FMT_INT4 ? G : Ie;

    for (int r0 = 0; r0 < rows; r0 += 8 * TILES) {
        float acc[TILES][4];
        #pragma unroll
        for (int i = 0; i < TILES; i++)
            #pragma unroll
            for (int j = 0; j < 4; j++) acc[i][j] = 0.f;
        for (int k1 = 0; k1 < Ie; k1 += step) {
            float p[TILES][4];
            #pragma unroll
            for (int i = 0; i < TILES; i++)
                #pragma unroll
                for (int j = 0; j < 4; j++) p[i][j] = 0.f;
            for (int k0 = k1; k0 < k1 + step; k0 += 16) {
                u32 a[4];
                load_a<FMT>(a, We, f, Ie, k0, g, t);
                #pragma unroll
                for (int i = 0; i < TILES; i++) {
                    if (r0 + 8 * i >= rows) break;
                    int r = r0 + 8 * i + g;
                    u32 b[2];
                    load_b(b, act, begin + r, Ie, k0, t, r < rows);
                    mma_bf16(p[i], a, b);
                }
            }
            float s0 = 1.f, s8 = 1.f;
            if (FMT == FMT_INT4) {
                int groups = Ie / G, q = k1 / G;
                s0 = Se[(long)(f + g) * groups + q];
                s8 = Se[(long)(f + g + 8) * groups + q];
            }
            #pragma unroll
            for (int i = 0; i < TILES; i++) {
                acc[i][0] += s0 * p[i][0]; acc[i][1] += s0 * p[i][1];
                acc[i][2] += s8 * p[i][2]; acc[i][3] += s8 * p[i][3];
            }
        }
        #pragma unroll
        for (int i = 0; i < TILES; i++) {
            #pragma unroll
            for (int j = 0; j < 4; j++) {
                int r = r0 + 8 * i + 2 * t + (j & 1), feature = f + g + (j >= 2 ? 8 : 0);
                if (r < rows)
                    out[(long)(begin + r) * H + feature] = route_weight[begin + r] * acc[i][j];
            }
        }
    }
}

extern "C" {
__global__ void __launch_bounds__(128) moe_gate_up_bf16(const u16* W, const u16* X, const int* row_token,
        const int* offsets, int H, int Ie, u16* act) {
    gate_up_kernel<FMT_BF16>(W, 0, X, row_token, offsets, H, Ie, 16, act);
}
__global__ void __launch_bounds__(128) moe_gate_up_int4(const u32* W, const float* scales, const u16* X,
        const int* row_token, const int* offsets, int H, int Ie, int G, u16* act) {
    gate_up_kernel<FMT_INT4>(W, scales, X, row_token, offsets, H, Ie, G, act);
}
__global__ void __launch_bounds__(128) moe_down_bf16(const u16* W, const u16* act, const float* route_weight,
        const int* offsets, int H, int Ie, float* out) {
    down_kernel<FMT_BF16>(W, 0, act, route_weight, offsets, H, Ie, 16, out);
}
__global__ void __launch_bounds__(128) moe_down_int4(const u32* W, const float* scales, const u16* act,
        const float* route_weight, const int* offsets, int H, int Ie, int G, float* out) {
    down_kernel<FMT_INT4>(W, scales, act, route_weight, offsets, H, Ie, G, out);
}
}
