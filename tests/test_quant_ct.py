"""Bit-for-bit agreement with the compressed-tensors package's own compressors and decompressors
(a test-only dependency: `pip install compressed-tensors==0.20.0`), and with torch's FP8 casts."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import NVFP4PackedCompressor, PackedQuantizationCompressor  # noqa: E402
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8  # noqa: E402
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32  # noqa: E402
from compressed_tensors.quantization import (  # noqa: E402
    QuantizationArgs, QuantizationConfig, QuantizationScheme, preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam  # noqa: E402
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4  # noqa: E402

from minidiff import formats as Q  # noqa: E402
from minidiff.tensors import f32_to_bf16_bits  # noqa: E402

SHAPES = [(48, 256), (7, 384), (128, 1024)]


def weights(shape, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[0, :128] = 0.0                                    # all-zero groups
    w[1, 3] = 1.5                                       # an outlier
    w[2, :64] = np.where(rng.random(64) < 0.5, -1e-6, 1e-6)  # tiny values that round to (signed) zero
    return w


def int4_scheme(g):
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=g))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 31, 32, 33, 256])
def test_pack_int4_matches_pack_to_int32(n):
    q = np.random.default_rng(n).integers(-8, 8, size=(5, n)).astype(np.int8)
    theirs = pack_to_int32(torch.from_numpy(q), 4).numpy()
    mine = Q.pack_int4(q)
    assert mine.dtype == theirs.dtype == np.int32 and np.array_equal(mine, theirs)
    back = unpack_from_int32(torch.from_numpy(mine), 4, torch.Size(q.shape)).numpy()
    assert np.array_equal(back, q) and np.array_equal(Q.unpack_int4(theirs, n), q)


@pytest.mark.parametrize("g", [32, 64, 128])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale_dtype", ["BF16", "F32"])
def test_int4_compressor_bit_exact(g, shape, scale_dtype):
    w = weights(shape, seed=g + shape[0])
    s = Q.int4_scales(w, g, scale_dtype)
    packed = Q.pack_int4(Q.quantize_int4(w, s))
    scheme = int4_scheme(g)
    # their compressor, fed the same weights and scales (float64: the exact quotient, as ours)
    out = PackedQuantizationCompressor.compress(
        {"weight": torch.from_numpy(w).double(), "weight_scale": torch.from_numpy(s).double()}, scheme)
    assert set(out) == {"weight_packed", "weight_scale", "weight_shape"}
    assert np.array_equal(out["weight_packed"].numpy(), packed)
    assert out["weight_shape"].tolist() == list(shape) and out["weight_shape"].dtype == torch.int64
    # In float32 (their default for an fp32 model) they divide in float32, which can round a quotient
    # just inside +-7.5 (a group's extreme element) onto the tie and then to -8: exactly those
    # elements differ, and there theirs leaves the half-step bound while ours keeps it.
    out32 = PackedQuantizationCompressor.compress(
        {"weight": torch.from_numpy(w), "weight_scale": torch.from_numpy(s)}, scheme)
    rows, n = shape
    quot32 = (w.reshape(rows, -1, g) / s[..., None]).reshape(shape)          # float32 division
    q32 = np.clip(np.rint(quot32), -8, 7).astype(np.int8)
    assert np.array_equal(out32["weight_packed"].numpy(), Q.pack_int4(q32))
    q = Q.quantize_int4(w, s)
    exact = (w.astype(np.float64).reshape(rows, -1, g) / s.astype(np.float64)[..., None]).reshape(shape)
    differ = q32 != q
    assert np.all(np.abs(exact - q) <= 0.5)
    assert np.all(np.abs(exact[differ] - q32[differ]) > 0.5)
    # their decompressor on our bytes == our dequantization (rounded to the scale dtype as they do)
    scale_t = torch.from_numpy(s).to(torch.bfloat16 if scale_dtype == "BF16" else torch.float32)
    dec = PackedQuantizationCompressor.decompress(
        {"weight_packed": torch.from_numpy(packed), "weight_scale": scale_t,
         "weight_shape": torch.tensor(shape)}, scheme)["weight"]
    mine = Q.dequant_int4(packed, s, shape[1])
    if scale_dtype == "BF16":
        assert dec.dtype == torch.bfloat16
        assert np.array_equal(dec.view(torch.int16).numpy().view(np.uint16), f32_to_bf16_bits(mine))
    else:
        assert np.array_equal(dec.numpy(), mine)


def test_e4m3_matches_torch():
    rng = np.random.default_rng(0)
    mags = Q.E4M3[:127].astype(np.float64)
    mids = ((mags[1:] + mags[:-1]) / 2).astype(np.float32)      # every tie
    x = np.concatenate([rng.standard_normal(50000) * 30, rng.standard_normal(5000) * 1e-3, mids, -mids,
                        [0.0, -0.0, 448.0, -448.0, 2.0 ** -10, -(2.0 ** -10)]]).astype(np.float32)
    theirs = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    assert np.array_equal(Q.f32_to_e4m3(x), theirs)
    all_bytes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
    assert np.array_equal(Q.E4M3, all_bytes, equal_nan=True)


def test_fp4_cast_and_pack_match():
    rng = np.random.default_rng(1)
    grid = np.array([0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    x = np.concatenate([rng.uniform(-7, 7, 4000), grid, -grid, grid + 1e-3, -grid - 1e-3,
                        [-1e-7, 1e-7, -0.3, 0.3]]).astype(np.float32)
    x = x[: len(x) // 4 * 4].reshape(2, -1)
    clamped = torch.from_numpy(np.clip(x, -6, 6))
    fp4 = cast_to_fp4(clamped.clone())
    codes = Q.fp4_encode(x)
    assert np.array_equal(Q.FP4_TABLE[codes], fp4.numpy())
    assert np.array_equal(Q.pack_nvfp4(codes), pack_fp4_to_uint8(fp4).numpy())
    unpacked = unpack_fp4_from_uint8(torch.from_numpy(Q.pack_nvfp4(codes)), *x.shape, dtype=torch.float32)
    assert np.array_equal(unpacked.numpy(), Q.FP4_TABLE[codes])


@pytest.mark.parametrize("shape", SHAPES)
def test_nvfp4_compressor_bit_exact(shape):
    w = weights(shape, seed=shape[1])
    scheme = preset_name_to_scheme("NVFP4A16", ["Linear"])
    # the global scale and the group scales as compressed-tensors computes them
    tw = torch.from_numpy(w)
    tgs = generate_gparam(tw.min(), tw.max())
    gs = Q.nvfp4_global_scale(w)
    assert np.float32(tgs.item()) == gs
    groups = tw.reshape(shape[0], -1, 16)
    ts, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=tgs)
    packed, sbits = Q.quantize_nvfp4(w, global_scale=gs)
    assert np.array_equal(Q.e4m3_to_f32(sbits), ts.numpy())
    # their compressor on the same weight / scales
    out = NVFP4PackedCompressor.compress(
        {"weight": tw, "weight_scale": ts, "weight_global_scale": tgs}, scheme)
    assert np.array_equal(out["weight_packed"].numpy(), packed)
    assert np.array_equal(out["weight_scale"].view(torch.uint8).numpy(), sbits)
    # their decompressor on our bytes (it returns bf16) == ours rounded to bf16
    dec = NVFP4PackedCompressor.decompress(
        {"weight_packed": torch.from_numpy(packed), "weight_scale": torch.from_numpy(sbits).view(torch.float8_e4m3fn),
         "weight_global_scale": torch.tensor([gs])}, scheme)["weight"]
    mine = Q.dequant_nvfp4(packed, sbits, global_scale=gs)
    assert np.array_equal(dec.view(torch.int16).numpy().view(np.uint16), f32_to_bf16_bits(mine))
    # and in float32, their formula exactly: fp4 * (scale / global_scale)
    fp4 = unpack_fp4_from_uint8(torch.from_numpy(packed), *shape, dtype=torch.float32)
    ref = (fp4.reshape(shape[0], -1, 16) * (torch.from_numpy(Q.e4m3_to_f32(sbits)) / torch.tensor([gs]))[..., None])
    assert np.array_equal(ref.reshape(shape).numpy(), mine)


def test_written_config_is_valid_compressed_tensors(tmp_path):
    from minidiff.quantize import quantization_config
    group = {"self_attn.q_proj": 128, "mlp.down_proj": 64, "experts.gate_proj": 128, "experts.down_proj": 64}
    for fmt in ("int4", "nvfp4"):
        q = quantization_config(group if fmt == "int4" else {k: 16 for k in group}, fmt, "all-linear")
        cfg = QuantizationConfig.model_validate({k: v for k, v in q.items() if k not in ("version", "sparsity_config",
                                                                                          "transform_config")})
        assert cfg.format == ("pack-quantized" if fmt == "int4" else "nvfp4-pack-quantized")
        sizes = sorted(g.weights.group_size for g in cfg.config_groups.values())
        assert sizes == ([64, 128] if fmt == "int4" else [16])
