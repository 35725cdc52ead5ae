"""Bad input -> one clear line naming the problem, a non-zero exit, never a traceback."""

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import minidiff
from minidiff.errors import MinidiffError

GOLDEN = Path(__file__).parent / "golden" / "tiny"
EXPERTS = "model.decoder.layers.0.experts.gate_up_proj"


def run_trace(folder, prompt="2,5,9", canvas="1,2,3", out=None):
    """`minidiff trace` in a fresh process -> (exit code, stderr)."""
    out = out or Path(folder) / "trace.safetensors"
    p = subprocess.run([sys.executable, "-m", "minidiff.cli", "trace", str(folder), "--prompt-ids", prompt,
                        "--canvas-ids", canvas, "--out", str(out)],
                       capture_output=True, text=True, timeout=120)
    return p.returncode, p.stderr


def assert_one_line_error(code, err, *needles):
    assert code != 0
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minidiff: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(GOLDEN, d)
    return d


def test_the_good_checkpoint_works(model_dir):
    code, err = run_trace(model_dir)
    assert code == 0, err
    assert (model_dir / "trace.safetensors").is_file()


def test_truncated_shard(model_dir):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    assert_one_line_error(*run_trace(model_dir), "truncated", "model.safetensors")


def test_header_length_past_end_of_file(model_dir):
    f = model_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 4) + data[8:])
    assert_one_line_error(*run_trace(model_dir), "header length", "past the end")


def load_file(path):
    """name -> (safetensors dtype, raw bits) of every tensor (works for BF16, unlike safetensors.numpy)."""
    f = minidiff.weights.SafetensorsFile(path)
    return {n: (f.entries[n][0], np.array(f.raw(n))) for n in f.entries}


