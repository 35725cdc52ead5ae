"""Hostile model folders and arguments: one `minidiff: error:` line, a non-zero exit, within seconds, nothing
read outside the folder, nothing left behind, the source untouched (docs/security.md).

One test per class of attack or accident; the two parsers are also fuzzed (Hypothesis)."""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import minidiff
from minidiff import formats as Q
from minidiff import schemes as S
from minidiff.chat import ChatTemplate
from minidiff.cli_generate import for_terminal
from minidiff.config import parse_config
from minidiff.errors import MinidiffError
from minidiff.output import destination_lock
from minidiff.quantize import convert
from minidiff.generation_config import GenerationConfig
from minidiff.weights import SafetensorsFile, open_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "tiny"
DEFAULT = Path(minidiff.__file__).parent / "default_model"
SECRET = b"root:x:0:0:secret-bytes-never-echoed"


def cli(*argv, stdin=None, timeout=60, env=None, preexec=None, stdout=subprocess.PIPE):
    """`minidiff ARGV` in a fresh process -> (exit code, stdout, stderr, seconds)."""
    t = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "minidiff.cli", *map(str, argv)], input=stdin, stdout=stdout,
                       stderr=subprocess.PIPE, timeout=timeout, env=env, preexec_fn=preexec)
    return p.returncode, p.stdout or b"", p.stderr.decode("utf-8", "replace"), time.monotonic() - t


def one_line(code, err, *needles):
    """A non-zero exit whose stderr ends in exactly one `minidiff: error:` line (progress notes of a long
    command may come before it), no traceback, no bytes of the secret file."""
    assert code not in (0, None), err
    assert "Traceback" not in err and "Warning" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("minidiff: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    assert all(line.startswith(("note: ", "minidiff: error: ", "[")) for line in lines), err
    for n in needles:
        assert n in errors[0], (n, errors[0])
    assert "secret-bytes" not in err


def trace(folder, out=None, **kw):
    out = out or Path(folder).parent / "trace.safetensors"
    return cli("trace", folder, "--prompt-ids", "2,5,9", "--canvas-ids", "1,2,3", "--out", out, **kw)


@pytest.fixture
def model(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(GOLDEN, d)
    return d


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "private.key"
    p.write_bytes(struct.pack("<Q", 12) + SECRET)
    return p


def edit_config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


# ---------------------------------------------------------------- nothing outside the folder


@pytest.mark.parametrize("target", ["../private.key", "{secret}", "sub/../../private.key",
                                    "sub/../model.safetensors"])   # '..' is refused even when it stays inside
def test_index_naming_a_file_outside_is_refused(model, secret, target):
    target = target.format(secret=secret)
    names = open_checkpoint(model).names()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: target for n in names}}))
    code, _, err, _ = trace(model)
    one_line(code, err, "model.safetensors.index.json", "file")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "a/../x", "/etc/passwd", "\\\\server\\x", "c:x", "a\x00b", ""])
def test_folder_names_are_plain_relative_names(name):
    """`plain_name`, the rule every name taken from a folder's own files passes: relative, no '..' at all."""
    from minidiff.folder import plain_name
    with pytest.raises(MinidiffError):
        plain_name(name, "index")
    assert plain_name("sub/model-00001-of-00002.safetensors", "index")


def test_a_shard_linking_outside_the_folder_is_refused(model, secret):
    (model / "model.safetensors").rename(model.parent / "elsewhere.safetensors")
    os.symlink(model.parent / "elsewhere.safetensors", model / "model.safetensors")
    one_line(*_ce(trace(model)), "outside the model folder")
    (model / "model.safetensors").unlink()
    os.symlink(secret, model / "model.safetensors")
    one_line(*_ce(trace(model)), "outside the model folder")


def test_a_hub_cache_snapshot_linking_into_its_blobs_loads(tmp_path):
    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in GOLDEN.iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(Path("../../blobs") / f.name, snap / f.name)
    assert minidiff.load(snap).config.vocab_size > 0


