"""The ops of `model.py`, written as plainly as possible: loops over heads, tokens and experts, float64.

Read these beside the fast versions in `model.py` (which group work into few large matmuls, run in place
and in threads): each function here computes the same thing the obvious way, with the same name and
arguments (less the `xp` switch: NumPy only). tests/test_reference_ops.py checks every pair on random
shapes. Nothing in minidiff calls these; they are for reading, and for checking.
"""

import math

import numpy as np


def rms_norm(x, w=None, eps=1e-6):
    """x / sqrt(mean(x²) + eps) over the last axis, times w (Gemma 4: w, not 1 + w)."""
    x = np.asarray(x, np.float64)
    y = x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps)
    return y if w is None else y * np.asarray(w, np.float64)


def gelu_tanh(x):
    """0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))"""
    x = np.asarray(x, np.float64)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def softcap(logits, cap):
    return cap * np.tanh(np.asarray(logits, np.float64) / cap)


def rope(x, positions, inv_freq):
    """x [T, n, hd]: dims i and i + hd/2 form a pair, rotated by the angle position · inv_freq[i]."""
    x = np.asarray(x, np.float64)
    out = x.copy()
    half = x.shape[-1] // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            a = float(np.float32(np.float32(pos) * np.float32(inv_freq[i])))   # the angle, in float32 as there
            c, s = math.cos(a), math.sin(a)
            out[t, :, i] = x[t, :, i] * c - x[t, :, i + half] * s
            out[t, :, i + half] = x[t, :, i + half] * c + x[t, :, i] * s
    return out


def attention(q, k, v, mask=None):
    """q [T, nh, hd], k/v [S, nkv, hd], mask [T, S] (True = may attend) -> [T, nh·hd]. Scale 1.0.

    Query head h reads KV head h // (nh / nkv): the KV heads are shared by groups of query heads.
    """
    T, nh, hd = q.shape
    rep = nh // k.shape[1]
    out = np.zeros((T, nh, hd))
    for h in range(nh):
        for t in range(T):
            scores = np.array([q[t, h] @ k[j, h // rep] for j in range(k.shape[0])], np.float64)
            if mask is not None:
                scores[~mask[t]] = -np.inf
            out[t, h] = softmax(scores) @ v[:, h // rep]
    return out.reshape(T, nh * hd)


def causal_attention(q, keys, values, positions, key_positions, window=None):
    """The encoder's mask: a query at p sees keys at j <= p, and on sliding layers also j > p - window."""
    p, j = np.asarray(positions)[:, None], np.asarray(key_positions)[None, :]
    mask = j <= p
    if window is not None:
        mask &= j > p - window
    return attention(q, keys, values, mask)


def route(res, scale, proj, per_expert_scale, top_k, eps=1e-6):
    """res [T, H] (the raw residual) -> expert ids [T, k], weights [T, k], one token at a time."""
    T, H = res.shape
    ids, weights = np.zeros((T, top_k), np.int64), np.zeros((T, top_k))
    for t in range(T):
        r = rms_norm(res[t]) * scale * H ** -0.5
        probs = softmax(np.asarray(proj, np.float64) @ r)               # over all E experts
        best = sorted(range(len(probs)), key=lambda e: (-probs[e], e))[:top_k]
        top = probs[best] / probs[best].sum()                           # renormalised over the chosen k
        ids[t], weights[t] = best, top * np.asarray(per_expert_scale, np.float64)[best]
    return ids, weights


def experts(x, idx, weight, gate_up, down):
    """Σ over each token's k chosen experts of weight · down(gelu_tanh(gate(x)) · up(x)), token by token."""
    T, k = idx.shape
    Ie = gate_up.shape[1] // 2
    out = np.zeros((T, down.shape[1]))
    for t in range(T):
        for j in range(k):
            e = idx[t, j]
            gu = np.asarray(gate_up[e], np.float64) @ x[t]              # [2·Ie]: gate rows, then up rows
            out[t] += weight[t, j] * (np.asarray(down[e], np.float64) @ (gelu_tanh(gu[:Ie]) * gu[Ie:]))
    return out
