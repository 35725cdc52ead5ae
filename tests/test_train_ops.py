"""Every hand-written backward of minidiff/train/ops.py against torch autograd (float64) and against
finite differences, on shapes Hypothesis draws: relative error of each gradient <= 1e-6."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minidiff.train import ops

torch = pytest.importorskip("torch")


def t(a, grad=True):
    return torch.tensor(a, dtype=torch.float64, requires_grad=grad)


def close(got, want, tol=1e-6):
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    scale = max(1e-12, float(np.abs(want).max()))
    assert got.shape == want.shape, (got.shape, want.shape)
    assert float(np.abs(got - want).max()) <= tol * max(1.0, scale), float(np.abs(got - want).max()) / scale


def torch_grads(fn, inputs, dy):
    ts = [t(a) for a in inputs]
    out = fn(*ts)
    out.backward(torch.tensor(dy))
    return out.detach().numpy(), [x.grad for x in ts]


def rng_for(seed):
    return np.random.default_rng(seed)


SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(seed=st.integers(0, 10**6), T=st.integers(1, 6), H=st.integers(2, 12), weighted=st.booleans())
def test_rms_norm(seed, T, H, weighted):
    r = rng_for(seed)
    x, w, dy = r.standard_normal((T, H)), r.uniform(0.5, 1.5, H), r.standard_normal((T, H))
    y, saved = ops.rms_norm(np, x, w if weighted else None)
    dx, dw = ops.rms_norm_backward(np, dy, saved)
    tw = t(w)

    def f(x):
        n = x * torch.rsqrt((x * x).mean(-1, keepdim=True) + 1e-6)
        return n * tw if weighted else n
    ref, (gx,) = torch_grads(f, [x], dy)
    close(y, ref), close(dx, gx)
    if weighted:
        close(dw, tw.grad)


@SETTINGS
@given(seed=st.integers(0, 10**6), n=st.integers(1, 30))
def test_elementwise_ops(seed, n):
    r = rng_for(seed)
    x, dy = 3 * r.standard_normal(n), r.standard_normal(n)
    y, s = ops.gelu_tanh(np, x)
    ref, (gx,) = torch_grads(lambda x: torch.nn.functional.gelu(x, approximate="tanh"), [x], dy)
    close(y, ref), close(ops.gelu_tanh_backward(np, dy, s), gx)
    y, s = ops.softcap(np, 20 * x, 30.0)
    ref, (gx,) = torch_grads(lambda z: 30.0 * torch.tanh(z / 30.0), [20 * x], dy)
    close(y, ref), close(ops.softcap_backward(np, dy, s), gx)
    y, s = ops.softmax(np, x[None])
    ref, (gx,) = torch_grads(lambda z: torch.softmax(z, -1), [x[None]], dy[None])
    close(y, ref), close(ops.softmax_backward(np, dy[None], s), gx)


@SETTINGS
@given(seed=st.integers(0, 10**6), T=st.integers(1, 5), n=st.integers(1, 3), half=st.integers(1, 5),
       B=st.sampled_from([None, 1, 3]))
def test_rope(seed, T, n, half, B):
    """Positions [T] (one sequence), or [B, T]: a batch whose rows start at different positions."""
    r = rng_for(seed)
    lead = () if B is None else (B,)
    x, dy = r.standard_normal(lead + (T, n, 2 * half)), r.standard_normal(lead + (T, n, 2 * half))
    pos, inv = r.integers(0, 50, lead + (1,)) + np.arange(T), r.uniform(0, 1, half)
    y, s = ops.rope(np, x, pos, inv)
    ang = torch.tensor(pos, dtype=torch.float32)[..., None] * torch.tensor(inv, dtype=torch.float32)
    cos = torch.cat([ang, ang], -1).cos().double()[..., None, :]            # float32 angles, as the model
    sin = torch.cat([ang, ang], -1).sin().double()[..., None, :]
    ref, (gx,) = torch_grads(lambda x: x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin, [x], dy)
    close(y, ref), close(ops.rope_backward(np, dy, s), gx)


@SETTINGS
@given(seed=st.integers(0, 10**6), T=st.integers(1, 5), H=st.integers(1, 8), I=st.integers(1, 8))
def test_linear_and_mlp(seed, T, H, I):
    r = rng_for(seed)
    x, g, u, d, dy = (r.standard_normal(s) for s in ((T, H), (I, H), (I, H), (H, I), (T, H)))
    y, s = ops.mlp(np, x, g, u, d)
    F = torch.nn.functional
    ref, grads = torch_grads(lambda x, g, u, d: F.linear(F.gelu(F.linear(x, g), approximate="tanh") * F.linear(x, u), d),
                             [x, g, u, d], dy)
    close(y, ref)
    for got, want in zip(ops.mlp_backward(np, dy, s), grads):
        close(got, want)


@SETTINGS
@given(seed=st.integers(0, 10**6), T=st.integers(1, 6), S0=st.integers(0, 5),
       heads=st.sampled_from([(2, 1), (2, 2), (4, 2)]), masked=st.booleans(), B=st.sampled_from([None, 1, 3]))
def test_attention(seed, T, S0, heads, masked, B):
    """One sequence, or a batch (leading axis B) with a mask per row: each row attends on its own."""
    r = rng_for(seed)
    nh, nkv, hd = heads[0], heads[1], 4
    S = S0 + T
    lead = () if B is None else (B,)
    q = r.standard_normal(lead + (T, nh, hd))
    k, v = r.standard_normal(lead + (S, nkv, hd)), r.standard_normal(lead + (S, nkv, hd))
    mask = None
    if masked:                                  # causal over cache + new, a row's first keys hidden
        mask = np.broadcast_to(np.arange(S)[None] <= np.arange(S0, S)[:, None], lead + (T, S)).copy()
        if B:
            mask[..., :r.integers(0, S0 + 1)] = False
            mask[..., np.arange(T), np.arange(S0, S)] = True                        # every query sees itself
    do = r.standard_normal(lead + (T, nh * hd))
    o, s = ops.attention(np, q, k, v, mask)
    rep = nh // nkv

    def f(q, k, v):
        kk, vv = k.repeat_interleave(rep, -2), v.repeat_interleave(rep, -2)       # [..., S, nh, hd]
        sc = torch.einsum("...thd,...shd->...hts", q, kk)
        if mask is not None:
            sc = sc.masked_fill(~torch.tensor(mask)[..., None, :, :], float("-inf"))
        return torch.einsum("...hts,...shd->...thd", torch.softmax(sc, -1), vv).reshape(*lead, T, nh * hd)
    ref, grads = torch_grads(f, [q, k, v], do)
    close(o, ref)
    for got, want in zip(ops.attention_backward(np, do, s), grads):
        close(got, want)


@SETTINGS
@given(seed=st.integers(0, 10**6), T=st.integers(1, 7), V=st.integers(2, 9), H=st.integers(1, 6))
def test_embedding_head_and_soft_embedding(seed, T, V, H):
    r = rng_for(seed)
    ids, E = r.integers(0, V, T), r.standard_normal((V, H))
    dy = r.standard_normal((T, H))
    y, s = ops.embed(np, ids, E, 1.7)
    ref, (gE,) = torch_grads(lambda E: E[torch.tensor(ids)] * 1.7, [E], dy)
    close(y, ref), close(ops.embed_backward(np, dy, s), gE)
    x, dl = r.standard_normal((T, H)), r.standard_normal((T, V))         # tied head: logits = x Eᵀ
    _, s = ops.linear(np, x, E)
    _, grads = torch_grads(lambda x, E: x @ E.T, [x, E], dl)
    for got, want in zip(ops.linear_backward(np, dl, s), grads):
        close(got, want)
    probs = np.exp(r.standard_normal((T, V)))
    probs /= probs.sum(-1, keepdims=True)
    y, s = ops.soft_embedding(np, probs, E, 1.7)
    ref, (gE,) = torch_grads(lambda E: torch.tensor(probs) @ E * 1.7, [E], dy)
    close(y, ref), close(ops.soft_embedding_backward(np, dy, s), gE)


@SETTINGS
@given(seed=st.integers(0, 10**6), T=st.integers(1, 6), E=st.integers(2, 6), H=st.integers(2, 8), data=st.data())
def test_router(seed, T, E, H, data):
    k = data.draw(st.integers(1, E))
    r = rng_for(seed)
    res, scale, proj, pes = r.standard_normal((T, H)), r.uniform(0.5, 1.5, H), r.standard_normal((E, H)), r.uniform(0.5, 1.5, E)
    dw = r.standard_normal((T, k))
    (ids, w), s = ops.route(np, res, scale, proj, pes, k)

    def f(res, scale, proj, pes):
        n = res * torch.rsqrt((res * res).mean(-1, keepdim=True) + 1e-6)
        p = torch.softmax((n * scale * H ** -0.5) @ proj.T, -1)
        top = p.gather(-1, torch.tensor(ids))                             # the same experts (no gradient)
        return top / top.sum(-1, keepdim=True) * pes[torch.tensor(ids)]
    ref, grads = torch_grads(f, [res, scale, proj, pes], dw)
    close(w, ref)
    for got, want in zip(ops.route_backward(np, dw, s), grads):
        close(got, want)


@SETTINGS
@given(seed=st.integers(0, 10**6), T=st.integers(1, 6), E=st.integers(1, 5), data=st.data())
def test_experts(seed, T, E, data):
    k = data.draw(st.integers(1, E))
    r = rng_for(seed)
    H, Ie = 4, 3
    x, w = r.standard_normal((T, H)), r.uniform(0.1, 1, (T, k))
    ids = np.stack([r.choice(E, k, replace=False) for _ in range(T)])
    gu, dn, dy = r.standard_normal((E, 2 * Ie, H)), r.standard_normal((E, H, Ie)), r.standard_normal((T, H))
    y, s = ops.experts(np, x, ids, w, gu, dn)

    def f(x, w, gu, dn):
        out = torch.zeros_like(x)
        for ti in range(T):
            for j in range(k):
                e = int(ids[ti, j])
                h = gu[e] @ x[ti]
                out = out.index_add(0, torch.tensor([ti]), (w[ti, j] * (dn[e] @ (torch.nn.functional.gelu(
                    h[:Ie], approximate="tanh") * h[Ie:])))[None])
        return out
    ref, grads = torch_grads(f, [x, w, gu, dn], dy)
    close(y, ref)
    for got, want in zip(ops.experts_backward(np, dy, s), grads):
        close(got, want)


def test_finite_differences_of_a_composed_block():
    """Without torch's help: a block of norm, attention, MLP and router+experts, checked by central
    differences of a scalar loss (float64)."""
    r = rng_for(0)
    T, H, E, k = 4, 6, 3, 2
    x0 = r.standard_normal((T, H))
    P = dict(w=r.uniform(0.5, 1.5, H), scale=r.uniform(0.5, 1.5, H), proj=r.standard_normal((E, H)),
             pes=r.uniform(0.5, 1.5, E), gu=r.standard_normal((E, 4, H)), dn=r.standard_normal((E, H, 2)))
    gy = r.standard_normal((T, H))

    def loss(x):
        n, _ = ops.rms_norm(np, x, P["w"])
        (ids, w), _ = ops.route(np, x, P["scale"], P["proj"], P["pes"], k)
        y, _ = ops.experts(np, n, ids, w, P["gu"], P["dn"])
        return float((y * gy).sum())

    n, sn = ops.rms_norm(np, x0, P["w"])
    (ids, w), sr = ops.route(np, x0, P["scale"], P["proj"], P["pes"], k)
    y, se = ops.experts(np, n, ids, w, P["gu"], P["dn"])
    dn_, dw, _, _ = ops.experts_backward(np, gy, se)
    dx = ops.rms_norm_backward(np, dn_, sn)[0] + ops.route_backward(np, dw, sr)[0]
    num = np.zeros_like(x0)
    for i in np.ndindex(x0.shape):
        e = np.zeros_like(x0)
        e[i] = 1e-6
        num[i] = (loss(x0 + e) - loss(x0 - e)) / 2e-6
    assert np.abs(dx - num).max() <= 1e-6 * max(1.0, np.abs(num).max())
