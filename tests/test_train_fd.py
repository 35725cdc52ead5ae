"""Training gradients without torch: central finite differences of the whole objective in float64 on the
default model (every kind of weight, encoder and decoder paths, self-conditioning on), and AdamW against
its textbook formulas. (tests/test_train_ops.py, _layer.py and _objective.py check against torch.)"""

import numpy as np
import pytest

from minidiff.train.objective import load_params, loss_and_grads
from minidiff.train.trainer import Settings, adamw_step

PROMPT = [2, 105, 449, 447, 433, 446, 437, 451, 438, 16, 106, 107, 105, 109, 107]


@pytest.mark.parametrize("use_sc", [True, False])
def test_objective_gradient_equals_finite_differences(use_sc):
    cfg, params = load_params(None, "float64")
    rng = np.random.default_rng(1)
    C = cfg.canvas_length
    ids = np.concatenate([PROMPT, rng.integers(5, 500, 2 * C)])
    b = 1                                                      # the second canvas: it reads the first
    xt = ids[len(PROMPT) + C:len(PROMPT) + 2 * C].copy()
    xt[::3] = rng.integers(0, cfg.vocab_size, len(xt[::3]))     # corrupted
    dec, enc, grads = loss_and_grads(np, params, cfg, ids, b, xt, use_sc, len(PROMPT))
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
            up = sum(loss_and_grads(np, params, cfg, ids, b, xt, use_sc, len(PROMPT), backward=False)[:2])
            w[i] = old - 1e-6
            down = sum(loss_and_grads(np, params, cfg, ids, b, xt, use_sc, len(PROMPT), backward=False)[:2])
            w[i] = old
            num = (up - down) / 2e-6
            assert abs(num - g[i]) <= 1e-5 * max(1.0, abs(num)) + 1e-7, (name, i, num, g[i])


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
