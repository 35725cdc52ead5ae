"""Loader behaviour: hub ids through the huggingface_hub cache (offline), laziness, bf16 widening."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import minidiff
from minidiff.errors import MinidiffError
from minidiff.tensors import HalfTensor, bf16_to_f32, f32_to_bf16_bits, take_rows

GOLDEN = Path(__file__).parent / "golden" / "tiny"


def test_hub_id_resolves_from_the_offline_cache(tmp_path, monkeypatch):
    """A hub id is served from the huggingface_hub cache layout with HF_HUB_OFFLINE=1 (no network)."""
    repo = tmp_path / "hub" / "models--someorg--tiny-dg"
    snap = repo / "snapshots" / ("a" * 40)
    shutil.copytree(GOLDEN, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"), raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    model = minidiff.load("someorg/tiny-dg")
    assert Path(model.folder).resolve() == snap.resolve()
    ref = minidiff.load(GOLDEN)
    np.testing.assert_array_equal(model.denoise([1, 2], model.encode([2, 3])), ref.denoise([1, 2], ref.encode([2, 3])))


def test_unknown_hub_id_offline_is_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path), raising=False)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MinidiffError, match="could not fetch from the Hugging Face hub") as e:
        minidiff.load("nobody/no-such-model")
    assert "\n" not in str(e.value)


def test_bf16_experts_stay_memory_mapped_until_used():
    model = minidiff.load(GOLDEN)
    gu = model.layers[0]["experts.gate_up_proj"]
    assert isinstance(gu, HalfTensor) and gu.dtype == "BF16"
    assert gu.nbytes == int(np.prod(gu.shape)) * 2          # holds bf16 bits, not float32
    np.testing.assert_array_equal(gu[3], gu.dequantize()[3])  # one expert widened == the whole tensor's slice
    np.testing.assert_array_equal(gu.dequantize(), bf16_to_f32(gu.raw))
    emb = model.embed_tokens                                 # the vocabulary-sized embedding stays bf16 too
    assert isinstance(emb, HalfTensor)
    ids = np.array([5, 0, 5, emb.shape[0] - 1])
    np.testing.assert_array_equal(take_rows(emb, ids), bf16_to_f32(emb.raw)[ids])
    buf = np.full((7,) + emb.shape[1:], np.nan, np.float32)   # a poisoned buffer is fully overwritten
    np.testing.assert_array_equal(emb.expand_into(slice(3, 10), buf), bf16_to_f32(emb.raw)[3:10])


def test_bf16_conversions_round_trip_and_round_to_nearest_even():
    x = np.array([1.0, -2.5, 3.1415927, 1e-30, 65504.0, np.inf, -np.inf], np.float32)
    assert np.array_equal(bf16_to_f32(f32_to_bf16_bits(bf16_to_f32(f32_to_bf16_bits(x)))), bf16_to_f32(f32_to_bf16_bits(x)))
    # 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to the even mantissa (1.0)
    assert bf16_to_f32(f32_to_bf16_bits(np.array([1 + 2**-8], np.float32)))[0] == 1.0
    assert bf16_to_f32(f32_to_bf16_bits(np.array([1 + 3 * 2**-8], np.float32)))[0] == 1 + 2**-6
    assert np.isnan(bf16_to_f32(f32_to_bf16_bits(np.array([np.nan], np.float32))))[0]


def test_release_config_keys_are_understood(tmp_path):
    """The release's config.json names full-layer overrides global_head_dim / num_global_key_value_heads."""
    from minidiff.config import parse_config
    root = json.loads((GOLDEN / "config.json").read_text())
    tc = root["text_config"]
    per = tc.pop("per_layer_config")
    full = next(iter(per.values()))
    tc["global_head_dim"], tc["num_global_key_value_heads"] = full["head_dim"], full["num_key_value_heads"]
    a = parse_config(root)
    b = minidiff.load(GOLDEN).config
    assert [(l.kind, l.head_dim, l.num_kv_heads) for l in a.layers] == [(l.kind, l.head_dim, l.num_kv_heads) for l in b.layers]
    assert all(np.array_equal(x.inv_freq, y.inv_freq) for x, y in zip(a.layers, b.layers))


def test_release_rope_frequencies():
    """Full layers of the release: proportional RoPE, denominator 512, only the first 64 pairs rotate."""
    from minidiff.config import rope_inv_freq
    full = rope_inv_freq({"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": 0.25}, 512, "x")
    assert full.shape == (256,) and np.all(full[64:] == 0) and np.all(full[:64] > 0)
    np.testing.assert_allclose(full[:64], 1e6 ** (-np.arange(0, 128, 2) / 512), rtol=1e-6)
    sliding = rope_inv_freq({"rope_type": "default", "rope_theta": 1e4}, 256, "x")
    np.testing.assert_allclose(sliding, 1e4 ** (-np.arange(0, 256, 2) / 256), rtol=1e-6)


def test_f16_and_f32_tensors_are_read_as_float32(tmp_path):
    from safetensors.numpy import save_file
    from minidiff.weights import open_checkpoint
    a = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    save_file({"h": a.astype(np.float16), "f": a}, str(tmp_path / "model.safetensors"))
    ck = open_checkpoint(tmp_path)
    assert ck.dtype("h") == "F16" and ck.get("h").dtype == np.float32
    np.testing.assert_array_equal(ck.get("h"), a.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(ck.get("f"), a)


def test_lazy_and_dense_experts_give_identical_logits():
    """Per-expert widening of memory-mapped bf16 experts == the same experts held as dense arrays."""
    lazy = minidiff.load(GOLDEN)
    dense = minidiff.load(GOLDEN)
    for layer in dense.layers:
        for k in ("experts.gate_up_proj", "experts.down_proj"):
            layer[k] = layer[k].dequantize()
    for ids in ([2, 3], list(range(2, 40))):   # few tokens: some experts idle; many: all active
        np.testing.assert_array_equal(lazy.denoise([5, 6, 7], lazy.encode(ids)), dense.denoise([5, 6, 7], dense.encode(ids)))


def test_same_tensor_in_two_unindexed_files_is_an_error(tmp_path):
    from safetensors.numpy import save_file
    from minidiff.weights import open_checkpoint
    save_file({"a": np.zeros(2, np.float32)}, str(tmp_path / "x.safetensors"))
    save_file({"a": np.ones(2, np.float32)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(MinidiffError, match="tensor 'a' is in both x.safetensors and y.safetensors"):
        open_checkpoint(tmp_path)
