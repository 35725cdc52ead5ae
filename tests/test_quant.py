"""minidiff.formats and minidiff.schemes without any framework: bit layouts, rounding rules, the loader hook and its errors.

The comparisons with the compressed-tensors package are in test_quant_ct.py; quantizing whole
checkpoints is in test_quantize.py.
"""

import json
import os
import zlib

import numpy as np
import pytest

from minidiff import formats as Q
from minidiff import schemes as S
from minidiff.tensors import bf16_to_f32, f32_to_bf16_bits
from minidiff.errors import MinidiffError
from minidiff.quantize import ShardWriter
from minidiff.weights import open_checkpoint

_RNGS: dict = {}


def rng() -> np.random.Generator:
    """The calling test's own generator, seeded by its name: its data does not depend on which tests ran
    before it (a module-level generator would hand each test whatever the previous ones left)."""
    name = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    if name not in _RNGS:
        _RNGS[name] = np.random.default_rng(zlib.crc32(name.encode()))
    return _RNGS[name]


# ---------------------------------------------------------------------------------------------
# int4 bit layout

def test_pack_int4_layout_written_out():
    # inputs 0..7 of a row -> one int32, input k in bits 4k..4k+3 as code q + 8
    q = np.array([[-8, -7, 0, 1, 7, -1, 3, 2]], dtype=np.int8)
    codes = q[0].astype(np.int64) + 8                       # 0, 1, 8, 9, 15, 7, 11, 10
    expect = sum(int(c) << (4 * k) for k, c in enumerate(codes))
    packed = Q.pack_int4(q)
    assert packed.dtype == np.int32 and packed.shape == (1, 1)
    assert int(packed.view(np.uint32)[0, 0]) == expect == 0xAB7F9810
    assert packed[0, 0] < 0  # top nibble >= 8: negative as int32, only the bits matter
    # little-endian bytes: byte 0 holds inputs 0 (low nibble) and 1 (high nibble)
    assert packed.tobytes()[0] == (0 | 1 << 4)


def test_pack_int4_pads_with_code_zero():
    q = np.full((2, 11), 3, dtype=np.int8)                   # 11 inputs -> 2 words, 5 padding nibbles
    packed = Q.pack_int4(q)
    assert packed.shape == (2, 2)
    assert int(packed.view(np.uint32)[0, 1]) == 0xBBB      # codes 11 in nibbles 0..2, then zeros
    assert np.array_equal(Q.unpack_int4(packed, 11), q)


@pytest.mark.parametrize("n", [8, 16, 24, 40, 256, 13, 1])
def test_int4_round_trip(n):
    q = rng().integers(-8, 8, size=(3, 5, n)).astype(np.int8)
    assert np.array_equal(Q.unpack_int4(Q.pack_int4(q), n), q)


def test_pack_int4_rejects_out_of_range():
    with pytest.raises(ValueError):
        Q.pack_int4(np.array([[8]]))
    with pytest.raises(ValueError):
        Q.unpack_int4(np.zeros((2, 3), np.int32), 8)        # 3 words cannot hold 8 inputs


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("scale_dtype", ["BF16", "F16", "F32"])
def test_int4_error_within_half_a_step(g, scale_dtype):
    w = (rng().standard_normal((64, 512)) * 0.02).astype(np.float32)
    w[3, :g] = 0.0                                          # an all-zero group
    w[5, 7] = 0.9                                           # an outlier group
    s = Q.int4_scales(w, g, scale_dtype)
    assert s.shape == (64, 512 // g)
    # scales are exactly representable in their dtype and never below max|W|/7.5
    if scale_dtype == "BF16":
        assert np.array_equal(bf16_to_f32(f32_to_bf16_bits(s)), s)
    elif scale_dtype == "F16":
        assert np.array_equal(s.astype(np.float16).astype(np.float32), s)
    amax = np.abs(w.reshape(64, -1, g)).max(-1).astype(np.float64)
    assert np.all(s.astype(np.float64) >= amax / 7.5)
    q = Q.quantize_int4(w, s)
    assert q.min() >= -8 and q.max() <= 7
    wq = Q.dequant_int4(Q.pack_int4(q), s, 512)
    step = np.repeat(s.astype(np.float64), g, axis=1)
    exact = q.astype(np.float64) * step                     # the quantized value, exactly
    err = np.abs(w.astype(np.float64) - exact)
    assert np.all(err <= step / 2)                          # symmetric rounding: at most half a step
    assert np.all(wq[3, :g] == 0)
    # dequant_int4 returns q * s rounded once to float32 (exact for bf16/f16 scales: 4 + 11 bits)
    assert np.array_equal(wq, exact.astype(np.float32))
    if scale_dtype != "F32":
        assert np.array_equal(wq.astype(np.float64), exact)
    # and the bound is tight-ish: the worst error is close to half a step somewhere
    assert (err / step).max() > 0.45


def test_int4_rounding_is_half_to_even():
    s = np.array([[1.0]], np.float32)
    w = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 7.4, -7.6, 7.5, -8.0]] + [[0] * 9] * 0, np.float32)
    w = np.pad(w, ((0, 0), (0, 32 - w.shape[1])))
    q = Q.quantize_int4(w, np.ones((1, 1), np.float32))
    assert list(q[0, :9]) == [0, 2, 2, 0, -2, 7, -8, 7, -8]
    del s


