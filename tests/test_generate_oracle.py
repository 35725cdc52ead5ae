"""Trajectory oracle: minidiff's `generate` against transformers' `generate`, token for token.

Both sides consume ONE numpy Generator in the portable-randomness order (docs/randomness.md):
    canvas start: integers(0, V, size=(B, C))
    every step:   random(B*C)  (categorical draws by inverse CDF)  then  integers(0, V, size=(B, C))
On the transformers side, `EntropyBoundSampler.initialize_canvas` (canvas start and renoising) and
`torch.multinomial` (the categorical draw) are patched to consume that Generator. The inverse CDF in the
patch is written out here independently of minidiff's implementation.

The tiny checkpoints have a confident embedding (embed_std 1.5-2, tests/tinyckpt.py): near-uniform random
models are chaotic under self-conditioning and two correct implementations drift apart (oracle.md).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from transformers.models.diffusion_gemma import generation_diffusion_gemma as hfgen  # noqa: E402

import minidiff  # noqa: E402
import tinyckpt  # noqa: E402

pytestmark = pytest.mark.oracle


def _hf_generate(ref, prompts, rng, monkeypatch, **kw):
    """transformers' generate with the protocol's draws injected; returns (sequences, tokens_per_forward)."""

    def initialize_canvas(self, batch_size, device):
        return torch.from_numpy(rng.integers(0, self.vocab_size, size=(batch_size, self.canvas_length)))

    def multinomial(probs, num_samples, replacement=False, *, generator=None, out=None):
        assert num_samples == 1
        p = probs.detach().cpu().numpy()                          # [R, V] float32
        u = rng.random(p.shape[0])                                # [R] float64 in [0, 1)
        cdf = np.cumsum(p.astype(np.float64), axis=-1)            # sequential float64 cumsum
        idx = np.count_nonzero(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
        return torch.from_numpy(np.minimum(idx, p.shape[1] - 1).astype(np.int64))[:, None]

    monkeypatch.setattr(hfgen.EntropyBoundSampler, "initialize_canvas", initialize_canvas)
    monkeypatch.setattr(torch, "multinomial", multinomial)
    args = dict(kw)
    args["sampler_config"] = hfgen.EntropyBoundSamplerConfig(entropy_bound=float(args.pop("entropy_bound")))
    ids = torch.tensor(np.asarray(prompts), dtype=torch.long)
    with torch.no_grad():
        out = ref.generate(input_ids=ids, **args)
    monkeypatch.undo()
    return out.sequences.numpy(), out.tokens_per_forward.numpy()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(transformers model, minidiff model) pairs: canvas 8 / vocab 128 and canvas 12 / vocab 200."""
    out = {}
    for name, text, C, seed, std in [("a", dict(vocab_size=128), 8, 3, 2.0),
                                     ("b", dict(vocab_size=200, sliding_window=5), 12, 11, 1.5)]:
        ref = tinyckpt.build_model(text, canvas_length=C, seed=seed, embed_std=std)
        folder = tinyckpt.save(ref, tmp_path_factory.mktemp(f"gen_{name}"))
        out[name] = (ref, minidiff.load(folder))
    return out


CASES = {
    # name: (checkpoint, generate kwargs). eos_token_id "row0": a stop id that first appears in the second
    # canvas of row 0 (in a batch the other row goes on: row 0 gets pad canvases and is still denoised, as
    # in HF); "all": one such id per row, so every row stops after the second canvas.
    "fixed_steps": ("a", dict(max_denoising_steps=10, stability_threshold=None, confidence_threshold=None)),
    "fixed_steps_eos": ("a", dict(max_denoising_steps=10, stability_threshold=None, confidence_threshold=None,
                                  eos_token_id="all")),
    # adaptive stopping fires on these models only with a generous budget/threshold (checked below)
    "adaptive": ("a", dict(max_denoising_steps=12, entropy_bound=3.0, stability_threshold=1,
                           confidence_threshold=1.0)),
    "adaptive_eos": ("b", dict(max_denoising_steps=12, entropy_bound=1.0, t_min=0.05, t_max=0.3,
                               stability_threshold=2, confidence_threshold=1.0, eos_token_id="row0")),
    "defaults_b": ("b", dict(max_denoising_steps=8)),
    "wide_bound": ("b", dict(max_denoising_steps=6, entropy_bound=1.0, t_min=0.2, t_max=1.1,
                             stability_threshold=0, confidence_threshold=4.0)),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("batch", [1, 2])
def test_trajectory_matches_transformers(case, batch, checkpoints, monkeypatch):
    ckpt, kw = CASES[case]
    ref, model = checkpoints[ckpt]
    V, C = model.config.vocab_size, model.config.canvas_length
    data = np.random.default_rng(200 + batch)
    prompts = data.integers(5, V, size=(batch, 6))
    base = dict(entropy_bound=0.1, t_min=0.4, t_max=0.8, pad_token_id=0, max_new_tokens=3 * C + 1)  # 4 canvases
    base.update(kw)
    seed = 1234 + batch

    stop = base.get("eos_token_id")
    if stop in ("row0", "all"):
        base["eos_token_id"] = [V + 7]
        probe = model.generate(prompts if batch > 1 else prompts[0], rng=np.random.default_rng(seed), **base)
        first = np.concatenate([t[:C] for t in probe.tokens])
        ids = []
        for row in probe.tokens[:1] if stop == "row0" else probe.tokens:
            fresh = [t for t in row[C:2 * C] if t not in first and t != 0]
            assert fresh, "no token to pick as a stop id"
            ids.append(int(fresh[0]))
        base["eos_token_id"] = ids + [V + 7]
    else:
        base.setdefault("eos_token_id", [V + 7])  # never sampled: no stop

    ours = model.generate(prompts if batch > 1 else prompts[0], rng=np.random.default_rng(seed), **base)
    theirs, tpf = _hf_generate(ref, prompts, np.random.default_rng(seed), monkeypatch, **base)

    ours_seq = np.atleast_2d(ours.sequences)
    assert ours_seq.shape == theirs.shape, (ours_seq.shape, theirs.shape)
    mismatch = np.argwhere(ours_seq != theirs)
    assert mismatch.size == 0, f"first mismatch at {mismatch[0]} of {theirs.shape}"
    assert np.allclose(np.atleast_1d(ours.tokens_per_forward), tpf, rtol=0, atol=1e-6)
    n_canvases = (theirs.shape[1] - prompts.shape[1]) // C
    N = base["max_denoising_steps"]
    if case.startswith("adaptive"):                 # the early stop really fired (and matched)
        assert ours.passes.min() < N * n_canvases
        assert min(ours.steps_per_canvas) < N
    if stop in ("row0", "all"):
        assert ours.finished[0] and (ours.tokens[0][C:2 * C] == 0).any()     # padded after the stop id
        assert (ours.tokens[0][2 * C:] == 0).all()                          # later canvases: all pad
        assert n_canvases == (2 if stop == "all" or batch == 1 else 4)
    else:
        assert n_canvases == 4 and not ours.finished.any()
