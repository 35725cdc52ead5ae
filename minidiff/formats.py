"""Low-bit weight formats: int4 (W4A16) and NVFP4, bit by bit, and the packed tensors that hold them.

Everything here is plain NumPy and exact: every function below is the readable specification of a
format, and the kernels that read one (minidiff/kernels/) decode it to the same bits. Which format a
checkpoint's module uses, its config says: schemes.py reads that. Three on-disk formats are read:

  (a) compressed-tensors `pack-quantized` int4        (what `minidiff quantize` writes)
  (b) NVFP4, NVIDIA ModelOpt convention               (nvidia/diffusiongemma-26B-A4B-it-NVFP4)
  (c) NVFP4, compressed-tensors `nvfp4-pack-quantized` (RedHatAI/diffusiongemma-26B-A4B-it-NVFP4)

All three keep a Linear weight W [out, in] (PyTorch layout, y = x @ W.T) quantized in groups of
consecutive elements along the INPUT dimension, one scale per (row, group).

int4, compressed-tensors `pack-quantized` (symmetric, group strategy)
---------------------------------------------------------------------
    q[o, i] = clamp(round_half_even(W[o, i] / s[o, i // g]), -8, 7)        int4 in [-8, 7]
    W'[o, i] = q[o, i] * s[o, i // g]                                       (dequantized)

  tensors of a module `M` (e.g. `model.decoder.layers.3.self_attn.q_proj`):
    M.weight_packed  I32  [out, ceil(in / 8)]   eight 4-bit codes per int32
    M.weight_scale   BF16/F16/F32 [out, in / g] one scale per group of g inputs
    M.weight_shape   I64 (or I32) [2]           = (out, in)

  the code of an element is u = q + 8 (0..15, "offset binary"). Word j of a row holds inputs
  8j .. 8j+7, the lowest nibble first:

      bit:   31..28  27..24  23..20  19..16  15..12  11..8   7..4    3..0
      input: 8j+7    8j+6    8j+5    8j+4    8j+3    8j+2    8j+1    8j+0

  i.e. word = sum_k u[8j + k] << (4k), stored as a little-endian int32 (so codes >= 8 in the top
  nibble make the int32 negative: only the bits matter). When `in` is not a multiple of 8 the row is
  padded with code 0 (not 8). `weight_zero_point` exists only for asymmetric schemes: unsupported.

NVFP4 (both conventions)
------------------------
  element: FP4 E2M1, one nibble = s m2 m1 m0 (bit 3 = sign, bits 0-2 = magnitude index):

      index:  0    1    2    3    4    5    6    7
      value:  0   0.5  1.0  1.5  2.0  3.0  4.0  6.0          (sign bit set: the negative value)

  two elements per uint8, the EVEN (first) input in the LOW nibble:
      byte[o, j] = code[o, 2j] | (code[o, 2j + 1] << 4)         -> weight [out, in / 2] U8
  group: 16 consecutive inputs share one FP8 E4M3 scale            -> weight_scale [out, in / 16] F8_E4M3
  FP8 E4M3 ("fn" variant, bias 7, no infinities) of a byte s eeee mmm:
      e == 0:                 (-1)^s * (m / 8) * 2^-6              (subnormal; 0x00 = 0)
      e == 15 and m == 7:     NaN                                 (0x7F, 0xFF)
      otherwise:              (-1)^s * (1 + m / 8) * 2^(e - 7)    (max 448 = 0x7E)
  and a per-tensor second-level F32 scale, with opposite conventions:
    (b) ModelOpt:           M.weight, M.weight_scale, M.weight_scale_2 (+ M.input_scale, unused)
                            W'[o, i] = fp4[o, i] * (scale[o, i // 16] * weight_scale_2)
    (c) compressed-tensors: M.weight_packed, M.weight_scale, M.weight_global_scale (+ input_global_scale)
                            W'[o, i] = fp4[o, i] * (scale[o, i // 16] / weight_global_scale)
  (the bracket is one float32 operation, then the product with fp4 is exact in float32.)

Fused experts
-------------
The release stores the routed experts fused: `…experts.gate_up_proj` [E, 2*Ie, H] (rows 0:Ie = gate,
Ie:2Ie = up) and `…experts.down_proj` [E, H, Ie]. Quantized checkpoints (ours, and the published
NVFP4 ones, as vLLM's Gemma 4 loader expects) store them UNFUSED, one Linear per expert and
projection, under the same prefix:
    …experts.{e}.gate_proj.<tensors>   [Ie, H]     = gate_up_proj[e, :Ie]
    …experts.{e}.up_proj.<tensors>     [Ie, H]     = gate_up_proj[e, Ie:]
    …experts.{e}.down_proj.<tensors>   [H, Ie]     = down_proj[e]
with <tensors> those of the format (weight_packed/weight_scale/weight_shape for int4, …).

Loading (`schemes.load_quantized`) keeps the packed bytes (memory-mapped) and dequantizes per use:
`QuantTensor.dequantize()` for a 2-D weight, `experts[e]` for one expert of a 3-D stack.
"""

