"""The 40-line sampler (minidiff/sampler_minimal.py) is the real one: same tokens as `sampler.generate`."""

from pathlib import Path

import numpy as np
import pytest

import minidiff
from minidiff.chat import ChatTemplate
from minidiff.sampler import round_bf16
from minidiff.sampler_minimal import generate_minimal
from minidiff.tokenizer import Tokenizer

GOLDEN = Path(__file__).parent / "golden" / "tiny"


@pytest.mark.parametrize("prompt, seed", [("Write a haiku about the sea", 0), ("Explain how a refrigerator works", 4)])
def test_minimal_equals_generate_on_the_default_model(prompt, seed):
    m = minidiff.load(None)
    tok, tpl = Tokenizer.from_folder(m.folder), ChatTemplate.from_folder(m.folder)
    ids = tok.encode(tpl.render([{"role": "user", "content": prompt}]))
    res = m.generate(ids, seed=seed, max_new_tokens=96)
    mine = generate_minimal(m, ids, seed, max_new_tokens=96, sc=round_bf16)        # a bf16 checkpoint
    n = len(mine)
    assert n % m.config.canvas_length == 0 and (res.tokens[0][:n] == mine).all()
    assert (res.tokens[0][n:] == 0).all()                                          # generate pads after the stop


def test_minimal_equals_generate_on_a_random_model_with_renoising():
    """A random model: many steps, renoising and no early stop, every canvas to the end."""
    m = minidiff.load(GOLDEN)
    res = m.generate([2, 105, 7, 19], seed=9, max_new_tokens=24, eos_token_id=[], max_denoising_steps=12)
    mine = generate_minimal(m, [2, 105, 7, 19], 9, max_new_tokens=24, N=12, eos=(), sc=round_bf16)
    assert res.steps_per_canvas != [1] * len(res.steps_per_canvas)
    np.testing.assert_array_equal(res.tokens[0], mine)