def save_file(tensors, path):
    """Write {name: (dtype, array)} as a safetensors file: [u64 N][JSON header][data]."""
    header, blobs, off = {}, [], 0
    for name, (dtype, a) in tensors.items():
        b = np.ascontiguousarray(a).tobytes()
        header[name] = {"dtype": dtype, "shape": list(a.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    raw = json.dumps(header).encode()
    Path(path).write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


def _rewrite_header(f, edit):
    data = f.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def test_unknown_dtype(model_dir):
    _rewrite_header(model_dir / "model.safetensors", lambda h: h[EXPERTS].update(dtype="Q7"))
    assert_one_line_error(*run_trace(model_dir), "unknown dtype", "Q7", EXPERTS)


def test_wrong_shape(model_dir):
    t = load_file(str(model_dir / "model.safetensors"))
    t["model.decoder.norm.weight"] = ("F32", np.ones(7, dtype=np.float32))
    save_file(t, str(model_dir / "model.safetensors"))
    assert_one_line_error(*run_trace(model_dir), "model.decoder.norm.weight", "shape [7]", "expected [64]")


def test_missing_tensor(model_dir):
    t = load_file(str(model_dir / "model.safetensors"))
    del t["model.decoder.layers.2.self_attn.v_proj.weight"]
    save_file(t, str(model_dir / "model.safetensors"))
    assert_one_line_error(*run_trace(model_dir), "missing tensor", "layers.2.self_attn.v_proj.weight")


def test_missing_encoder_layer_scalar(model_dir):
    t = load_file(str(model_dir / "model.safetensors"))
    del t["model.encoder.language_model.layers.4.layer_scalar"]
    save_file(t, str(model_dir / "model.safetensors"))
    assert_one_line_error(*run_trace(model_dir), "missing tensor", "language_model.layers.4.layer_scalar")


def test_index_points_to_missing_shard(model_dir):
    names = load_file(str(model_dir / "model.safetensors")).keys()
    weight_map = {n: "model.safetensors" for n in names}
    weight_map[EXPERTS] = "model-00002-of-00002.safetensors"
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_one_line_error(*run_trace(model_dir), "missing shard", "model-00002-of-00002.safetensors")


def test_sharded_checkpoint_loads_and_matches(model_dir):
    """Split into two shards with an index: same logits as the single file."""
    t = load_file(str(model_dir / "model.safetensors"))
    names = sorted(t)
    a, b = names[::2], names[1::2]
    save_file({n: t[n] for n in a}, str(model_dir / "model-00001-of-00002.safetensors"))
    save_file({n: t[n] for n in b}, str(model_dir / "model-00002-of-00002.safetensors"))
    weight_map = {n: "model-00001-of-00002.safetensors" for n in a} | {n: "model-00002-of-00002.safetensors" for n in b}
    (model_dir / "model.safetensors").unlink()
    (model_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    sharded, single = minidiff.load(model_dir), minidiff.load(GOLDEN)
    ids = [2, 7, 9, 11]
    np.testing.assert_array_equal(sharded.denoise([1, 2, 3], sharded.encode(ids)),
                                  single.denoise([1, 2, 3], single.encode(ids)))


@pytest.mark.parametrize("edit, needle", [
    (lambda c: "{not json", "not valid JSON"),
    (lambda c: json.dumps({**c, "text_config": {k: v for k, v in c["text_config"].items() if k != "hidden_size"}}),
     "missing field text_config.hidden_size"),
    (lambda c: json.dumps({**c, "text_config": {**c["text_config"], "top_k_experts": 99}}),
     "text_config.top_k_experts = 99 is out of range"),
    (lambda c: json.dumps({**c, "text_config": {**c["text_config"], "num_hidden_layers": "six"}}),
     "text_config.num_hidden_layers must be an integer"),
    (lambda c: json.dumps({**c, "model_type": "llama"}), "model_type 'llama'"),
])
def test_broken_config(model_dir, edit, needle):
    cfg = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(edit(cfg))
    assert_one_line_error(*run_trace(model_dir), "config.json", needle)


def test_canvas_ids_out_of_vocabulary(model_dir):
    assert_one_line_error(*run_trace(model_dir, canvas="1,2,320"), "token id 320", "outside the vocabulary")
    model = minidiff.load(model_dir)
    with pytest.raises(MinidiffError, match="outside the vocabulary"):
        model.denoise([-1, 3], model.encode([2, 3]))


def test_bad_cli_values(model_dir):
    assert_one_line_error(*run_trace(model_dir, prompt="2,x,9"), "--prompt-ids")
    assert_one_line_error(*run_trace(model_dir / "nope", out=model_dir / "t.safetensors"), "nope: no such folder")


def test_prompt_longer_than_context(model_dir):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["text_config"]["max_position_embeddings"] = 8
    (model_dir / "config.json").write_text(json.dumps(cfg))
    assert_one_line_error(*run_trace(model_dir, prompt=",".join(["5"] * 9)), "exceed the model's context of 8")


def test_vision_tensors_are_never_read(model_dir):
    """Corrupting every vision tensor's bytes (all 0xFF: NaN in any float format) changes nothing: they are
    skipped without being read."""
    clean = minidiff.load(GOLDEN)
    f = minidiff.weights.SafetensorsFile(model_dir / "model.safetensors")
    vision = [n for n in f.entries if "vision" in n]
    assert vision
    data = bytearray((model_dir / "model.safetensors").read_bytes())
    for n in vision:
        dtype, shape, begin = f.entries[n]
        nbytes = int(np.prod(shape)) * np.dtype(minidiff.weights.DTYPES[dtype]).itemsize
        data[f.data_start + begin:f.data_start + begin + nbytes] = b"\xff" * nbytes
    (model_dir / "model.safetensors").write_bytes(bytes(data))
    model = minidiff.load(model_dir)
    assert not any("vision" in n for layer in model.layers for n in layer)
    prompt, canvas = [2, 5, 9, 11], [1, 2, 3, 4, 5, 6, 7, 8]
    np.testing.assert_array_equal(model.denoise(canvas, model.encode(prompt)),
                                  clean.denoise(canvas, clean.encode(prompt)))
