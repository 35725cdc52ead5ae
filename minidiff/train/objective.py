"""The release's training objective (docs/sampler.md §S18–§S20) for one example, forward and backward.

    encoder   the clean [prompt ; canvases] through the encoder, causally: its KV cache, and logits for the
              next-token loss (tied head + softcap on the final norm)
    corrupt   canvas b (chosen by the caller) with uniform noise: xt (the caller's draw)
    pass 1    the denoiser on xt reading the cache of positions < P + b·C, no self-conditioning, no gradient
    pass 2    the same with self-conditioning on pass 1's softcapped logits when `use_sc`, else none
    losses    decoder: cross-entropy of the clean canvas under pass 2, every position, mean;
              encoder: next-token cross-entropy where token i and i + 1 are both in the sequence, mean

The gradient of the decoder loss flows into the encoder's keys and values (the release does not stop
it); weights shared by both passes get the sum. Everything here is plain NumPy/CuPy through `xp`; the
layer's backward is minidiff/train/layer.py, each op's is minidiff/train/ops.py.
"""

from __future__ import annotations

from . import ops
from .layer import layer_backward, layer_forward

DEC, ENC = "model.decoder", "model.encoder.language_model"


def layer_params(params: dict, i: int) -> dict:
    """The weights of layer i under model.layers[i]'s names (the same for both modes)."""
    p = f"{DEC}.layers.{i}."
    return {n[len(p):]: w for n, w in params.items() if n.startswith(p)}


def head(xp, params, cfg, h):
    """final norm -> tied head -> softcap:  h [T, H] -> (logits [T, V], saved)"""
    n, s_norm = ops.rms_norm(xp, h, params[f"{DEC}.norm.weight"], cfg.rms_norm_eps)
    z, s_head = ops.linear(xp, n, params[f"{DEC}.embed_tokens.weight"])
    y, s_cap = ops.softcap(xp, z, cfg.final_logit_softcapping)
    return y, (s_norm, s_head, s_cap)


def head_backward(xp, dy, saved, grads):
    s_norm, s_head, s_cap = saved
    dz = ops.softcap_backward(xp, dy, s_cap)
    dn, dE = ops.linear_backward(xp, dz, s_head)
    _add(grads, f"{DEC}.embed_tokens.weight", dE)
    dh, dw = ops.rms_norm_backward(xp, dn, s_norm)
    _add(grads, f"{DEC}.norm.weight", dw)
    return dh


def cross_entropy(xp, logits, targets):
    """mean over rows of -log softmax(logits)[target] -> (loss, dlogits)"""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))
    n = targets.shape[0]
    loss = -logp[xp.arange(n), targets].mean()
    d = xp.exp(logp)
    d[xp.arange(n), targets] -= 1
    return loss, d / n


def encoder(xp, params, cfg, ids):
    """Causal pass over ids [S] at positions 0 … S-1 (sliding layers see the last W keys)."""
    S = ids.shape[0]
    pos = xp.arange(S)
    allowed = pos[None, :] <= pos[:, None]
    h, s_emb = ops.embed(xp, ids, params[f"{DEC}.embed_tokens.weight"], cfg.hidden_size ** 0.5)
    keys, values, saved = [], [], []
    for i, lc in enumerate(cfg.layers):
        mask = allowed & (pos[None, :] > pos[:, None] - cfg.sliding_window) if lc.is_sliding else allowed
        empty = xp.zeros((0, lc.num_kv_heads, lc.head_dim), dtype=h.dtype)
        h, k, v, s = layer_forward(xp, layer_params(params, i), lc, cfg.rms_norm_eps, cfg.top_k_experts, h, pos,
                                   xp.asarray(lc.inv_freq), empty, empty, mask,
                                   params[f"{ENC}.layers.{i}.layer_scalar"])
        keys.append(k), values.append(v), saved.append(s)
    logits, s_head = head(xp, params, cfg, h)
    return logits, keys, values, (s_emb, saved, s_head)


def context(cfg, lc, keys, end: int):
    """The cache a canvas starting at `end` reads: positions < end, a sliding layer's last W - 1 of them."""
    start = max(0, end - (cfg.sliding_window - 1)) if lc.is_sliding else 0
    return start, keys[start:end]


def denoiser(xp, params, cfg, xt, start: int, keys, values, sc_logits=None):
    """One denoising pass over the canvas xt [C] at positions start … start + C - 1, reading the encoder's
    keys/values of the positions before it; sc_logits [C, V] (detached) or None."""
    C = xt.shape[0]
    pos = xp.arange(start, start + C)
    x, s_emb = ops.embed(xp, xt, params[f"{DEC}.embed_tokens.weight"], cfg.hidden_size ** 0.5)
    s_sc = None
    if sc_logits is not None:
        probs, _ = ops.softmax(xp, sc_logits)
        soft, s_soft = ops.soft_embedding(xp, probs, params[f"{DEC}.embed_tokens.weight"], cfg.hidden_size ** 0.5)
        n, s_pre = ops.rms_norm(xp, soft, params[f"{DEC}.self_conditioning.pre_norm.weight"], cfg.rms_norm_eps)
        m, s_mlp = ops.mlp(xp, n, *(params[f"{DEC}.self_conditioning.{p}_proj.weight"] for p in ("gate", "up", "down")))
        x = x + m
        s_sc = (s_soft, s_pre, s_mlp)
    h, s_post = ops.rms_norm(xp, x, None, cfg.rms_norm_eps)              # the weightless post_norm
    saved = []
    for i, lc in enumerate(cfg.layers):
        a, pk = context(cfg, lc, keys[i], start)
        _, pv = context(cfg, lc, values[i], start)
        h, _, _, s = layer_forward(xp, layer_params(params, i), lc, cfg.rms_norm_eps, cfg.top_k_experts, h, pos,
                                   xp.asarray(lc.inv_freq), pk, pv, None, params[f"{DEC}.layers.{i}.layer_scalar"])
        saved.append((a, s))
    logits, s_head = head(xp, params, cfg, h)
    return logits, (s_emb, s_sc, s_post, saved, s_head)


