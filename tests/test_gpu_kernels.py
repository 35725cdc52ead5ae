"""The CUDA kernels against their NumPy reference, and the GPU model against the CPU model.
Run where a GPU and CuPy are present; skipped, with the reason, elsewhere.

Kernels (minidiff/kernels/moe_experts.cu vs moe_reference): bf16 and int4 weights; ragged expert counts,
empty experts, row counts that are not multiples of the 8-row tiles or the 64-row passes, feature counts
that are not multiples of the 64-feature blocks; output buffers poisoned with NaN beforehand; the same bits
on a second run. Stated bound: max |Δ| <= 2e-3 · max(1, max |reference|) (float32 sums in another order,
plus at most one bf16 step where an activation sits on a rounding boundary).
Model: fp32 logits within 1e-4 relative of NumPy and the same trajectories; "bf16" (the kernels) within
a stated bound and the same memorised answer on the default model.
"""

from pathlib import Path

import numpy as np
import pytest

from gpu_only import cupy_with_a_gpu  # noqa: E402

cupy = cupy_with_a_gpu()

import minidiff  # noqa: E402
from minidiff import gpu  # noqa: E402
from minidiff.tensors import bf16_to_f32, f32_to_bf16_bits  # noqa: E402

import moe_cases  # noqa: E402
from minidiff.kernels import moe_experts  # noqa: E402
from minidiff.kernels.moe_experts_reference import moe_reference  # noqa: E402

GOLDEN = Path(__file__).parent / "golden" / "tiny"
BOUND = 2e-3


def random_experts(rng, fmt, E, N, K, G):
    """-> (DeviceExperts, float32 weight values [E, N, K]) with random bf16 or int4 weights (the draw of
    minidiff/kernels/moe_experts_emulator.py, which replays these same cases on the CPU)."""
    data, scales, values = moe_cases.random_experts(rng, fmt, E, N, K, G)
    group = G if fmt == "int4" else None
    return gpu.DeviceExperts(fmt, data, (E, N, K), scales, group, bf16_moe=True, xp=cupy), values


CASES = [  # T, E, k, H, Ie, G, experts left empty
    (1, 4, 1, 64, 16, 16, 0),
    (37, 8, 3, 80, 48, 16, 2),          # H, Ie not multiples of the 64-feature blocks; ragged rows
    (256, 16, 8, 128, 64, 32, 3),       # 128 rows per expert on average: several 64-row passes
    (300, 128, 8, 96, 32, 32, 40),      # many empty experts
]


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
@pytest.mark.parametrize("T, E, k, H, Ie, G, empty", CASES)
def test_moe_kernels_equal_the_reference(fmt, T, E, k, H, Ie, G, empty):
    rng = np.random.default_rng(T + E + H)
    gate_up, gu_vals = random_experts(rng, fmt, E, 2 * Ie, H, G)
    down, dn_vals = random_experts(rng, fmt, E, H, Ie, G)
    live = rng.permutation(E)[empty:] if empty < E else np.arange(E)
    idx = np.stack([rng.choice(live, k, replace=False) for _ in range(T)])
    w = rng.random((T, k)).astype(np.float32)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ref = moe_reference(x, idx, w, gu_vals, dn_vals)

    got = gate_up.moe(cupy.asarray(x), cupy.asarray(idx), cupy.asarray(w), down)
    got = cupy.asnumpy(got)
    assert np.isfinite(got).all()
    err, tol = float(np.abs(got - ref).max()), BOUND * max(1.0, float(np.abs(ref).max()))
    assert err <= tol, f"max |Δ| {err:.3g} > {tol:.3g}"
    again = cupy.asnumpy(gate_up.moe(cupy.asarray(x), cupy.asarray(idx), cupy.asarray(w), down))
    assert np.array_equal(got.view(np.uint32), again.view(np.uint32)), "not deterministic"