from __future__ import annotations

import numpy as np

from .errors import MinidiffError
from .tensors import Stored, bf16_to_f32, to_float32

# ================================================================================================
# int4: pack / unpack / quantize / dequantize
# ================================================================================================

INT4_OFFSET = 8  # code = q + 8


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int4 values q in [-8, 7] (any integer dtype) [..., n] -> int32 [..., ceil(n / 8)].

    Word j holds q[..., 8j + k] + 8 in bits 4k .. 4k+3 (lowest nibble first); padding codes are 0.
    """
    q = np.asarray(q)
    if q.size and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack_int4: values outside [-8, 7]")
    n = q.shape[-1]
    words = -(-n // 8)
    codes = np.zeros(q.shape[:-1] + (words * 8,), dtype=np.uint32)  # padding code 0
    codes[..., :n] = q.astype(np.int32) + INT4_OFFSET
    codes = codes.reshape(q.shape[:-1] + (words, 8))                    # [..., words, 8]
    shifts = np.arange(0, 32, 4, dtype=np.uint32)                       # 0, 4, ..., 28
    packed = np.bitwise_or.reduce(codes << shifts, axis=-1)            # [..., words] uint32
    return packed.view(np.int32)


def unpack_int4(packed, n: int, xp=np):
    """int32 (or uint32) words [..., ceil(n / 8)] -> int8 [..., n] in [-8, 7] (the inverse of `pack_int4`);
    xp: the array module of `packed` (NumPy or CuPy)."""
    if packed.dtype not in (xp.int32, xp.uint32) or packed.shape[-1] != -(-n // 8):
        raise ValueError(f"unpack_int4: expected int32 [..., {-(-n // 8)}], got {packed.dtype} {list(packed.shape)}")
    u = xp.ascontiguousarray(packed).view(xp.uint32)[..., None]        # [..., words, 1]
    shifts = xp.arange(0, 32, 4, dtype=xp.uint32)
    codes = ((u >> shifts) & 0xF).astype(xp.int8)                       # [..., words, 8]
    return codes.reshape(packed.shape[:-1] + (-1,))[..., :n] - INT4_OFFSET


def int4_scales(w: np.ndarray, group_size: int, scale_dtype: str = "F32") -> np.ndarray:
    """Symmetric per-group scales of W [out, in] -> float32 [out, in / g], exactly representable in
    `scale_dtype` ("BF16", "F16" or "F32").

    s = max|W_group| / 7.5 (compressed-tensors' min-max rule: the range [-8, 7] has half-width 7.5),
    rounded UP to the scale dtype so that |W / s| <= 7.5 holds exactly: then every element rounds
    within half a step, |W - q*s| <= s/2. An all-zero group gets the dtype's epsilon (as
    compressed-tensors does), which quantizes it to zeros.
    """
    out, n = w.shape
    if n % group_size:
        raise ValueError(f"int4_scales: in_features {n} is not a multiple of group_size {group_size}")
    absmax = np.abs(w.reshape(out, n // group_size, group_size)).max(axis=-1).astype(np.float64)
    s = round_up_to(absmax / 7.5, scale_dtype)
    eps = {"BF16": 2.0 ** -7, "F16": 2.0 ** -10, "F32": 2.0 ** -23}[scale_dtype]
    return np.where(s == 0, np.float32(eps), s).astype(np.float32)


def quantize_int4(w: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """W [out, in] and scales [out, in / g] -> int8 q [out, in] in [-8, 7].

    q = clamp(round_half_even(W / s), -8, 7). The division is done in float64, where it is exact
    enough never to move a quotient across a rounding boundary (W and s have <= 24-bit mantissas),
    so q is the correctly rounded value; compressed-tensors' compressor gives the same q when fed
    the same W and s in float64 (or in float32 for all but astronomically rare ties).
    """
    out, n = w.shape
    g = n // scale.shape[-1]
    x = w.astype(np.float64).reshape(out, n // g, g) / scale.astype(np.float64)[..., None]
    return np.clip(np.rint(x), -8, 7).astype(np.int8).reshape(out, n)


def dequant_int4(packed, scale, in_features: int, xp=np):
    """weight_packed int32 [..., out, ceil(in / 8)] and weight_scale [..., out, in / g] (float32 values) ->
    float32 [..., out, in]: W' = q * s (exact in float32 for bf16/f16 scales). Any leading axes (experts);
    xp: NumPy or CuPy (gpu.py widens device weights with it)."""
    q = unpack_int4(packed, in_features, xp)                             # [..., out, in] int8
    groups = scale.shape[-1]
    w = q.reshape(q.shape[:-1] + (groups, in_features // groups)).astype(xp.float32) \
        * scale.astype(xp.float32)[..., None]
    return w.reshape(q.shape)


def dequant_int4_into(packed: np.ndarray, scale: np.ndarray, out: np.ndarray) -> np.ndarray:
    """`dequant_int4` written into out [rows, in] float32, with the same values bit for bit, in fewer passes:
    on a little-endian machine byte t of a row holds inputs 2t (low nibble) and 2t + 1 (high nibble), so
    each nibble plane is masked as bytes and cast straight into every other float of `out`."""
    R, n = out.shape
    if n % 2 or np.little_endian is False:
        out[...] = dequant_int4(packed, scale, n)
        return out
    b = np.ascontiguousarray(packed).view(np.uint8)[:, : n // 2]      # [R, n/2] two codes per byte
    pairs = out.reshape(R, n // 2, 2)
    q = np.empty(b.shape, dtype=np.int8)
    u = q.view(np.uint8)
    for plane, shift in ((0, 0), (1, 4)):                               # low nibble: even input; high: odd
        np.right_shift(b, shift, out=u)
        u &= 15
        q -= INT4_OFFSET                                                # code -> q in [-8, 7]
        np.copyto(pairs[..., plane], q, casting="unsafe")               # exact small integers
    groups = scale.shape[-1]
    out.reshape(R, groups, n // groups)[...] *= scale.astype(np.float32, copy=False)[..., None]
    return out


# ================================================================================================
# float formats: bf16 / fp8 E4M3 / fp4 E2M1
# ================================================================================================

# (bf16 <-> f32: tensors.bf16_to_f32 / f32_to_bf16_bits, the one statement of the bf16 widening)


def round_up_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """Nonnegative values (float64) -> the smallest value >= x representable in `dtype`, as float64."""
    x = np.asarray(x, dtype=np.float64)
    if dtype == "F32":
        y = x.astype(np.float32)
        y = np.where(y.astype(np.float64) < x, np.nextafter(y, np.float32(np.inf)), y)
    elif dtype == "F16":
        y = x.astype(np.float16)
        y = np.where(y.astype(np.float64) < x, np.nextafter(y, np.float16(np.inf)), y)
    elif dtype == "BF16":
        f = x.astype(np.float32)
        f = np.where(f.astype(np.float64) < x, np.nextafter(f, np.float32(np.inf)), f)  # f >= x
        u = f.view(np.uint32)
        up = (u & 0xFFFF) != 0                                  # not already a bf16 value
        y = ((u >> 16) + up.astype(np.uint32)).astype(np.uint16)  # truncate, then one bf16 ulp up
        y = bf16_to_f32(y)
    else:
        raise ValueError(f"round_up_to: unknown dtype {dtype!r}")
    return y.astype(np.float64)


def _e4m3_table() -> np.ndarray:
    """The 256 FP8 E4M3 ("fn") values, indexed by byte."""
    b = np.arange(256)
    s, e, m = b >> 7, (b >> 3) & 0xF, b & 0x7
    mag = np.where(e == 0, m / 8.0 * 2.0 ** -6, (1 + m / 8.0) * 2.0 ** (e - 7.0))
    mag = np.where((e == 15) & (m == 7), np.nan, mag)
    return np.where(s == 1, -mag, mag).astype(np.float32)


E4M3 = _e4m3_table()
E4M3_MAX = 448.0


def e4m3_to_f32(bits: np.ndarray) -> np.ndarray:
    """FP8 E4M3 bytes (uint8) -> float32."""
    return E4M3[np.asarray(bits, dtype=np.uint8)]


def f32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """float -> FP8 E4M3 bytes, round to nearest, ties to even (torch's `.to(torch.float8_e4m3fn)`),
    saturating at +-448 (torch gives NaN from 464 up; scales here never get there)."""
    x = np.asarray(x, dtype=np.float64)
    mags = E4M3[:127].astype(np.float64)          # codes 0..126: 0 .. 448, increasing
    a = np.minimum(np.abs(x), E4M3_MAX)
    hi = np.clip(np.searchsorted(mags, a, side="left"), 0, 126)   # first mag >= a
    lo = np.maximum(hi - 1, 0)
    dlo, dhi = a - mags[lo], mags[hi] - a
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))          # tie -> even mantissa
    code = np.where(pick_hi, hi, lo).astype(np.uint8) | (np.signbit(x).astype(np.uint8) << 7)
    return np.where(np.isnan(x), np.uint8(0x7F), code).astype(np.uint8)


FP4_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], dtype=np.float32)
# all 16 nibbles: index | sign << 3
FP4_TABLE = np.concatenate([FP4_VALUES, -FP4_VALUES]).astype(np.float32)
FP4_MAX = 6.0


def fp4_encode(x: np.ndarray) -> np.ndarray:
    """float -> FP4 E2M1 nibble codes (uint8, 0..15): clamp to +-6, round to nearest, ties to even
    mantissa (0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4), sign bit = x < 0 (so a small
    negative value that rounds to zero is stored as -0, code 8, as compressed-tensors does)."""
    x = np.asarray(x, dtype=np.float64)
    a = np.minimum(np.abs(x), FP4_MAX)
    # boundaries between consecutive magnitudes; `right` says whether the boundary goes up
    idx = np.zeros(a.shape, dtype=np.uint8)
    for bound, up_on_tie in ((0.25, False), (0.75, True), (1.25, False), (1.75, True),
                             (2.5, False), (3.5, True), (5.0, False)):
        idx += (a >= bound) if up_on_tie else (a > bound)
    return idx | ((x < 0).astype(np.uint8) << 3)


def pack_nvfp4(codes: np.ndarray) -> np.ndarray:
    """FP4 codes uint8 [..., n] (n even) -> uint8 [..., n / 2]: byte j = code[2j] | code[2j+1] << 4."""
    codes = np.asarray(codes, dtype=np.uint8)
    if codes.shape[-1] % 2:
        raise ValueError("pack_nvfp4: the last dimension must be even")
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nvfp4(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> FP4 codes uint8 [..., 2m] (low nibble first)."""
    packed = np.asarray(packed, dtype=np.uint8)
    return np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))


