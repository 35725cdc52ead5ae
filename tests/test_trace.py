"""`minidiff trace`: the exported tensors follow docs/trace.md and equal the API's outputs."""

from pathlib import Path

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file

import minidiff
from minidiff.cli import main
from minidiff.model import rms_norm

GOLDEN = Path(__file__).parent / "golden" / "tiny"


def test_trace_schema_and_values(tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code = main(["trace", str(GOLDEN), "--prompt-ids", "2,105,7,19,250,3,44", "--canvas-ids", "17,0,1,106",
                 "--self-conditioning-temperature", "0.8", "--out", str(out)])
    assert code == 0
    t = load_file(str(out))
    model = minidiff.load(GOLDEN)
    L, H, V = model.config.num_hidden_layers, model.config.hidden_size, model.config.vocab_size
    assert {k: v.shape for k, v in t.items()} == {
        "prompt_ids": (7,), "canvas_ids": (4,), "encoder.embeddings": (7, H), "encoder.hidden_states": (L, 7, H),
        "encoder.final_norm": (7, H), "denoiser.logits": (4, V), "denoiser.sc_logits": (4, V)}
    assert t["prompt_ids"].dtype == np.int64 and t["denoiser.logits"].dtype == np.float32
    cache, hidden = model.encode(t["prompt_ids"], return_hidden=True)
    np.testing.assert_array_equal(t["encoder.hidden_states"], hidden)
    np.testing.assert_array_equal(t["encoder.final_norm"], rms_norm(np, hidden[-1], model.final_norm, 1e-6))
    logits = model.denoise(t["canvas_ids"], cache)
    np.testing.assert_array_equal(t["denoiser.logits"], logits)
    np.testing.assert_array_equal(t["denoiser.sc_logits"], model.denoise(t["canvas_ids"], cache, logits / np.float32(0.8)))
    with safe_open(str(out), "np") as f:
        assert f.metadata()["self_conditioning_temperature"] == "0.8"
    assert sorted(p.name for p in tmp_path.iterdir() if "partial" in p.name) == []


def test_trace_without_self_conditioning_has_no_sc_tensor(tmp_path):
    out = tmp_path / "t.safetensors"
    assert main(["trace", str(GOLDEN), "--prompt-ids", "2,5", "--canvas-ids", "1", "--out", str(out)]) == 0
    assert "denoiser.sc_logits" not in load_file(str(out))


def test_trace_rejects_a_bad_temperature(tmp_path, capsys):
    code = main(["trace", str(GOLDEN), "--prompt-ids", "2", "--canvas-ids", "1",
                 "--self-conditioning-temperature", "0", "--out", str(tmp_path / "t.safetensors")])
    assert code == 2 and "--self-conditioning-temperature must be > 0" in capsys.readouterr().err
