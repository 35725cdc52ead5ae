"""The CPU kernel for 4-bit experts (minidiff/kernels/lowbit_matmul.c) against its plain statement.

Plain statement (minidiff/kernels/lowbit_matmul_reference.py): widen the weights with formats.dequant_int4 /
dequant_nvfp4, then X @ W.T (ops.experts' NumPy path). The kernel must decode every code and scale to the very same float32 weight (checked bit for
bit by multiplying with one-hot inputs, where each sum has a single term), give the same products up to
the order of float32 additions, give the same bits for any number of threads, refuse what the NumPy path
refuses, and step aside cleanly where it cannot run.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minidiff import ops
from minidiff.kernels import lowbit_matmul as native, lowbit_matmul_reference as reference
from minidiff import formats as Q
from minidiff.errors import MinidiffError
from minidiff.tensors import bf16_to_f32, f32_to_bf16_bits

needs_kernel = pytest.mark.skipif(native.library() is None, reason=f"no CPU kernel: {native.status()}")


@pytest.fixture
def numpy_path(monkeypatch):
    """Run the block with the kernel off (the NumPy path), then restore it."""
    def off():
        monkeypatch.setenv("MINIDIFF_NATIVE", "0")
        native.reset()
    yield off
    monkeypatch.delenv("MINIDIFF_NATIVE", raising=False)
    native.reset()


def int4(w, g, sdt):
    s = Q.int4_scales(w, g, sdt)
    raw = f32_to_bf16_bits(s) if sdt == "BF16" else s
    return Q.Int4Weight("w", Q.pack_int4(Q.quantize_int4(w, s)), raw, sdt, w.shape, g)


def nvfp4(w, convention):
    if convention == "ct":
        gs = Q.nvfp4_global_scale(w)
        packed, sb = Q.quantize_nvfp4(w, global_scale=gs)
        return Q.NVFP4Weight("w", packed, sb, w.shape, global_scale=gs)
    s2 = np.float32(1.0 / Q.nvfp4_global_scale(w))
    packed, sb = Q.quantize_nvfp4(w, scale_2=s2)
    return Q.NVFP4Weight("w", packed, sb, w.shape, scale_2=s2)


def one_linear(rng, fmt, shape):
    w = (rng.standard_normal(shape) * rng.choice([0.02, 1.0, 30.0])).astype(np.float32)
    w[0, : min(5, shape[1])] = 0.0                                       # some zeros
    return int4(w, fmt[1], fmt[2]) if fmt[0] == "int4" else nvfp4(w, fmt[1])


def make_experts(rng, fmt, E, H, Ie):
    def one(shape):
        return one_linear(rng, fmt, shape)
    gu = Q.QuantExperts("gu", [[one((Ie, H)), one((Ie, H))] for _ in range(E)], (E, 2 * Ie, H))
    dn = Q.QuantExperts("dn", [[one((H, Ie))] for _ in range(E)], (E, H, Ie))
    native.bind(gu), native.bind(dn)                                    # as the loader does on the CPU
    return gu, dn


def numpy_values(w) -> np.ndarray:
    """The float32 weight of a 4-bit Linear by formats.py's NumPy functions alone (the plain statement)."""
    if isinstance(w, Q.Int4Weight):
        scale = bf16_to_f32(w.scale_raw) if w.scale_dtype == "BF16" else w.scale_raw
        return Q.dequant_int4(w.packed, scale, w.shape[1])
    return Q.dequant_nvfp4(w.packed, w.scale_bits, w.global_scale, w.scale_2)


def numpy_experts(ex) -> np.ndarray:
    return np.stack([np.concatenate([numpy_values(p) for p in parts]) for parts in ex.parts])


FORMATS = [("int4", 32, "BF16"), ("int4", 16, "F32"), ("int4", 64, "BF16"), ("int4", 128, "F32"),
           ("nvfp4", "ct"), ("nvfp4", "modelopt")]


