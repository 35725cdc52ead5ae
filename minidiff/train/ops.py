"""Every op of the forward pass with its backward, side by side: the gradients training needs, by hand.

Each op is a pair. `<op>(xp, ...)` computes the forward in the input's dtype (float32 to train, float64 to
check) and returns (output, saved): what the backward needs. `<op>_backward(xp, d_out, saved)` returns the
gradients of the inputs that have one, in the order the forward takes them. The formulas are written in
the docstrings; tests/test_train_ops.py checks every one against torch autograd (float64) and against
finite differences, on shapes Hypothesis draws. No autograd framework: this file is the chain rule.

Each forward is the model's own op (minidiff/ops.py, imported here as `forward`) where that op's result is
all the backward needs, or built from its pieces where the backward needs an intermediate (RMSNorm's
1/rms, RoPE's tables); GELU, attention, the router and the experts keep their intermediates here, and
tests/test_train_ops.py checks each against the model's op.
"""

from __future__ import annotations

import math

import numpy as np

from .. import ops as forward
from ..backend import to_numpy
from ..ops import group_by_expert

SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


# ----------------------------------------------------------------------------------------------
# elementwise and normalisation


def rms_norm(xp, x, w=None, eps=1e-6):
    """y = n · w,  n = x · r,  r = (mean(x²) + eps)^-1/2   (over the last axis; w absent: y = n)"""
    r = forward.inv_rms(xp, x, eps)
    n = x * r
    return (n if w is None else n * w), (n, r, w)


def rms_norm_backward(xp, dy, saved):
    """dn = dy · w;  dx = r · (dn - n · mean(dn · n));  dw = Σ_rows dy · n.   -> (dx, dw or None)"""
    n, r, w = saved
    dn = dy if w is None else dy * w
    dx = r * (dn - n * xp.mean(dn * n, axis=-1, keepdims=True))
    dw = None if w is None else (dy * n).reshape(-1, n.shape[-1]).sum(axis=0)
    return dx, dw


def gelu_tanh(xp, x):
    """y = ½ x (1 + tanh u),  u = √(2/π) (x + 0.044715 x³)"""
    t = xp.tanh(SQRT_2_OVER_PI * (x + 0.044715 * (x * x * x)))      # x * x * x: x ** 3 is a slow pow()
    return 0.5 * x * (1 + t), (x, t)


def gelu_tanh_backward(xp, dy, saved):
    """dy/dx = ½ (1 + t) + ½ x (1 - t²) √(2/π) (1 + 3 · 0.044715 x²)"""
    x, t = saved
    return dy * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x))


def softmax(xp, z):
    """p = exp(z - max z) / Σ exp(z - max z)   (last axis)"""
    p = forward.softmax(xp, z)
    return p, p


def softmax_backward(xp, dp, p):
    """dz = p · (dp - Σ dp · p)"""
    return p * (dp - (dp * p).sum(axis=-1, keepdims=True))


def softcap(xp, z, cap):
    """y = cap · tanh(z / cap)"""
    y = forward.softcap(xp, z.copy(), cap)
    return y, (y, cap)


def softcap_backward(xp, dy, saved):
    """dz = dy · (1 - (y / cap)²)"""
    y, cap = saved
    return dy * (1 - (y / cap) ** 2)


def rope(xp, x, positions, inv_freq):
    """x [..., T, n, hd] rotated pairwise (dims i, i + hd/2) by the angle position · inv_freq[i] (model.rope);
    positions [T], or [B, T] for a batch whose rows start at different places. The angles, cos and sin are
    float32 whatever x's dtype, as in the model and the reference."""
    cos, sin = forward.rope_tables(xp, positions, inv_freq, x.dtype)                  # [..., T, 1, hd]
    return forward.rotate(xp, x, cos, sin), (cos, sin)


def rope_backward(xp, dy, saved):
    """A rotation's transpose is the rotation back: dx = dy · cos + rotate_half⁻¹(dy · sin),
    with rotate_half⁻¹(a) = [a[half:], -a[:half]]."""
    cos, sin = saved
    ds = dy * sin
    half = dy.shape[-1] // 2
    return dy * cos + xp.concatenate([ds[..., half:], -ds[..., :half]], axis=-1)


# ----------------------------------------------------------------------------------------------
# products


def linear(xp, x, W):
    """y = x Wᵀ   (W [out, in], PyTorch layout)"""
    return forward.linear(x, W), (x, W)


def linear_backward(xp, dy, saved):
    """dx = dy W;  dW = dyᵀ x   (rows of every leading axis summed)   -> (dx, dW)"""
    x, W = saved
    return dy @ W, dy.reshape(-1, dy.shape[-1]).T @ x.reshape(-1, x.shape[-1])


