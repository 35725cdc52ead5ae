"""The forward pass's ops, one small function each: what `model.py` is built from.

Every op takes `xp` (NumPy or CuPy) first and works on float32 arrays. Shapes use
    T tokens, S keys, H hidden, V vocab, E experts, k experts per token,
    nh query heads, nkv key/value heads, hd head dim, rep = nh // nkv.
Spec: docs/architecture.md (section numbers below refer to it). `reference_ops.py` states each op again
the obvious way (loops, float64) under the same name; tests/test_reference_ops.py checks every pair.

Weights come plain (an array) or stored (`tensors.Stored`: bf16 words, 4-bit codes), widened per use.
A stored weight may also multiply itself, and says so by one protocol, named for what it does to the
numbers:
    W.bf16_gemm is True      W.linear(x) = x @ Wᵀ and W.rmatmul(p) = p @ W as bf16 GEMMs, float32
                             accumulation (gpu.DeviceHalf in precision "bf16": activations rounded to bf16)
    gate_up.moe(x, idx, weight, down)
                             the routed experts computed by a kernel the loader bound to the tensor (the
                             CPU kernel for 4-bit experts, float32; the CUDA kernels in precision "bf16"),
                             or None when it does not apply to these inputs (then the grouped float32 path)
This module imports only the array-module switch (`backend`) and the stored-weight type (`tensors`).
"""

from __future__ import annotations

import math

from .backend import rowwise
from .tensors import expand, is_stored


def inv_rms(xp, x, eps):
    """(mean(x²) + eps)^-1/2 over the last axis of x [..., n] -> [..., 1]."""
    mean_sq = xp.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]
    return (mean_sq + eps) ** -0.5


def rms_norm(xp, x, w=None, eps=1e-6):
    """Gemma 4 RMSNorm: x / sqrt(mean(x²) + eps), times w (NOT 1 + w) when the norm has a weight."""
    y = x * inv_rms(xp, x, eps)
    if w is not None:
        y *= w
    return y


def gelu_tanh(xp, x):
    """GELU, tanh approximation (`gelu_pytorch_tanh`): 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).

    Evaluated in place in one scratch array (4x faster than the one-line form on large MLP widths).
    """
    y = x * x
    y *= 0.044715
    y += 1.0
    y *= x                              # x + 0.044715·x³
    y *= math.sqrt(2.0 / math.pi)
    xp.tanh(y, out=y)
    y += 1.0
    y *= x
    y *= 0.5
    return y


def softmax(xp, x, flush_subnormal=False):
    """exp(x - max) / sum over the last axis, computed in one new array (row blocks on separate threads).

    flush_subnormal: exponents below -87 (probabilities near 2^-126, the smallest normal float32, and
    under) become exactly 0. Such a term changes a weighted sum by less than 1e-37 of its largest term,
    but subnormal floats can make the BLAS dozens of times slower on some CPUs (long attention spans are
    full of them).
    """
    e = xp.empty(x.shape, dtype=x.dtype)

    def rows(xb, eb):
        xp.subtract(xb, xb.max(axis=-1, keepdims=True), out=eb)
        if flush_subnormal:
            eb[eb < -87.0] = -xp.inf                      # exp(-87.34) = 2^-126: below, exp is subnormal
        xp.exp(eb, out=eb)
        eb /= eb.sum(axis=-1, keepdims=True)
    rowwise(rows, x.reshape(-1, x.shape[-1]), e.reshape(-1, x.shape[-1]))
    return e


def softcap(xp, logits, cap):
    """cap · tanh(logits / cap), in place on logits [C, V] (row blocks on separate threads)."""
    def rows(z):
        z /= cap
        xp.tanh(z, out=z)
        z *= cap
    rowwise(rows, logits)
    return logits


def rope(xp, x, positions, inv_freq):
    """Rotate x [..., T, n, hd] by its positions [..., T] ("rotate_half" layout: dim i pairs with i + hd/2).

    inv_freq [hd/2] is zero for the pairs that do not rotate (the full layers' proportional RoPE).
    """
    return rotate(xp, x, *rope_tables(xp, positions, inv_freq, x.dtype))


def rope_tables(xp, positions, inv_freq, dtype):
    """cos, sin [..., T, 1, hd] of the angles position · inv_freq, computed in float32 (as the reference)."""
    ang = positions.astype(xp.float32)[..., None] * inv_freq.astype(xp.float32)   # [..., T, hd/2]
    ang = xp.concatenate([ang, ang], axis=-1)                                     # [..., T, hd]
    return xp.cos(ang).astype(dtype)[..., None, :], xp.sin(ang).astype(dtype)[..., None, :]