def test_round_up_to_dtype():
    x = np.array([1.0, 1.0 + 2 ** -10, 3.0e-3, 0.0, 1e-40])
    for dt, back in (("F32", np.float32), ("F16", np.float16)):
        y = Q.round_up_to(x, dt)
        assert np.all(y >= x) and np.array_equal(y.astype(back).astype(np.float64), y)
    y = Q.round_up_to(x, "BF16")
    assert np.all(y >= x)
    assert y[0] == 1.0 and y[1] == 1.0 + 2 ** -7              # next bf16 above 1 + 2^-10
    assert np.array_equal(bf16_to_f32(f32_to_bf16_bits(y.astype(np.float32))), y.astype(np.float32))


# ---------------------------------------------------------------------------------------------
# NVFP4 / FP8 layouts

def test_e4m3_table():
    assert Q.e4m3_to_f32(np.uint8(0x7E)) == 448.0
    assert Q.e4m3_to_f32(np.uint8(0x38)) == 1.0              # e = 7, m = 0
    assert Q.e4m3_to_f32(np.uint8(0x01)) == 2.0 ** -9         # smallest subnormal
    assert Q.e4m3_to_f32(np.uint8(0x08)) == 2.0 ** -6         # smallest normal
    assert Q.e4m3_to_f32(np.uint8(0xB8)) == -1.0
    assert np.isnan(Q.e4m3_to_f32(np.uint8(0x7F))) and np.isnan(Q.e4m3_to_f32(np.uint8(0xFF)))
    finite = np.array([b for b in range(256) if b not in (0x7F, 0xFF)], np.uint8)
    assert np.array_equal(Q.f32_to_e4m3(Q.e4m3_to_f32(finite)), finite)  # every value round-trips


def test_e4m3_rounding_ties_to_even():
    # between 1.0 (0x38) and 1.125 (0x39): the midpoint goes to the even code 0x38
    assert Q.f32_to_e4m3(1.0625) == 0x38
    assert Q.f32_to_e4m3(1.0625 + 1e-6) == 0x39
    # between 1.125 (0x39) and 1.25 (0x3A): the midpoint goes to 0x3A
    assert Q.f32_to_e4m3(1.1875) == 0x3A
    assert Q.f32_to_e4m3(1000.0) == 0x7E                       # saturates at 448


def test_fp4_encode_grid_and_ties():
    x = np.array([0, 0.25, 0.26, 0.75, 1.25, 1.3, 1.75, 2.5, 2.6, 3.5, 5.0, 5.1, 7.0, -0.1, -6.0, -0.0])
    codes = Q.fp4_encode(x)
    vals = Q.FP4_TABLE[codes]
    assert list(vals) == [0, 0, 0.5, 1, 1, 1.5, 2, 2, 3, 4, 4, 6, 6, -0.0, -6, 0]
    assert codes[13] == 8            # a negative value rounding to zero keeps its sign: code 8
    assert codes[15] == 0            # -0.0 itself encodes as +0
    assert np.array_equal(Q.fp4_encode(Q.FP4_TABLE), np.r_[np.arange(8), 0, np.arange(9, 16)])


