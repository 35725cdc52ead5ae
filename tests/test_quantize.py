"""`minidiff quantize` end to end: tiny transformers checkpoints -> int4 / NVFP4 folders -> minidiff.load.

The strongest check: minidiff running a quantized folder equals transformers (fp32) running the same
model with its weights replaced by the dequantized values (the "fake-quantized" model), at the
oracle tolerance. So the files, the loader and the per-use dequantization lose nothing beyond the
quantization itself.
"""

import json
import tracemalloc

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import tinyckpt  # noqa: E402
from reference import compare  # noqa: E402

import minidiff  # noqa: E402
from minidiff import formats as Q  # noqa: E402
from minidiff import quantize as QZ  # noqa: E402
from minidiff.cli import main  # noqa: E402
from minidiff.config import load_config  # noqa: E402
from minidiff.weights import load_text_weights, open_checkpoint  # noqa: E402

TEXT = dict(tinyckpt.TINY, moe_intermediate_size=32)  # every width a multiple of 16 (NVFP4 needs it)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    model = tinyckpt.build_model(TEXT, seed=3)
    path = tmp_path_factory.mktemp("src")
    tinyckpt.save(model, path)
    return model, path


def originals(path):
    ck = open_checkpoint(path)
    return {n: ck.get(n) for n in ck.names() if ck.dtype(n) in ("F32", "BF16")}


def weights_of(folder):
    return load_text_weights(open_checkpoint(folder), load_config(folder))


def quantized_names(scope):
    return lambda n: bool(QZ.EXPERT_RE.match(n) or (scope == "all-linear" and QZ.LINEAR_RE.match(n)))


@pytest.mark.parametrize("g, scope", [(32, "all-linear"), (128, "experts"), (64, "all-linear")])
def test_cli_int4_round_trip_exact(src, tmp_path, capsys, g, scope):
    _, path = src
    dst = tmp_path / "q"
    assert main(["quantize", str(path), str(dst), "--group-size", str(g), "--scope", scope]) == 0
    err = capsys.readouterr().err
    assert "wrote model.safetensors" in err and "done:" in err
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    qc = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and "lm_head" in qc["ignore"]
    # TINY: hidden 64, intermediate 96, experts 32: 128 -> 64 -> 32 for the narrower inputs
    sizes = {t: grp["weights"]["group_size"] for grp in qc["config_groups"].values() for t in grp["targets"]}
    assert sizes[QZ.target_regex("experts.gate_proj")] == min(g, 64)
    assert sizes[QZ.target_regex("experts.down_proj")] == 32
    assert (QZ.target_regex("self_attn.q_proj") in sizes) == (scope == "all-linear")

    orig = originals(path)
    loaded = weights_of(dst)
    is_q = quantized_names(scope)
    n_quant = 0
    for name, w in loaded.items():
        if not is_q(name):
            assert isinstance(w, np.ndarray) and np.array_equal(w, orig[name]), name  # copied bit for bit
            continue
        n_quant += 1
        assert isinstance(w, Q.QuantTensor) and w.shape == orig[name].shape
        mats = [(w[e], orig[name][e]) for e in range(w.shape[0])] if w.shape != orig[name].shape[-2:] else \
            [(w.dequantize(), orig[name])]
        for wq, wo in mats:
            # the reference quantization of the original, recomputed here, is reproduced exactly
            n = wo.shape[1]
            gg = max(d for d in (g, g // 2, g // 4) if n % d == 0)
            s = Q.int4_scales(wo, gg, "F32")
            q = Q.quantize_int4(wo, s)
            assert np.array_equal(wq, Q.dequant_int4(Q.pack_int4(q), s, n)), name
            exact = q.astype(np.float64) * np.repeat(s.astype(np.float64), gg, axis=1)
            assert np.all(np.abs(wo - exact) <= np.repeat(s.astype(np.float64), gg, axis=1) / 2), name
    assert n_quant == (4 * 2 if scope == "experts" else 4 * 2 + 4 * 3 + 2 * 4 + 2 * 3)


def set_weights(model, weights: dict):
    params = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, w in weights.items():   # the rest is identical: same builder, same seed
            if isinstance(w, Q.QuantTensor):
                params[name].copy_(torch.from_numpy(w.dequantize()))


@pytest.mark.parametrize("fmt, g", [("int4", 32), ("int4", 128), ("nvfp4", 16), ("nvfp4-modelopt", 16)])
def test_quantized_folder_matches_fake_quantized_oracle(src, tmp_path, fmt, g):
    ref, path = src
    dst = QZ.convert(path, tmp_path / fmt, group_size=32 if fmt != "int4" else g, fmt=fmt)
    model = minidiff.load(dst)
    fake = tinyckpt.build_model(TEXT, seed=3)
    set_weights(fake, weights_of(dst))
    rng = np.random.default_rng(0)
    V = TEXT["vocab_size"]
    errs = compare(fake, model, rng.integers(3, V, 9), rng.integers(3, V, 8), rng.integers(3, V, 8))
    for k, (err, tol) in errs.items():
        assert err <= tol, (k, err, tol)
    # and the quantization did change the model (the comparison is not vacuous)
    base = compare(ref, model, rng.integers(3, V, 9), rng.integers(3, V, 8), rng.integers(3, V, 8))
    assert base["logits"][0] > 100 * base["logits"][1]


def test_bf16_source_gets_bf16_scales(tmp_path):
    model = tinyckpt.build_model(TEXT, seed=5, dtype=torch.bfloat16)
    tinyckpt.save(model, tmp_path / "src")
    dst = QZ.convert(tmp_path / "src", tmp_path / "q", group_size=32)
    ck = open_checkpoint(dst)
    name = "model.decoder.layers.1.experts.3.up_proj.weight_scale"
    assert ck.dtype(name) == "BF16" and ck.dtype(name.replace("scale", "packed")) == "I32"
    orig = open_checkpoint(tmp_path / "src").get("model.decoder.layers.1.experts.gate_up_proj")[3, 32:]
    w = weights_of(dst)["model.decoder.layers.1.experts.gate_up_proj"][3][32:]
    s = Q.int4_scales(orig, 32, "BF16")
    assert np.array_equal(w.astype(np.float64),
                          Q.quantize_int4(orig, s).astype(np.float64) * np.repeat(s, 32, axis=1).astype(np.float64))


def test_group_fallback_and_unquantizable_projection(tmp_path, capsys):
    tiny = tinyckpt.build_model(dict(tinyckpt.TINY), seed=1)  # expert width 24: 24 % 16 != 0, 24 % 32 != 0
    tinyckpt.save(tiny, tmp_path / "src")
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "i4")]) == 0
    assert "experts.down_proj has [24] inputs, not a multiple of 32: group size 8" in capsys.readouterr().err
    w = weights_of(tmp_path / "i4")["model.decoder.layers.0.experts.down_proj"]
    assert isinstance(w, Q.QuantExperts) and w.parts[0][0].group_size == 8
    assert main(["quantize", str(tmp_path / "src"), str(tmp_path / "fp4"), "--format", "nvfp4"]) == 0
    assert "experts.down_proj (inputs [24]) cannot be quantized as nvfp4" in capsys.readouterr().err
    qc = json.loads((tmp_path / "fp4" / "config.json").read_text())["quantization_config"]
    assert QZ.target_regex("experts.down_proj") in qc["ignore"]
    ws = weights_of(tmp_path / "fp4")
    assert isinstance(ws["model.decoder.layers.0.experts.down_proj"], np.ndarray)       # kept dense
    assert isinstance(ws["model.decoder.layers.0.experts.gate_up_proj"], Q.QuantExperts)


