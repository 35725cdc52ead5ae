"""The DiffusionGemma text model: embed -> layers -> head, in two modes over one set of weights.

    encode(ids, cache)   causal pass; appends each layer's K/V to the cache (prompt prefill, canvas commit)
    denoise(canvas, cache, sc_logits)
                         bidirectional pass over cache + canvas; reads the cache, never writes it;
                         returns softcapped float32 logits [C, V]

Read top to bottom: the KV cache, one layer, then the two modes; the ops each line calls are in
`ops.py`, one small function each. Every array op goes through `xp` (NumPy or CuPy). Shapes use
    T tokens in this call, S keys (cached + new), H hidden, V vocab, E experts, k experts per token,
    nh query heads, nkv key/value heads, hd head dim, rep = nh // nkv.
Spec: docs/architecture.md (section numbers below refer to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import to_numpy
from .config import DEC, ENC, ModelConfig
from .errors import MinidiffError
from .ops import (attention, causal_attention, experts, linear, mlp, rms_norm, rope, route, soft_embedding,
                  softcap, softmax, tied_head)
from .tensors import take_rows

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
            a = to_numpy(ids)
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
