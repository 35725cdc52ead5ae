"""Bounds on the logits error of int4 g32 / g128 and NVFP4 against fp32 (tools/quant_report.py, tiny
config), and the size table of the real config (tools/size_table.py)."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import size_table  # noqa: E402

from minidiff import quantize as QZ  # noqa: E402


def test_size_table_real_config():
    params = size_table.other_params() + sum(o * n * c for _, o, n, c in size_table.linears())
    # 25,823,778,864 (release metadata, all tensors but buffers) - 572,792,112 vision + 60 layer_scalars
    assert params == 25_250_986_812
    assert size_table.variant_bytes("none", "bf16") == 2 * params          # 50.5 GB of text weights
    int4 = size_table.variant_bytes("all-linear", "int4", 32)              # minidiff's default
    room = 18e9 - int4 - size_table.kv_bytes(32768) - 256 * 262144 * 4
    assert room > 1e9                                                       # fits 18 GB with a 32k KV cache
    assert size_table.variant_bytes("experts", "int4", 128) < size_table.variant_bytes("experts", "int4", 32)
    assert size_table.group_for(704, 128) == 64 and size_table.group_for(2112, 128) == 64


@pytest.mark.parametrize("fmt, g, out, n", [("int4", 32, 704, 2816), ("int4", 128, 2816, 704), ("nvfp4", 16, 8, 64)])
def test_size_table_counts_the_bytes_the_quantizer_writes(fmt, g, out, n):
    gg = size_table.group_for(n, g) if fmt == "int4" else 16
    written = sum(int(np.prod(shape)) * np.dtype(size_table_dtype(dt)).itemsize
                  for _, dt, shape in QZ._module_tensors("m", out, n, gg, fmt if fmt == "int4" else "nvfp4-modelopt", "BF16"))
    extra_input_scale = 4 if fmt == "nvfp4" else 0                           # ModelOpt also stores input_scale
    assert size_table.linear_bytes(out, n, fmt, g) == written + extra_input_scale


def size_table_dtype(dt):
    from minidiff.weights import DTYPES
    return DTYPES[dt]


def test_logits_error_bounds_tiny(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import quant_report
    import tinyckpt
    import minidiff

    rows = {r["variant"]: r for r in quant_report.measure("tiny", tmp_path, with_steps=False)}
    # control: an unrelated model of the same config (what a layout / scale bug would look like)
    text, canvas = quant_report.configs()["tiny"]
    tinyckpt.save(tinyckpt.build_model(text, canvas_length=canvas, seed=99), tmp_path / "control")
    ref = minidiff.load(tmp_path / "tiny-fp32")
    ctl = minidiff.load(tmp_path / "control")
    L0, L1 = quant_report.logits_pairs(ref, 4, 12, 0), quant_report.logits_pairs(ctl, 4, 12, 0)
    ctl_mean, ctl_top1 = float(np.abs(L1 - L0).mean()), float((L1.argmax(-1) == L0.argmax(-1)).mean())
    ctl_max = float(np.abs(L1 - L0).max())
    # (random models mostly echo the canvas token, so even an unrelated model agrees on ~30 % of argmaxes)
    assert ctl_mean > 10 and ctl_top1 < 0.45
    # measured (4 pairs, seed 0): int4 g32 max 24.9 mean 4.01 top-1 56 %; g128 26.5 / 4.52 / 53 %;
    # NVFP4 25.8 / 4.31 / 62 %; control (seed 99) max 50.8 mean 12.3 top-1 31 %
    for v, (mean_bound, top1_bound) in {"int4 g32": (4.5, 0.5), "int4 g128": (5.0, 0.45), "NVFP4": (5.0, 0.5)}.items():
        r = rows[v]
        assert r["mean"] <= mean_bound and r["top1"] >= top1_bound, (v, r)
        assert r["mean"] < 0.5 * ctl_mean and r["top1"] > ctl_top1 + 0.15, (v, r, ctl_mean, ctl_top1)
        assert r["max"] < 0.6 * ctl_max, (v, r, ctl_max)
    assert rows["int4 g32"]["mean"] <= rows["int4 g128"]["mean"]          # smaller groups, smaller error
