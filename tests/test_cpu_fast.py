"""The CPU fast paths against their plain statements: same values (bit for bit where the fast path claims it).

The real-width work (widening stored weights into reused buffers, threaded row blocks in the sampler,
the chunked head, subnormal-free attention) must not change what the model computes. Each fast path is
checked here against the one-line formula it replaces, with poisoned output buffers and 1 and 2 threads.
"""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minidiff import formats as Q
from minidiff import sampler
from minidiff.backend import scratch
from minidiff.ops import attention, experts, soft_embedding, softmax, tied_head
from minidiff.tensors import HalfTensor, bf16_to_f32, expand, f32_to_bf16_bits, take_rows


@pytest.fixture(params=[1, 2, 3], ids=lambda n: f"{n}threads")
def threads(request, monkeypatch):
    monkeypatch.setenv("MINIDIFF_THREADS", str(request.param))
    return request.param


# ---------------------------------------------------------------- sampler passes: bit for bit


def plain_softmax_entropy(z):
    m = z.max(axis=-1, keepdims=True)
    e = np.exp(z - m)
    s = e.sum(axis=-1, keepdims=True)
    p = e / s
    return p, -(p * ((z - m) - np.log(s))).sum(axis=-1)


def plain_inverse_cdf(p, u):
    cdf = np.cumsum(p, axis=-1, dtype=np.float64)
    return np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(axis=-1), p.shape[1] - 1)


@pytest.mark.parametrize("shape", [(1, 7, 33), (2, 5, 1000), (1, 130, 4099)])
def test_sampler_passes_equal_their_formulas_bit_for_bit(shape, threads):
    rng = np.random.default_rng(sum(shape))
    z = (rng.standard_normal(shape) * rng.choice([0.1, 3.0, 40.0])).astype(np.float32)
    z[..., 0] = -1e30 if shape[-1] > 100 else z[..., 0]             # a token with probability 0
    p, H = sampler.softmax_entropy(z)
    p0, H0 = plain_softmax_entropy(z)
    assert p.dtype == np.float32 and H.dtype == np.float32 and H.shape == shape[:-1]
    np.testing.assert_array_equal(p, p0)
    np.testing.assert_array_equal(H, H0)
    flat = p.reshape(-1, shape[-1])
    u = rng.random(flat.shape[0])
    u[0] = 0.0
    for chunk in (1 << 23, shape[-1] * 3, 1):                       # blocks of many rows, 3 rows, 1 row
        np.testing.assert_array_equal(sampler.sample_inverse_cdf(flat, u, chunk_elems=chunk),
                                      plain_inverse_cdf(flat, u))
    np.testing.assert_array_equal(sampler.round_bf16(z).view(np.uint32),
                                  bf16_to_f32(f32_to_bf16_bits(z)).view(np.uint32))


def test_round_bf16_specials(threads):
    x = np.array([[0.0, -0.0, np.inf, -np.inf, np.nan, 1 + 2 ** -8, 1 + 3 * 2 ** -8, 3.4e38, -1e-45]], np.float32)
    np.testing.assert_array_equal(sampler.round_bf16(x).view(np.uint32),
                                  bf16_to_f32(f32_to_bf16_bits(x)).view(np.uint32))


# ---------------------------------------------------------------- stored tensors widen exactly


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_tensor_expand_into_any_index(dtype, threads):
    rng = np.random.default_rng(1)
    w = rng.standard_normal((5, 6, 10)).astype(np.float32)
    raw = f32_to_bf16_bits(w) if dtype == "BF16" else w.astype(np.float16).view(np.uint16)
    want = bf16_to_f32(raw) if dtype == "BF16" else raw.view(np.float16).astype(np.float32)
    t = HalfTensor(raw, dtype)
    for index in (slice(None), slice(1, 4), np.array([4, 0, 4]), np.array([], dtype=np.int64)):
        out = np.full((len(want[index]),) + w.shape[1:], np.nan, np.float32)      # poisoned
        np.testing.assert_array_equal(t.expand_into(index, out), want[index])
    t2 = HalfTensor(raw.reshape(30, 10), dtype)                                    # 2-D: row blocks per thread
    out = np.full((23, 10), np.nan, np.float32)
    np.testing.assert_array_equal(t2.expand_into(slice(2, 25), out), want.reshape(30, 10)[2:25])
    np.testing.assert_array_equal(take_rows(t2, np.array([[3, 3], [29, 0]])), want.reshape(30, 10)[[[3, 3], [29, 0]]])


def test_expand_reuses_a_zeroed_buffer_for_bf16_and_stays_exact():
    """`expand` copies only the top halves into a buffer that only ever holds widened bf16: after a larger
    and a smaller use of the same key (shapes change, the flat buffer is shared), values stay exact."""
    rng = np.random.default_rng(2)
    a = HalfTensor(f32_to_bf16_bits(rng.standard_normal((9, 4, 6)).astype(np.float32)), "BF16")
    b = HalfTensor(f32_to_bf16_bits(rng.standard_normal((40, 7)).astype(np.float32)), "BF16")
    for w, index in ((a, np.arange(9)), (b, slice(3, 40)), (a, np.array([2])), (b, slice(0, 1)), (a, np.arange(9))):
        got = expand(w, index, "test-key")
        np.testing.assert_array_equal(got, bf16_to_f32(w.raw)[index])
    # the scratch buffer for other formats is a different one: garbage there cannot leak into bf16
    scratch("test-key", (1000,))[...] = np.nan
    np.testing.assert_array_equal(expand(b, slice(0, 40), "test-key"), bf16_to_f32(b.raw))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 9), words=st.integers(1, 12), g=st.sampled_from([8, 16, 32]), cut=st.integers(0, 7),
       seed=st.integers(0, 999), sdt=st.sampled_from(["BF16", "F16", "F32"]))