def rotate(xp, x, cos, sin):
    """x · cos + rotate_half(x) · sin, rotate_half(x) = [-x[half:], x[:half]]."""
    half = x.shape[-1] // 2
    rotated = xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half(x)
    return x * cos + rotated * sin


def attention(xp, q, k, v, mask=None):
    """Scaled-by-1.0 dot-product attention with grouped KV heads.

    q [T, nh, hd], k/v [S, nkv, hd], mask [T, S] bool (True = may attend) or None -> [T, nh * hd].
    KV head j serves query heads j*rep ... j*rep + rep - 1, so those rep heads are stacked as rows.
    """
    T, nh, hd = q.shape
    nkv, rep = k.shape[1], nh // k.shape[1]
    qg = xp.ascontiguousarray(q.reshape(T, nkv, rep, hd).transpose(1, 2, 0, 3)).reshape(nkv, rep * T, hd)
    kt = xp.ascontiguousarray(k.transpose(1, 2, 0))                    # [nkv, hd, S]
    scores = (qg @ kt).reshape(nkv, rep, T, -1)                        # [nkv, rep, T, S]  (scale 1.0, no softcap)
    if mask is not None:
        scores = xp.where(mask, scores, -xp.inf)
    p = softmax(xp, scores, flush_subnormal=True).reshape(nkv, rep * T, -1)
    o = p @ xp.ascontiguousarray(v.transpose(1, 0, 2))                 # [nkv, rep*T, hd]
    return o.reshape(nkv, rep, T, hd).transpose(2, 0, 1, 3).reshape(T, nh * hd)   # head-major concat


def causal_attention(xp, q, keys, values, positions, key_positions, window=None, block=128):
    """Encoder attention: causal, and banded on sliding layers, computed in blocks of queries.

    q [T, nh, hd] at positions [T]; keys/values [S, nkv, hd] at ascending key_positions [S].
    A query at p sees keys j with j <= p, and on sliding layers also j > p - window (W keys including
    itself). A block of queries at positions p0..p1 can only see keys in [p0 - window + 1, p1], so each
    block multiplies just that slice of keys: causal work halves, and a sliding layer's cost grows with
    T·W instead of T². (A tiling over blocks of `block` queries, as flash attention does.)
    """
    out = []
    for s in range(0, q.shape[0], block):
        qp = positions[s:s + block]                                                   # [B]
        a = 0 if window is None else int(xp.searchsorted(key_positions, int(qp[0]) - window + 1))
        b = int(xp.searchsorted(key_positions, int(qp[-1]), side="right"))
        kp = key_positions[a:b]                                                       # [S_block]
        mask = kp[None, :] <= qp[:, None]                                             # causal
        if window is not None:
            mask &= kp[None, :] > qp[:, None] - window                                # sliding band
        out.append(attention(xp, q[s:s + block], keys[a:b], values[a:b], mask))
    return xp.concatenate(out)                                                        # [T, nh * hd]


def linear(x, W):
    """y = x @ Wᵀ for a PyTorch-layout weight W [out, in] (a stored low-bit W is widened for this use)."""
    if getattr(W, "bf16_gemm", False):           # a device weight multiplied by a bf16 GEMM (gpu.py)
        return W.linear(x)
    return x @ expand(W, slice(None), "linear").T


def mlp(xp, x, gate, up, down):
    """GeGLU MLP: down(gelu_tanh(gate(x)) * up(x))."""
    return linear(gelu_tanh(xp, linear(x, gate)) * linear(x, up), down)


def route(xp, res, w, cfg):
    """The router (§8): reads the RAW residual res [T, H] -> expert ids [T, k], weights [T, k].

    no-scale RMSNorm, × learned scale × H^-1/2, project to E logits, softmax over all E, keep the top k,
    renormalise them to sum 1, then × the chosen experts' per_expert_scale.
    """
    r = rms_norm(xp, res, eps=cfg.rms_norm_eps) * w["router.scale"] * cfg.hidden_size ** -0.5
    probs = softmax(xp, linear(r, w["router.proj.weight"]))           # [T, E]
    k = cfg.top_k_experts
    idx = xp.argsort(-probs, axis=-1, kind="stable")[:, :k]           # [T, k] highest probability first
    top = xp.take_along_axis(probs, idx, axis=-1)                      # [T, k]
    top = top / top.sum(axis=-1, keepdims=True)
    return idx, top * w["router.per_expert_scale"][idx]