def test_nvfp4_pack_layout():
    codes = np.array([[1, 2, 15, 8]], np.uint8)
    packed = Q.pack_nvfp4(codes)
    assert packed.tolist() == [[0x21, 0x8F]]                  # even input in the low nibble
    assert np.array_equal(Q.unpack_nvfp4(packed), codes)


@pytest.mark.parametrize("convention", ["ct", "modelopt"])
def test_nvfp4_round_trip_and_error(convention):
    w = (rng().standard_normal((32, 128)) * 0.05).astype(np.float32)
    gs = Q.nvfp4_global_scale(w)
    kw = dict(global_scale=gs) if convention == "ct" else dict(scale_2=np.float32(1.0) / gs)
    packed, sbits = Q.quantize_nvfp4(w, **kw)
    assert packed.shape == (32, 64) and sbits.shape == (32, 8) and sbits.dtype == np.uint8
    wq = Q.dequant_nvfp4(packed, sbits, **kw)
    # re-quantizing the dequantized weights with the same scales reproduces the codes exactly
    eff = np.repeat(Q.e4m3_to_f32(sbits) / gs if convention == "ct" else Q.e4m3_to_f32(sbits) * kw["scale_2"], 16, 1)
    codes = Q.unpack_nvfp4(packed)
    assert np.array_equal(Q.FP4_TABLE[codes] * eff, wq)
    # each element is within half an FP4 step of the grid (steps 0.5, 1, 2 at magnitudes <2, <4, <=6),
    # up to the fp8 rounding of the group scale (at most 1/16 relative)
    mag = np.abs(w / eff)
    half_step = np.where(mag < 2, 0.25, np.where(mag < 4, 0.5, 1.0))
    assert np.all(np.abs(w / eff - Q.FP4_TABLE[codes]) <= half_step + 1e-6)
    assert np.abs(mag).max() <= 6 * (1 + 1 / 16)


# ---------------------------------------------------------------------------------------------
# the loader hook on real files (written with our own safetensors writer)

def _write(folder, tensors: dict, config: dict | None):
    folder.mkdir(parents=True, exist_ok=True)
    dt = {np.dtype(np.int32): "I32", np.dtype(np.int64): "I64", np.dtype(np.float32): "F32",
          np.dtype(np.uint16): "BF16", np.dtype(np.uint8): "U8", np.dtype(np.float16): "F16"}
    entries, arrays = [], {}
    for name, (arr, sdt) in tensors.items():
        arr = np.asarray(arr)
        entries.append((name, sdt or dt[arr.dtype], arr.shape))
        arrays[name] = arr
    w = ShardWriter(folder / "model.safetensors", entries)
    for name, arr in arrays.items():
        w.write(name, arr)
    w.close()
    (folder / "config.json").write_text(json.dumps({"quantization_config": config} if config else {}))
    return open_checkpoint(folder)


def ct_int4_config(g=32, targets=("Linear",), ignore=("lm_head",), fmt="pack-quantized", **weights):
    w = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": g, "strategy": "group"}
    w.update(weights)
    return {"quant_method": "compressed-tensors", "format": fmt, "ignore": list(ignore),
            "config_groups": {"group_0": {"targets": list(targets), "weights": w}}}


def int4_tensors(module, w, g, scale_dtype="BF16"):
    s = Q.int4_scales(w, g, scale_dtype)
    packed = Q.pack_int4(Q.quantize_int4(w, s))
    sraw = f32_to_bf16_bits(s) if scale_dtype == "BF16" else s
    return {module + ".weight_packed": (packed, None), module + ".weight_scale": (sraw, scale_dtype),
            module + ".weight_shape": (np.array(w.shape, np.int64), None)}, Q.dequant_int4(packed, s, w.shape[1])


M = "model.decoder.layers.0.self_attn.q_proj"


