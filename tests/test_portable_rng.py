"""The NumPy-free randomness reference (minidiff/portable_rng.py) reproduces NumPy's draws bit for bit:
the sampler's whole stream for odd and even B·C (the buffered 32-bit half carries over between draws),
the release's V = 262144, bounds that reject often, and seeds of one and of several 32-bit words."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minidiff.portable_rng import PCG64, seed_sequence


def protocol_stream(draw_int, draw_real, BC, V, steps):
    """The sampler's draws for two canvases (docs/randomness.md): init, then per step u and noise."""
    out = []
    for _ in range(2):
        out.append(("init", draw_int(V, BC)))
        for _ in range(steps):
            out.append(("u", draw_real(BC)))
            out.append(("noise", draw_int(V, BC)))
    return out


@pytest.mark.parametrize("BC", [1, 3, 256, 257, 2 * 255])
@pytest.mark.parametrize("seed", [0, 7, 2**63 - 1])
def test_sampler_stream_equals_numpy(BC, seed):
    g, p = np.random.default_rng(seed), PCG64(seed)
    V = 262144
    want = protocol_stream(lambda v, n: g.integers(0, v, size=n).tolist(), lambda n: g.random(n).tolist(), BC, V, 3)
    got = protocol_stream(p.integers, p.random, BC, V, 3)
    assert got == want


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**130), high=st.one_of(st.integers(2, 1000), st.integers(2, 2**32),
                                                   st.sampled_from([2**31 + 1, 3 * 2**30 + 1, 2**32])),
       n1=st.integers(0, 9), n2=st.integers(0, 9))
def test_draws_equal_numpy(seed, high, n1, n2):
    """Any seed, any bound up to 2^32 (2^31 + 1 rejects almost half the draws), interleaved draws."""
    g, p = np.random.default_rng(seed), PCG64(seed)
    assert p.integers(high, n1) == g.integers(0, high, size=n1).tolist()
    assert p.random(n2) == g.random(n2).tolist()
    assert p.integers(high, n2) == g.integers(0, high, size=n2).tolist()


def test_seed_sequence_words():
    for seed in (0, 1, 2**32, 2**64 + 5, 2**256 - 1):
        assert seed_sequence(seed) == np.random.SeedSequence(seed).generate_state(8, np.uint32).tolist()