def group_by_expert(xp, idx, E: int):
    """The T·k (token, expert) assignments of idx [T, k] sorted by expert; assignment a = t·k + j is token
    t's j-th choice. -> order [T·k] (assignment ids, expert 0's first, ascending within each expert),
    counts [E] (assignments per expert), first [E] (where each expert's run starts in `order`).
    Every grouped expert path uses this: the float32 one below, the CPU and CUDA kernels, the trainer."""
    flat = idx.reshape(-1)                                             # [T*k] expert of each assignment
    order = xp.argsort(flat, kind="stable")
    counts = xp.bincount(flat, minlength=E)
    return order, counts, xp.cumsum(counts) - counts


def experts(xp, x, idx, weight, gate_up, down, chunk=16):
    """Routed experts, computed by grouping tokens per expert (batched GEMMs, no per-token loop).

    x [T, H] (pre_feedforward_layernorm_2 output), idx/weight [T, k], gate_up [E, 2Ie, H] (rows :Ie gate,
    Ie: up), down [E, H, Ie]  ->  [T, H] = sum over the k chosen experts of weight · expert(x).

    The T·k (token, expert) assignments are sorted by expert. A group of G experts then gathers its
    tokens into a padded batch X [G, M, H] (M = the group's busiest expert) and runs them through its
    weights in one stacked matmul, as W @ Xᵀ (weights on the left: the BLAS then streams the big
    operand once, 30 % faster than X @ Wᵀ when M is small). Plain weight arrays form one group of all
    E experts, used as they are. Stored weights (bf16, int4, NVFP4: tensors.py) widen only the experts
    in use, `chunk` at a time, into reused buffers; the experts are taken busiest first so that a
    chunk's counts are alike and little of X is padding.
    """
    moe = getattr(gate_up, "moe", None)         # a kernel the loader bound to these experts (module docstring)
    if moe is not None and (y := moe(x, idx, weight, down)) is not None:
        return y
    T, k = idx.shape
    E, H = gate_up.shape[0], x.shape[1]
    order, counts, first = group_by_expert(xp, idx, E)
    if is_stored(gate_up):
        active = xp.flatnonzero(counts)
        active = active[xp.argsort(-counts[active], kind="stable")]    # busiest first
        groups = [active[i:i + chunk] for i in range(0, active.shape[0], chunk)]
    else:
        groups = [xp.arange(E)]
    y = xp.empty((T * k, H), dtype=x.dtype)                            # one output row per assignment
    for ids in groups:                                                 # [G] expert ids
        n = counts[ids]                                                # [G]
        M = int(n.max())
        j = xp.arange(M)
        used = j[None, :] < n[:, None]                                 # [G, M] real rows (the rest: padding)
        a = order[xp.where(used, first[ids][:, None] + j[None, :], 0)] # [G, M] assignment of each row
        Xt = x[a // k].transpose(0, 2, 1)                              # [G, H, M] tokens as columns
        gu = expand(gate_up, ids, "experts.gate_up", xp) @ Xt          # [G, 2Ie, M]
        ie = gu.shape[1] // 2
        act = gelu_tanh(xp, gu[:, :ie]) * gu[:, ie:]                   # [G, Ie, M] gate rows, then up rows
        Y = expand(down, ids, "experts.down", xp) @ act                # [G, H, M]
        y[a[used]] = Y.transpose(0, 2, 1)[used]
    y *= weight.reshape(-1, 1)                                         # [T*k, H] routing weights
    return y.reshape(T, k, H).sum(axis=1)                              # [T, H]


def tied_head(xp, x, embed_tokens, block=16384):
    """Logits x @ Eᵀ [T, V] over the tied embedding E [V, H]; a stored E is widened block by block."""
    if getattr(embed_tokens, "bf16_gemm", False):
        return embed_tokens.linear(x)
    if not is_stored(embed_tokens):
        return x @ embed_tokens.T
    V = embed_tokens.shape[0]
    out = xp.empty((x.shape[0], V), dtype=xp.float32)
    for v0 in range(0, V, block):
        out[:, v0:v0 + block] = x @ expand(embed_tokens, slice(v0, v0 + block), "vocab", xp).T
    return out


def soft_embedding(xp, probs, embed_tokens, block=16384):
    """probs [C, V] @ E [V, H] -> [C, H]: the expected embedding under probs; stored E block by block."""
    if getattr(embed_tokens, "bf16_gemm", False):
        return embed_tokens.rmatmul(probs)
    if not is_stored(embed_tokens):
        return probs @ embed_tokens
    out = xp.zeros((probs.shape[0], embed_tokens.shape[1]), dtype=xp.float32)
    for v0 in range(0, embed_tokens.shape[0], block):
        out += probs[:, v0:v0 + block] @ expand(embed_tokens, slice(v0, v0 + block), "vocab", xp)
    return out
