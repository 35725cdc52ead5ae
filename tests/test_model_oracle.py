"""Live oracle: minidiff's forward pass against transformers' DiffusionGemmaForBlockDiffusion.

Hypothesis draws tiny configs (mixes of sliding/full layers with a full last layer, distinct global
head dims and KV-head counts, windows shorter than the prompt, experts/top-k, canvas lengths) and
perturbed weights; every quantity must agree to 1e-4 · max(1, max |reference|).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

import minidiff  # noqa: E402
import tinyckpt  # noqa: E402
from reference import compare  # noqa: E402

pytestmark = pytest.mark.oracle


@st.composite
def configs(draw):
    n_layers = draw(st.integers(2, 5))
    kinds = draw(st.lists(st.sampled_from(["sliding_attention", "full_attention"]), min_size=n_layers, max_size=n_layers))
    kinds[-1] = "full_attention"
    n_heads = draw(st.sampled_from([2, 4]))
    n_experts = draw(st.integers(2, 8))
    text = dict(
        vocab_size=draw(st.integers(40, 300)),
        hidden_size=draw(st.sampled_from([32, 48, 64])),
        intermediate_size=draw(st.sampled_from([16, 40, 96])),
        num_hidden_layers=n_layers,
        layer_types=kinds,
        num_attention_heads=n_heads,
        num_key_value_heads=draw(st.sampled_from([d for d in (1, 2, 4) if n_heads % d == 0])),
        head_dim=draw(st.sampled_from([4, 8, 16])),
        global_head_dim=draw(st.sampled_from([8, 16, 32])),
        num_global_key_value_heads=draw(st.sampled_from([d for d in (1, 2) if n_heads % d == 0])),
        sliding_window=draw(st.integers(2, 9)),
        num_experts=n_experts,
        top_k_experts=draw(st.integers(1, min(4, n_experts))),
        moe_intermediate_size=draw(st.sampled_from([8, 12, 24])),
    )
    canvas = draw(st.integers(1, 12))
    prompt_len = draw(st.integers(1, 24))
    seed = draw(st.integers(0, 2**16))
    return text, canvas, prompt_len, seed


def _check(text, canvas, prompt_len, seed, tmp_path, T=0.8):
    ref = tinyckpt.build_model(text, canvas_length=canvas, seed=seed)
    folder = tinyckpt.save(ref, tmp_path / f"m{seed}")
    model = minidiff.load(folder)
    rng = np.random.default_rng(seed)
    V = model.config.vocab_size
    prompt = rng.integers(0, V, prompt_len)
    c1, c2 = rng.integers(0, V, canvas), rng.integers(0, V, canvas)
    return compare(ref, model, prompt, c1, c2, T)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(configs())
def test_matches_transformers_on_random_configs(tmp_path, cfg):
    errs = _check(*cfg, tmp_path)
    for name, (err, tol) in errs.items():
        assert err <= tol, f"{name}: max |Δ| {err:.3g} > {tol:.3g} for {cfg}"


def test_release_like_shape_prompt_longer_than_window(tmp_path):
    """5 sliding : 1 full like the release, prompt 3x the window, 2 canvases through the commit path."""
    text = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=5)
    errs = _check(text, 8, 17, 7, tmp_path)
    for name, (err, tol) in errs.items():
        assert err <= tol, f"{name}: max |Δ| {err:.3g} > {tol:.3g}"


def test_broken_window_is_detected(tmp_path):
    """The oracle must catch an off-by-one sliding window (W instead of W-1 cached keys)."""
    text = dict(num_hidden_layers=6, layer_types=["sliding_attention"] * 5 + ["full_attention"], sliding_window=5)
    ref = tinyckpt.build_model(text, canvas_length=8, seed=7)
    model = minidiff.load(tinyckpt.save(ref, tmp_path / "m"))
    rng = np.random.default_rng(7)
    prompt, c1, c2 = rng.integers(0, 256, 17), rng.integers(0, 256, 8), rng.integers(0, 256, 8)
    model.config.sliding_window += 1  # the bug
    errs = compare(ref, model, prompt, c1, c2)
    assert any(err > tol for err, tol in errs.values()), errs


def test_prompt_spanning_several_attention_blocks(tmp_path):
    """A 300-token prompt: the encoder's blocked causal attention crosses 128-query block boundaries."""
    text = dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                sliding_window=40)
    errs = _check(text, 8, 300, 11, tmp_path)
    for name, (err, tol) in errs.items():
        assert err <= tol, f"{name}: max |Δ| {err:.3g} > {tol:.3g}"