def test_sharded_source_streams_with_bounded_memory(tmp_path):
    text = dict(tinyckpt.TINY, hidden_size=128, num_experts=32, moe_intermediate_size=64, num_hidden_layers=4,
                intermediate_size=128)
    model = tinyckpt.build_model(text, seed=2)
    model.save_pretrained(str(tmp_path / "src"), max_shard_size="3MB")
    src_ck = open_checkpoint(tmp_path / "src")
    n_src = len({src_ck.file_of(n).name for n in src_ck.names()})
    assert n_src >= 3
    total = sum(src_ck.raw(n).nbytes for n in src_ck.names())
    fused = src_ck.raw("model.decoder.layers.0.experts.gate_up_proj").size * 8   # one fused tensor in float64
    tracemalloc.start()
    QZ.convert(tmp_path / "src", tmp_path / "q", group_size=32)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < fused / 2 and peak < total / 16, (peak, fused, total)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{i:05d}-of-{n_src:05d}.safetensors" for i in range(1, n_src + 1)]
    assert index["metadata"]["total_size"] == sum((tmp_path / "q" / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((tmp_path / "q" / s).read_bytes()[:8], "little") for s in shards)
    ws = weights_of(tmp_path / "q")
    assert isinstance(ws["model.decoder.layers.3.experts.down_proj"], Q.QuantExperts)


def test_interrupted_run_leaves_no_complete_looking_file(src, tmp_path, monkeypatch):
    _, path = src
    calls = []
    real = QZ._run_job

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(QZ, "_run_job", flaky)
    with pytest.raises(KeyboardInterrupt):
        QZ.convert(path, tmp_path / "q")
    left = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert left == []   # the partial shard is removed; no config.json, no index
    monkeypatch.setattr(QZ, "_run_job", real)
    QZ.convert(path, tmp_path / "q")          # a rerun completes
    assert (tmp_path / "q" / "config.json").is_file()


def test_refusals(src, tmp_path, capsys):
    _, path = src
    dst = tmp_path / "q"
    assert main(["quantize", str(path), str(dst)]) == 0
    assert main(["quantize", str(path), str(dst)]) == 2
    assert "already holds a checkpoint (" in capsys.readouterr().err
    assert main(["quantize", str(path), str(dst), "--force"]) == 0
    assert main(["quantize", str(dst), str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["quantize", str(path), str(tmp_path / "y"), "--group-size", "48"])
    assert e.value.code == 2
