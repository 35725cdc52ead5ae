"""Training gradients without torch: central finite differences of the whole objective in float64 on the
default model (every kind of weight, encoder and decoder paths, self-conditioning on), and AdamW against
its textbook formulas. (tests/test_train_ops.py, _layer.py and _objective.py check against torch.)"""

import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

from minidiff.train.objective import Batch, load_params, loss_and_grads
from minidiff.train.trainer import Settings, adamw_step

PROMPT = [2, 105, 449, 447, 433, 446, 437, 451, 438, 16, 106, 107, 105, 109, 107]


def frozen_pass_1(monkeypatch):
    """Pass 1 carries no gradient: the loss as a function of the weights holds its logits fixed. A finite
    difference must do the same, so pass 1 is computed once (at the unperturbed weights) and replayed."""
    import minidiff.train.objective as objective
    pass_1, kept = objective.pass_1, []

    def replay(*args):
        if not kept:                                            # at the unperturbed weights
            kept.append(pass_1(*args))
        return kept[0]
    monkeypatch.setattr(objective, "pass_1", replay)


@pytest.mark.parametrize("use_sc", [True, False])
def test_objective_gradient_equals_finite_differences(use_sc, monkeypatch):
    frozen_pass_1(monkeypatch)
    cfg, params = load_params(None, "float64")
    rng = np.random.default_rng(1)
    C = cfg.canvas_length
    ids = np.concatenate([PROMPT, rng.integers(5, 500, 2 * C)])
    b = 1                                                      # the second canvas: it reads the first
    xt = ids[len(PROMPT) + C:len(PROMPT) + 2 * C].copy()
    xt[::3] = rng.integers(0, cfg.vocab_size, len(xt[::3]))     # corrupted
    batch = Batch(np, [(ids, len(PROMPT) + b * C, xt, use_sc)])
    dec, enc, grads = loss_and_grads(np, params, cfg, batch)
    names = ["model.decoder.embed_tokens.weight", "model.decoder.layers.0.self_attn.q_proj.weight",
             "model.decoder.layers.1.self_attn.k_norm.weight", "model.decoder.layers.2.experts.gate_up_proj",
             "model.decoder.layers.3.router.proj.weight", "model.decoder.layers.0.input_layernorm.weight",
             "model.decoder.layers.2.self_attn.k_proj.weight", "model.decoder.norm.weight"]
    if use_sc:
        names.append("model.decoder.self_conditioning.gate_proj.weight")
    for name in names:
        w = params[name]
        g = grads[name]
        for flat in rng.choice(w.size, 3, replace=False):
            if name.endswith("embed_tokens.weight"):            # an entry of a row that is used
                flat = int(ids[5]) * w.shape[1] + int(flat % w.shape[1])
            i = np.unravel_index(flat, w.shape)
            old = w[i]
            w[i] = old + 1e-6
            up = sum(loss_and_grads(np, params, cfg, batch, backward=False)[:2])
            w[i] = old - 1e-6
            down = sum(loss_and_grads(np, params, cfg, batch, backward=False)[:2])
            w[i] = old
            num = (up - down) / 2e-6
            assert abs(num - g[i]) <= 1e-5 * max(1.0, abs(num)) + 1e-7, (name, i, num, g[i])


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10**6), shapes=st.lists(st.tuples(st.integers(1, 12), st.integers(1, 2), st.booleans()),
                                                   min_size=2, max_size=4))
def test_a_padded_batch_equals_its_examples_one_by_one(seed, shapes):
    """Examples of different lengths in one batch (right-padded, each canvas at its own position, self-
    conditioning on some rows only) give what each gives alone, combined as a mean over positions: padding
    is never read and rows never see each other."""
    cfg, params = load_params(None, "float64")
    rng = np.random.default_rng(seed)
    C, examples = cfg.canvas_length, []
    for prompt_len, canvases, use_sc in shapes:
        ids = rng.integers(5, 500, prompt_len + canvases * C)
        b = int(rng.integers(0, canvases))
        xt = np.where(rng.random(C) < 0.5, rng.integers(0, cfg.vocab_size, C), ids[prompt_len + b * C:][:C])
        examples.append((ids, prompt_len + b * C, xt, use_sc))
    dec, enc, grads = loss_and_grads(np, params, cfg, Batch(np, examples))
    pairs = [len(e[0]) - 1 for e in examples]                  # each example's next-token pairs
    want_dec = want_enc = 0.0
    want = {}
    for e, n in zip(examples, pairs):
        w = (1 / len(examples), n / sum(pairs))
        d, en, g = loss_and_grads(np, params, cfg, Batch(np, [e]), loss_weights=w)
        want_dec, want_enc = want_dec + d * w[0], want_enc + en * w[1]
        for k, v in g.items():
            want[k] = want.get(k, 0) + v
    assert abs(dec - want_dec) < 1e-12 and abs(enc - want_enc) < 1e-12, (dec, want_dec, enc, want_enc)
    assert set(grads) == set(want)
    for k, g in grads.items():
        np.testing.assert_allclose(g, want[k], rtol=1e-9, atol=1e-12, err_msg=k)


