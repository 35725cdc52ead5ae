"""The trainer's forward is the model's forward: train/layer.py's `layer_forward` (built on train/ops.py, whose
forwards call minidiff/ops.py where they can) against `Model.layer`, both modes, every layer of a checkpoint
whose norms, router scales and layer scalars are all away from 1.0, in float32, without torch. The two differ
only in how they order float32 sums (batched attention, a saved-intermediates GELU), so they agree to float32
rounding: 2e-5 · max(1, |h|) here, on a router whose top-k choice is not a near tie (gap ≥ 1e-6, checked)."""

from pathlib import Path

import numpy as np
import pytest

import minidiff
from minidiff import ops
from minidiff.train import ops as train_ops
from minidiff.train.layer import layer_forward
from minidiff.train.objective import layer_params, load_params

GOLDEN = Path(__file__).parent / "golden" / "tiny"


def router_gap(model, i, h):
    """The smallest gap between a token's k-th and (k+1)-th router probability (a tie flips either path)."""
    w, cfg = model.layers[i], model.config
    r = ops.rms_norm(np, h, eps=cfg.rms_norm_eps) * w["router.scale"] * cfg.hidden_size ** -0.5
    p = np.sort(ops.softmax(np, ops.linear(r, w["router.proj.weight"])), axis=-1)[:, ::-1]
    return float((p[:, cfg.top_k_experts - 1] - p[:, cfg.top_k_experts]).min())


@pytest.mark.parametrize("mode", ["encode", "denoise"])
def test_layer_forward_is_model_layer(mode):
    model = minidiff.load(GOLDEN)
    cfg, (_, params) = model.config, load_params(GOLDEN)
    scalars = [float(np.asarray(w["layer_scalar"]).reshape(-1)[0]) for w in model.layers]
    assert all(abs(s - 1) > 1e-3 for s in scalars)                      # the scalars are exercised
    rng = np.random.default_rng(0)
    P, T = 5, 4
    cache = model.encode(rng.integers(0, cfg.vocab_size, P))
    compared = 0
    for i, lc in enumerate(cfg.layers):
        h = rng.standard_normal((T, cfg.hidden_size)).astype(np.float32)
        if router_gap(model, i, h) < 1e-6:
            continue
        pos = np.arange(P, P + T)
        pk, pv = cache.keys[i], cache.values[i]
        key_pos = np.arange(P - pk.shape[0], P + T)
        want, k_want, v_want = model.layer(i, h, pos, pk, pv, key_pos, mode)
        if mode == "encode":
            mask = key_pos[None, :] <= pos[:, None]
            if lc.is_sliding:
                mask &= key_pos[None, :] > pos[:, None] - cfg.sliding_window
            name = f"model.encoder.language_model.layers.{i}.layer_scalar"
        else:
            mask, name = None, f"model.decoder.layers.{i}.layer_scalar"
        got, k_got, v_got, _ = layer_forward(np, layer_params(params, i), lc, cfg.rms_norm_eps, cfg.top_k_experts, h,
                                             pos, lc.inv_freq, pk, pv, mask, params[name])
        for a, b in ((got, want), (k_got, k_want), (v_got, v_want)):
            assert a.dtype == np.float32 and a.shape == b.shape
            np.testing.assert_allclose(a, b, rtol=0, atol=2e-5 * max(1.0, float(np.abs(b).max())))
        compared += 1
    assert compared == cfg.num_hidden_layers                            # no layer skipped on this draw


def test_train_forward_ops_are_the_models_ops():
    """Each train/ops.py forward gives the model op's float32 result (bit for bit where it calls it)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 8)).astype(np.float32)
    w = rng.standard_normal(8).astype(np.float32)
    W = rng.standard_normal((6, 8)).astype(np.float32)
    pos, inv = np.array([0, 3, 7]), rng.random(4).astype(np.float32)
    same = np.testing.assert_array_equal
    same(train_ops.rms_norm(np, x, w)[0], ops.rms_norm(np, x, w))
    same(train_ops.softmax(np, x)[0], ops.softmax(np, x))
    same(train_ops.softcap(np, 10 * x, 3.0)[0], ops.softcap(np, 10 * x, 3.0))
    same(train_ops.rope(np, x, pos, inv)[0], ops.rope(np, x, pos, inv))
    same(train_ops.linear(np, x, W)[0], ops.linear(x, W))
    close = dict(rtol=0, atol=2e-6)
    np.testing.assert_allclose(train_ops.gelu_tanh(np, x)[0], ops.gelu_tanh(np, x.copy()), **close)
    q, k, v = (rng.standard_normal((4, n, 8)).astype(np.float32) for n in (4, 2, 2))
    mask = rng.random((4, 4)) < 0.7
    mask[np.arange(4), np.arange(4)] = True
    np.testing.assert_allclose(train_ops.attention(np, q, k, v, mask)[0], ops.attention(np, q, k, v, mask), **close)
    gu, dn = rng.standard_normal((5, 12, 8)).astype(np.float32), rng.standard_normal((5, 8, 6)).astype(np.float32)
    idx, wt = np.stack([rng.choice(5, 2, replace=False) for _ in range(4)]), rng.random((4, 2)).astype(np.float32)
    xe = rng.standard_normal((4, 8)).astype(np.float32)
    np.testing.assert_allclose(train_ops.experts(np, xe, idx, wt, gu, dn)[0], ops.experts(np, xe, idx, wt, gu, dn),
                               rtol=0, atol=1e-5)
