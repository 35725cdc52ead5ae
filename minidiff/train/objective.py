"""The release's training objective (docs/sampler.md §S18–§S20) for a batch, forward and backward.

    encoder   the clean [prompt ; canvases] of every example through the encoder, causally: its KV cache,
              and logits for the next-token loss (tied head + softcap on the final norm)
    corrupt   one canvas per example with uniform noise: xt (the caller's draw)
    pass 1    the denoiser on xt reading the cache of the positions before the canvas, no self-conditioning,
              no gradient (only for the examples that use self-conditioning)
    pass 2    the same with self-conditioning on pass 1's softcapped logits where chosen, else none
    losses    decoder: cross-entropy of the clean canvas under pass 2, every position, mean over the batch;
              encoder: next-token cross-entropy where token i and i + 1 are both in the sequence, mean

A batch is one array per quantity (`Batch`): the sequences right-padded to one length S, so that every op
runs once for the whole batch (no Python loop over examples). Padding is never read: the encoder is causal
and padding comes last, a canvas reads only the positions before it, and the encoder loss skips it.

The head and its loss run a block of rows at a time (`head_loss`, at most HEAD_ELEMENTS logits at once),
so a 262,144-entry vocabulary never costs B · S · V floats (pass 1's logits, the input of self-conditioning,
are the one whole [n, C, V] array). The gradient of the decoder loss flows into the encoder's keys and
values (the release does not stop it); weights shared by both passes get the sum. Everything here is plain
NumPy/CuPy through `xp`; the layer's backward is minidiff/train/layer.py, each op's is minidiff/train/ops.py.
"""

from __future__ import annotations

from ..config import DEC, ENC
from . import ops
from .layer import layer_backward, layer_forward

HEAD_ELEMENTS = 1 << 22          # logits alive at once in head_loss: rows · V <= this (16 MB of float32)


def layer_params(params: dict, i: int) -> dict:
    """The weights of layer i under model.layers[i]'s names (the same for both modes)."""
    p = f"{DEC}.layers.{i}."
    return {n[len(p):]: w for n, w in params.items() if n.startswith(p)}


def head(xp, params, cfg, h):
    """final norm -> tied head -> softcap:  h [..., H] -> logits [..., V], no gradient (pass 1's logits; the
    losses go through head_loss)"""
    n, _ = ops.rms_norm(xp, h, params[f"{DEC}.norm.weight"], cfg.rms_norm_eps)
    return ops.softcap(xp, ops.linear(xp, n, params[f"{DEC}.embed_tokens.weight"])[0], cfg.final_logit_softcapping)[0]


