"""The GPU path's host side, run with NumPy standing in for CuPy (no GPU needed): the device weight types
(gpu.py) give the CPU model's logits, and the MoE kernels' routing plan and combine step, around a NumPy
statement of what each kernel computes per sorted row, equal `moe_reference` and the float32 experts up to
the documented bf16 rounding of the activations."""

from pathlib import Path

import numpy as np
import pytest

import minidiff
from minidiff import gpu
from minidiff.kernels.moe_experts import check_shapes, combine, expert_rows
from minidiff.kernels.moe_experts_reference import moe_reference
from minidiff.model import Model
from minidiff.ops import experts, gelu_tanh
from minidiff.tensors import bf16_to_f32, f32_to_bf16_bits
from minidiff.weights import load_text_weights, open_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "tiny"


def device_model(folder, precision="fp32"):
    """The model as minidiff.load(device="cuda") builds it, with NumPy arrays in place of CuPy ones."""
    cpu = minidiff.load(folder)
    weights = load_text_weights(open_checkpoint(cpu.folder), cpu.config)
    dev = {k: gpu.to_device(v, k, precision, xp=np) for k, v in weights.items()}
    return cpu, Model(cpu.config, dev, folder=cpu.folder, xp=np), dev


def test_device_weight_types_are_compact_and_give_the_cpu_logits(tmp_path):
    cpu, dev_model, dev = device_model(GOLDEN)
    emb = dev["model.decoder.embed_tokens.weight"]
    assert isinstance(emb, gpu.DeviceHalf) and emb.raw.dtype == np.uint16
    assert isinstance(dev["model.decoder.layers.0.experts.gate_up_proj"], gpu.DeviceExperts)
    assert isinstance(dev["model.decoder.layers.0.self_attn.q_proj.weight"], gpu.DeviceHalf)   # bf16 values
    prompt, canvas = [2, 105, 7, 19, 250, 3, 44, 12], [17, 0, 1, 106, 9]
    c1, c2 = cpu.encode(prompt), dev_model.encode(prompt)
    a = cpu.denoise(canvas, c1)
    np.testing.assert_allclose(dev_model.denoise(canvas, c2), a, rtol=0, atol=1e-5 * max(1, np.abs(a).max()))
    res1, res2 = cpu.generate(prompt, seed=3, max_new_tokens=16), dev_model.generate(prompt, seed=3, max_new_tokens=16)
    assert (res1.tokens[0] == res2.tokens[0]).all() and res1.steps_per_canvas == res2.steps_per_canvas


def test_int4_experts_on_the_device_dequantize_like_the_cpu(tmp_path):
    from minidiff.cli import main
    assert main(["quantize", "default", str(tmp_path / "q"), "--scope", "experts"]) == 0
    cpu, dev_model, dev = device_model(tmp_path / "q")
    gu = dev["model.decoder.layers.1.experts.gate_up_proj"]
    assert gu.fmt == "int4" and gu.data.dtype == np.uint32
    ids = np.array([3, 0, 5])
    want = cpu.layers[1]["experts.gate_up_proj"].expand_into(ids, np.empty((3,) + gu.shape[1:], np.float32))
    np.testing.assert_array_equal(gu.expand_into(ids, np.empty_like(want)), want)
    ids = [2, 105, 449, 447, 433]
    np.testing.assert_allclose(dev_model.denoise(ids, dev_model.encode(ids)), cpu.denoise(ids, cpu.encode(ids)),
                               rtol=0, atol=1e-4)


def kernels_in_numpy(gate_up, down, x, plan, T, k):
    """What moe_gate_up / moe_down compute for each sorted row r (expert e of r), in NumPy."""
    Ie = gate_up.shape[1] // 2
    xb = bf16_to_f32(f32_to_bf16_bits(x))
    rows = np.zeros((plan.A, down.shape[1]), np.float32)
    for e in range(gate_up.shape[0]):
        for r in range(plan.offsets[e], plan.offsets[e + 1]):
            gu = gate_up[e] @ xb[plan.row_token[r]]
            act = bf16_to_f32(f32_to_bf16_bits(gelu_tanh(np, gu[:Ie].copy()) * gu[Ie:]))
            rows[r] = plan.route_weight[r] * (down[e] @ act)
    return combine(np, rows, plan, T, k)


@pytest.mark.parametrize("T, E, k", [(1, 4, 1), (37, 8, 3), (64, 16, 8), (5, 32, 2)])
def test_route_plan_and_combine_around_the_kernel_contract(T, E, k):
    rng = np.random.default_rng(T * 100 + E)
    H, Ie = 32, 16
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    w = rng.random((T, k)).astype(np.float32)
    gu = bf16_to_f32(f32_to_bf16_bits(rng.standard_normal((E, 2 * Ie, H)).astype(np.float32) * 0.3))
    dn = bf16_to_f32(f32_to_bf16_bits(rng.standard_normal((E, H, Ie)).astype(np.float32) * 0.3))
    plan = expert_rows(np, idx, w, E)
    assert plan.offsets[-1] == T * k and (np.diff(plan.offsets) >= 0).all()
    owner = np.repeat(np.arange(E), np.diff(plan.offsets))              # the expert owning each sorted row
    assert (idx.reshape(-1)[plan.order] == owner).all() and (plan.row_token == plan.order // k).all()
    got = kernels_in_numpy(gu, dn, x, plan, T, k)
    ref = moe_reference(x, idx, w, gu, dn)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-5 * max(1, np.abs(ref).max()))
    full = experts(np, x, idx, w, gu, dn)                  # float32 activations: only bf16 rounding apart
    assert np.abs(full - ref).max() <= 2e-2 * max(1, np.abs(full).max())


def test_kernel_shape_requirements():
    check_shapes((8, 64, 64), 32)
    with pytest.raises(minidiff.MinidiffError, match="divisible by 16"):
        check_shapes((8, 30, 64), None)
