"""The GPU path: weights that stay compact on the device, and the products they offer the model.

`model.py` is the same forward on both backends. What differs on a GPU lives here, in the weight types:

    DeviceHalf     a bf16 tensor as its raw 16-bit words on the device (the embedding / tied head, and every
                   Linear whose float32 values are all bf16 values); widened per use into a scratch buffer,
                   or (precision "bf16": `bf16_gemm`) multiplied by cuBLAS bf16 GEMMs on the words
    DeviceInt4     an int4 Linear (compressed-tensors layout): packed words + scales, dequantized per use
    DeviceExperts  fused experts [E, rows, in], bf16 or int4. In precision "fp32" they widen per use like any
                   stored tensor (ops.experts groups the tokens and multiplies in float32, exactly as on the
                   CPU). In "bf16" (`bf16_moe`) their `moe` runs the whole MoE on the grouped tensor-core
                   kernels of minidiff/kernels/moe_experts.cu, with bf16 activations.

`to_device(weight, precision)` picks the type; `minidiff.load(..., device="cuda", precision=...)` calls it.
Nothing here runs without CuPy, but the classes take any array module, so their host-side logic is
tested with NumPy too.
"""

from __future__ import annotations

import numpy as np

from .errors import MinidiffError
from .formats import Int4Weight, QuantExperts, dequant_int4
from .kernels.moe_experts import moe_experts
from .tensors import HalfTensor, Stored, bf16_to_f32, f32_to_bf16_bits

PRECISIONS = ("fp32", "bf16")


# ----------------------------------------------------------------------------------------------
# weight types


class DeviceHalf(Stored):
    """bf16 [rows, ...] as raw words on the device; expand_into widens the asked rows (exact).

    `bf16_gemm` (precision "bf16"): ops.linear / tied_head / soft_embedding call `linear` and `rmatmul`
    instead, cuBLAS bf16 GEMMs on the raw words with float32 accumulation and output (the activations
    rounded to bf16, as in the reference's bf16 model)."""

    def __init__(self, raw, name="?", xp=None, bf16_gemm=False):
        self.xp = xp or _cupy()
        self.raw, self.name, self.dtype, self.bf16_gemm = self.xp.asarray(raw), name, "BF16", bf16_gemm
        self.shape, self.nbytes = tuple(self.raw.shape), int(self.raw.nbytes)

    def expand_into(self, index, out):
        rows = self.raw[index] if isinstance(index, slice) else self.raw[self.xp.asarray(index)]
        out[...] = bf16_to_f32(rows).reshape(out.shape)
        return out

    def linear(self, x):
        """x [T, K] float32 @ Wᵀ (W [N, K]) -> [T, N] float32."""
        N, K = self.shape
        return gemm_bf16(self.raw, f32_to_bf16_bits(x), N, x.shape[0], K, transpose_w=True)

    def rmatmul(self, p):
        """p [T, N] float32 @ W (W [N, K]) -> [T, K] float32."""
        N, K = self.shape
        return gemm_bf16(self.raw, f32_to_bf16_bits(p), K, p.shape[0], N, transpose_w=False)


class DeviceInt4(Stored):
    """A [N, K] int4 Linear on the device: words uint32 [N, K/8] (nibble i = input 8w + i, code q + 8) and
    float32 scales [N, K/G]; expand_into gives q · s in float32 (the values `formats.dequant_int4` gives)."""

    def __init__(self, words, scales, shape, group, name="?", xp=None):
        self.xp = xp or _cupy()
        self.words = self.xp.asarray(np.ascontiguousarray(words).view(np.uint32))
        self.scales = self.xp.asarray(np.asarray(scales, dtype=np.float32))
        self.shape, self.group, self.name = tuple(shape), int(group), name
        self.nbytes = int(self.words.nbytes + self.scales.nbytes)

    def expand_into(self, index, out):
        xp = self.xp
        idx = index if isinstance(index, slice) else xp.asarray(index)
        out[...] = dequant_int4(self.words[idx], self.scales[idx], self.shape[-1], xp).reshape(out.shape)
        return out