def test_adamw_equals_its_formulas():
    """Two steps, by the book: clip by the global norm, m and v, bias correction, decoupled decay."""
    s = Settings(lr=0.01, weight_decay=0.1, clip=1.0)
    b1, b2 = s.betas
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal(4)
    params, state = {"w": w0.copy()}, {}
    ref, m, v = w0.copy(), np.zeros(4), np.zeros(4)
    for step in range(2):
        g = rng.standard_normal(4) * (3 if step == 0 else 0.2)          # the first one is clipped
        adamw_step(np, params, {"w": g}, state, step, s.lr, s)
        g = g * min(1.0, s.clip / (np.linalg.norm(g) + 1e-6))
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        ref = ref * (1 - s.lr * s.weight_decay) - s.lr * (m / (1 - b1 ** (step + 1))) / (
            np.sqrt(v / (1 - b2 ** (step + 1))) + s.eps)
        np.testing.assert_allclose(params["w"], ref, rtol=1e-12)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10**6), window=st.integers(2, 40), prompt_len=st.integers(1, 30), b=st.integers(0, 2),
       use_sc=st.booleans())
def test_the_training_forward_is_the_inference_forward(seed, window, prompt_len, b, use_sc):
    """The denoiser's logits in training (one batched pass, the canvas reading the encoder's cache through
    a mask) equal minidiff.model's (encode the sequence before the canvas, then denoise it), with sliding
    windows small enough to matter in both the encoder and the canvas's context."""
    import dataclasses

    from minidiff.config import load_config
    from minidiff.loader import resolve
    from minidiff.model import Model
    from minidiff.weights import load_text_weights, open_checkpoint
    from unittest import mock

    from minidiff.train import ops
    from minidiff.train.objective import denoiser, encoder, head
    folder = resolve(None)
    cfg = dataclasses.replace(load_config(folder), sliding_window=window)
    _, params = load_params(None, "float32")
    model = Model(cfg, load_text_weights(open_checkpoint(folder), cfg))
    rng = np.random.default_rng(seed)
    C = cfg.canvas_length
    ids = rng.integers(5, 500, prompt_len + 3 * C)
    start = prompt_len + b * C
    xt = rng.integers(0, cfg.vocab_size, C)
    sc = (4 * rng.standard_normal((C, cfg.vocab_size))).astype(np.float32) if use_sc else None
    gaps = []                                              # each token's gap between its k-th and (k+1)-th expert

    def route(xp, res, *args):
        out, saved = ops_route(xp, res, *args)
        p = np.sort(saved[6], axis=-1)[:, ::-1]
        gaps.append(float((p[:, cfg.top_k_experts - 1] - p[:, cfg.top_k_experts]).min()))
        return out, saved
    ops_route = ops.route
    with mock.patch.object(ops, "route", route):
        _, keys, values, _ = encoder(np, params, cfg, ids[None])
        h, _ = denoiser(np, params, cfg, xt[None], np.array([start]), keys, values,
                        None if sc is None else sc[None], np.array([0]))
    # a router tie (two experts within float32 noise of each other) lets two right implementations choose
    # differently: such draws say nothing about the forward (seed 3037, window 40, prompt 29, b 2, with
    # self-conditioning was one: a gap of 7e-8, and 1e-4 of noise on its input flips the training choice)
    assume(min(gaps) > 1e-6)
    got = head(np, params, cfg, h)
    want = model.denoise(xt, model.encode(ids[:start]), sc)
    tol = 1e-4 * max(1.0, float(np.abs(want).max()))       # the project's logit tolerance (float32 sums)
    assert float(np.abs(got[0] - want).max()) <= tol, (float(np.abs(got[0] - want).max()), tol)


@pytest.mark.parametrize("rows_per_block", [1, 3, 7])
def test_the_head_in_blocks_of_rows_equals_the_head_at_once(rows_per_block, monkeypatch):
    """head_loss never holds all logits: with blocks of a few rows (as a 262k vocabulary gets), the losses and
    every gradient equal one block of all rows, to float64 rounding."""
    import minidiff.train.objective as objective
    cfg, params = load_params(None, "float64")
    rng = np.random.default_rng(3)
    C = cfg.canvas_length
    examples = []
    for n, b, sc in ((len(PROMPT), 0, True), (len(PROMPT) + 4, 1, False)):
        ids = np.concatenate([PROMPT * 2, rng.integers(5, 500, 2 * C)])[-(n + 2 * C):]
        examples.append((ids, n + b * C, rng.integers(0, cfg.vocab_size, C), sc))
    batch = Batch(np, examples)
    whole = loss_and_grads(np, params, cfg, batch)
    monkeypatch.setattr(objective, "HEAD_ELEMENTS", rows_per_block * cfg.vocab_size)
    blocks = loss_and_grads(np, params, cfg, batch)
    assert abs(whole[0] - blocks[0]) <= 1e-12 and abs(whole[1] - blocks[1]) <= 1e-12
    for k, g in whole[2].items():
        assert np.abs(blocks[2][k] - g).max() <= 1e-12 * max(1.0, np.abs(g).max()), k