def head_loss(xp, params, cfg, h, targets, weight, backward=True, scale=1.0):
    """final norm -> tied head -> softcap -> cross-entropy, and their backward, a block of rows at a time.

    h [..., H], targets/weight [...] (weight 0: a row without a loss). -> (loss = Σ weight · CE, dh [..., H] and
    the head's grads {name: array} of scale · loss; None, None without backward). A block is as many rows
    as keep rows · V <= HEAD_ELEMENTS, so the whole logits never exist; each block's softcap and linear
    backward run while its logits are at hand, and only dn [rows, H] and dE [V, H] are kept."""
    H = h.shape[-1]
    n, s_norm = ops.rms_norm(xp, h.reshape(-1, H), params[f"{DEC}.norm.weight"], cfg.rms_norm_eps)   # [N, H]
    E, t, w = params[f"{DEC}.embed_tokens.weight"], targets.reshape(-1), weight.reshape(-1)
    rows = max(1, HEAD_ELEMENTS // E.shape[0])
    losses, dn, dE = [], (xp.empty_like(n) if backward else None), None
    for a in range(0, n.shape[0], rows):
        z, s_lin = ops.linear(xp, n[a:a + rows], E)                                        # [rows, V]
        y, s_cap = ops.softcap(xp, z, cfg.final_logit_softcapping)
        block_loss, dy = cross_entropy(xp, y, t[a:a + rows], w[a:a + rows])
        losses.append(block_loss)                                   # summed on the device, read once
        if backward:
            dn[a:a + rows], dE_block = ops.linear_backward(xp, ops.softcap_backward(xp, dy * scale, s_cap), s_lin)
            dE = dE_block if dE is None else dE + dE_block
    loss = float(sum(losses))
    if not backward:
        return loss, None, None
    dh, dw = ops.rms_norm_backward(xp, dn, s_norm)
    return loss, dh.reshape(h.shape), {f"{DEC}.embed_tokens.weight": dE, f"{DEC}.norm.weight": dw}


def cross_entropy(xp, logits, targets, weight):
    """Σ over rows of weight · -log softmax(logits)[target]   (logits [N, V], targets/weight [N])
    -> (loss, dlogits)"""
    z = logits - logits.max(axis=-1, keepdims=True)
    logp = z - xp.log(xp.exp(z).sum(axis=-1, keepdims=True))
    rows = xp.arange(targets.shape[0])
    loss = -(weight * logp[rows, targets]).sum()
    d = xp.exp(logp)
    d[rows, targets] -= 1
    return loss, d * weight[:, None]


def encoder(xp, params, cfg, ids):
    """Causal pass over ids [B, S] at positions 0 … S-1 (sliding layers see the last W keys).
    -> (final hidden state [B, S, H] (head_loss takes it on), keys and values per layer [B, S, nkv, hd], saved)"""
    S = ids.shape[-1]
    pos = xp.arange(S)
    allowed = pos[None, :] <= pos[:, None]                              # [S, S], the same for every row
    masks = {False: allowed, True: allowed & (pos[None, :] > pos[:, None] - cfg.sliding_window)}   # by is_sliding
    h, s_emb = ops.embed(xp, ids, params[f"{DEC}.embed_tokens.weight"], cfg.hidden_size ** 0.5)
    keys, values, saved = [], [], []
    for i, lc in enumerate(cfg.layers):
        empty = xp.zeros(ids.shape[:-1] + (0, lc.num_kv_heads, lc.head_dim), dtype=h.dtype)
        h, k, v, s = layer_forward(xp, layer_params(params, i), lc, cfg.rms_norm_eps, cfg.top_k_experts, h, pos,
                                   xp.asarray(lc.inv_freq), empty, empty, masks[lc.is_sliding],
                                   params[f"{ENC}.layers.{i}.layer_scalar"])
        keys.append(k), values.append(v), saved.append(s)
    return h, keys, values, (s_emb, saved)


def context_mask(xp, cfg, sliding: bool, starts, S: int, C: int):
    """What a canvas starting at position `start` reads: the cache positions before it (a sliding layer only
    the last W - 1 of them) and its own C positions, all of them (bidirectional). -> [B, C, S + C] bool"""
    j = xp.arange(S)[None, :]
    ok = j < starts[:, None]                                            # [B, S]
    if sliding:
        ok &= j >= starts[:, None] - (cfg.sliding_window - 1)
    past = xp.broadcast_to(ok[:, None, :], (starts.shape[0], C, S))
    return xp.concatenate([past, xp.ones((starts.shape[0], C, C), dtype=bool)], axis=-1)


def denoiser(xp, params, cfg, xt, starts, keys, values, sc_logits=None, sc_rows=None):
    """One denoising pass over the canvases xt [B, C], row b at positions starts[b] … starts[b] + C - 1,
    reading the encoder's keys/values [B, S, nkv, hd] of the positions before it. Self-conditioning:
    sc_logits [n, C, V] (detached) for the rows sc_rows [n], or None. -> (final hidden state [B, C, H], saved)"""
    C = xt.shape[-1]
    pos = starts[:, None] + xp.arange(C)[None, :]                       # [B, C]
    x, s_emb = ops.embed(xp, xt, params[f"{DEC}.embed_tokens.weight"], cfg.hidden_size ** 0.5)
    s_sc = None
    if sc_logits is not None:
        probs, _ = ops.softmax(xp, sc_logits)
        soft, s_soft = ops.soft_embedding(xp, probs, params[f"{DEC}.embed_tokens.weight"], cfg.hidden_size ** 0.5)
        n, s_pre = ops.rms_norm(xp, soft, params[f"{DEC}.self_conditioning.pre_norm.weight"], cfg.rms_norm_eps)
        m, s_mlp = ops.mlp(xp, n, *(params[f"{DEC}.self_conditioning.{p}_proj.weight"] for p in ("gate", "up", "down")))
        x[sc_rows] += m                                                 # the other rows: no signal at all
        s_sc = (s_soft, s_pre, s_mlp, sc_rows)
    h, s_post = ops.rms_norm(xp, x, None, cfg.rms_norm_eps)              # the weightless post_norm
    S = keys[0].shape[-3]
    kinds = {lc.is_sliding for lc in cfg.layers}
    masks = {sliding: context_mask(xp, cfg, sliding, starts, S, C) for sliding in kinds}     # one per layer kind
    saved = []
    for i, lc in enumerate(cfg.layers):
        h, _, _, s = layer_forward(xp, layer_params(params, i), lc, cfg.rms_norm_eps, cfg.top_k_experts, h, pos,
                                   xp.asarray(lc.inv_freq), keys[i], values[i], masks[lc.is_sliding],
                                   params[f"{DEC}.layers.{i}.layer_scalar"])
        saved.append(s)
    return h, (s_emb, s_sc, s_post, saved)


def pass_1(xp, params, cfg, batch, keys, values, rows):
    """The first denoising pass for the examples `rows` that self-condition: softcapped logits [n, C, V],
    a constant of the objective (no gradient flows through them)."""
    h, _ = denoiser(xp, params, cfg, batch.xt[rows], batch.starts[rows], [k[rows] for k in keys],
                    [v[rows] for v in values])
    return head(xp, params, cfg, h)


def load_params(folder, dtype="float32", xp=None) -> tuple:
    """(config, {name: array}) of a model folder, every tensor dense in `dtype` (the trainable copy)."""
    import numpy as np
    from ..config import load_config
    from ..loader import resolve
    from ..weights import load_text_weights, open_checkpoint
    xp = xp or np
    folder = resolve(folder)
    cfg = load_config(folder)
    weights = load_text_weights(open_checkpoint(folder), cfg)
    return cfg, {n: xp.asarray(np.array(w, dtype=dtype)) for n, w in weights.items()}   # writable copies


class Batch:
    """One training batch as arrays. Example b: the clean sequence ids[b, :lengths[b]] (prompt + its answer
    canvases; right-padded with `pad`), its corrupted canvas xt[b] standing at positions starts[b] …
    starts[b] + C - 1 (in place of ids there), and whether pass 2 self-conditions on pass 1 (use_sc[b])."""

    def __init__(self, xp, examples, pad: int = 0):
        """examples: (ids [S_b], first position of the corrupted canvas, xt [C], use_sc) per example."""
        S = max(len(e[0]) for e in examples)
        ids = [list(map(int, e[0])) + [pad] * (S - len(e[0])) for e in examples]
        self.ids = xp.asarray(ids, dtype=xp.int64)                              # [B, S]
        self.lengths = xp.asarray([len(e[0]) for e in examples])                # [B]
        self.starts = xp.asarray([int(e[1]) for e in examples])                 # [B]
        self.xt = xp.asarray([list(map(int, e[2])) for e in examples], dtype=xp.int64)   # [B, C]
        self.use_sc = xp.asarray([bool(e[3]) for e in examples])               # [B]
        C = self.xt.shape[1]
        self.x0 = xp.take_along_axis(self.ids, self.starts[:, None] + xp.arange(C)[None, :], axis=1)


def loss_and_grads(xp, params, cfg, batch: Batch, backward: bool = True, loss_weights=(1.0, 1.0)):
    """-> (decoder loss, encoder loss, grads {name: array} of w_dec · dec + w_enc · enc; None without backward).
    Each loss is a mean over its positions in the whole batch (the canvases' B·C; the encoder's next-token
    pairs). The release weighs the two alike: loss_weights (1, 1)."""
    B, S = batch.ids.shape
    C = batch.xt.shape[1]
    h_enc, keys, values, s_enc = encoder(xp, params, cfg, batch.ids)
    pairs = xp.arange(S)[None, :] < (batch.lengths - 1)[:, None]      # [B, S]: token i+1 is in the sequence
    next_ids = xp.concatenate([batch.ids[:, 1:], batch.ids[:, :1]], axis=1)   # [B, S]: target of position i
    enc_loss, dh_enc, g_enc = head_loss(xp, params, cfg, h_enc, next_ids, (pairs / pairs.sum()).astype(h_enc.dtype),
                                        backward, loss_weights[1])
    sc, rows = None, xp.flatnonzero(batch.use_sc)
    if rows.size:                                                       # pass 1 (its result is a constant)
        sc = pass_1(xp, params, cfg, batch, keys, values, rows)
    h_dec, s_dec = denoiser(xp, params, cfg, batch.xt, batch.starts, keys, values, sc, rows)
    dec_loss, dh_dec, g_dec = head_loss(xp, params, cfg, h_dec, batch.x0, xp.full((B, C), 1.0 / (B * C), h_dec.dtype),
                                        backward, loss_weights[0])
    if not backward:
        return dec_loss, enc_loss, None

    grads, dkeys, dvalues = {}, [xp.zeros_like(k) for k in keys], [xp.zeros_like(v) for v in values]
    for name, g in g_dec.items():
        _add(grads, name, g)
    denoiser_backward(xp, params, cfg, dh_dec, s_dec, dkeys, dvalues, grads)
    for name, g in g_enc.items():
        _add(grads, name, g)
    encoder_backward(xp, params, cfg, dh_enc, s_enc, dkeys, dvalues, grads)
    return dec_loss, enc_loss, grads


def denoiser_backward(xp, params, cfg, dh, saved, dkeys, dvalues, grads):
    """dh [B, C, H] (from head_loss) down the layers. Accumulates into grads, and into dkeys/dvalues (the
    encoder's cache) for the positions read."""
    s_emb, s_sc, s_post, layers = saved
    for i in reversed(range(len(layers))):
        dh, dpk, dpv, g, _ = layer_backward(xp, dh, None, None, layers[i])   # layer scalars are buffers
        dkeys[i] += dpk
        dvalues[i] += dpv
        _add_layer(grads, i, g)
    dx, _ = ops.rms_norm_backward(xp, dh, s_post)
    _add(grads, f"{DEC}.embed_tokens.weight", ops.embed_backward(xp, dx, s_emb))
    if s_sc is not None:
        s_soft, s_pre, s_mlp, rows = s_sc
        dn, *dw = ops.mlp_backward(xp, dx[rows], s_mlp)
        for p, d in zip(("gate", "up", "down"), dw):
            _add(grads, f"{DEC}.self_conditioning.{p}_proj.weight", d)
        dsoft, dpre = ops.rms_norm_backward(xp, dn, s_pre)
        _add(grads, f"{DEC}.self_conditioning.pre_norm.weight", dpre)
        _add(grads, f"{DEC}.embed_tokens.weight", ops.soft_embedding_backward(xp, dsoft, s_soft))


def encoder_backward(xp, params, cfg, dh, saved, dkeys, dvalues, grads):
    """dh [B, S, H] (from head_loss) and the cache's dkeys/dvalues down the layers into grads."""
    s_emb, layers = saved
    for i in reversed(range(len(layers))):
        dh, _, _, g, _ = layer_backward(xp, dh, dkeys[i], dvalues[i], layers[i])
        _add_layer(grads, i, g)
    _add(grads, f"{DEC}.embed_tokens.weight", ops.embed_backward(xp, dh, s_emb))


def _add(grads, name, g):
    grads[name] = g if name not in grads else grads[name] + g


def _add_layer(grads, i, g):
    for n, d in g.items():
        _add(grads, f"{DEC}.layers.{i}.{n}", d)
