"""One transformer layer for training: the forward of `model.Model.layer`, saving what its backward needs,
and the backward, op by op in reverse (minidiff/train/ops.py has each op's rule).

    forward:  h ─ input_layernorm ─ q/k/v ─ q/k norms, RoPE, v_norm ─ attention(past + new) ─ o_proj
              ─ post_attention_layernorm ─ (+ h) = h1
              h1 ─ dense MLP (pre/post norms) ┐
              h1 ─ router ─ experts (pre/post norms) ┴ post_feedforward_layernorm ─ (+ h1) ─ × layer_scalar

`P` holds the layer's weights under the names of `model.layers[i]` ("self_attn.q_proj.weight", …,
"experts.gate_up_proj"); `scalar` is the mode's layer scalar (the encoder's or the decoder's). Keys and
values of earlier positions (`past_k`, `past_v`) are inputs with gradients: in training the denoiser reads
the encoder's cache, and its gradient flows back into the encoder (the release does not stop it).
"""

from __future__ import annotations

from . import ops

NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm",
         "post_feedforward_layernorm_1", "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2")


def layer_forward(xp, P, lc, eps, top_k, h, positions, inv_freq, past_k, past_v, mask, scalar):
    """h [..., T, H] -> (out [..., T, H], k [..., T, nkv, hd], v [..., T, nkv, hd], saved); past_k/past_v
    [..., P, nkv, hd], positions [..., T], mask [..., T, P + T] bool or None. The leading axes are a batch
    (or none); the router and the experts see every token of it as one list."""
    lead, hd = h.shape[:-1], lc.head_dim
    s = {"lc": lc, "past": past_k.shape[-3], "scalar": scalar}
    x, s["in"] = ops.rms_norm(xp, h, P["input_layernorm.weight"], eps)
    q, s["q"] = ops.linear(xp, x, P["self_attn.q_proj.weight"])
    kr, s["k"] = ops.linear(xp, x, P["self_attn.k_proj.weight"])
    if lc.is_sliding:
        vr, s["v"] = ops.linear(xp, x, P["self_attn.v_proj.weight"])
    else:                                                               # full layers: V is the raw K
        vr = kr
    q, s["qn"] = ops.rms_norm(xp, q.reshape(*lead, -1, hd), P["self_attn.q_norm.weight"], eps)
    q, s["qr"] = ops.rope(xp, q, positions, inv_freq)
    k, s["kn"] = ops.rms_norm(xp, kr.reshape(*lead, -1, hd), P["self_attn.k_norm.weight"], eps)
    k, s["kr"] = ops.rope(xp, k, positions, inv_freq)
    v, s["vn"] = ops.rms_norm(xp, vr.reshape(*lead, -1, hd), None, eps)
    o, s["att"] = ops.attention(xp, q, xp.concatenate([past_k, k], axis=-3), xp.concatenate([past_v, v], axis=-3),
                                mask)
    a, s["o"] = ops.linear(xp, o, P["self_attn.o_proj.weight"])
    a, s["post_attention_layernorm"] = ops.rms_norm(xp, a, P["post_attention_layernorm.weight"], eps)
    h1 = h + a

    m, s["pre_feedforward_layernorm"] = ops.rms_norm(xp, h1, P["pre_feedforward_layernorm.weight"], eps)
    m, s["mlp"] = ops.mlp(xp, m, P["mlp.gate_proj.weight"], P["mlp.up_proj.weight"], P["mlp.down_proj.weight"])
    m, s["post_feedforward_layernorm_1"] = ops.rms_norm(xp, m, P["post_feedforward_layernorm_1.weight"], eps)
    tokens = h1.reshape(-1, h1.shape[-1])                               # [N, H]: every token of the batch
    (ids, w), s["router"] = ops.route(xp, tokens, P["router.scale"], P["router.proj.weight"],
                                      P["router.per_expert_scale"], top_k, eps)
    y, s["pre_feedforward_layernorm_2"] = ops.rms_norm(xp, tokens, P["pre_feedforward_layernorm_2.weight"], eps)
    y, s["experts"] = ops.experts(xp, y, ids, w, P["experts.gate_up_proj"], P["experts.down_proj"])
    y = y.reshape(h1.shape)
    y, s["post_feedforward_layernorm_2"] = ops.rms_norm(xp, y, P["post_feedforward_layernorm_2.weight"], eps)
    z, s["post_feedforward_layernorm"] = ops.rms_norm(xp, m + y, P["post_feedforward_layernorm.weight"], eps)
    h2 = h1 + z
    s["h2"] = h2
    return h2 * scalar, k, v, s