@needs_kernel
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: "-".join(map(str, f)))
def test_kernel_decodes_every_weight_bit_for_bit(fmt):
    """One-hot tokens pick single weights: Y = W' exactly, for every code, every scale, every row."""
    rng = np.random.default_rng(0)
    K = 256 if fmt[0] == "int4" and fmt[1] >= 64 else 96
    R = 7                                                               # not a multiple of the 4-row tile
    gu = Q.QuantExperts("gu", [[one_linear(rng, fmt, (R, K)), one_linear(rng, fmt, (R, K))] for _ in range(2)],
                        (2, 2 * R, K))
    p = native.kernel_view(gu)
    assert p is not None
    X = p.columns(np.eye(K, dtype=np.float32))                        # K tokens, one per input
    Y = np.full((K, p.rows), np.nan, np.float32)
    p.run(X, Y, np.array([1]), np.array([0, 0]), np.array([0, K]))
    np.testing.assert_array_equal(Y.T, numpy_experts(gu)[1])
    for w in gu.parts[0]:                    # the decoder that widens for the BLAS: the same values
        assert native.widener(w) is not None
        np.testing.assert_array_equal(w.dequantize(), numpy_values(w))


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(fmt=st.sampled_from(FORMATS), E=st.integers(1, 6), H=st.sampled_from([32, 48, 96, 128]),
       Ie=st.integers(1, 12), T=st.integers(1, 13), seed=st.integers(0, 10_000))
def test_kernel_experts_equal_widen_then_matmul(fmt, E, H, Ie, T, seed):
    rng = np.random.default_rng(seed)
    g = fmt[1] if fmt[0] == "int4" else 16
    H = max(H // g, 1) * g
    Ie = Ie * (16 if fmt[0] == "nvfp4" else g)                         # down's inputs: a multiple of the group
    gu, dn = make_experts(rng, fmt, E, H, Ie)
    k = min(E, 1 + seed % 3)
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(E, k, replace=False) for _ in range(T)])
    wts = rng.random((T, k)).astype(np.float32)
    got = native.experts(x, idx, wts, gu, dn)
    assert got is not None
    want = reference.lowbit_matmul(x, idx, wts, gu, dn)
    np.testing.assert_array_equal(numpy_experts(gu), np.stack([np.concatenate([reference.lowbit_widen(p) for p in ps])
                                                                for ps in gu.parts]))
    scale = float(np.abs(want).max()) + 1e-30
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale)


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_same_bits_for_any_number_of_threads(threads, monkeypatch):
    rng = np.random.default_rng(1)
    gu, dn = make_experts(rng, ("int4", 32, "BF16"), 5, 64, 96)
    x = rng.standard_normal((9, 64)).astype(np.float32)
    idx = np.stack([rng.choice(5, 2, replace=False) for _ in range(9)])
    wts = rng.random((9, 2)).astype(np.float32)
    monkeypatch.setenv("MINIDIFF_THREADS", "1")
    one = native.experts(x, idx, wts, gu, dn)
    monkeypatch.setenv("MINIDIFF_THREADS", str(threads))
    np.testing.assert_array_equal(native.experts(x, idx, wts, gu, dn), one)


@needs_kernel
def test_model_uses_the_kernel_and_the_numpy_path_agrees(numpy_path):
    rng = np.random.default_rng(2)
    gu, dn = make_experts(rng, ("nvfp4", "ct"), 4, 64, 32)
    x = rng.standard_normal((6, 64)).astype(np.float32)
    idx = np.stack([rng.choice(4, 2, replace=False) for _ in range(6)])
    wts = rng.random((6, 2)).astype(np.float32)
    fast = ops.experts(np, x, idx, wts, gu, dn)
    np.testing.assert_array_equal(fast, native.experts(x, idx, wts, gu, dn))
    numpy_path()
    assert native.experts(x, idx, wts, gu, dn) is None and native.status().startswith("off (MINIDIFF_NATIVE=0)")
    np.testing.assert_allclose(ops.experts(np, x, idx, wts, gu, dn), fast, rtol=1e-5, atol=1e-5)


