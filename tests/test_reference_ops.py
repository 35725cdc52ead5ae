"""Every fast op in model.py equals its plain version in minidiff/reference_ops.py, on random shapes."""

from types import SimpleNamespace

import numpy as np
from hypothesis import given, settings, strategies as st

import minidiff.ops as fast
import minidiff.reference_ops as plain


def close(got, want, tol=2e-5):
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * max(1.0, float(np.abs(want).max())))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 9), H=st.sampled_from([4, 8, 16]))
def test_norm_activation_softmax_softcap(seed, T, H):
    rng = np.random.default_rng(seed)
    x = (3 * rng.standard_normal((T, H))).astype(np.float32)
    w = rng.uniform(0.5, 1.5, H).astype(np.float32)
    close(fast.rms_norm(np, x, w), plain.rms_norm(x, w))
    close(fast.rms_norm(np, x), plain.rms_norm(x))
    close(fast.gelu_tanh(np, x.copy()), plain.gelu_tanh(x))
    close(fast.softmax(np, x), plain.softmax(x))
    close(fast.softcap(np, (20 * x).copy(), 30.0), plain.softcap(20 * x, 30.0))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 7), n=st.integers(1, 3), half=st.integers(1, 6),
       start=st.integers(0, 5000), proportional=st.booleans())
def test_rope(seed, T, n, half, start, proportional):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, n, 2 * half)).astype(np.float32)
    inv = (1.0 / 10000 ** (np.arange(half) / half)).astype(np.float32)
    if proportional:
        inv[half // 2:] = 0                                 # pairs that do not rotate
    pos = np.arange(start, start + T)
    close(fast.rope(np, x, pos, inv), plain.rope(x, pos, inv), tol=1e-4)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 12), cached=st.integers(0, 9),
       heads=st.sampled_from([(4, 2), (4, 1), (2, 2)]), window=st.one_of(st.none(), st.integers(2, 6)))
def test_attention_bidirectional_and_causal(seed, T, cached, heads, window):
    rng = np.random.default_rng(seed)
    nh, nkv, hd = heads[0], heads[1], 8
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    k = rng.standard_normal((cached + T, nkv, hd)).astype(np.float32)
    v = rng.standard_normal((cached + T, nkv, hd)).astype(np.float32)
    close(fast.attention(np, q, k, v), plain.attention(q, k, v))            # the denoiser: no mask
    pos, kpos = np.arange(cached, cached + T), np.arange(cached + T)
    close(fast.causal_attention(np, q, k, v, pos, kpos, window, block=3),
          plain.causal_attention(q, k, v, pos, kpos, window))


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10**6), T=st.integers(1, 10), E=st.integers(1, 8), data=st.data())
def test_router_and_experts(seed, T, E, data):
    k = data.draw(st.integers(1, E))
    rng = np.random.default_rng(seed)
    H, Ie = 8, 6
    res = rng.standard_normal((T, H)).astype(np.float32)
    w = {"router.scale": rng.uniform(0.5, 1.5, H).astype(np.float32),
         "router.proj.weight": rng.standard_normal((E, H)).astype(np.float32),
         "router.per_expert_scale": rng.uniform(0.5, 1.5, E).astype(np.float32)}
    cfg = SimpleNamespace(rms_norm_eps=1e-6, hidden_size=H, top_k_experts=k)   # what route reads
    idx, weight = fast.route(np, res, w, cfg)
    ridx, rweight = plain.route(res, w["router.scale"], w["router.proj.weight"], w["router.per_expert_scale"], k)
    assert (np.sort(idx, -1) == np.sort(ridx, -1)).all()
    close(np.take_along_axis(weight, np.argsort(idx, -1), -1), np.take_along_axis(rweight, np.argsort(ridx, -1), -1))
    gu = rng.standard_normal((E, 2 * Ie, H)).astype(np.float32)
    dn = rng.standard_normal((E, H, Ie)).astype(np.float32)
    close(fast.experts(np, res, idx, weight, gu, dn), plain.experts(res, idx, weight, gu, dn), tol=1e-4)