class DeviceExperts(Stored):
    """Fused experts [E, N, K] on the device, bf16 words or int4 words + scales.

    fmt "bf16": raw uint16 [E, N, K].  fmt "int4": words uint32 [E, N, K/8], scales float32 [E, N, K/G].
    `bf16_moe` (precision "bf16"): `moe` runs the whole MoE on the grouped kernels; otherwise the experts
    widen per use.
    """

    def __init__(self, fmt, data, shape, scales=None, group=None, bf16_moe=False, name="?", xp=None):
        self.xp = xp or _cupy()
        self.fmt, self.shape, self.group, self.bf16_moe, self.name = fmt, tuple(shape), group, bf16_moe, name
        self.data = self.xp.asarray(data)
        self.scales = None if scales is None else self.xp.asarray(scales, dtype=self.xp.float32)  # host or device
        self.nbytes = int(self.data.nbytes + (0 if scales is None else self.scales.nbytes))

    def expand_into(self, index, out):
        xp = self.xp
        idx = index if isinstance(index, slice) else xp.asarray(index)
        if self.fmt == "bf16":
            out[...] = bf16_to_f32(self.data[idx]).reshape(out.shape)
        else:
            out[...] = dequant_int4(self.data[idx], self.scales[idx], self.shape[-1], xp).reshape(out.shape)
        return out

    def moe(self, x, idx, weight, down: "DeviceExperts"):
        """The routed experts on the grouped kernels (precision "bf16"), else None (ops.experts widens)."""
        return moe_experts(self, down, x, idx, weight) if self.bf16_moe else None


def gemm_bf16(w_bits, x_bits, m: int, n: int, k: int, transpose_w: bool):
    """cublasGemmEx on bf16 words, float32 accumulation and output. Row-major Y [n, m] = X [n, k] @ op(W):
    cuBLAS is column-major, so it computes Yᵀ = op(W)ᵀ Xᵀ, with W [m, k] (transpose_w: x @ Wᵀ) or
    W [k, m] (p @ W) read in place."""
    import cupy
    from cupy_backends.cuda.libs import cublas
    R_16BF, R_32F, COMPUTE_32F, OP_N, OP_T, DEFAULT = 14, 0, 68, 0, 1, -1
    y = cupy.empty((n, m), dtype=cupy.float32)
    one, zero = np.ones(1, np.float32), np.zeros(1, np.float32)
    cublas.gemmEx(cupy.cuda.device.get_cublas_handle(), OP_T if transpose_w else OP_N, OP_N, m, n, k,
                  one.ctypes.data, w_bits.data.ptr, R_16BF, k if transpose_w else m,
                  x_bits.data.ptr, R_16BF, k, zero.ctypes.data, y.data.ptr, R_32F, m, COMPUTE_32F, DEFAULT)
    return y


# ----------------------------------------------------------------------------------------------
# from host weights to device weights


def to_device(w, name: str, precision: str = "fp32", xp=None):
    """The device form of one weight as the loader made it (a float32 array, HalfTensor, or formats type)."""
    xp = xp or _cupy()
    if precision not in PRECISIONS:
        raise MinidiffError(f"unknown precision {precision!r} (choose {' or '.join(PRECISIONS)})")
    bf16 = precision == "bf16"
    experts = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
    if isinstance(w, HalfTensor) and w.dtype == "BF16":
        raw = np.ascontiguousarray(w.raw)
        return DeviceExperts("bf16", raw, w.shape, bf16_moe=bf16, name=name, xp=xp) if experts \
            else DeviceHalf(raw, name, xp, bf16_gemm=bf16 and w.raw.ndim == 2)
    if isinstance(w, QuantExperts) and all(isinstance(p, Int4Weight) for ps in w.parts for p in ps):
        words = np.stack([np.concatenate([np.asarray(p.packed) for p in ps]) for ps in w.parts])
        scales = np.stack([np.concatenate([p._scale(slice(None)) for p in ps]) for ps in w.parts])
        group = w.parts[0][0].group_size
        return DeviceExperts("int4", words.view(np.uint32), w.shape, scales, group, bf16, name, xp)
    if isinstance(w, Int4Weight):
        return DeviceInt4(np.asarray(w.packed), w._scale(slice(None)), w.shape, w.group_size, name, xp)
    if isinstance(w, Stored):                      # NVFP4, f16: float32 on the device (no kernels for them yet)
        return xp.asarray(w.dequantize())
    a = np.asarray(w, dtype=np.float32)
    if a.ndim >= 2 and a.size >= 4096:             # a Linear: keep it as bf16 words when that is exact
        bits = f32_to_bf16_bits(a)
        if np.array_equal(bf16_to_f32(bits), a, equal_nan=True):
            return DeviceHalf(bits, name, xp, bf16_gemm=bf16 and a.ndim == 2)
    return xp.asarray(a)


def _cupy():
    import cupy
    return cupy
