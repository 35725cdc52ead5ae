"""The GPU path: weights that stay compact on the device, and the CUDA kernels they dispatch to.

`model.py` is the same forward on both backends. What differs on a GPU lives here, in the weight types:

    DeviceHalf     a bf16 tensor as its raw 16-bit words on the device (the embedding / tied head, and every
                   Linear whose float32 values are all bf16 values); widened per use into a scratch buffer,
                   or (precision "bf16") multiplied by cuBLAS bf16 GEMMs on the words
    DeviceInt4     an int4 Linear (compressed-tensors layout): packed words + scales, dequantized per use
    DeviceExperts  fused experts [E, rows, in], bf16 or int4. In exact mode they widen per use like any stored
                   tensor (model.experts groups the tokens and multiplies in float32, exactly as on the CPU).
                   In "bf16" mode `model.experts` hands them the whole MoE (`run`): the grouped tensor-core
                   kernels of kernels_cuda/moe_experts.cu, with bf16 activations.

`to_device(weight, precision)` picks the type; `minidiff.load(..., device="cuda", precision=...)` calls it.
`moe_reference` is the NumPy statement of what the kernels compute (tests/test_gpu_kernels.py).
Nothing here runs without CuPy, but the classes take any array module, so their host-side logic is
tested with NumPy too.
"""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import MinidiffError
from .quant import dequant_int4
from .tensors import HalfTensor, Stored, bf16_to_f32, f32_to_bf16_bits

KERNELS = Path(__file__).resolve().parents[1] / "kernels_cuda"
PRECISIONS = ("fp32", "bf16")
BLOCK_FEATURES, BLOCK_THREADS = 64, 128      # moe_experts.cu: 4 warps × 16 features per block


@lru_cache(maxsize=None)
def module(name: str):
    """kernels_cuda/<name>.cu compiled by CuPy (NVRTC), once per process."""
    import cupy
    path = KERNELS / f"{name}.cu"
    if not path.is_file():
        raise MinidiffError(f"{path}: missing (the CUDA kernels ship in the repository's kernels_cuda/; "
                            "install minidiff from a clone with pip install -e .)")
    return cupy.RawModule(code=path.read_text(), options=("-std=c++14",))


# ----------------------------------------------------------------------------------------------
# weight types


class DeviceHalf(Stored):
    """bf16 [rows, ...] as raw words on the device; expand_into widens the asked rows (exact).

    `fast` (precision "bf16"): model.linear / tied_head / soft_embedding call `linear` and `rmatmul`
    instead, cuBLAS bf16 GEMMs on the raw words with float32 accumulation and output (the activations
    rounded to bf16, as in the reference's bf16 model)."""

    def __init__(self, raw, name="?", xp=None, fast=False):
        self.xp = xp or _cupy()
        self.raw, self.name, self.dtype, self.fast = self.xp.asarray(raw), name, "BF16", fast
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
    float32 scales [N, K/G]; expand_into gives q · s in float32 (the values `quant.dequant_int4` gives)."""

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
    `kernels` (precision "bf16") routes the whole MoE through `run`; otherwise the experts widen per use.
    """

    def __init__(self, fmt, data, shape, scales=None, group=None, kernels=False, name="?", xp=None):
        self.xp = xp or _cupy()
        self.fmt, self.shape, self.group, self.kernels, self.name = fmt, tuple(shape), group, kernels, name
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

    def run(self, x, idx, weight, down: "DeviceExperts"):
        """The routed experts of model.experts on the grouped kernels: x [T, H] float32, idx/weight [T, k]
        -> [T, H] float32. Activations are rounded to bf16 for the tensor cores (moe_reference states it)."""
        xp = self.xp
        T, k = idx.shape
        E, N, H = self.shape
        Ie = N // 2
        check_shapes(self.shape, self.group if self.fmt == "int4" else None)
        plan = route_plan(xp, idx, weight, E)
        xb = f32_to_bf16_bits(x)                                          # [T, H] bf16 words
        act = xp.empty((plan.A, Ie), dtype=xp.uint16)
        rows = xp.empty((plan.A, H), dtype=xp.float32)
        mod = module("moe_experts")
        i32 = np.int32
        if self.fmt == "bf16":
            mod.get_function("moe_gate_up_bf16")(
                (math.ceil(Ie / BLOCK_FEATURES), E), (BLOCK_THREADS,),
                (self.data, xb, plan.row_token, plan.offsets, i32(H), i32(Ie), act))
            mod.get_function("moe_down_bf16")(
                (math.ceil(H / BLOCK_FEATURES), E), (BLOCK_THREADS,),
                (down.data, act, plan.route_weight, plan.offsets, i32(H), i32(Ie), rows))
        else:
            mod.get_function("moe_gate_up_int4")(
                (math.ceil(Ie / BLOCK_FEATURES), E), (BLOCK_THREADS,),
                (self.data, self.scales, xb, plan.row_token, plan.offsets, i32(H), i32(Ie), i32(self.group), act))
            mod.get_function("moe_down_int4")(
                (math.ceil(H / BLOCK_FEATURES), E), (BLOCK_THREADS,),
                (down.data, down.scales, act, plan.route_weight, plan.offsets, i32(H), i32(Ie),
                 i32(down.group), rows))
        return combine(xp, rows, plan, T, k)


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
# the host side of the MoE kernels (any array module)


