"""Mock denoisers with known entropies for the sampler's property tests; no tests here.

`MockModel` has the three things the sampler uses: `config`, `encode`, `denoise`. It records every call.
Logit functions take (canvas [C], cache, sc [C, V] | None, model) and return [C, V] float32:
    peaked(tokens)   40 at a chosen token per position, 0 elsewhere (H ~ 0)
    flat(seed)       small random logits (H ~ log V)
    graded(heights)  a peak whose height varies by position (known, distinct entropies)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np


@dataclass(frozen=True)
class MockCache:
    tokens: tuple
    length: int


@dataclass
class MockModel:
    V: int
    C: int
    logits_fn: object
    eos: list = field(default_factory=lambda: [10 ** 6])   # no stop id unless a test asks for one
    pad: int = 0
    ctx: int = 100_000
    folder: object = None

    def __post_init__(self):
        self.config = SimpleNamespace(vocab_size=self.V, canvas_length=self.C, eos_token_ids=list(self.eos),
                                      pad_token_id=self.pad, max_position_embeddings=self.ctx)
        self.encodes = []      # (ids, start position)
        self.denoises = []     # (canvas, start position, sc or None, logits)

    def encode(self, ids, cache=None):
        ids = np.asarray(ids).copy()
        start = 0 if cache is None else cache.length
        self.encodes.append((ids, start))
        prev = () if cache is None else cache.tokens
        return MockCache(prev + tuple(int(i) for i in ids), start + len(ids))

    def denoise(self, canvas, cache, self_conditioning_logits=None):
        canvas = np.asarray(canvas).copy()
        assert canvas.shape == (self.C,) and np.issubdtype(canvas.dtype, np.integer)
        sc = None if self_conditioning_logits is None else np.asarray(self_conditioning_logits).copy()
        out = np.asarray(self.logits_fn(canvas, cache, sc, self), dtype=np.float32)
        self.denoises.append((canvas, cache.length, sc, out.copy()))
        return out


def peaked(tokens_fn, height=40.0):
    """tokens_fn(cache) -> [C] ids: logit `height` there, 0 elsewhere."""
    def fn(canvas, cache, sc, m):
        out = np.zeros((m.C, m.V), np.float32)
        out[np.arange(m.C), np.asarray(tokens_fn(cache)) % m.V] = height
        return out
    return fn


def flat(seed=0, scale=0.1):
    rng = np.random.default_rng(seed)

    def fn(canvas, cache, sc, m):
        return (rng.standard_normal((m.C, m.V)) * scale).astype(np.float32)
    return fn


def graded(heights, seed=0):
    """Peak height per position (len C) at a random token, small noise elsewhere: distinct entropies."""
    rng = np.random.default_rng(seed)

    def fn(canvas, cache, sc, m):
        out = (rng.standard_normal((m.C, m.V)) * 0.5).astype(np.float32)
        tok = rng.integers(0, m.V, m.C)
        out[np.arange(m.C), tok] += np.asarray(heights, np.float32)
        return out
    return fn


def random_logits(seed=0, scale=4.0):
    """Fresh random logits every call (varied entropies, a new argmax each step): `flat`, scaled up."""
    return flat(seed, scale)


def replay_draws(seed, B, C, V, steps_per_canvas):
    """The protocol's draws for a run: per canvas (init [B, C], [(u [B, C], noise [B, C]) per step])."""
    rng = np.random.default_rng(seed)
    out = []
    for n in steps_per_canvas:
        init = rng.integers(0, V, size=(B, C))
        steps = []
        for _ in range(n):
            u = rng.random((B, C))
            steps.append((u, rng.integers(0, V, size=(B, C))))
        out.append((init, steps))
    return out