def test_a_named_pipe_is_not_opened(model):
    (model / "model.safetensors").unlink()
    os.mkfifo(model / "model.safetensors")
    code, _, err, secs = trace(model, timeout=30)
    one_line(code, err, "not a regular file")
    assert secs < 20


def test_quantize_does_not_copy_links_to_outside_files(tmp_path, secret):
    src = tmp_path / "src"
    shutil.copytree(GOLDEN, src)
    os.symlink(secret, src / "notes.txt")
    (src / "README.md").write_text("kept")
    code, _, err, _ = cli("quantize", src, tmp_path / "q")
    assert code == 0, err
    assert (tmp_path / "q" / "README.md").read_text() == "kept"
    assert not (tmp_path / "q" / "notes.txt").exists() and "skipped notes.txt" in err
    assert not any(SECRET in p.read_bytes() for p in (tmp_path / "q").rglob("*") if p.is_file())


def _ce(r):
    code, _, err, _ = r
    return code, err


# ---------------------------------------------------------------- no hang, no memory bomb


@pytest.mark.parametrize("field, value, needle", [
    ("num_hidden_layers", 10 ** 9, "num_hidden_layers"),
    ("num_hidden_layers", 10 ** 40, "digits"),
    ("head_dim", 2 ** 31, "head_dim"),
    ("vocab_size", 2 ** 40, "vocab_size"),
    ("max_position_embeddings", 2 ** 62, "max_position_embeddings"),
])
def test_huge_config_sizes_are_refused_before_anything_is_allocated(model, field, value, needle):
    text = (model / "config.json").read_text()
    cfg = json.loads(text)
    cfg["text_config"][field] = 0
    (model / "config.json").write_text(json.dumps(cfg).replace(f'"{field}": 0', f'"{field}": {value}'))
    code, _, err, secs = trace(model)
    one_line(code, err, needle)
    assert secs < 20


def test_generation_limits_scale_with_the_model(model):
    c = GenerationConfig.from_dict({"stability_threshold": 10 ** 9, "max_denoising_steps": 4})
    assert c.stability_threshold == 4                                   # clamped: equivalent, and small
    with pytest.raises(MinidiffError, match="max_denoising_steps"):
        GenerationConfig.from_dict({"max_denoising_steps": 10 ** 12})
    (model / "generation_config.json").write_text('{"stability_threshold": 1000000000, "max_denoising_steps": 2}')
    r = minidiff.load(model).generate([2, 5], max_new_tokens=4, seed=0)
    assert r.steps_per_canvas == [2]


@pytest.mark.parametrize("source, needle", [
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}", "longer than"),
    ("{{ 'x' * 10000000000 }}", "memory"),
    ("{% for i in range(99999) %}{{ 'y' * 1000 }}{% endfor %}", "longer than"),
    ("{% macro m(n) %}{{ m(n) }}{% endmacro %}{{ m(1) }}", "recursed"),
])
def test_chat_templates_are_bounded_in_time_memory_and_output(source, needle):
    t = time.monotonic()
    with pytest.raises(MinidiffError, match=needle):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}], max_chars=100000)
    assert time.monotonic() - t < 15


def test_a_regex_that_backtracks_is_refused(tmp_path):
    with pytest.raises(MinidiffError, match="exponential"):
        S._ct_scheme({"config_groups": {"g": {"targets": ["Linear"]}}, "ignore": ["re:(a+)+$"]},
                     "a" * 22 + "!", "x", "config.json")   # (unchecked, this match alone takes ~1 s)


def test_infill_with_a_huge_gap_is_refused():
    code, _, err, secs = cli("generate", "--infill", "a[[99999999999999]]b", "--max-new-tokens", "4")
    one_line(code, err, "--infill")
    assert secs < 30


# ---------------------------------------------------------------- never silent garbage


@pytest.mark.parametrize("text_config, needle", [
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"final_logit_softcapping": 0.0}, "final_logit_softcapping"),
    ({"hidden_size": 1.5}, "hidden_size"),
    ({"hidden_size": True}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"layer_types": "all"}, "layer_types"),
    ({"rope_parameters": {"sliding_attention": {"rope_theta": "big"}}}, "rope"),
])
def test_config_values_are_typed_and_finite(model, text_config, needle):
    edit_config(model, lambda c: c["text_config"].update(text_config))
    one_line(*_ce(trace(model)), needle)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e400"])