def test_hook_int4_2d(tmp_path):
    w = rng().standard_normal((16, 64)).astype(np.float32)
    t, expect = int4_tensors(M, w, 32)
    ck = _write(tmp_path, t, ct_int4_config(32))
    q = S.load_quantized(ck, M + ".weight", (16, 64), ct_int4_config(32))
    assert q.shape == (16, 64) and q.nbytes == 16 * 8 * 4 + 16 * 2 * 2
    assert np.array_equal(q.dequantize(), expect)
    assert S.load_quantized(ck, "model.decoder.layers.0.self_attn.k_proj.weight", (16, 64), ct_int4_config(32)) is None


def test_hook_experts_int4_and_getitem(tmp_path):
    E, I, H = 3, 8, 64
    gate_up = rng().standard_normal((E, 2 * I, H)).astype(np.float32)
    down = rng().standard_normal((E, H, 32)).astype(np.float32)
    tensors, exp_gu, exp_dn = {}, [], []
    base = "model.decoder.layers.2.experts"
    for e in range(E):
        t, g = int4_tensors(f"{base}.{e}.gate_proj", gate_up[e, :I], 32)
        tensors.update(t)
        t, u = int4_tensors(f"{base}.{e}.up_proj", gate_up[e, I:], 32)
        tensors.update(t)
        t, d = int4_tensors(f"{base}.{e}.down_proj", down[e], 32)
        tensors.update(t)
        exp_gu.append(np.concatenate([g, u]))
        exp_dn.append(d)
    cfg = ct_int4_config(32, targets=[r"re:.*\.experts\.\d+\.(gate|up|down)_proj$"])
    ck = _write(tmp_path, tensors, cfg)
    gu = S.load_quantized(ck, base + ".gate_up_proj", (E, 2 * I, H), cfg)
    dn = S.load_quantized(ck, base + ".down_proj", (E, H, 32), cfg)
    assert gu.shape == (E, 2 * I, H) and dn.shape == (E, H, 32)
    for e in range(E):
        assert np.array_equal(gu[e], exp_gu[e]) and np.array_equal(dn[e], exp_dn[e])
    assert np.array_equal(gu.dequantize(), np.stack(exp_gu))
    assert np.abs(gu.dequantize() - gate_up).max() > 0        # it is quantized, not the original
    with pytest.raises(IndexError):
        gu[E]
    assert S.load_quantized(ck, "model.decoder.layers.3.experts.down_proj", (E, H, 32), cfg) is None


def test_hook_nvfp4_both_conventions(tmp_path):
    w = (rng().standard_normal((16, 64)) * 0.1).astype(np.float32)
    gs = Q.nvfp4_global_scale(w)
    p, s = Q.quantize_nvfp4(w, global_scale=gs)
    ct = {"quant_method": "compressed-tensors", "format": "nvfp4-pack-quantized",
          "config_groups": {"g": {"targets": ["Linear"], "weights": {"num_bits": 4, "type": "float",
                                                                     "group_size": 16, "strategy": "tensor_group"}}}}
    ck = _write(tmp_path / "ct", {M + ".weight_packed": (p, None), M + ".weight_scale": (s, "F8_E4M3"),
                                  M + ".weight_global_scale": (np.array([gs], np.float32), None)}, ct)
    q = S.load_quantized(ck, M + ".weight", (16, 64), ct)
    assert np.array_equal(q.dequantize(), Q.dequant_nvfp4(p, s, global_scale=gs))
    s2 = np.float32(np.abs(w).max() / 2688)
    p2, sb2 = Q.quantize_nvfp4(w, scale_2=s2)
    mo = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    ck = _write(tmp_path / "mo", {M + ".weight": (p2, None), M + ".weight_scale": (sb2, "F8_E4M3"),
                                  M + ".weight_scale_2": (np.array(s2, np.float32), None),
                                  M + ".input_scale": (np.array(1.0, np.float32), None)}, mo)
    q = S.load_quantized(ck, M + ".weight", (16, 64), mo)
    assert np.array_equal(q.dequantize(), Q.dequant_nvfp4(p2, sb2, scale_2=s2))
    assert np.abs(q.dequantize() - w).max() < 0.25 * np.abs(w).max()
    # ModelOpt described only by hf_quant_config.json
    (tmp_path / "mo" / "hf_quant_config.json").write_text(json.dumps({"producer": {"name": "modelopt"},
                                                                       "quantization": mo}))
    q = S.load_quantized(ck, M + ".weight", (16, 64), None)
    assert np.array_equal(q.dequantize(), Q.dequant_nvfp4(p2, sb2, scale_2=s2))