def layer_backward(xp, dout, dk_new, dv_new, s):
    """Gradients of one layer: dout [..., T, H] of its output, dk_new / dv_new [..., T, nkv, hd] of its new keys
    and values from later readers (or None). -> (dh [..., T, H], dpast_k, dpast_v, grads {name: array}, dscalar)."""
    g = {}
    lead = dout.shape[:-1]
    dscalar = (dout * s["h2"]).sum().reshape(1)
    dh1 = dout * s["scalar"]                                            # d h2
    dsum, g["post_feedforward_layernorm.weight"] = ops.rms_norm_backward(xp, dh1, s["post_feedforward_layernorm"])
    dy, g["post_feedforward_layernorm_2.weight"] = ops.rms_norm_backward(xp, dsum, s["post_feedforward_layernorm_2"])
    dy, dw, g["experts.gate_up_proj"], g["experts.down_proj"] = ops.experts_backward(
        xp, dy.reshape(-1, dy.shape[-1]), s["experts"])
    dx, g["pre_feedforward_layernorm_2.weight"] = ops.rms_norm_backward(xp, dy, s["pre_feedforward_layernorm_2"])
    dh1 = dh1 + dx.reshape(lead + dx.shape[-1:])
    dx, g["router.scale"], g["router.proj.weight"], g["router.per_expert_scale"] = ops.route_backward(xp, dw, s["router"])
    dh1 = dh1 + dx.reshape(lead + dx.shape[-1:])
    dm, g["post_feedforward_layernorm_1.weight"] = ops.rms_norm_backward(xp, dsum, s["post_feedforward_layernorm_1"])
    dm, g["mlp.gate_proj.weight"], g["mlp.up_proj.weight"], g["mlp.down_proj.weight"] = ops.mlp_backward(xp, dm, s["mlp"])
    dx, g["pre_feedforward_layernorm.weight"] = ops.rms_norm_backward(xp, dm, s["pre_feedforward_layernorm"])
    dh1 = dh1 + dx

    da, g["post_attention_layernorm.weight"] = ops.rms_norm_backward(xp, dh1, s["post_attention_layernorm"])
    do, g["self_attn.o_proj.weight"] = ops.linear_backward(xp, da, s["o"])
    dq, dkeys, dvalues = ops.attention_backward(xp, do, s["att"])
    n = s["past"]
    dk, dv = dkeys[..., n:, :, :], dvalues[..., n:, :, :]
    if dk_new is not None:
        dk, dv = dk + dk_new, dv + dv_new
    dv, _ = ops.rms_norm_backward(xp, dv, s["vn"])
    dk = ops.rope_backward(xp, dk, s["kr"])
    dk, g["self_attn.k_norm.weight"] = ops.rms_norm_backward(xp, dk, s["kn"])
    dq = ops.rope_backward(xp, dq, s["qr"])
    dq, g["self_attn.q_norm.weight"] = ops.rms_norm_backward(xp, dq, s["qn"])
    dx, g["self_attn.q_proj.weight"] = ops.linear_backward(xp, dq.reshape(*lead, -1), s["q"])
    if s["lc"].is_sliding:
        dxv, g["self_attn.v_proj.weight"] = ops.linear_backward(xp, dv.reshape(*lead, -1), s["v"])
        dx = dx + dxv
    else:
        dk = dk + dv                                                    # V was the raw K
    dxk, g["self_attn.k_proj.weight"] = ops.linear_backward(xp, dk.reshape(*lead, -1), s["k"])
    dh, g["input_layernorm.weight"] = ops.rms_norm_backward(xp, dx + dxk, s["in"])
    return dh1 + dh, dkeys[..., :n, :, :], dvalues[..., :n, :, :], g, dscalar