def test_non_finite_json_numbers_are_refused(model, literal):
    text = (model / "config.json").read_text()
    cfg = json.loads(text)
    cfg["text_config"]["rope_parameters"]["full_attention"]["rope_theta"] = 12345
    (model / "config.json").write_text(json.dumps(cfg).replace("12345", literal))
    one_line(*_ce(trace(model)), "config.json")


def test_a_nan_weight_is_an_error_not_nan_logits(model):
    f = SafetensorsFile(model / "model.safetensors")
    name = "model.decoder.layers.0.self_attn.q_proj.weight"
    dtype, shape, begin = f.entries[name]
    data = bytearray((model / "model.safetensors").read_bytes())
    data[f.data_start + begin:f.data_start + begin + 2] = b"\xc0\x7f"            # bf16 NaN
    (model / "model.safetensors").write_bytes(bytes(data))
    one_line(*_ce(trace(model)), "not finite")


def test_a_tiny_temperature_is_an_error():
    m = minidiff.load(None)
    with pytest.raises(MinidiffError, match="too small"):
        m.generate([2, 5], max_new_tokens=4, seed=0, t_min=0.0, t_max=1e-40)


def test_overlapping_tensors_are_refused(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    blob = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(16))
    with pytest.raises(MinidiffError, match="overlap"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_a_broken_chat_template_is_an_error_not_a_raw_prompt(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(DEFAULT, d)
    (d / "chat_template.jinja").write_text("{% if %}")
    one_line(*_ce(cli("generate", "hello", "--model", d)), "chat_template.jinja", "not a valid jinja2 template")
    (d / "chat_template.jinja").write_bytes(b"\xff\xfe{{ bos_token }}")
    one_line(*_ce(cli("generate", "hello", "--model", d)), "UTF-8")


def test_quantize_refuses_nan_weights_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(GOLDEN, src)
    f = SafetensorsFile(src / "model.safetensors")
    dtype, shape, begin = f.entries["model.decoder.layers.1.experts.down_proj"]
    data = bytearray((src / "model.safetensors").read_bytes())
    data[f.data_start + begin + 6:f.data_start + begin + 8] = b"\x80\x7f"           # bf16 +inf
    (src / "model.safetensors").write_bytes(bytes(data))
    one_line(*_ce(cli("quantize", src, tmp_path / "q")), "NaN or infinite")
    assert list((tmp_path / "q").iterdir()) == []


def test_trace_never_overwrites_the_model_it_reads(model):
    before = (model / "model.safetensors").read_bytes()
    one_line(*_ce(trace(model, out=model / "model.safetensors")), "of the model being traced")
    os.symlink(model / "config.json", model.parent / "alias.json")
    one_line(*_ce(trace(model, out=model.parent / "alias.json")), "of the model being traced")
    assert (model / "model.safetensors").read_bytes() == before


# ---------------------------------------------------------------- tracebacks -> one line


@pytest.mark.parametrize("entry", [
    {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4.0], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},
    {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [10 ** 20, 10 ** 20], "data_offsets": [0, 16]},
    {"dtype": "F32", "shape": [4], "data_offsets": [0, "16"]},
    {"dtype": "F32", "shape": [4], "data_offsets": [16, 0]},
    {"dtype": "F32", "shape": [4], "data_offsets": {"a": 1}},
    "not an object",
])
def test_malformed_header_entries(tmp_path, entry):
    blob = json.dumps({"t": entry}).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(16))
    with pytest.raises(MinidiffError, match="x.safetensors"):
        SafetensorsFile(tmp_path / "x.safetensors")


def test_deeply_nested_json_and_bad_utf8(model):
    (model / "config.json").write_text("[" * 200000 + "]" * 200000)
    one_line(*_ce(trace(model)), "config.json")
    (model / "config.json").write_bytes(b'{"text_config": "\xff"}')
    one_line(*_ce(trace(model)), "config.json", "UTF-8")