NVFP4_GROUP = 16


def nvfp4_global_scale(w: np.ndarray) -> np.float32:
    """compressed-tensors' per-tensor global scale: 448 * 6 / max|W| (float32). ModelOpt's
    weight_scale_2 is the reciprocal convention, max|W| / (6 * 448)."""
    amax = np.float32(max(float(np.abs(w).max()), float(np.finfo(np.float32).tiny)))
    return np.float32(np.float32(E4M3_MAX * FP4_MAX) / amax)


def quantize_nvfp4(w: np.ndarray, global_scale=None, scale_2=None):
    """W [out, in] -> (packed uint8 [out, in/2], scale F8_E4M3 bytes [out, in/16]).

    Exactly one of `global_scale` (compressed-tensors: the effective group scale is s / gs) or
    `scale_2` (ModelOpt: s * scale_2) is given. Group scale s = fp8(max|W_group| / 6 * gs) (or
    / scale_2), an all-zero group gets fp8's epsilon 0.125; then codes = fp4(W / (s / gs)) with the
    divisions in float32, as compressed-tensors and ModelOpt compute them.
    """
    if (global_scale is None) == (scale_2 is None):
        raise ValueError("quantize_nvfp4: give exactly one of global_scale, scale_2")
    out, n = w.shape
    if n % NVFP4_GROUP:
        raise ValueError(f"quantize_nvfp4: in_features {n} is not a multiple of {NVFP4_GROUP}")
    w = np.asarray(w, dtype=np.float32)
    wg = w.reshape(out, n // NVFP4_GROUP, NVFP4_GROUP)
    local = np.abs(wg).max(axis=-1) / np.float32(FP4_MAX)                     # float32
    if global_scale is not None:
        local = np.float32(global_scale) * local
    else:
        local = local / np.float32(scale_2)
    scale_bits = f32_to_e4m3(local)
    scale_bits = np.where(scale_bits == 0, np.uint8(0x20), scale_bits)          # 0x20 = 0.125
    s = e4m3_to_f32(scale_bits)
    eff = s / np.float32(global_scale) if global_scale is not None else s * np.float32(scale_2)
    codes = fp4_encode((wg / eff[..., None]).astype(np.float32))
    return pack_nvfp4(codes.reshape(out, n)), scale_bits


def dequant_nvfp4(packed: np.ndarray, scale_bits: np.ndarray, global_scale=None, scale_2=None) -> np.ndarray:
    """weight [out, in/2] U8 + weight_scale [out, in/16] F8_E4M3 bytes + one second-level scale ->
    float32 [out, in]. compressed-tensors: W' = fp4 * (s / global_scale); ModelOpt: W' = fp4 * (s * scale_2)."""
    vals = FP4_TABLE[unpack_nvfp4(packed)]                                     # [out, in] float32
    out, n = vals.shape
    eff = nvfp4_group_scales(scale_bits, global_scale, scale_2)                # [out, in/16]
    return (vals.reshape(out, -1, NVFP4_GROUP) * eff[..., None]).reshape(out, n)


def nvfp4_group_scales(scale_bits: np.ndarray, global_scale=None, scale_2=None) -> np.ndarray:
    """The float32 scale of each group of 16: s / global_scale (compressed-tensors) or s * scale_2 (ModelOpt),
    s the FP8 E4M3 byte's value."""
    if (global_scale is None) == (scale_2 is None):
        raise ValueError("dequant_nvfp4: give exactly one of global_scale, scale_2")
    s = e4m3_to_f32(scale_bits)                                                # [out, in/16]
    eff = s / np.float32(global_scale) if global_scale is not None else s * np.float32(scale_2)
    return eff


# ================================================================================================
# quantized tensors held packed in memory
# ================================================================================================

class QuantTensor(Stored):
    """A weight kept packed; widened on use through `expand_into` (tensors.Stored); `nbytes` = packed bytes.
    A 2-D format defines `_numpy_rows`; one row is a block of one."""

    kernel_widen = None   # kernel_widen(rows, out) -> bool, bound by the loader (kernels/lowbit_matmul.py)

    def _expand_one(self, i, out):
        self._expand_rows(slice(i, i + 1), out[None])

    def _expand_rows(self, rows: slice, out: np.ndarray) -> None:
        """A 2-D format's rows: through the CPU kernel's decoder where one is bound and reads the format (the
        same values in one pass), else the format's NumPy statement `_numpy_rows`."""
        if self.kernel_widen is None or not self.kernel_widen(rows, out):
            self._numpy_rows(rows, out)


def check_finite(scale: np.ndarray, name: str, where: str):
    if not np.isfinite(scale).all():
        raise MinidiffError(f"{where}: {name} holds non-finite scales")


class Int4Weight(QuantTensor):
    """One [out, in] Linear in compressed-tensors pack-quantized int4."""

    def __init__(self, name, packed, scale_raw, scale_dtype, shape, group_size, where=""):
        self.name, self.packed, self.scale_raw, self.scale_dtype = name, packed, scale_raw, scale_dtype
        self.shape, self.group_size, self.where = tuple(shape), group_size, where
        self.nbytes = int(packed.nbytes + scale_raw.nbytes)

    def _scale(self, rows) -> np.ndarray:
        scale = to_float32(self.scale_raw[rows], self.scale_dtype)
        check_finite(scale, self.name + ".weight_scale", self.where)
        return scale

    def _numpy_rows(self, rows: slice, out: np.ndarray) -> None:
        dequant_int4_into(self.packed[rows], self._scale(rows), out)


class NVFP4Weight(QuantTensor):
    """One [out, in] Linear in NVFP4 (either convention)."""

    def __init__(self, name, packed, scale_bits, shape, global_scale=None, scale_2=None, where=""):
        self.name, self.packed, self.scale_bits, self.shape = name, packed, scale_bits, tuple(shape)
        self.global_scale, self.scale_2, self.where = global_scale, scale_2, where
        self.nbytes = int(packed.nbytes + scale_bits.nbytes + 4)

    def _numpy_rows(self, rows: slice, out: np.ndarray) -> None:
        out[...] = dequant_nvfp4(self.packed[rows], self.scale_bits[rows], self.global_scale, self.scale_2)
        check_finite(out, self.name, self.where)  # NaN scale bytes (0x7F) or a zero global scale


class QuantExperts(QuantTensor):
    """A fused expert tensor [E, rows, in] kept as E x (one or more) packed [r, in] parts, stacked
    along the rows: gate_up_proj[e] = concat(gate_proj_e, up_proj_e); down_proj[e] = down_proj_e.
    `expand_into(ids, out)` widens the experts `ids` only, one expert per thread."""

    def __init__(self, name, parts: list[list[QuantTensor]], shape):
        self.name, self.parts, self.shape = name, parts, tuple(shape)
        self.nbytes = sum(p.nbytes for ps in parts for p in ps)

    def _expand_one(self, e, out):
        r = 0
        for p in self.parts[e]:                     # gate rows, then up rows (or the one down part)
            p._expand_rows(slice(0, p.shape[0]), out[r:r + p.shape[0]])
            r += p.shape[0]
