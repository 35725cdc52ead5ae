"""Exactness without torch: minidiff against reference outputs committed by tools/make_golden.py.

The checkpoint in tests/golden/tiny is stored in BF16 (exercising the bf16 -> f32 widening); the
expected tensors were computed by transformers (fp32, eager) on the same bf16-representable weights.
"""

from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

import minidiff
from minidiff.model import rms_norm

GOLDEN = Path(__file__).parent / "golden"


def test_golden_outputs_match():
    exp = load_file(str(GOLDEN / "expected.safetensors"))
    model = minidiff.load(GOLDEN / "tiny")
    prompt, c1, c2, T = exp["prompt"], exp["canvas1"], exp["canvas2"], float(exp["temperature"][0])
    assert len(prompt) > model.config.sliding_window  # the window rule is exercised

    cache, hidden = model.encode(prompt, return_hidden=True)
    hidden[-1] = rms_norm(np, hidden[-1], model.final_norm, model.config.rms_norm_eps)
    logits = model.denoise(c1, cache)
    got = {"hidden": hidden, "logits": logits, "sc_logits": model.denoise(c1, cache, logits / np.float32(T)),
           "logits2": model.denoise(c2, model.encode(c1, cache))}
    for name, value in got.items():
        ref = exp[name]
        tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
        err = float(np.abs(ref - value).max())
        assert err <= tol, f"{name}: max |Δ| {err:.3g} > {tol:.3g}"


def test_golden_detects_a_wrong_layer_scalar():
    """Swapping encoder and decoder layer scalars must break the golden comparison."""
    exp = load_file(str(GOLDEN / "expected.safetensors"))
    model = minidiff.load(GOLDEN / "tiny")
    for layer in model.layers:
        layer["layer_scalar"], layer["encoder_layer_scalar"] = layer["encoder_layer_scalar"], layer["layer_scalar"]
    logits = model.denoise(exp["canvas1"], model.encode(exp["prompt"]))
    assert np.abs(logits - exp["logits"]).max() > 1e-2