def test_invalid_utf8_in_arguments_and_stdin():
    code, _, err, _ = cli("generate", os.fsdecode(b"caf\xe9"))
    one_line(code, err, "UTF-8")
    code, _, err, _ = cli("generate", stdin=b"caf\xe9 au lait")
    one_line(code, err, "UTF-8")


def test_a_full_disk_is_one_line():
    with open("/dev/full", "wb") as full:
        code, _, err, _ = cli("generate", "Write a haiku about the sea", "--seed", "0", stdout=full)
    one_line(code, err, "No space left")


def test_closed_standard_streams():
    code, _, err, _ = cli("generate", "hello", stdout=subprocess.DEVNULL, preexec=lambda: os.close(1))
    one_line(code, err, "standard output is closed")
    code, _, err, _ = cli("chat", preexec=lambda: os.close(0))
    one_line(code, err, "standard input")
    code, _, err, _ = cli("generate", preexec=lambda: os.close(0))
    one_line(code, err, "empty prompt")


def test_output_paths_that_cannot_be_written(model, tmp_path):
    one_line(*_ce(trace(model, out=tmp_path)), "is a folder")
    (tmp_path / "file").write_text("x")
    one_line(*_ce(trace(model, out=tmp_path / "file" / "t.safetensors")), "not a folder")
    one_line(*_ce(cli("quantize", model, tmp_path / "file")), "not a folder")


def test_disk_full_while_quantizing_leaves_nothing(tmp_path):
    import resource
    import signal

    def limit():                                   # files may not grow past 64 KiB: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
    (tmp_path / "q").mkdir()
    one_line(*_ce(cli("quantize", GOLDEN, tmp_path / "q", preexec=limit)), "q")
    assert list((tmp_path / "q").iterdir()) == []


# ---------------------------------------------------------------- writers that cannot lose data


def test_a_second_writer_to_the_same_destination_is_refused(tmp_path):
    dst = tmp_path / "q"
    dst.mkdir()
    with destination_lock(dst):
        with pytest.raises(MinidiffError, match="another minidiff process"):
            convert(GOLDEN, dst)
    assert list(dst.iterdir()) == []
    convert(GOLDEN, dst)                                                 # once free, it works
    assert (dst / "config.json").is_file()


def test_force_keeps_the_old_checkpoint_when_the_source_is_bad(tmp_path):
    dst = tmp_path / "q"
    convert(GOLDEN, dst)
    before = {p.name: p.read_bytes() for p in dst.iterdir()}
    bad = tmp_path / "bad"
    shutil.copytree(GOLDEN, bad)
    (bad / "model.safetensors").write_bytes(b"\x00" * 7)
    one_line(*_ce(cli("quantize", bad, dst, "--force")), "truncated")
    assert {p.name: p.read_bytes() for p in dst.iterdir()} == before


# ---------------------------------------------------------------- terminal, ModelOpt config


def test_terminal_escapes_are_shown_not_executed():
    evil = "ok\x1b]0;pwned\x07\x1b[2J\u202egnp.exe\x9b31m"
    shown = for_terminal(evil)
    assert "\x1b" not in shown and "\x07" not in shown and "\u202e" not in shown and "\x9b" not in shown
    assert shown.startswith("ok\\x1b]0;pwned\\x07") and "\\u202e" in shown
    assert for_terminal("line one\n\tline two") == "line one\n\tline two"
    assert for_terminal("a\nb", keep_lines=False) == "a\\x0ab"


def test_modelopt_config_carries_ignore_and_config_groups(tmp_path):
    dst = convert(GOLDEN, tmp_path / "mo", fmt="nvfp4-modelopt")
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["ignore"] == qc["exclude_modules"] and "lm_head" in qc["ignore"]
    assert qc["config_groups"]["group_0"]["weights"]["group_size"] == 16
    assert minidiff.load(dst).config.vocab_size > 0
    for key in ("ignore", "exclude_modules"):                         # either spelling excludes
        assert S._modelopt_scheme({key: ["*router*"], "quant_algo": "NVFP4"}, "model.layers.0.router.proj",
                                  "t", "s") is None


# ---------------------------------------------------------------- fuzzing the parsers