# ---------------------------------------------------------------------------------------------
# bad input: a clear error naming the tensor, never silent wrong weights

def _int4_ckpt(tmp_path, g_file=32, cfg=None, mutate=None):
    w = rng().standard_normal((16, 128)).astype(np.float32)
    t, _ = int4_tensors(M, w, g_file)
    if mutate:
        mutate(t)
    cfg = cfg if cfg is not None else ct_int4_config(g_file)
    return _write(tmp_path, t, cfg), cfg


@pytest.mark.parametrize("case, match", [
    ("group_size", r"q_proj\.weight_scale has shape \[16, 4\], expected \[16, 1\].*group_size 128"),
    ("shape", r"q_proj\.weight_shape is \[16, 128\], expected \[16, 256\]"),
    ("packed_dtype", r"q_proj\.weight_packed has dtype U8, expected I32"),
    ("scale_dtype", r"q_proj\.weight_scale has dtype I32"),
    ("no_scale", r"q_proj\.weight_scale is missing"),
    ("zero_point", r"weight_zero_point present"),
    ("method", r"q_proj\.weight_packed: unsupported quantization method 'gptq'"),
    ("format", r"unsupported compressed-tensors format 'marlin-24'"),
    ("bits", r"unsupported pack-quantized scheme \(num_bits 8"),
    ("asym", r"asymmetric int4"),
    ("no_config", r"q_proj\.weight_packed is stored quantized .* no quantization_config"),
    ("ignored", r"does not target model\.decoder\.layers\.0\.self_attn\.q_proj"),
    ("nan_scale", r"q_proj\.weight\.weight_scale holds non-finite scales"),
])
def test_int4_bad_input(tmp_path, case, match):
    shape = (16, 128)
    cfg, mutate = None, None
    if case == "group_size":
        cfg = ct_int4_config(128)
    elif case == "shape":
        shape = (16, 256)
    elif case == "packed_dtype":
        mutate = lambda t: t.__setitem__(M + ".weight_packed", (t[M + ".weight_packed"][0].view(np.uint8), None))
    elif case == "scale_dtype":
        mutate = lambda t: t.__setitem__(M + ".weight_scale", (t[M + ".weight_scale"][0].astype(np.int32), "I32"))
    elif case == "no_scale":
        mutate = lambda t: t.pop(M + ".weight_scale")
    elif case == "zero_point":
        mutate = lambda t: t.__setitem__(M + ".weight_zero_point", (np.zeros((2, 4), np.int32), None))
    elif case == "method":
        cfg = dict(ct_int4_config(32), quant_method="gptq")
    elif case == "format":
        cfg = ct_int4_config(32, fmt="marlin-24")
    elif case == "bits":
        cfg = ct_int4_config(32, num_bits=8)
    elif case == "asym":
        cfg = ct_int4_config(32, symmetric=False)
    elif case == "no_config":
        cfg = {}
    elif case == "ignored":
        cfg = ct_int4_config(32, ignore=[r"re:.*q_proj$"])
    elif case == "nan_scale":
        def mutate(t):
            s = t[M + ".weight_scale"][0].copy()
            s[3, 1] = 0x7FC0                                     # bf16 NaN
            t[M + ".weight_scale"] = (s, "BF16")
    ck, cfg = _int4_ckpt(tmp_path, cfg=cfg, mutate=mutate)
    with pytest.raises(MinidiffError, match=match) as ei:
        q = S.load_quantized(ck, M + ".weight", shape, cfg or None)
        q.dequantize()
    assert "\n" not in str(ei.value)
    assert "model.safetensors" in str(ei.value) or str(tmp_path) in str(ei.value)


