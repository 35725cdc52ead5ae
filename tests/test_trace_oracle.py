"""Live oracle for the full trace: every tensor minidiff's trace records (per-layer attention, dense MLP,
router choices and weights, experts, hidden states of the encoder, both denoiser steps, the commit and
the next canvas; both KV caches) against the same tensors captured from transformers with forward hooks,
to 1e-4 · max(1, max |reference|) — the tolerance of the logits tests."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings  # noqa: E402

import minidiff  # noqa: E402
import tinyckpt  # noqa: E402
from minidiff.compare import compare, format_report  # noqa: E402
from minidiff.trace import trace  # noqa: E402
from reference import reference_trace  # noqa: E402
from test_model_oracle import configs  # noqa: E402

pytestmark = pytest.mark.oracle


def _check(text, canvas, prompt_len, seed, folder, chunk=None):
    ref = tinyckpt.build_model(text, canvas_length=canvas, seed=seed)
    model = minidiff.load(tinyckpt.save(ref, folder))
    if chunk:
        model.prefill_chunk = chunk
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    prompt, c1, c2 = rng.integers(0, V, prompt_len), rng.integers(0, V, canvas), rng.integers(0, V, canvas)
    expected = reference_trace(ref, prompt, c1, 0.8, c2)
    got = trace(model, prompt, c1, 0.8, c2)
    assert set(got) == set(expected), sorted(set(got) ^ set(expected))
    rep = compare(expected, list(got), got)
    assert rep["ok"], format_report(rep)
    L = model.config.num_hidden_layers
    assert len(rep["rows"]) == 2 + 4 + 6 * L * 5 + 4 * 3 + 2 * 2 * L + 3   # nothing skipped
    return rep


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs())
def test_every_traced_tensor_matches_transformers(tmp_path, cfg):
    text, canvas, prompt_len, seed = cfg
    _check(text, canvas, prompt_len, seed, tmp_path / f"m{seed}")


def test_trace_of_a_chunked_prefill_matches(tmp_path):
    """A prompt encoded in pieces (prefill_chunk) records the same tensors as one pass would."""
    text = dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                sliding_window=4)
    _check(text, 5, 23, 5, tmp_path / "m", chunk=7)