@needs_kernel
def test_non_finite_scales_are_refused_as_on_the_numpy_path():
    rng = np.random.default_rng(3)
    gu, dn = make_experts(rng, ("int4", 32, "F32"), 3, 64, 32)
    dn.parts[2][0].scale_raw[1, 0] = np.nan
    x = rng.standard_normal((4, 64)).astype(np.float32)
    idx = np.array([[0], [1], [2], [0]])
    with pytest.raises(MinidiffError, match="non-finite scales"):
        ops.experts(np, x, idx, np.ones((4, 1), np.float32), gu, dn)
    gu, dn = make_experts(rng, ("nvfp4", "ct"), 2, 64, 32)
    gu.parts[1][1].global_scale = np.float32(0.0)                      # s / 0
    with pytest.raises(MinidiffError, match="non-finite scales"):
        ops.experts(np, x, idx % 2, np.ones((4, 1), np.float32), gu, dn)


@needs_kernel
def test_long_runs_and_other_forms_take_the_numpy_path():
    rng = np.random.default_rng(4)
    gu, dn = make_experts(rng, ("int4", 32, "BF16"), 2, 64, 32)
    x = rng.standard_normal((native.MAX_TOKENS + 1, 64)).astype(np.float32)
    idx = np.zeros((x.shape[0], 1), np.int64)
    assert native.experts(x, idx, np.ones((x.shape[0], 1), np.float32), gu, dn) is None   # a long prefill
    w = rng.standard_normal((32, 64)).astype(np.float32)
    f16 = Q.QuantExperts("gu", [[int4(w, 32, "F16"), int4(w, 32, "F16")]], (1, 64, 64))
    g8 = Q.QuantExperts("gu", [[int4(w, 8, "BF16"), int4(w, 8, "BF16")]], (1, 64, 64))
    assert native.kernel_view(f16) is None and native.kernel_view(g8) is None       # f16 scales, groups of 8: NumPy's
    short = int4(w, 32, "BF16")
    short.scale_raw = short.scale_raw[:, :1]                           # arrays smaller than the shape says
    assert native.widener(short) is None                               # the kernel never reads past them


def test_no_compiler_or_a_failing_one_leaves_the_numpy_path(monkeypatch, tmp_path, numpy_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for cc, why in ((str(tmp_path / "no-such-cc"), "no C compiler"), ("false", "could not build")):
        monkeypatch.setenv("CC", cc)
        native.reset()
        assert native.library() is None and why in native.status()
    assert not list(tmp_path.rglob("*.so"))                            # nothing half-built left behind
    monkeypatch.delenv("CC")
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))       # a cache that cannot be a folder
    native.reset()
    assert native.library() is None and "cannot create" in native.status()
    rng = np.random.default_rng(5)
    gu, dn = make_experts(rng, ("int4", 32, "BF16"), 2, 64, 32)
    x = rng.standard_normal((3, 64)).astype(np.float32)
    idx = np.array([[0], [1], [1]])
    want = ops.experts(np, x, idx, np.ones((3, 1), np.float32), gu.dequantize(), dn.dequantize())
    np.testing.assert_allclose(ops.experts(np, x, idx, np.ones((3, 1), np.float32), gu, dn), want,
                               rtol=1e-5, atol=1e-5)


@needs_kernel
def test_the_loader_binds_the_kernel_to_4bit_weights(tmp_path):
    """minidiff.load on the CPU offers the kernel to every 4-bit weight (ops.py's protocol): the experts
    compute through it, and the model's logits are what the kernel gives."""
    import minidiff
    from minidiff.cli import main
    assert main(["quantize", "default", str(tmp_path / "q"), "--scope", "all-linear"]) == 0
    model = minidiff.load(tmp_path / "q")
    gu, dn = model.layers[0]["experts.gate_up_proj"], model.layers[0]["experts.down_proj"]
    q = model.layers[0]["self_attn.q_proj.weight"]
    assert callable(gu.moe) and q.kernel_widen is not None
    rng = np.random.default_rng(6)
    x = rng.standard_normal((5, gu.shape[2])).astype(np.float32)
    idx = np.stack([rng.choice(gu.shape[0], 2, replace=False) for _ in range(5)])
    wts = rng.random((5, 2)).astype(np.float32)
    np.testing.assert_array_equal(ops.experts(np, x, idx, wts, gu, dn), native.experts(x, idx, wts, gu, dn))
    out = np.empty(q.shape, np.float32)
    assert q.kernel_widen(slice(0, q.shape[0]), out)
    np.testing.assert_array_equal(out, reference.lowbit_widen(q))