@pytest.mark.parametrize("case, match", [
    ("scale_shape", r"q_proj\.weight_scale has shape \[16, 2\], expected \[16, 4\]"),
    ("scale_dtype", r"q_proj\.weight_scale has dtype U8, expected F8_E4M3"),
    ("no_scale2", r"q_proj\.weight_scale_2 is missing"),
    ("scale2_shape", r"q_proj\.weight_scale_2 has shape \[2\], expected a single value"),
    ("scale2_zero", r"q_proj\.weight_scale_2 = 0\.0, expected a positive"),
    ("packed_shape", r"q_proj\.weight has shape \[16, 16\], expected \[16, 32\]"),
    ("algo", r"unsupported ModelOpt quant_algo 'FP8'"),
    ("group", r"NVFP4 group_size 32"),
    ("excluded", r"excludes model\.decoder\.layers\.0\.self_attn\.q_proj"),
    ("no_config", r"neither config\.json's quantization_config nor hf_quant_config\.json"),
])
def test_modelopt_bad_input(tmp_path, case, match):
    w = (rng().standard_normal((16, 64)) * 0.1).astype(np.float32)
    s2 = np.float32(np.abs(w).max() / 2688)
    p, sb = Q.quantize_nvfp4(w, scale_2=s2)
    t = {M + ".weight": (p, None), M + ".weight_scale": (sb, "F8_E4M3"),
         M + ".weight_scale_2": (np.array(s2, np.float32), None)}
    cfg = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16, "exclude_modules": ["lm_head"]}
    if case == "scale_shape":
        t[M + ".weight_scale"] = (sb[:, :2].copy(), "F8_E4M3")
    elif case == "scale_dtype":
        t[M + ".weight_scale"] = (sb, "U8")
    elif case == "no_scale2":
        t.pop(M + ".weight_scale_2")
    elif case == "scale2_shape":
        t[M + ".weight_scale_2"] = (np.array([s2, s2], np.float32), None)
    elif case == "scale2_zero":
        t[M + ".weight_scale_2"] = (np.array(0.0, np.float32), None)
    elif case == "packed_shape":
        t[M + ".weight"] = (p[:, :16].copy(), None)
    elif case == "algo":
        cfg["quant_algo"] = "FP8"
    elif case == "group":
        cfg["group_size"] = 32
    elif case == "excluded":
        cfg["exclude_modules"] = ["*self_attn*"]
    elif case == "no_config":
        cfg = None
    ck = _write(tmp_path, t, cfg)
    with pytest.raises(MinidiffError, match=match):
        S.load_quantized(ck, M + ".weight", (16, 64), cfg).dequantize()


def test_experts_missing_one_expert_is_an_error(tmp_path):
    base = "model.decoder.layers.0.experts"
    tensors = {}
    for e in (0, 2):  # expert 1 absent
        t, _ = int4_tensors(f"{base}.{e}.down_proj", rng().standard_normal((32, 32)).astype(np.float32), 32)
        tensors.update(t)
    cfg = ct_int4_config(32)
    ck = _write(tmp_path, tensors, cfg)
    with pytest.raises(MinidiffError, match=r"experts\.1\.down_proj has no quantized weight"):
        S.load_quantized(ck, base + ".down_proj", (3, 32, 32), cfg)


def test_two_groups_pick_by_regex(tmp_path):
    # group sizes per projection, as the quantizer writes them for widths 128 does not divide
    w = rng().standard_normal((16, 96)).astype(np.float32)
    t, expect = int4_tensors("model.decoder.layers.0.mlp.down_proj", w, 32)
    cfg = ct_int4_config(128, targets=[r"re:.*\.self_attn\.q_proj$"])
    cfg["config_groups"]["group_1"] = {"targets": [r"re:.*\.mlp\.down_proj$"],
                                       "weights": dict(cfg["config_groups"]["group_0"]["weights"], group_size=32)}
    ck = _write(tmp_path, t, cfg)
    q = S.load_quantized(ck, "model.decoder.layers.0.mlp.down_proj.weight", (16, 96), cfg)
    assert q.group_size == 32 and np.array_equal(q.dequantize(), expect)
