"""The DiffusionGemma text model: embed -> layers -> head, in two modes over one set of weights.

    encode(ids, cache)   causal pass; appends each layer's K/V to the cache (prompt prefill, canvas commit)
    denoise(canvas, cache, sc_logits)
                         bidirectional pass over cache + canvas; reads the cache, never writes it;
                         returns softcapped float32 logits [C, V]

Read top to bottom: the ops (one small function each), then one layer, then the two modes.
Every array op goes through `xp` (NumPy or CuPy). Shapes use
    T tokens in this call, S keys (cached + new), H hidden, V vocab, E experts, k experts per token,
    nh query heads, nkv key/value heads, hd head dim, rep = nh // nkv.
Spec: docs/architecture.md (section numbers below refer to it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .backend import rowwise
from .config import ModelConfig
from .errors import MinidiffError
from . import native
from .tensors import expand, is_stored, take_rows
from .weights import DEC, ENC

# ----------------------------------------------------------------------------------------------
# ops (§2, §3)


def rms_norm(xp, x, w=None, eps=1e-6):
    """Gemma 4 RMSNorm: x / sqrt(mean(x²) + eps), times w (NOT 1 + w) when the norm has a weight."""
    mean_sq = xp.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]   # mean(x²) over the last axis
    y = x * (mean_sq + eps) ** -0.5
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
    """cap · tanh(logits / cap), in place on float32 logits [C, V] (row blocks on separate threads)."""
    def rows(z):
        z /= cap
        xp.tanh(z, out=z)
        z *= cap
    logits = logits.astype(xp.float32, copy=False)
    rowwise(rows, logits)
    return logits


def rope(xp, x, positions, inv_freq):
    """Rotate x [T, n, hd] by its positions [T] ("rotate_half" layout: dim i pairs with i + hd/2).

    inv_freq [hd/2] is zero for the pairs that do not rotate (the full layers' proportional RoPE).
    """
    ang = positions.astype(xp.float32)[:, None] * inv_freq[None, :]   # [T, hd/2]
    cos = xp.cos(xp.concatenate([ang, ang], axis=-1))[:, None, :]      # [T, 1, hd]
    sin = xp.sin(xp.concatenate([ang, ang], axis=-1))[:, None, :]
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
    if getattr(W, "fast", False):                # a device weight with its own bf16 GEMM (gpu.py)
        return W.linear(x)
    return x @ expand(W, slice(None), "linear").T


def mlp(xp, x, gate, up, down):
    """GeGLU MLP: down(gelu_tanh(gate(x)) * up(x))."""
    return linear(gelu_tanh(xp, linear(x, gate)) * linear(x, up), down)


def route(xp, res, w, cfg: ModelConfig):
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
    if getattr(gate_up, "kernels", False):      # device experts with grouped CUDA kernels (gpu.py)
        return gate_up.run(x, idx, weight, down)
    if xp is np and (y := native.experts(x, idx, weight, gate_up, down)) is not None:
        return y                                # 4-bit experts through the CPU kernel (native.py)
    T, k = idx.shape
    E, H = gate_up.shape[0], x.shape[1]
    flat = idx.reshape(-1)                                             # [T*k] expert of each assignment
    order = xp.argsort(flat, kind="stable")                           # assignment ids grouped by expert
    counts = xp.bincount(flat, minlength=E)                            # [E] assignments per expert
    first = xp.cumsum(counts) - counts                                 # [E] where each expert's run starts
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
    if getattr(embed_tokens, "fast", False):     # a device weight with its own bf16 GEMM (gpu.py)
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
    if getattr(embed_tokens, "fast", False):
        return embed_tokens.rmatmul(probs)
    if not is_stored(embed_tokens):
        return probs @ embed_tokens
    out = xp.zeros((probs.shape[0], embed_tokens.shape[1]), dtype=xp.float32)
    for v0 in range(0, embed_tokens.shape[0], block):
        out += probs[:, v0:v0 + block] @ expand(embed_tokens, slice(v0, v0 + block), "vocab", xp)
    return out


# ----------------------------------------------------------------------------------------------
# the KV cache


@dataclass(frozen=True)
class KVCache:
    """What the encoder has written: per layer keys [S_l, nkv, hd] (post-norm, post-RoPE) and values
    [S_l, nkv, hd] (post-v_norm). `length` counts every position ever encoded; sliding layers keep only
    their last W-1 positions (as the reference's dynamic cache does), full layers keep all.
    Immutable: `encode` returns a new cache and leaves the old one valid.
    """
    keys: tuple
    values: tuple
    length: int

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.keys + self.values))


# ----------------------------------------------------------------------------------------------
# the model


class Model:
    """DiffusionGemma text path. Build with `minidiff.load(...)`."""

    # encoder tokens per pass: a longer prompt is encoded in pieces of this many (the same result, as
    # attention is causal), so the activations of one piece, not of the whole prompt, set the memory
    prefill_chunk = 4096

    def __init__(self, cfg: ModelConfig, weights: dict, folder=None, xp=np):
        self.config, self.folder, self.xp = cfg, folder, xp
        self.embed_scale = float(np.float32(cfg.hidden_size ** 0.5))   # fp32 buffer in an fp32 model (§10)
        self.embed_tokens = weights[f"{DEC}.embed_tokens.weight"]      # [V, H], also the tied lm_head
        self.final_norm = weights[f"{DEC}.norm.weight"]
        self.sc = {k: weights[f"{DEC}.self_conditioning.{k}.weight"] for k in ("pre_norm", "gate_proj", "up_proj", "down_proj")}
        self.layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"{DEC}.layers.{i}."
            layer = {name[len(p):]: w for name, w in weights.items() if name.startswith(p)}
            layer["encoder_layer_scalar"] = weights[f"{ENC}.layers.{i}.layer_scalar"]
            self.layers.append(layer)
        self.inv_freq = [xp.asarray(layer.inv_freq) for layer in cfg.layers]

    # ------------------------------------------------------------------ one layer (§2)

    def layer(self, i: int, h, positions, past_k, past_v, key_positions, mode: str, kv_only: bool = False,
              tap=None):
        """One transformer layer. h [T, H] -> (h [T, H], k [T, nkv, hd], v [T, nkv, hd]).

        past_k/past_v [P, nkv, hd] are the cached keys/values this layer may read (P may be 0);
        key_positions [P + T] are the absolute positions of past + new keys (encoder masking only).
        kv_only: stop after attention (h is then incomplete); the encoder's last layer needs only its K/V.
        tap: None, or tap(name, array) to receive this layer's intermediates (minidiff/trace.py).
        """
        xp, cfg, w, lc = self.xp, self.config, self.layers[i], self.config.layers[i]
        eps, T = cfg.rms_norm_eps, h.shape[0]

        # ---- attention ----
        x = rms_norm(xp, h, w["input_layernorm.weight"], eps)
        q = linear(x, w["self_attn.q_proj.weight"]).reshape(T, -1, lc.head_dim)              # [T, nh, hd]
        k_raw = linear(x, w["self_attn.k_proj.weight"]).reshape(T, -1, lc.head_dim)          # [T, nkv, hd]
        v_raw = linear(x, w["self_attn.v_proj.weight"]).reshape(T, -1, lc.head_dim) if lc.is_sliding else k_raw
        q = rope(xp, rms_norm(xp, q, w["self_attn.q_norm.weight"], eps), positions, self.inv_freq[i])
        k = rope(xp, rms_norm(xp, k_raw, w["self_attn.k_norm.weight"], eps), positions, self.inv_freq[i])
        v = rms_norm(xp, v_raw, eps=eps)                                                     # v_norm: no weight, no RoPE
        keys, values = xp.concatenate([past_k, k]), xp.concatenate([past_v, v])             # [S, nkv, hd]
        if mode == "encode":   # causal; a sliding query at p sees keys j with p - W < j <= p
            window = cfg.sliding_window if lc.is_sliding else None
            o = causal_attention(xp, q, keys, values, positions, key_positions, window)
        else:                  # denoise: no mask, bidirectional over everything the cache holds + the canvas
            o = attention(xp, q, keys, values)
        a = linear(o, w["self_attn.o_proj.weight"])
        h = h + rms_norm(xp, a, w["post_attention_layernorm.weight"], eps)
        if tap is not None:
            tap(f"layers.{i}.attention", a)                                                  # [T, H] o_proj output
        if kv_only:
            return h, k, v

        # ---- dense MLP and routed experts in parallel, both from the same residual ----
        res = h
        m = mlp(xp, rms_norm(xp, res, w["pre_feedforward_layernorm.weight"], eps),
                w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"])
        m = rms_norm(xp, m, w["post_feedforward_layernorm_1.weight"], eps)
        idx, weight = route(xp, res, w, cfg)
        y = experts(xp, rms_norm(xp, res, w["pre_feedforward_layernorm_2.weight"], eps), idx, weight,
                    w["experts.gate_up_proj"], w["experts.down_proj"])
        y = rms_norm(xp, y, w["post_feedforward_layernorm_2.weight"], eps)
        h = res + rms_norm(xp, m + y, w["post_feedforward_layernorm.weight"], eps)
        scalar = w["encoder_layer_scalar"] if mode == "encode" else w["layer_scalar"]
        h = h * scalar                                                 # layer_scalar scales the whole stream
        if tap is not None:
            for name, value in (("dense_mlp", m), ("router_ids", idx), ("router_weights", weight),
                                ("experts", y), ("hidden", h)):
                tap(f"layers.{i}.{name}", value)
        return h, k, v

    # ------------------------------------------------------------------ input checks

    def _ids(self, ids, what):
        xp, V = self.xp, self.config.vocab_size
        try:
            a = np.asarray(ids.get() if hasattr(ids, "get") else ids)
        except (TypeError, ValueError):
            raise MinidiffError(f"{what}: expected a 1-D sequence of token ids")
        if a.ndim != 1 or a.size == 0 or not np.issubdtype(a.dtype, np.integer):
            raise MinidiffError(f"{what}: expected a non-empty 1-D sequence of integer token ids, got shape {a.shape} dtype {a.dtype}")
        a = a.astype(np.int64)
        bad = (a < 0) | (a >= V)
        if bad.any():
            raise MinidiffError(f"{what}: token id {int(a[bad][0])} at index {int(np.argmax(bad))} is outside the vocabulary [0, {V})")
        return xp.asarray(a)

    def _check_length(self, cache_len, n, what):
        limit = self.config.max_position_embeddings
        if cache_len + n > limit:
            raise MinidiffError(f"{what}: {cache_len} cached + {n} new positions exceed the model's context of {limit}")

    def empty_cache(self) -> KVCache:
        xp = self.xp
        z = [xp.zeros((0, lc.num_kv_heads, lc.head_dim), xp.float32) for lc in self.config.layers]
        return KVCache(tuple(z), tuple(z), 0)

    def embed(self, ids):
        """Scaled token embedding: E[ids] · sqrt(H)  ->  [T, H]."""
        return take_rows(self.embed_tokens, ids) * self.embed_scale

    # ------------------------------------------------------------------ encoder mode (§1, §4, §5)

    def encode(self, ids, cache: KVCache | None = None, return_hidden: bool = False, tap=None):
        """Causal pass over ids [T] at positions cache.length ... cache.length + T - 1.

        Returns the new cache (and, with return_hidden, the hidden state after every layer [L, T, H]).
        tap: None, or tap(name, array) to receive every intermediate (a long prompt's pieces in order).
        """
        xp, cfg = self.xp, self.config
        ids = self._ids(ids, "encode")
        cache = cache or self.empty_cache()
        self._check_length(cache.length, ids.shape[0], "encode")
        T = ids.shape[0]
        if T > self.prefill_chunk:   # a long prompt in pieces: each sees the cache of those before it
            hidden = []
            for s in range(0, T, self.prefill_chunk):
                out = self.encode(ids[s:s + self.prefill_chunk], cache, return_hidden, tap)
                cache = out[0] if return_hidden else out
                hidden += [out[1]] if return_hidden else []
            return (cache, xp.concatenate(hidden, axis=1)) if return_hidden else cache
        positions = xp.arange(cache.length, cache.length + T)
        h = self.embed(ids)
        if tap is not None:
            tap("embeddings", h)
        keys, values, hidden = [], [], []
        for i, lc in enumerate(cfg.layers):
            pk, pv = cache.keys[i], cache.values[i]
            key_positions = xp.arange(cache.length - pk.shape[0], cache.length + T)
            # the last layer's FFN feeds no cache: skip it unless its hidden state is asked for
            kv_only = i == cfg.num_hidden_layers - 1 and not return_hidden and tap is None
            h, k, v = self.layer(i, h, positions, pk, pv, key_positions, "encode", kv_only, tap)
            k, v = xp.concatenate([pk, k]), xp.concatenate([pv, v])
            if lc.is_sliding:                          # keep the last W - 1 positions, like DynamicSlidingWindowLayer
                keep = cfg.sliding_window - 1
                k, v = k[-keep:], v[-keep:]
            keys.append(k)
            values.append(v)
            if return_hidden:
                hidden.append(h)
        new = KVCache(tuple(keys), tuple(values), cache.length + T)
        if tap is not None:
            tap("final_norm", rms_norm(xp, h, self.final_norm, cfg.rms_norm_eps))
        return (new, xp.stack(hidden)) if return_hidden else new

    # ------------------------------------------------------------------ denoiser mode (§1, §6, §7)

    def denoise(self, canvas_ids, cache: KVCache, self_conditioning_logits=None, tap=None):
        """Bidirectional pass over the canvas [C] at positions cache.length ... cache.length + C - 1.

        self_conditioning_logits [C, V] (the previous step's tempered logits) or None (first step).
        Returns float32 logits [C, V], softcapped: 30 · tanh(logits / 30). The cache is not modified.
        tap: None, or tap(name, array) to receive every intermediate (minidiff/trace.py).
        """
        xp, cfg = self.xp, self.config
        ids = self._ids(canvas_ids, "denoise: canvas")
        if cache is None:
            raise MinidiffError("denoise: needs the cache from encode(prompt_ids)")
        C, eps = ids.shape[0], cfg.rms_norm_eps
        self._check_length(cache.length, C, "denoise")
        positions = xp.arange(cache.length, cache.length + C)
        x = self.embed(ids)                                                  # [C, H]
        if tap is not None:
            tap("embeddings", x)
        if self_conditioning_logits is not None:
            S = xp.asarray(self_conditioning_logits, dtype=xp.float32)
            if S.shape != (C, cfg.vocab_size):
                raise MinidiffError(f"denoise: self_conditioning_logits must have shape {[C, cfg.vocab_size]}, got {list(S.shape)}")
            soft = soft_embedding(xp, softmax(xp, S), self.embed_tokens) * self.embed_scale   # [C, H]
            s = rms_norm(xp, soft, self.sc["pre_norm"], eps)
            sc = mlp(xp, s, self.sc["gate_proj"], self.sc["up_proj"], self.sc["down_proj"])   # [C, H]
            if tap is not None:
                tap("self_conditioning", sc)
            x = x + sc
        # (no logits: the soft embedding is 0, pre_norm(0) = 0 and the MLP adds exactly 0)
        h = rms_norm(xp, x, eps=eps)                                          # post_norm: no weight
        if tap is not None:
            tap("input", h)
        for i in range(cfg.num_hidden_layers):
            h, _, _ = self.layer(i, h, positions, cache.keys[i], cache.values[i], None, "denoise", tap=tap)
        h = rms_norm(xp, h, self.final_norm, eps)                             # [C, H]
        if tap is not None:
            tap("final_norm", h)
        logits = tied_head(xp, h, self.embed_tokens)                          # [C, V]
        logits = softcap(xp, logits, cfg.final_logit_softcapping)
        if not bool(xp.isfinite(logits).all()):      # NaN in, NaN out: an error, never silent garbage
            raise MinidiffError("denoise: the logits are not finite (NaN): a weight of the checkpoint, the cache "
                                "or the self-conditioning logits hold NaN or infinite values")
        return logits

    def generate(self, prompt_ids, **kwargs):
        """Block-diffusion generation; see `minidiff.sampler.generate`."""
        from .sampler import generate
        return generate(self, prompt_ids, **kwargs)