def mlp(xp, x, gate, up, down):
    """GeGLU: y = down(gelu_tanh(gate x) · up x)"""
    g, sg = linear(xp, x, gate)
    u, su = linear(xp, x, up)
    a, sa = gelu_tanh(xp, g)
    h = a * u
    y, sd = linear(xp, h, down)
    return y, (sg, su, sa, a, u, sd)


def mlp_backward(xp, dy, saved):
    """-> (dx, dgate, dup, ddown)"""
    sg, su, sa, a, u, sd = saved
    dh, ddown = linear_backward(xp, dy, sd)
    dg = gelu_tanh_backward(xp, dh * u, sa)
    dx1, dgate = linear_backward(xp, dg, sg)
    dx2, dup = linear_backward(xp, dh * a, su)
    return dx1 + dx2, dgate, dup, ddown


def attention(xp, q, k, v, mask=None):
    """o = softmax(q kᵀ + mask) v per head, scale 1.0, KV head j serving query heads j·rep … j·rep + rep - 1.
    q [..., T, nh, hd], k/v [..., S, nkv, hd], mask [..., T, S] bool (True = may attend) -> o [..., T, nh · hd].
    The leading axes (none, or a batch) are carried through."""
    *lead, T, nh, hd = q.shape
    nkv = k.shape[-2]
    rep = nh // nkv
    qg = xp.moveaxis(q.reshape(*lead, T, nkv, rep, hd), -4, -2)         # [..., nkv, rep, T, hd]
    kt = xp.moveaxis(k, -3, -1)[..., :, None, :, :]                     # [..., nkv, 1, hd, S]
    vg = xp.moveaxis(v, -3, -2)[..., :, None, :, :]                     # [..., nkv, 1, S, hd]
    s = qg @ kt                                                         # [..., nkv, rep, T, S]
    if mask is not None:
        s = xp.where(mask[..., None, None, :, :], s, -xp.inf)
    p, _ = softmax(xp, s)
    o = p @ vg                                                          # [..., nkv, rep, T, hd]
    return xp.moveaxis(o, -2, -4).reshape(*lead, T, nh * hd), (qg, kt, vg, p)


def attention_backward(xp, do, saved):
    """dV = Pᵀ dO;  dP = dO Vᵀ;  dS = P · (dP - Σ dP · P);  dQ = dS K;  dK = dSᵀ Q   (grouped heads summed
    into their KV head).  -> (dq [..., T, nh, hd], dk [..., S, nkv, hd], dv [..., S, nkv, hd])"""
    qg, kt, vg, p = saved
    *lead, nkv, rep, T, hd = qg.shape
    do = xp.moveaxis(do.reshape(*lead, T, nkv, rep, hd), -4, -2)        # [..., nkv, rep, T, hd]
    dv = xp.moveaxis((xp.swapaxes(p, -1, -2) @ do).sum(axis=-3), -3, -2)         # [..., S, nkv, hd]
    dp = do @ xp.swapaxes(vg, -1, -2)                                   # [..., nkv, rep, T, S]
    ds = softmax_backward(xp, dp, p)
    dq = xp.moveaxis(ds @ xp.swapaxes(kt, -1, -2), -2, -4).reshape(*lead, T, nkv * rep, hd)
    dk = xp.moveaxis((xp.swapaxes(ds, -1, -2) @ qg).sum(axis=-3), -3, -2)
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# embedding, head, self-conditioning


def embed(xp, ids, E, scale):
    """y = E[ids] · scale"""
    return E[ids] * scale, (ids, E.shape, scale)


def embed_backward(xp, dy, saved):
    """dE[i] = Σ over positions holding id i of dy · scale   -> dE"""
    ids, shape, scale = saved
    dE = xp.zeros(shape, dtype=dy.dtype)
    xp.add.at(dE, ids.reshape(-1), dy.reshape(-1, shape[1]) * scale)
    return dE


def soft_embedding(xp, probs, E, scale):
    """s = probs E · scale   (the expected embedding; probs carry no gradient in training: pass 1 is detached)"""
    return probs @ E * scale, (probs, scale)


def soft_embedding_backward(xp, ds, saved):
    """dE = probsᵀ ds · scale   (rows of every leading axis summed)   -> dE"""
    probs, scale = saved
    return probs.reshape(-1, probs.shape[-1]).T @ ds.reshape(-1, ds.shape[-1]) * scale


# ----------------------------------------------------------------------------------------------
# the router and the experts