def load_params(folder, dtype="float32", xp=None) -> tuple:
    """(config, {name: array}) of a model folder, every tensor dense in `dtype` (the trainable copy)."""
    import numpy as np
    from ..config import load_config
    from ..loader import resolve
    from ..tensors import dense
    from ..weights import load_text_weights, open_checkpoint
    xp = xp or np
    folder = resolve(folder)
    cfg = load_config(folder)
    weights = load_text_weights(open_checkpoint(folder), cfg)
    return cfg, {n: xp.asarray(np.array(dense(w), dtype=dtype)) for n, w in weights.items()}   # writable copies


def loss_and_grads(xp, params, cfg, ids, b: int, xt, use_sc: bool, prompt_len: int, backward: bool = True,
                   weights=(1.0, 1.0)):
    """One example. ids [S] the clean prompt + canvases, canvas b (at prompt_len + b·C) corrupted into xt.
    -> (decoder loss, encoder loss, grads {name: array} of weights[0]·dec + weights[1]·enc; None without
    backward). The weights let a batch combine examples as a mean over all of its positions."""
    C = xt.shape[0]
    start = prompt_len + b * C
    enc_logits, keys, values, s_enc = encoder(xp, params, cfg, ids)
    enc_loss, d_enc = cross_entropy(xp, enc_logits[:-1], ids[1:])
    x0 = ids[start:start + C]
    sc = None
    if use_sc:                                                          # pass 1 (its result is a constant)
        sc, _ = denoiser(xp, params, cfg, xt, start, keys, values)
    logits, s_dec = denoiser(xp, params, cfg, xt, start, keys, values, sc)
    dec_loss, d_dec = cross_entropy(xp, logits, x0)
    if not backward:
        return float(dec_loss), float(enc_loss), None

    grads, dkeys, dvalues = {}, [xp.zeros_like(k) for k in keys], [xp.zeros_like(v) for v in values]
    denoiser_backward(xp, params, cfg, d_dec * weights[0], s_dec, dkeys, dvalues, grads)
    d_full = xp.zeros_like(enc_logits)
    d_full[:-1] = d_enc * weights[1]
    encoder_backward(xp, params, cfg, d_full, s_enc, dkeys, dvalues, grads)
    return float(dec_loss), float(enc_loss), grads


def denoiser_backward(xp, params, cfg, dlogits, saved, dkeys, dvalues, grads):
    """Accumulates into grads, and into dkeys/dvalues (the encoder's cache) for the positions read."""
    s_emb, s_sc, s_post, layers, s_head = saved
    dh = head_backward(xp, dlogits, s_head, grads)
    for i in reversed(range(len(layers))):
        a, s = layers[i]
        dh, dpk, dpv, g, _ = layer_backward(xp, dh, None, None, s)     # layer scalars are buffers: not trained
        dkeys[i][a:a + dpk.shape[0]] += dpk
        dvalues[i][a:a + dpv.shape[0]] += dpv
        _add_layer(grads, i, g)
    dx, _ = ops.rms_norm_backward(xp, dh, s_post)
    _add(grads, f"{DEC}.embed_tokens.weight", ops.embed_backward(xp, dx, s_emb))
    if s_sc is not None:
        s_soft, s_pre, s_mlp = s_sc
        dn, *dw = ops.mlp_backward(xp, dx, s_mlp)
        for p, d in zip(("gate", "up", "down"), dw):
            _add(grads, f"{DEC}.self_conditioning.{p}_proj.weight", d)
        dsoft, dpre = ops.rms_norm_backward(xp, dn, s_pre)
        _add(grads, f"{DEC}.self_conditioning.pre_norm.weight", dpre)
        _add(grads, f"{DEC}.embed_tokens.weight", ops.soft_embedding_backward(xp, dsoft, s_soft))


def encoder_backward(xp, params, cfg, dlogits, saved, dkeys, dvalues, grads):
    s_emb, layers, s_head = saved
    dh = head_backward(xp, dlogits, s_head, grads)
    for i in reversed(range(len(layers))):
        dh, _, _, g, _ = layer_backward(xp, dh, dkeys[i], dvalues[i], layers[i])
        _add_layer(grads, i, g)
    _add(grads, f"{DEC}.embed_tokens.weight", ops.embed_backward(xp, dh, s_emb))


def _add(grads, name, g):
    grads[name] = g if name not in grads else grads[name] + g


def _add_layer(grads, i, g):
    for n, d in g.items():
        _add(grads, f"{DEC}.layers.{i}.{n}", d)
