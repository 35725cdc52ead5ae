"""`minidiff trace` (schema version 2, docs/trace.md): names, shapes, order, metadata, and values equal to
what the API computes; the transformers side is in test_trace_oracle.py."""

import json
from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

import minidiff
from minidiff.cli import main
from minidiff.ops import rms_norm
from minidiff.output import _umask

GOLDEN = Path(__file__).parent / "golden" / "tiny"
PER_LAYER = ["attention", "dense_mlp", "router_ids", "router_weights", "experts", "hidden"]


def expected_names(L, sc, nxt):
    def stack(p, head, tail):
        return [f"{p}.{n}" for n in head] + [f"{p}.layers.{i}.{n}" for i in range(L) for n in PER_LAYER] + \
               [f"{p}.{n}" for n in tail]
    cache = lambda p: [f"cache.{p}.layers.{i}.{kv}" for i in range(L) for kv in ("keys", "values")]  # noqa: E731
    names = ["prompt_ids", "canvas_ids"] + stack("encoder", ["embeddings"], ["final_norm"]) + cache("prompt")
    names += stack("denoiser", ["embeddings", "input"], ["final_norm", "logits"])
    if sc:
        names += stack("denoiser_sc", ["embeddings", "self_conditioning", "input"], ["final_norm", "logits"])
    names += ["commit.ids"] + stack("commit", ["embeddings"], ["final_norm"]) + cache("commit")
    if nxt:
        names += ["next.canvas_ids"] + stack("next", ["embeddings", "input"], ["final_norm", "logits"])
    return names


def test_trace_schema_order_and_values(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code = main(["trace", str(GOLDEN), "--prompt-ids", "2,105,7,19,250,3,44", "--canvas-ids", "17,0,1,106",
                 "--self-conditioning-temperature", "0.8", "--next-canvas-ids", "5,6,7,8", "--out", str(out)])
    assert code == 0
    t = load_file(str(out))
    model = minidiff.load(GOLDEN)
    cfg = model.config
    L, H, V, k = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.top_k_experts
    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    assert meta["schema"] == "minidiff-trace" and meta["schema_version"] == "2"
    assert meta["self_conditioning_temperature"] == "0.8"
    assert json.loads(meta["order"]) == expected_names(L, True, True)
    assert set(t) == set(expected_names(L, True, True))
    assert json.loads(capsys.readouterr().out)["tensors"] == len(t)

    # shapes and dtypes
    assert t["encoder.layers.3.router_ids"].shape == (7, k) and t["encoder.layers.3.router_ids"].dtype == np.int64
    assert t["denoiser.layers.0.attention"].shape == (4, H) and t["denoiser.logits"].shape == (4, V)
    for i, lc in enumerate(cfg.layers):
        keep = min(7, cfg.sliding_window - 1) if lc.is_sliding else 7
        assert t[f"cache.prompt.layers.{i}.keys"].shape == (keep, lc.num_kv_heads, lc.head_dim)
        keep = min(11, cfg.sliding_window - 1) if lc.is_sliding else 11
        assert t[f"cache.commit.layers.{i}.values"].shape == (keep, lc.num_kv_heads, lc.head_dim)

    # values: the API's results
    cache, hidden = model.encode(t["prompt_ids"], return_hidden=True)
    for i in range(L):
        np.testing.assert_array_equal(t[f"encoder.layers.{i}.hidden"], hidden[i])
        np.testing.assert_array_equal(t[f"cache.prompt.layers.{i}.keys"], cache.keys[i])
    np.testing.assert_array_equal(t["encoder.final_norm"], rms_norm(np, hidden[-1], model.final_norm, 1e-6))
    np.testing.assert_array_equal(t["encoder.embeddings"], model.embed(t["prompt_ids"]))
    logits = model.denoise(t["canvas_ids"], cache)
    np.testing.assert_array_equal(t["denoiser.logits"], logits)
    sc_logits = model.denoise(t["canvas_ids"], cache, logits / np.float32(0.8))
    np.testing.assert_array_equal(t["denoiser_sc.logits"], sc_logits)
    np.testing.assert_array_equal(t["commit.ids"], sc_logits.argmax(-1))
    cache = model.encode(t["commit.ids"], cache)
    np.testing.assert_array_equal(t["next.logits"], model.denoise([5, 6, 7, 8], cache))
    for i in range(L):
        np.testing.assert_array_equal(t[f"cache.commit.layers.{i}.values"], cache.values[i])
    w = t["denoiser.layers.2.router_weights"]
    assert np.all(w > 0) and np.all(np.diff(t["denoiser.layers.2.router_ids"], axis=-1) != 0)
    assert [p.name for p in tmp_path.iterdir()] == ["t.safetensors"]
    assert out.stat().st_mode & 0o777 == 0o666 & ~_umask()     # not safetensors' 0600


def test_trace_without_options_has_no_optional_passes(tmp_path):
    out = tmp_path / "t.safetensors"
    assert main(["trace", str(GOLDEN), "--prompt-ids", "2,5", "--canvas-ids", "1", "--out", str(out)]) == 0
    t = load_file(str(out))
    assert set(t) == set(expected_names(6, False, False))
    np.testing.assert_array_equal(t["commit.ids"], t["denoiser.logits"].argmax(-1))


def test_trace_rejects_a_bad_temperature(tmp_path, capsys):
    code = main(["trace", str(GOLDEN), "--prompt-ids", "2", "--canvas-ids", "1",
                 "--self-conditioning-temperature", "0", "--out", str(tmp_path / "t.safetensors")])
    assert code == 2 and "--self-conditioning-temperature must be > 0" in capsys.readouterr().err


def test_long_prompt_pieces_are_joined(tmp_path):
    """A prompt encoded in pieces records the same tensors as one pass (taps concatenate)."""
    from minidiff.compare import compare, format_report
    from minidiff.trace import trace
    model = minidiff.load(GOLDEN)
    prompt = np.arange(2, 40) % 300
    whole = trace(model, prompt, [1, 2, 3])
    model.prefill_chunk = 9
    pieces = trace(model, prompt, [1, 2, 3])
    assert list(whole) == list(pieces)
    rep = compare(whole, list(whole), pieces)        # float noise only: 1e-4 · max(1, max |whole|)
    assert rep["ok"] and len(rep["rows"]) == len(whole), format_report(rep)


def test_commit_takes_the_last_steps_argmax():
    """The sampler commits the argmax of the last step: with self-conditioning, the second step's."""
    from minidiff.model import KVCache
    from minidiff.trace import trace

    class Stub:
        committed = None

        def encode(self, ids, cache=None, tap=None):
            if cache is not None:
                Stub.committed = np.asarray(ids)
            return KVCache((np.zeros((1, 1, 2), np.float32),), (np.zeros((1, 1, 2), np.float32),), 1)

        def denoise(self, ids, cache, sc=None, tap=None):
            logits = np.zeros((len(ids), 5), np.float32)
            logits[:, 1 if sc is None else 3] = 1.0            # the two steps disagree everywhere
            return logits

    t = trace(Stub(), [2, 3], [0, 0, 0], sc_temperature=0.5)
    assert t["commit.ids"].tolist() == [3, 3, 3] == Stub.committed.tolist()
    assert trace(Stub(), [2, 3], [0, 0])["commit.ids"].tolist() == [1, 1]
