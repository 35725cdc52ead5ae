"""`minidiff compare`: it must name the first wrong op when one op of a copy of the model is perturbed."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import minidiff
from minidiff.cli import main
from minidiff.compare import compare, format_report
from minidiff.trace import save_tensors, trace

GOLDEN = Path(__file__).parent / "golden" / "tiny"
PROMPT, CANVAS, NEXT = [2, 105, 7, 19, 250, 3, 44, 12], [17, 0, 1, 106, 9], [5, 6, 7, 8, 9]


def _trace(model):
    return trace(model, PROMPT, CANVAS, 0.8, NEXT)


@pytest.fixture(scope="module")
def reference():
    return _trace(minidiff.load(GOLDEN))


def bump(w):
    """w × (1 ± 5 %), alternating sign per element (a uniform scale would vanish in the next RMSNorm)."""
    w = np.asarray(w, dtype=np.float32)
    return w * (1 + 0.05 * (-1.0) ** np.arange(w.size)).reshape(w.shape).astype(np.float32)


# (what to perturb, the tensor that must be reported first)
def layer_weight(i, name):
    return lambda m: m.layers[i].__setitem__(name, bump(m.layers[i][name]))


CASES = [
    (layer_weight(3, "input_layernorm.weight"), "encoder.layers.3.attention"),
    (layer_weight(2, "post_feedforward_layernorm_1.weight"), "encoder.layers.2.dense_mlp"),
    (layer_weight(1, "router.per_expert_scale"), "encoder.layers.1.router_weights"),
    (layer_weight(4, "post_feedforward_layernorm_2.weight"), "encoder.layers.4.experts"),
    (layer_weight(0, "encoder_layer_scalar"), "encoder.layers.0.hidden"),
    (layer_weight(5, "layer_scalar"), "denoiser.layers.5.hidden"),                     # denoiser only
    (lambda m: m.sc.__setitem__("pre_norm", bump(m.sc["pre_norm"])), "denoiser_sc.self_conditioning"),
    (lambda m: setattr(m, "final_norm", bump(m.final_norm)), "encoder.final_norm"),
]


@pytest.mark.parametrize("perturb, first", CASES, ids=[c[1] for c in CASES])
def test_compare_names_the_first_perturbed_op(reference, perturb, first):
    model = minidiff.load(GOLDEN)
    perturb(model)
    rep = compare(reference, list(reference), _trace(model))
    assert not rep["ok"]
    assert rep["first_past_tolerance"] == first, format_report(rep)
    order = list(reference)
    bad = [r["name"] for r in rep["rows"] if not r["ok"]]
    assert order.index(bad[0]) >= order.index(first)


def test_identical_traces_pass(reference):
    rep = compare(reference, list(reference), dict(reference))
    assert rep["ok"] and rep["first_past_tolerance"] is None and len(rep["rows"]) == len(reference)
    logits = next(r for r in rep["rows"] if r["name"] == "denoiser.logits")
    assert logits["top1"] == 1.0 and logits["top5"] == 1.0 and abs(logits["kl_mean"]) < 1e-12


def test_divergent_input_is_not_blamed_on_later_layers(reference):
    other = dict(reference)
    other["commit.ids"] = (reference["commit.ids"] + 1) % 320
    other.update({k: v + 1.0 for k, v in reference.items() if k.startswith(("commit.", "cache.commit", "next."))
                  and v.dtype == np.float32})
    rep = compare(reference, list(reference), other)
    assert rep["divergent_input"] == "commit.ids" and rep["first_past_tolerance"] is None and not rep["ok"]
    assert all(r.get("after_divergent_input") == "commit.ids" for r in rep["rows"]
               if r["name"].startswith(("commit.layers", "next.")))


def test_router_ids_compare_as_sets(reference):
    other = dict(reference)
    other["encoder.layers.0.router_ids"] = reference["encoder.layers.0.router_ids"][:, ::-1].copy()
    assert compare(reference, list(reference), other)["ok"]


def _save(path, tensors):
    save_tensors(path, tensors, {"order": json.dumps(list(tensors))})
    return str(path)


def test_cli_exit_status_report_and_name_map(tmp_path, reference, capsys):
    a = _save(tmp_path / "a.safetensors", reference)
    assert main(["compare", a, a, "--json", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is True
    capsys.readouterr()

    # another runtime's dump: its own names, bf16-rounded hidden states, layer 2 wrong
    dump = {f"blk.{i}.out": reference[f"denoiser.layers.{i}.hidden"].copy() for i in range(6)}
    dump["blk.2.out"] += 0.5
    dump["lm_logits"] = reference["denoiser.logits"]
    b = _save(tmp_path / "b.safetensors", dump)
    (tmp_path / "map.json").write_text(json.dumps({"blk.{i}.out": "denoiser.layers.{i}.hidden",
                                                   "lm_logits": "denoiser.logits"}))
    assert main(["compare", a, b, "--map", str(tmp_path / "map.json")]) == 1
    out = capsys.readouterr().out
    assert "first past tolerance: denoiser.layers.2.hidden" in out
    assert "6/7 tensors within tolerance" in out          # only layer 2 is off


def test_cli_bad_files_are_one_line(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\xff" * 64)
    p = subprocess.run([sys.executable, "-m", "minidiff", "compare", str(junk), str(junk)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("minidiff: error:")
    p = subprocess.run([sys.executable, "-m", "minidiff", "compare", str(tmp_path), str(junk)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "not a regular file" in p.stderr


def _cli(*argv):
    return subprocess.run([sys.executable, "-m", "minidiff", "compare", *map(str, argv)], capture_output=True,
                          text=True, timeout=60)


def test_map_patterns_are_validated_and_a_repeated_i_is_one_number(tmp_path, reference):
    from minidiff.compare import load_map, rename
    (tmp_path / "m.json").write_text(json.dumps({"h.{i}.x{i}": "denoiser.layers.{i}.hidden"}))
    rules = load_map(tmp_path / "m.json")                  # {i} twice: the same layer number both times
    assert list(rename({"h.3.x3": 1, "h.3.x4": 2}, rules)) == ["denoiser.layers.3.hidden", "h.3.x4"]
    a = _save(tmp_path / "a.safetensors", reference)
    for bad in ({"h.out": "denoiser.layers.{i}.hidden"}, {"x" * 2000: "y"}):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        p = _cli(a, a, "--map", tmp_path / "bad.json")
        assert p.returncode == 2 and p.stderr.count("\n") == 1 and p.stderr.startswith("minidiff: error: --map")


def test_traces_of_two_schema_versions_are_refused(tmp_path, reference):
    from minidiff.trace import SCHEMA_VERSION
    for name, version in (("a", SCHEMA_VERSION), ("old", 1)):
        save_tensors(tmp_path / f"{name}.safetensors", reference,
                     {"schema": "minidiff-trace", "schema_version": str(version), "order": json.dumps(list(reference))})
    assert _cli(tmp_path / "a.safetensors", tmp_path / "a.safetensors").returncode == 0
    p = _cli(tmp_path / "a.safetensors", tmp_path / "old.safetensors")
    assert p.returncode == 2 and "schema 2, B of schema 1" in p.stderr and p.stdout == ""


def test_only_inputs_in_common_is_not_a_pass(tmp_path, reference):
    a = _save(tmp_path / "a.safetensors", reference)
    from minidiff.compare import INPUTS
    ids = {k: v for k, v in reference.items() if INPUTS.search(k)}
    assert ids
    b = _save(tmp_path / "b.safetensors", ids)
    p = _cli(a, b)
    assert p.returncode == 1 and "only inputs (ids) in common" in p.stdout


def test_nested_order_metadata_and_empty_id_tensors(tmp_path):
    from safetensors.numpy import save_file
    t = {"x.ids": np.zeros((0, 3), np.int64), "y": np.ones(4, np.float32)}
    save_file(t, str(tmp_path / "a.safetensors"), metadata={"order": "[" * 100_000 + "]" * 100_000})
    p = _cli(tmp_path / "a.safetensors", tmp_path / "a.safetensors")
    assert p.returncode == 0 and "2/2 tensors within tolerance" in p.stdout, p.stderr


def test_json_report_never_replaces_an_input(tmp_path, reference):
    a = _save(tmp_path / "a.safetensors", reference)
    before = Path(a).read_bytes()
    p = _cli(a, a, "--json", a)
    assert p.returncode == 2 and "one of this command's inputs" in p.stderr and p.stdout == ""
    assert Path(a).read_bytes() == before