class RoutePlan:
    """The T·k assignments sorted by expert: expert e owns sorted rows offsets[e] .. offsets[e+1] - 1;
    sorted row r is assignment order[r], of token row_token[r], with weight route_weight[r]."""

    def __init__(self, order, row_token, route_weight, offsets):
        self.order, self.row_token, self.route_weight, self.offsets = order, row_token, route_weight, offsets
        self.A = int(order.shape[0])


def route_plan(xp, idx, weight, E: int) -> RoutePlan:
    T, k = idx.shape
    flat = idx.reshape(-1)
    order = xp.argsort(flat)                                              # any order within an expert will do
    counts = xp.bincount(flat, minlength=E)
    offsets = xp.concatenate([xp.zeros(1, dtype=counts.dtype), xp.cumsum(counts)]).astype(xp.int32)
    return RoutePlan(order, (order // k).astype(xp.int32), weight.reshape(-1)[order].astype(xp.float32), offsets)


def combine(xp, rows, plan: RoutePlan, T: int, k: int):
    """rows [A, H] in sorted order -> [T, H]: back to assignment order (t·k + j), then each token's k rows
    summed in order j = 0 .. k-1 (a fixed order: the same bits every run)."""
    y = xp.empty_like(rows)
    y[plan.order] = rows
    y = y.reshape(T, k, -1)
    out = y[:, 0].copy()
    for j in range(1, k):
        out += y[:, j]
    return out


def moe_reference(x, idx, weight, gate_up, down):
    """What the kernels compute, in NumPy: gate_up [E, 2Ie, H] and down [E, H, Ie] float32 weight VALUES
    (bf16 values, or q · s of int4); x [T, H] float32.

        xb  = bf16(x)                                   activations rounded to bf16 (nearest even)
        act = bf16(gelu_tanh(gate · xb) · (up · xb))    float32 products and sums, rounded to bf16
        out = Σ_j weight_j · (down · act_j)             the k experts of each token, in order

    The kernels' sums run in another order (tensor-core blocks of 16), so the results agree to float32
    rounding, except where an `act` value sits at a bf16 rounding boundary: the stated bound of
    tests/test_gpu_kernels.py covers one bf16 step there.
    """
    from .model import gelu_tanh
    T, k = idx.shape
    Ie = gate_up.shape[1] // 2
    xb = bf16_to_f32(f32_to_bf16_bits(np.asarray(x, np.float32)))
    out = np.zeros((T, down.shape[1]), np.float32)
    for j in range(k):
        e = idx[:, j]
        gu = np.einsum("tnh,th->tn", gate_up[e], xb)                        # [T, 2Ie]
        act = bf16_to_f32(f32_to_bf16_bits(gelu_tanh(np, gu[:, :Ie].copy()) * gu[:, Ie:]))
        out += weight[:, j:j + 1] * np.einsum("thi,ti->th", down[e], act)
    return out


# ----------------------------------------------------------------------------------------------
# from host weights to device weights


def to_device(w, name: str, precision: str = "fp32", xp=None):
    """The device form of one weight as the loader made it (a float32 array, HalfTensor, or quant type)."""
    from . import quant
    xp = xp or _cupy()
    if precision not in PRECISIONS:
        raise MinidiffError(f"unknown precision {precision!r} (choose {' or '.join(PRECISIONS)})")
    kernels = precision == "bf16"
    experts = name.endswith(("experts.gate_up_proj", "experts.down_proj"))
    if isinstance(w, HalfTensor) and w.dtype == "BF16":
        raw = np.ascontiguousarray(w.raw)
        return DeviceExperts("bf16", raw, w.shape, kernels=kernels, name=name, xp=xp) if experts \
            else DeviceHalf(raw, name, xp, fast=kernels and w.raw.ndim == 2)
    if isinstance(w, quant.QuantExperts) and all(isinstance(p, quant.Int4Weight) for ps in w.parts for p in ps):
        words = np.stack([np.concatenate([np.asarray(p.packed) for p in ps]) for ps in w.parts])
        scales = np.stack([np.concatenate([p._scale(slice(None)) for p in ps]) for ps in w.parts])
        group = w.parts[0][0].group_size
        return DeviceExperts("int4", words.view(np.uint32), w.shape, scales, group, kernels, name, xp)
    if isinstance(w, quant.Int4Weight):
        return DeviceInt4(np.asarray(w.packed), w._scale(slice(None)), w.shape, w.group_size, name, xp)
    if isinstance(w, Stored):                      # NVFP4, f16: float32 on the device (no kernels for them yet)
        return xp.asarray(w.dequantize())
    a = np.asarray(w, dtype=np.float32)
    if a.ndim >= 2 and a.size >= 4096:             # a Linear: keep it as bf16 words when that is exact
        bits = f32_to_bf16_bits(a)
        if np.array_equal(bf16_to_f32(bits), a, equal_nan=True):
            return DeviceHalf(bits, name, xp, fast=kernels and a.ndim == 2)
    return xp.asarray(a)


def check_shapes(gate_up_shape, group) -> None:
    """The kernels' requirements: H, Ie multiples of 16; int4 groups multiples of 16 dividing K."""
    E, N, H = gate_up_shape
    Ie = N // 2
    if H % 16 or Ie % 16 or (group is not None and (group % 16 or H % group or Ie % group)):
        raise MinidiffError(f"the MoE kernels need hidden size and expert width divisible by 16 (and by the "
                            f"int4 group size); got H={H}, Ie={Ie}, group={group}: use precision 'fp32'")


def _cupy():
    import cupy
    return cupy