def test_dequant_int4_into_equals_the_reference(rows, words, g, cut, seed, sdt):
    rng = np.random.default_rng(seed)
    n = max(1, words * 8 - cut)
    g = n if n % g else g                                     # a group size that divides n
    q = rng.integers(-8, 8, (rows, n))
    scale = Q.round_up_to(rng.random((rows, n // g)) * 0.1, sdt).astype(np.float32)
    packed = Q.pack_int4(q)
    want = Q.dequant_int4(packed, scale, n)
    out = np.full((rows, n), np.nan, np.float32)
    np.testing.assert_array_equal(Q.dequant_int4_into(packed, scale, out), want)


def test_quantized_experts_grouped_in_chunks_match_their_dense_values(threads):
    """Packed int4 experts, widened a few at a time, give what the plain widened arrays give."""
    rng = np.random.default_rng(3)
    E, H, Ie, T, k, g = 6, 16, 8, 11, 2, 8

    def int4(w):
        s = Q.int4_scales(w, g, "BF16")
        return Q.Int4Weight("w", Q.pack_int4(Q.quantize_int4(w, s)), f32_to_bf16_bits(s), "BF16", w.shape, g)
    gate = [int4(rng.standard_normal((Ie, H)).astype(np.float32)) for _ in range(E)]
    up = [int4(rng.standard_normal((Ie, H)).astype(np.float32)) for _ in range(E)]
    down = [int4(rng.standard_normal((H, Ie)).astype(np.float32)) for _ in range(E)]
    gu = Q.QuantExperts("gu", [[gate[e], up[e]] for e in range(E)], (E, 2 * Ie, H))
    dn = Q.QuantExperts("dn", [[down[e]] for e in range(E)], (E, H, Ie))
    x = rng.standard_normal((T, H)).astype(np.float32)
    idx = np.stack([rng.choice(E - 1, k, replace=False) for _ in range(T)])    # expert E-1 unused
    wts = rng.random((T, k)).astype(np.float32)
    want = experts(np, x, idx, wts, gu.dequantize(), dn.dequantize())
    for chunk in (1, 4, 16):
        np.testing.assert_allclose(experts(np, x, idx, wts, gu, dn, chunk=chunk), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gu[2][:Ie], gate[2].dequantize())


def test_chunked_head_and_soft_embedding_match_one_matmul(threads):
    rng = np.random.default_rng(4)
    V, H, C = 1000, 24, 5
    E = HalfTensor(f32_to_bf16_bits(rng.standard_normal((V, H)).astype(np.float32)), "BF16")
    Ef = bf16_to_f32(E.raw)
    x = rng.standard_normal((C, H)).astype(np.float32)
    np.testing.assert_allclose(tied_head(np, x, E, block=64), x @ Ef.T, rtol=1e-5, atol=1e-5)
    p = softmax(np, rng.standard_normal((C, V)).astype(np.float32))
    np.testing.assert_allclose(soft_embedding(np, p, E, block=100), p @ Ef, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- attention without subnormals


def test_attention_flushes_only_what_is_below_the_smallest_normal(threads):
    """Keys 88+ below the best score have weight < 2^-126: they become exactly 0 and nothing else changes."""
    rng = np.random.default_rng(5)
    T, S, nh, hd = 4, 50, 2, 8
    q = rng.standard_normal((T, nh, hd)).astype(np.float32)
    k = rng.standard_normal((S, nh, hd)).astype(np.float32)
    v = rng.standard_normal((S, nh, hd)).astype(np.float32)
    k[:10] *= 0.0
    k[10] = 60.0 * q[0] / np.linalg.norm(q[0], axis=-1, keepdims=True) ** 2   # one key far above the rest for row 0
    got = attention(np, q, k, v)
    s = np.einsum("tnd,snd->nts", q.astype(np.float64), k.astype(np.float64))
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("nts,snd->tnd", p, v.astype(np.float64)).reshape(T, nh * hd)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    x = np.array([[0.0, -86.9, -87.5, -200.0, -np.inf]], np.float32)
    e = softmax(np, x, flush_subnormal=True)[0]
    assert e[2] == e[3] == e[4] == 0.0 and e[1] > 0 and np.all(e[e > 0] >= np.finfo(np.float32).tiny)


def test_a_long_prompt_encoded_in_pieces_equals_one_pass():
    import minidiff
    from pathlib import Path
    m = minidiff.load(Path(__file__).parent / "golden" / "tiny")
    ids = np.random.default_rng(6).integers(0, m.config.vocab_size, 23)
    whole, hw = m.encode(ids, return_hidden=True)
    m.prefill_chunk = 5                                   # pieces of 5: sliding windows span pieces
    parts, hp = m.encode(ids, return_hidden=True)
    assert parts.length == whole.length == 23
    np.testing.assert_allclose(hp, hw, rtol=1e-5, atol=1e-5)
    for a, b in zip(parts.keys + parts.values, whole.keys + whole.values):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    canvas = np.arange(8) % m.config.vocab_size
    np.testing.assert_allclose(m.denoise(canvas, parts), m.denoise(canvas, whole), rtol=1e-4, atol=1e-4)