def _valid_header():
    return {"__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
            "b": {"dtype": "BF16", "shape": [3], "data_offsets": [16, 22]}}


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False)
                    | st.text(max_size=5), lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=4), c, max_size=4),
                    max_leaves=12)


FUZZ = int(os.environ.get("MINIDIFF_FUZZ_EXAMPLES", "300"))   # raise for a longer fuzzing run


@settings(max_examples=FUZZ, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.lists(st.sampled_from(["a", "b", "dtype", "shape", "data_offsets", 0, 1, "__metadata__", "format"]),
                     min_size=1, max_size=3), value=JSON, raw=st.binary(max_size=40), mode=st.integers(0, 2),
       cut=st.integers(0, 60))
def test_fuzz_safetensors_header(tmp_path, path, value, raw, mode, cut):
    h = _valid_header()
    node = h
    for k in path[:-1]:
        node = node.get(k) if isinstance(node, dict) else (node[k] if isinstance(node, list) and isinstance(k, int) and k < len(node) else None)
        if node is None:
            break
    if isinstance(node, dict) and isinstance(path[-1], str):
        node[path[-1]] = value
    elif isinstance(node, list) and isinstance(path[-1], int) and path[-1] < len(node):
        node[path[-1]] = value
    blob = json.dumps(h).encode() if mode else raw
    data = struct.pack("<Q", len(blob)) + blob + bytes(22)
    if mode == 2:
        data = data[:cut]
    f = tmp_path / "f.safetensors"
    f.write_bytes(data)
    try:
        sf = SafetensorsFile(f)
        for name in sf.entries:
            sf.raw(name)
    except MinidiffError:
        pass


@settings(max_examples=FUZZ, deadline=None)
@given(where=st.sampled_from(["root", "text_config", "rope", "per_layer"]), key=st.sampled_from([
    "num_hidden_layers", "hidden_size", "head_dim", "num_attention_heads", "num_key_value_heads", "vocab_size",
    "layer_types", "rope_parameters", "rope_theta", "rope_type", "partial_rotary_factor", "per_layer_config",
    "eos_token_id", "pad_token_id", "canvas_length", "max_position_embeddings", "quantization_config",
    "sliding_window", "rms_norm_eps", "final_logit_softcapping", "top_k_experts", "num_experts", "text_config",
    "0", "sliding_attention", "full_attention", "global_head_dim"]), value=JSON)
def test_fuzz_config_parser(where, key, value):
    cfg = json.loads((GOLDEN / "config.json").read_text())
    tc = cfg["text_config"]
    node = {"root": cfg, "text_config": tc, "rope": tc.get("rope_parameters", {}).get("full_attention", {}),
            "per_layer": tc.setdefault("per_layer_config", {}) if isinstance(tc.get("per_layer_config", {}), dict) else {}}[where]
    node[key] = value
    try:
        parse_config(cfg)
    except MinidiffError:
        pass


@settings(max_examples=FUZZ, deadline=None)
@given(key=st.sampled_from(["max_new_tokens", "max_length", "max_denoising_steps", "entropy_bound", "t_min",
                            "t_max", "stability_threshold", "confidence_threshold", "eos_token_id", "pad_token_id",
                            "seed", "greedy", "self_conditioning_dtype", "sampler_config"]), value=JSON)
def test_fuzz_generation_config(key, value):
    """Any value in generation_config.json is accepted as valid or refused with one MinidiffError, and what is
    accepted runs: a generation on the default model with it ends normally or with a MinidiffError."""
    try:
        c = GenerationConfig.from_dict({key: value, "max_denoising_steps": 2}
                                       if key != "max_denoising_steps" else {key: value})
    except MinidiffError:
        return
    if c.max_denoising_steps > 4 or (c.max_new_tokens or 0) > 64:
        return                                            # valid but slow: not run here
    try:
        _DEFAULT_MODEL().generate([2, 5], config=c)
    except MinidiffError:
        pass


def _DEFAULT_MODEL(cache={}):
    if "m" not in cache:
        cache["m"] = minidiff.load(None)
    return cache["m"]