def route(xp, res, scale, proj, per_expert_scale, k, eps=1e-6):
    """r = rms_norm(res) · scale · H^-1/2;  p = softmax(r projᵀ);  top-k ids (fixed: no gradient);
    w = p[ids] / Σ p[ids] · per_expert_scale[ids].   -> ((ids [T, k], w [T, k]), saved)"""
    H = res.shape[-1]
    n, sn = rms_norm(xp, res, None, eps)
    r = n * scale * H ** -0.5
    p, _ = softmax(xp, r @ proj.T)                                      # [T, E]
    ids = xp.argsort(-p, axis=-1, kind="stable")[:, :k]
    top = xp.take_along_axis(p, ids, axis=-1)
    total = top.sum(axis=-1, keepdims=True)
    w = top / total * per_expert_scale[ids]
    return (ids, w), (sn, n, r, scale, proj, per_expert_scale, p, ids, top, total, H)


def route_backward(xp, dw, saved):
    """Through the weights only (the choice of experts has no gradient):
    dtop = (dw · pes[ids] - Σ dw · w / total);  dp = scatter(dtop);  dz = softmax_backward(dp);
    dproj = dzᵀ r;  dr = dz proj;  dscale = Σ dr · n · H^-1/2;  dres = rms_norm_backward(dr · scale · H^-1/2);
    dpes[e] = Σ over (t, j) with ids = e of dw · top / total.
    -> (dres, dscale, dproj, dper_expert_scale)"""
    sn, n, r, scale, proj, pes, p, ids, top, total, H = saved
    w_over_pes = top / total                                            # the renormalised probabilities
    dpes = xp.bincount(ids.reshape(-1), weights=(dw * w_over_pes).reshape(-1),
                       minlength=pes.shape[0]).astype(dw.dtype)
    dq = dw * pes[ids]                                                  # d(top / total)
    dtop = (dq - (dq * w_over_pes).sum(axis=-1, keepdims=True)) / total
    dp = xp.zeros(p.shape, dtype=dw.dtype)
    xp.put_along_axis(dp, ids, dtop, axis=-1)
    dz = softmax_backward(xp, dp, p)
    dproj = dz.T @ r
    dr = dz @ proj
    dscale = (dr * n).sum(axis=0) * H ** -0.5
    dres, _ = rms_norm_backward(xp, dr * scale * H ** -0.5, sn)
    return dres, dscale, dproj, dpes


def experts(xp, x, ids, w, gate_up, down):
    """y = Σ_j w_j · down_e (gelu_tanh(gate_e x) · up_e x),  e = ids[:, j]; tokens grouped by expert.
    x [T, H], ids/w [T, k], gate_up [E, 2Ie, H], down [E, H, Ie] -> y [T, H]"""
    T, k = ids.shape
    E, Ie = gate_up.shape[0], gate_up.shape[1] // 2
    y = xp.zeros_like(x)
    groups = []
    order, counts, first = (to_numpy(a) for a in group_by_expert(xp, ids, E))
    for e in np.flatnonzero(counts):                                    # one batched product per expert in use
        a = xp.asarray(order[first[e]:first[e] + counts[e]])            # its assignments, ascending
        t = a // k
        gu = x[t] @ gate_up[e].T                                        # [n, 2Ie]
        act, sa = gelu_tanh(xp, gu[:, :Ie])
        h = act * gu[:, Ie:]
        out = h @ down[e].T                                             # [n, H]
        y[t] += w.reshape(-1)[a][:, None] * out                        # t has no repeats: top-k ids differ
        groups.append((e, a, t, gu, act, sa, h, out))
    return y, (x, w, gate_up, down, groups, Ie)


def experts_backward(xp, dy, saved):
    """Per expert: dout = w · dy[t];  dw = Σ dout_raw · out;  dh = dout downᵀ... (chain rule through GeGLU).
    -> (dx, dw [T, k], dgate_up, ddown)"""
    x, w, gate_up, down, groups, Ie = saved
    dx = xp.zeros_like(x)
    dw = xp.zeros(w.size, dtype=x.dtype)
    dgu_all, ddown_all = xp.zeros_like(gate_up), xp.zeros_like(down)
    wf = w.reshape(-1)
    for e, a, t, gu, act, sa, h, out in groups:
        g = dy[t]                                                       # [n, H]
        dw[a] = (g * out).sum(axis=-1)
        dout = wf[a][:, None] * g
        ddown_all[e] = dout.T @ h
        dh = dout @ down[e]                                             # [n, Ie]
        dgate = gelu_tanh_backward(xp, dh * gu[:, Ie:], sa)
        dgu = xp.concatenate([dgate, dh * act], axis=-1)                # [n, 2Ie]
        dgu_all[e] = dgu.T @ x[t]
        dx[t] += dgu @ gate_up[e]
    return dx, dw.reshape(w.shape), dgu_all, ddown_all
