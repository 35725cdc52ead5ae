"""Exactness without torch: minidiff's trace against the golden trace that transformers computed
(tools/make_golden.py; fp32, eager, on the bf16 checkpoint in tests/golden/tiny, so the bf16 widening path
is covered). Every tensor of the trace schema (docs/trace.md) must agree to 1e-4 · max(1, max |reference|)."""

from pathlib import Path

from safetensors import safe_open

import minidiff
from minidiff.compare import compare, format_report, read_trace
from minidiff.trace import SCHEMA_VERSION, trace

GOLDEN = Path(__file__).parent / "golden"


def _golden_trace(model):
    exp, order = read_trace(GOLDEN / "trace.safetensors", "golden")
    with safe_open(str(GOLDEN / "trace.safetensors"), "np") as f:
        meta = f.metadata()
    T = float(meta["self_conditioning_temperature"])
    got = trace(model, exp["prompt_ids"], exp["canvas_ids"], T, exp["next.canvas_ids"])
    return exp, order, got, meta


def test_golden_trace_matches():
    model = minidiff.load(GOLDEN / "tiny")
    exp, order, got, meta = _golden_trace(model)
    assert meta["schema_version"] == str(SCHEMA_VERSION)       # the golden file is in the current schema
    assert len(exp["prompt_ids"]) > model.config.sliding_window  # the window rule is exercised
    assert list(got) == order                                    # same names, same order
    rep = compare(exp, order, got)
    assert rep["ok"] and len(rep["rows"]) == len(order), format_report(rep)


def test_golden_detects_a_wrong_layer_scalar():
    """Swapping encoder and decoder layer scalars must break the comparison at the first layer."""
    model = minidiff.load(GOLDEN / "tiny")
    for layer in model.layers:
        layer["layer_scalar"], layer["encoder_layer_scalar"] = layer["encoder_layer_scalar"], layer["layer_scalar"]
    exp, order, got, _ = _golden_trace(model)
    rep = compare(exp, order, got)
    assert rep["first_past_tolerance"] == "encoder.layers.0.hidden"
    logits = next(r for r in rep["rows"] if r["name"] == "denoiser.logits")
    assert logits["max_abs"] > 1e-2
