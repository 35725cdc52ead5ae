"""The MoE kernels' test cases, drawn the same way for the GPU (tests/test_gpu_kernels.py) and for their
lane-by-lane replay on the CPU (minidiff/kernels/moe_experts_emulator.py, tests/test_kernel_emulator.py)."""

import numpy as np

from minidiff.kernels.moe_experts_emulator import moe
from minidiff.kernels.moe_experts_reference import moe_reference
from minidiff.tensors import bf16_to_f32, f32_to_bf16_bits


def random_experts(rng, fmt, E, N, K, G):
    """Random experts [E, N, K] in `fmt` -> (bf16 bits [E, N, K] or int4 words [E, N, K/8], scales
    [E, N, K/G] or None, float32 weight values [E, N, K]); tests/test_gpu_kernels.py draws its cases with it."""
    if fmt == "bf16":
        bits = f32_to_bf16_bits((0.2 * rng.standard_normal((E, N, K))).astype(np.float32))
        return bits, None, bf16_to_f32(bits)
    codes = rng.integers(0, 16, size=(E, N, K)).astype(np.uint32)
    words = np.zeros((E, N, K // 8), np.uint32)
    for i in range(8):
        words |= codes[..., i::8] << np.uint32(4 * i)
    scales = bf16_to_f32(f32_to_bf16_bits(rng.uniform(0.01, 0.05, (E, N, K // G)).astype(np.float32)))
    values = (codes.astype(np.float32) - 8).reshape(E, N, K // G, G) * scales[..., None]
    return words, scales, values.reshape(E, N, K)


def check(fmt, T, E, k, H, Ie, G, empty, seed=None):
    """max |kernel replay - moe_reference| and max |reference| on the GPU test's draw of this case."""
    rng = np.random.default_rng(T + E + H if seed is None else seed)
    gu, gu_s, gu_v = random_experts(rng, fmt, E, 2 * Ie, H, G)
    dn, dn_s, dn_v = random_experts(rng, fmt, E, H, Ie, G)
    live = rng.permutation(E)[empty:] if empty < E else np.arange(E)
    idx = np.stack([rng.choice(live, k, replace=False) for _ in range(T)])
    w = rng.random((T, k)).astype(np.float32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ref = moe_reference(x, idx, w, gu_v, dn_v)
    got = moe(fmt, gu, gu_s, dn, dn_s, x, idx, w, H, Ie, G)
    return float(np.abs(got - ref).max()), float(np.abs(ref).max())


if __name__ == "__main__":          # python tests/moe_cases.py: the GPU test's cases that fit, replayed
    for case in [(1, 4, 1, 64, 16, 16, 0), (37, 8, 3, 80, 48, 16, 2), (70, 2, 2, 32, 16, 16, 0)]:
        for fmt in ("bf16", "int4"):
            err, top = check(fmt, *case)
            print(f"{fmt:<5} T, E, k, H, Ie, G, empty = {case}:  max |Δ| {err:.3g}  (max |ref| {top:.3g})")
