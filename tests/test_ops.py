"""Unit checks of single ops against plain, obviously-correct NumPy (no torch needed)."""

import numpy as np
from hypothesis import given, settings, strategies as st

import minidiff.reference_ops as plain
from minidiff.ops import attention, causal_attention, experts, gelu_tanh
from minidiff.tensors import HalfTensor, bf16_to_f32, f32_to_bf16_bits


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 40), cached=st.integers(0, 12), window=st.one_of(st.none(), st.integers(2, 9)),
       block=st.integers(1, 17), seed=st.integers(0, 999))
def test_blocked_causal_attention_equals_full_masked_attention(T, cached, window, block, seed):
    rng = np.random.default_rng(seed)
    nh, nkv, hd = 4, 2, 8
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    k = rng.standard_normal((cached + T, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((cached + T, nkv, hd)).astype(np.float32)
    start = 5 + cached
    positions, key_positions = np.arange(start, start + T), np.arange(5, start + T)
    mask = key_positions[None] <= positions[:, None]
    if window is not None:
        mask &= key_positions[None] > positions[:, None] - window
    want = plain.attention(q, k, v, mask)
    np.testing.assert_allclose(attention(np, q, k, v, mask), want, rtol=1e-5, atol=1e-5)
    got = causal_attention(np, q, k, v, positions, key_positions, window, block=block)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@settings(max_examples=40, deadline=None)
@given(T=st.integers(1, 30), E=st.integers(1, 9), seed=st.integers(0, 999), data=st.data())
def test_grouped_experts_equal_a_per_token_loop(T, E, seed, data):
    k = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    H, Ie = 8, 6
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    w = rng.random((T, k)).astype(np.float32)
    gu = rng.standard_normal((E, 2 * Ie, H)).astype(np.float32)
    dn = rng.standard_normal((E, H, Ie)).astype(np.float32)
    want = np.zeros((T, H))
    for t in range(T):
        for j in range(k):
            g = gu[idx[t, j]] @ x[t]
            want[t] += w[t, j] * (dn[idx[t, j]] @ (gelu_tanh(np, g[:Ie]) * g[Ie:]))
    np.testing.assert_allclose(experts(np, x, idx, w, gu, dn), want, rtol=1e-4, atol=1e-5)

    # stored bf16 experts: only the experts in use are widened, `chunk` at a time (chunk 2 forces several
    # groups with ragged counts); the values are the bf16-rounded weights
    gu16, dn16 = HalfTensor(f32_to_bf16_bits(gu), "BF16"), HalfTensor(f32_to_bf16_bits(dn), "BF16")
    gu_r, dn_r = bf16_to_f32(gu16.raw), bf16_to_f32(dn16.raw)
    want16 = experts(np, x, idx, w, gu_r, dn_r)
    for chunk in (1, 2, 16):
        np.testing.assert_allclose(experts(np, x, idx, w, gu16, dn16, chunk=chunk), want16, rtol=1e-5, atol=1e-6)


def test_gelu_tanh_known_values():
    """Values of torch.nn.functional.gelu(x, approximate="tanh"), written down."""
    x = np.array([-1.0, 0.0, 1.0, 2.0], np.float32)
    want = np.array([-0.15880800939172324, 0.0, 0.8411919906082768, 1.9545976940877752])
    np.testing.assert_allclose(gelu_tanh(np, x), want, rtol=2e-6, atol=1e-7)