def test_every_row_is_written_over_poisoned_buffers():
    rng = np.random.default_rng(0)
    T, E, k, H, Ie = 21, 8, 2, 80, 48
    gate_up, _ = random_experts(rng, "bf16", E, 2 * Ie, H, 16)
    down, _ = random_experts(rng, "bf16", E, H, Ie, 16)
    idx = cupy.asarray(np.stack([rng.choice(E, k, replace=False) for _ in range(T)]))
    rows_of = moe_experts.expert_rows(cupy, idx, cupy.asarray(rng.random((T, k)).astype(np.float32)), E)
    xb = f32_to_bf16_bits(cupy.asarray(rng.standard_normal((T, H)).astype(np.float32)))
    act = cupy.full((rows_of.A, Ie), 0x7FC0, dtype=cupy.uint16)             # bf16 NaN everywhere
    rows = cupy.full((rows_of.A, H), np.nan, dtype=cupy.float32)
    mod = moe_experts.module()
    mod.get_function("moe_gate_up_bf16")((1, E), (128,), (gate_up.data, xb, rows_of.row_token, rows_of.offsets,
                                                           np.int32(H), np.int32(Ie), act))
    mod.get_function("moe_down_bf16")((2, E), (128,), (down.data, act, rows_of.route_weight, rows_of.offsets,
                                                        np.int32(H), np.int32(Ie), rows))
    assert not bool(cupy.isnan(bf16_to_f32(act)).any()) and not bool(cupy.isnan(rows).any())


def test_fp32_on_the_gpu_equals_the_cpu():
    cpu, dev = minidiff.load(GOLDEN), minidiff.load(GOLDEN, device="cuda")
    prompt, canvas = [2, 105, 7, 19, 250, 3, 44, 12, 9, 8], [17, 0, 1, 106, 9, 5, 5, 5]
    a = cpu.denoise(canvas, cpu.encode(prompt))
    b = cupy.asnumpy(dev.denoise(canvas, dev.encode(prompt)))
    assert np.abs(a - b).max() <= 1e-4 * max(1.0, float(np.abs(a).max()))
    r1, r2 = cpu.generate(prompt, seed=5, max_new_tokens=16), dev.generate(prompt, seed=5, max_new_tokens=16)
    assert (r1.tokens[0] == r2.tokens[0]).all() and r1.steps_per_canvas == r2.steps_per_canvas


def test_weights_stay_compact_on_the_gpu():
    dev = minidiff.load(None, device="cuda")
    emb = dev.embed_tokens
    assert isinstance(emb, gpu.DeviceHalf) and emb.raw.dtype == cupy.uint16
    assert isinstance(dev.layers[0]["experts.gate_up_proj"], gpu.DeviceExperts)


@pytest.mark.parametrize("quantized", [False, True])
def test_bf16_kernels_on_the_default_model(tmp_path, quantized):
    folder = None
    if quantized:
        from minidiff.cli import main
        assert main(["quantize", "default", str(tmp_path / "q"), "--scope", "experts"]) == 0
        folder = tmp_path / "q"
    cpu, fast = minidiff.load(folder), minidiff.load(folder, device="cuda", precision="bf16")
    ids = [2, 105, 449, 447, 433, 446, 437, 451, 438, 16]
    a = cpu.denoise(ids, cpu.encode(ids))
    b = cupy.asnumpy(fast.denoise(ids, fast.encode(ids)))
    assert np.abs(a - b).max() <= 5e-2 * max(1.0, float(np.abs(a).max()))     # bf16 activations in the MoE
    assert (a.argmax(-1) == b.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("T, N, K", [(1, 64, 48), (37, 300, 80), (256, 2048, 512)])
def test_bf16_gemms_of_device_weights(T, N, K):
    """DeviceHalf.linear (x @ Wᵀ) and .rmatmul (p @ W): cuBLAS bf16 with float32 accumulation, against
    float64 on the bf16-rounded inputs; ‖Δ‖/‖ref‖ well under bf16's own 4e-3."""
    rng = np.random.default_rng(T + N)
    bits = f32_to_bf16_bits(rng.standard_normal((N, K)).astype(np.float32))
    w = gpu.DeviceHalf(bits, "w", xp=cupy, bf16_gemm=True)
    W = bf16_to_f32(bits).astype(np.float64)
    x = rng.standard_normal((T, K)).astype(np.float32)
    p = rng.standard_normal((T, N)).astype(np.float32)
    xb = bf16_to_f32(f32_to_bf16_bits(x)).astype(np.float64)
    pb = bf16_to_f32(f32_to_bf16_bits(p)).astype(np.float64)
    for got, ref in ((w.linear(cupy.asarray(x)), xb @ W.T), (w.rmatmul(cupy.asarray(p)), pb @ W)):
        got = cupy.asnumpy(got)
        assert got.shape == ref.shape and got.dtype == np.float32
        assert np.linalg.norm(got - ref) <= 1e-5 * np.linalg.norm(ref)
