"""The MoE kernels' bookkeeping, checked without a GPU: minidiff/kernels/moe_experts_emulator.py replays
kernels_cuda/moe_experts.cu lane by lane (which weight word, token row and scale each lane loads, which
output it writes), with the tensor-core MMA as PTX defines it, and must equal `moe_reference` within
the GPU test's bound. It is a hand transcription of the kernel: it guards the index arithmetic as written
there, and tests/test_gpu_kernels.py (on a GPU) guards the kernel itself."""


import pytest
from hypothesis import given, settings, strategies as st

import moe_cases as emu

BOUND = 2e-3                                   # tests/test_gpu_kernels.py's stated bound


@pytest.mark.parametrize("fmt", ["bf16", "int4"])
@pytest.mark.parametrize("case", [
    (1, 4, 1, 64, 16, 16, 0),                  # the GPU test's first case (where the first GPU run failed)
    (37, 8, 3, 80, 48, 16, 2),                 # features not a multiple of 64; ragged rows; empty experts
    (70, 2, 2, 32, 16, 16, 0),                 # 70 rows an expert: two 64-row passes
])
def test_the_replayed_kernels_equal_the_reference(fmt, case):
    err, top = emu.check(fmt, *case)
    assert err <= BOUND * max(1.0, top), (err, top)


@settings(max_examples=12, deadline=None)
@given(fmt=st.sampled_from(["bf16", "int4"]), T=st.integers(1, 40), E=st.integers(1, 5), k=st.integers(1, 3),
       H=st.sampled_from([16, 32, 48, 96]), Ie=st.sampled_from([16, 32, 80]), G=st.sampled_from([16]),
       seed=st.integers(0, 2 ** 31))
def test_the_replayed_kernels_equal_the_reference_on_drawn_shapes(fmt, T, E, k, H, Ie, G, seed):
    k = min(k, E)
    err, top = emu.check(fmt, T, E, k, H, Ie, G, empty=0, seed=seed)
    assert err <= BOUND * max(1.0, top), (err, top)
