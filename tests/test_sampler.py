"""Sampler invariants (numbered 1-17 in the comments) with mock denoisers of known entropy.

Each invariant is checked by a function `check_*` that raises AssertionError when its rule is broken;
`test_checks_catch_broken_*` run some of them against deliberately broken sampler pieces, so the checks
are known to be able to fail.
"""

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from minidiff import sampler as S
from minidiff.errors import MinidiffError
from test_sampler_mocks import MockModel, flat, graded, peaked, random_logits, replay_draws

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(model, prompt=(2, 5, 6), **kw):
    events = []
    kw.setdefault("seed", 0)
    res = S.generate(model, list(prompt) if np.ndim(prompt[0]) == 0 else prompt, callback=events.append, **kw)
    return res, [e for e in events if e.kind == "step"], [e for e in events if e.kind == "commit"]


def ref_accept(H, bound):
    """Brute force: walk the ascending order, accept while the sum of the entropies before is <= bound."""
    H = np.asarray(H, np.float32)
    acc = np.zeros(H.shape, bool)
    for row in np.ndindex(H.shape[:-1]):
        h = H[row]
        order = sorted(range(len(h)), key=lambda j: (h[j], j))
        before = 0.0
        for j in order:
            if np.float32(before) <= np.float32(bound):
                acc[row + (j,)] = True
            before += float(h[j])
        # (float64 running sum; exact ties with float32 rounding are not drawn by the strategies)
    return acc


entropies = st.lists(st.floats(0, 3, allow_nan=False, width=32), min_size=1, max_size=24)


# ----------------------------------------------------------------------------------------------
# 3. acceptance


def check_acceptance(accept_fn, H, bound):
    H = np.asarray(H, np.float32)
    acc = accept_fn(H[None], bound)[0]
    k = int(acc.sum())
    assert 1 <= k <= len(H)
    order = np.argsort(H, kind="stable")
    assert acc[order[:k]].all() and not acc[order[k:]].any(), "accepted set is not a prefix of the stable order"
    s = H[order].astype(np.float64)
    excl = np.concatenate([[0.0], np.cumsum(s)[:-1]])
    # k = #{r: exclusive prefix sum <= bound}, away from float32 rounding of the boundary
    if np.all(np.abs(excl - bound) > 1e-5):
        assert k == int((excl <= bound).sum())
    if not H.any():
        assert k == len(H)
    return k


@SETTINGS
@given(entropies, st.floats(1e-3, 5))
def test_acceptance_is_an_entropy_prefix(H, bound):                      # invariant 3
    k = check_acceptance(S.entropy_bound_accept, H, bound)
    # monotone in the bound and in a scale-down of the entropies; depends only on the multiset
    assert S.entropy_bound_accept(np.asarray(H, np.float32)[None], bound * 2)[0].sum() >= k
    assert S.entropy_bound_accept(np.asarray(H, np.float32)[None] * np.float32(0.5), bound)[0].sum() >= k
    perm = np.random.default_rng(len(H)).permutation(len(H))
    assert S.entropy_bound_accept(np.asarray(H, np.float32)[perm][None], bound)[0].sum() == k


@SETTINGS
@given(entropies, st.floats(1e-3, 5))
def test_acceptance_matches_brute_force(H, bound):
    Hf = np.asarray(H, np.float32)
    s = np.sort(Hf).astype(np.float64)
    excl = np.concatenate([[0.0], np.cumsum(s)[:-1]])
    if np.any(np.abs(excl - bound) < 1e-5):
        return                                       # float32 boundary: covered by the exact torch test
    assert (S.entropy_bound_accept(Hf[None], bound)[0] == ref_accept(Hf, bound)).all()


def test_acceptance_spec_example():                                      # a worked example
    H = np.array([0, 0, .003, .010, .031, .096, .287, .792], np.float32)
    acc = S.entropy_bound_accept(H[None], 0.1)[0]
    assert acc.sum() == 6 and acc[5] and not acc[6]


def test_acceptance_ties_are_stable():
    H = np.array([0.5, 0.2, 0.5, 0.5, 0.2], np.float32)
    acc = S.entropy_bound_accept(H[None], 0.45)[0]   # exclusive sums 0, .2, .4 (accepted), .9 ...
    assert acc.tolist() == [True, True, False, False, True]   # the FIRST tied 0.5 is taken


def test_acceptance_equals_torch_rule():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    for trial in range(300):
        H = (rng.random((4, 32)) ** 3 * rng.choice([0.01, 0.1, 1.0])).astype(np.float32)
        bound = float(rng.choice([0.05, 0.1, 0.3]))
        t = torch.from_numpy(H)
        s, idx = torch.sort(t, dim=-1, stable=True)
        sel = torch.cumsum(s, dim=-1) - s <= bound
        ref = torch.zeros_like(sel).scatter(-1, idx, sel).numpy()
        assert (S.entropy_bound_accept(H, bound) == ref).all()


def exact_rule(H, bound):
    """The acceptance rule written out element by element, independently of entropy_bound_accept: sort
    ascending (stable); the r-th smallest is accepted iff (float32 of the float64 running sum through r)
    minus its own entropy, in float32, is <= the float32 bound."""
    H = [np.float32(h) for h in H]
    order = sorted(range(len(H)), key=lambda i: (H[i], i))
    acc, run = [False] * len(H), 0.0
    for i in order:
        run += float(H[i])
        acc[i] = bool(np.float32(np.float32(run) - H[i]) <= np.float32(bound))
    return acc


def test_acceptance_at_the_boundary_is_inclusive():
    """An exclusive sum exactly equal to the bound is accepted (<=, not <): where the rule is defined."""
    assert S.entropy_bound_accept(np.array([[0.1, 0.1]], np.float32), 0.1)[0].tolist() == [True, True]
    # float32 rounding decides near the bound: 0.05 + 0.05 + 0.05 leaves an exclusive sum just above 0.1
    assert S.entropy_bound_accept(np.array([[0.05, 0.05, 0.05]], np.float32), 0.1)[0].tolist() == \
        exact_rule([0.05, 0.05, 0.05], 0.1) == [True, True, False]


@SETTINGS
@given(entropies, st.integers(0, 30))
def test_acceptance_equals_the_exact_rule_on_its_boundary(H, r):
    """The bound set to one of the exclusive sums exactly (as float32): boundary cases, never skipped."""
    Hf = np.asarray(H, np.float32)
    s = np.sort(Hf, kind="stable")
    excl = (np.cumsum(s.astype(np.float64)).astype(np.float32) - s)
    bound = float(excl[r % len(H)])
    if not bound > 0:
        return
    assert S.entropy_bound_accept(Hf[None], bound)[0].tolist() == exact_rule(Hf, bound)


def test_done_rows_keep_their_canvas_where_not_accepted():
    """A row that met the stop rule while some of its positions were NOT accepted (a small entropy bound, a
    generous confidence threshold) keeps its canvas as it was: no renoising after done."""
    C, N = 6, 6

    def fn(canvas, cache, sc, m):
        if cache.tokens[0] == 3:                                            # confident, but not certain
            return peaked(lambda c: np.arange(C) + 10, height=6.0)(canvas, cache, sc, m)
        return flat(cache.length)(canvas, cache, sc, m)                     # H ~ log V: never done
    m = MockModel(40, C, fn, eos=[99])
    res, steps, _ = run(m, [[3], [4]], max_new_tokens=C, max_denoising_steps=N, stability_threshold=0,
                        confidence_threshold=1.0, entropy_bound=1e-6)
    done_at = next(e.step for e in steps if e.done[0])
    at = [e for e in steps if e.step == done_at][0]
    later = [e for e in steps if e.step > done_at]
    assert later and not any(e.done[1] for e in steps)                      # row 1 runs on: steps to check
    assert not at.accepted[0].all()                                         # the case the rule is about
    for e in later:
        assert not e.active[0]
        assert (e.canvas[0] == at.next_canvas[0]).all() and (e.next_canvas[0] == e.canvas[0]).all()


def test_inverse_cdf_sums_in_float64_on_the_boundaries():
    """Uniforms placed on the sequential float64 CDF's steps: a float32 running sum (or any other order)
    lands on the other side of some of them."""
    rng = np.random.default_rng(11)
    V = 3000
    p = (rng.random((64, V)) ** 8).astype(np.float32)
    p /= p.sum(axis=1, keepdims=True)
    cdf = np.cumsum(p.astype(np.float64), axis=1)                          # sequential, float64
    j = rng.integers(1, V, 64)
    u = cdf[np.arange(64), j - 1] / cdf[:, -1]                              # on a step of the CDF
    want = np.minimum((cdf <= (u * cdf[:, -1])[:, None]).sum(axis=1), V - 1)
    assert (S.sample_inverse_cdf(p, u) == want).all()
    f32 = np.cumsum(p, axis=1, dtype=np.float32)
    assert ((f32 <= (u * cdf[:, -1])[:, None]).sum(axis=1) != want).any()   # the test can tell the two apart


def broken_inclusive(H, bound):                       # accepts on the INCLUSIVE sum: a classic slip
    xp = np
    order = xp.argsort(H, axis=-1, kind="stable")
    s = xp.take_along_axis(H, order, axis=-1)
    keep = xp.cumsum(s, axis=-1) <= bound
    acc = xp.zeros(H.shape, bool)
    xp.put_along_axis(acc, order, keep, axis=-1)
    return acc


def test_checks_catch_broken_acceptance():
    with pytest.raises(AssertionError):
        check_acceptance(broken_inclusive, [0.3, 0.05, 0.2, 0.9], 0.1)


# ----------------------------------------------------------------------------------------------
# the per-step math


def test_temperature_schedule_values():                                   # invariant 6 (formula)
    N = 48
    T = [S.temperature(n, N, 0.4, 0.8) for n in range(N, 0, -1)]
    assert all(t.dtype == np.float32 for t in T)
    assert T[0] == np.float32(0.8)
    assert all(a > b for a, b in zip(T, T[1:]))
    assert np.isclose(T[-1], 0.4 + 0.4 / 48, rtol=1e-6) and T[-1] > 0.4
    assert np.allclose(np.diff(np.asarray(T, np.float64)), -0.4 / 48, rtol=1e-4)
    assert S.temperature(3, 6, None, 0.8) is None


def test_temperature_equals_torch():
    torch = pytest.importorskip("torch")
    for N in (1, 7, 48):
        for n in range(1, N + 1):
            t = 0.4 + ((0.8 - 0.4) * (torch.tensor(n, dtype=torch.int32) / N))
            assert t.item() == S.temperature(n, N, 0.4, 0.8)


def test_round_bf16_equals_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 30,
                        np.array([0, -0.0, 1e-40, 3.0e38, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8)], np.float32)])
    ref = torch.from_numpy(x).to(torch.bfloat16).to(torch.float32).numpy()
    assert (S.round_bf16(x).view(np.uint32) == ref.view(np.uint32)).all()


@SETTINGS
@given(st.integers(2, 50), st.integers(1, 6), st.integers(0, 2 ** 32))
def test_softmax_entropy(V, R, seed):
    z = (np.random.default_rng(seed).standard_normal((R, V)) * 5).astype(np.float32)
    p, H = S.softmax_entropy(z)
    q = np.exp(z.astype(np.float64) - z.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    assert np.allclose(p, q, atol=1e-6)
    assert np.allclose(H, -(q * np.log(q)).sum(-1), atol=1e-5)


@SETTINGS
@given(st.integers(2, 40), st.integers(1, 8), st.integers(0, 2 ** 32), st.integers(1, 5))
def test_inverse_cdf_rule(V, R, seed, chunk):
    rng = np.random.default_rng(seed)
    p = rng.random((R, V)).astype(np.float32) ** 4
    p /= p.sum(-1, keepdims=True)
    u = rng.random(R)
    got = S.sample_inverse_cdf(p, u, chunk_elems=chunk * V)              # chunking must not matter
    for r in range(R):                                                  # the protocol, one row at a time
        cdf = np.cumsum(p[r].astype(np.float64))
        assert got[r] == min(int((cdf <= u[r] * cdf[-1]).sum()), V - 1)
    u1 = np.nextafter(np.ones(R), 0)                                    # u -> 1 stays in range
    assert (S.sample_inverse_cdf(p, u1) < V).all()


def test_inverse_cdf_is_categorical():                                    # a statistical check, fixed seed
    rng = np.random.default_rng(1)
    p = np.array([[0.5, 0.25, 0.125, 0.125]], np.float32)
    draws = S.sample_inverse_cdf(np.repeat(p, 40000, 0), rng.random(40000))
    counts = np.bincount(draws, minlength=4)
    chi2 = (((counts - 40000 * p[0]) ** 2) / (40000 * p[0])).sum()
    assert chi2 < 16.3                                                  # p = 0.001, 3 dof


def test_eos_fill():                                                      # invariant 16 (within a canvas)
    t = np.array([[20, 21, 22, 1, 5, 1, 106, 9], [3, 4, 5, 6, 7, 8, 9, 10], [106, 1, 1, 2, 2, 2, 2, 2]])
    out = S.eos_fill(t, [1, 106, 50], 0)
    assert out.tolist() == [[20, 21, 22, 1, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10], [106, 0, 0, 0, 0, 0, 0, 0]]


# ----------------------------------------------------------------------------------------------
# whole runs on mocks

shapes = st.tuples(st.integers(8, 40), st.integers(2, 9), st.integers(1, 7), st.integers(1, 3))  # V, C, N, B


def prompts_for(B, seed):
    rng = np.random.default_rng(seed)
    return [list(rng.integers(5, 8, rng.integers(1, 5))) for _ in range(B)]


@SETTINGS
@given(shapes, st.integers(0, 1000), st.sampled_from(["flat", "random", "graded"]))
def test_step_invariants(shape, seed, kind):                               # invariants 1, 2, 4, 7, 8
    V, C, N, B = shape
    fn = {"flat": flat(seed), "random": random_logits(seed), "graded": graded(np.linspace(0, 30, C), seed)}[kind]
    m = MockModel(V, C, fn, eos=[V + 1])
    res, steps, commits = run(m, prompts_for(B, seed), max_new_tokens=2 * C, max_denoising_steps=N, seed=seed,
                              self_conditioning_dtype="float32", confidence_threshold=None)
    draws = replay_draws(seed, B, C, V, res.steps_per_canvas)
    calls = iter(m.denoises)
    prev_raw = prev_T = None
    for e in steps:
        for a in (e.canvas, e.sampled, e.argmax, e.next_canvas):
            assert a.shape == (B, C) and np.issubdtype(a.dtype, np.integer)     # 1
            assert a.min() >= 0 and a.max() < V                                 # 2
        u, noise = draws[e.canvas_index][1][e.step]
        acc = e.accepted
        assert acc.tolist() == [exact_rule(h, 0.1) for h in e.entropy]        # 3: recomputed, not trusted
        assert (e.next_canvas[acc] == e.sampled[acc]).all()                     # 4: accepted keep the sample
        assert (e.next_canvas[~acc] == noise[~acc]).all()                      # 4: the rest is the renoise draw
        if e.step == 0:
            assert (e.canvas == draws[e.canvas_index][0]).all()                 # fresh canvas = the init draw
        raws = []
        for b in range(B):                                                     # 7, 8 per row call
            canvas, start, sc, raw = next(calls)
            raws.append(raw)
            assert (canvas == e.canvas[b]).all()
            T = S.temperature(N - e.step, N, 0.4, 0.8)
            if e.step == 0:
                assert sc is None                                               # 7: SC reset per canvas
            else:
                assert (sc == prev_raw[b] / prev_T).all()                       # 7: previous tempered logits
            assert (e.argmax[b] == (raw / T).argmax(-1)).all()
            p, H = S.softmax_entropy(raw / T)
            assert (e.entropy[b] == H).all()
            assert (e.sampled[b] == S.sample_inverse_cdf(p, u[b])).all()       # the protocol's draw
        prev_raw = raws
        prev_T = S.temperature(N - e.step, N, 0.4, 0.8)
    for c, e in zip(commits, [s for i, s in enumerate(steps) if i + 1 == len(steps) or steps[i + 1].step == 0]):
        assert (c.tokens == e.argmax).all()                                     # 8: commit = last argmax


def test_sc_is_bf16_rounded_when_asked():                                   # 7 (bf16, as HF with bf16 weights)
    m = MockModel(32, 4, random_logits(3))
    run(m, max_new_tokens=4, max_denoising_steps=3, self_conditioning_dtype="bfloat16",
        stability_threshold=None, confidence_threshold=None)
    for i in (1, 2):
        T = S.temperature(4 - i, 3, 0.4, 0.8)
        want = S.round_bf16(m.denoises[i - 1][3] / T)
        assert (m.denoises[i][2] == want).all() and not (want == m.denoises[i - 1][3] / T).all()


def test_temperature_recovered_from_sc():                                  # invariant 6 via the recorder
    N = 6
    m = MockModel(32, 4, random_logits(4))
    run(m, max_new_tokens=4, max_denoising_steps=N, self_conditioning_dtype="float32",
        stability_threshold=None, confidence_threshold=None)
    T = [float(np.median(m.denoises[i][3] / m.denoises[i + 1][2])) for i in range(N - 1)]
    assert np.allclose(T, [0.8, 0.7333333, 0.6666667, 0.6, 0.5333333], rtol=1e-6)


def test_no_temperature_when_unset():
    m = MockModel(32, 4, random_logits(4))
    run(m, max_new_tokens=4, max_denoising_steps=3, t_min=None, t_max=None, self_conditioning_dtype="float32",
        stability_threshold=None, confidence_threshold=None)
    assert (m.denoises[1][2] == m.denoises[0][3]).all()


@SETTINGS
@given(st.integers(0, 3), st.integers(2, 9), st.integers(4, 12))
def test_stopping_peaked(s, C, N):                                          # invariant 9
    m = MockModel(50, C, peaked(lambda cache: np.arange(C) + 10))
    res, steps, _ = run(m, max_new_tokens=3 * C, max_denoising_steps=N, stability_threshold=s)
    assert res.steps_per_canvas == [min(s + 1, N)] * 3
    assert (res.passes == 3 * min(s + 1, N)).all()


@SETTINGS
@given(st.integers(0, 3), st.integers(2, 6), st.integers(1, 8))
def test_stopping_flat_or_unreachable(s, C, N):                             # invariant 9
    m = MockModel(50, C, flat(1))
    res, _, _ = run(m, max_new_tokens=2 * C, max_denoising_steps=N, stability_threshold=s)
    assert res.steps_per_canvas == [N, N]
    m = MockModel(50, C, peaked(lambda cache: np.arange(C) + 10, height=8.0))     # stable, mean H >= 2e-6
    res, _, _ = run(m, max_new_tokens=2 * C, max_denoising_steps=N, stability_threshold=s, confidence_threshold=1e-7)
    assert res.steps_per_canvas == [N, N]                                   # threshold below every mean H
    res, _, _ = run(m, max_new_tokens=2 * C, max_denoising_steps=N, confidence_threshold=None)
    assert res.steps_per_canvas == [N, N]


def test_stopping_needs_strictly_below_threshold():
    C = 4
    m = MockModel(2, C, lambda canvas, cache, sc, mm: np.zeros((C, 2), np.float32), eos=[9])
    H = np.log(2)                                                           # flat over 2 tokens, any T
    res, _, _ = run(m, [0], max_new_tokens=C, max_denoising_steps=5, stability_threshold=0,
                    confidence_threshold=float(np.float32(H)))
    assert res.steps_per_canvas == [5]
    res, _, _ = run(m, [0], max_new_tokens=C, max_denoising_steps=5, stability_threshold=0,
                    confidence_threshold=float(np.nextafter(np.float32(H), np.float32(1))))
    assert res.steps_per_canvas == [1]


def test_done_rows_are_frozen():                                            # invariant 10
    C, N = 5, 7

    def fn(canvas, cache, sc, m):                                           # row with prompt [3]: peaked
        if cache.tokens[0] == 3:
            return peaked(lambda c: np.arange(C) + 10)(canvas, cache, sc, m)
        return random_logits(cache.length)(canvas, cache, sc, m)
    m = MockModel(40, C, fn, eos=[99])
    res, steps, _ = run(m, [[3], [4]], max_new_tokens=2 * C, max_denoising_steps=N)
    assert res.steps_per_canvas == [N, N]
    assert res.passes.tolist() == [4, 2 * N]                                # done row stops counting
    assert len(m.denoises) == 2 + 2 * N + 2                                 # no call for the done row
    for k in range(2):
        evs = [e for e in steps if e.canvas_index == k]
        frozen = [e for e in evs if e.step >= 2]
        for e in frozen:                                                    # after done: nothing moves
            assert (e.canvas[0] == evs[1].next_canvas[0]).all() and (e.next_canvas[0] == e.canvas[0]).all()
            assert (e.argmax[0] == evs[1].argmax[0]).all() and e.done[0] and not e.active[0]
    assert (res.tokens[0] == np.tile(np.arange(C) + 10, 2)).all()


@SETTINGS
@given(shapes, st.integers(0, 1000))
def test_determinism(shape, seed):                                          # invariant 11
    V, C, N, B = shape
    a = S.generate(MockModel(V, C, random_logits(1)), prompts_for(B, 1), max_new_tokens=2 * C,
                   max_denoising_steps=N, seed=seed)
    b = S.generate(MockModel(V, C, random_logits(1)), prompts_for(B, 1), max_new_tokens=2 * C,
                   max_denoising_steps=N, seed=seed)
    assert (a.sequences == b.sequences).all() and a.steps_per_canvas == b.steps_per_canvas
    c = S.generate(MockModel(V, C, random_logits(1)), prompts_for(B, 1), max_new_tokens=2 * C,
                   max_denoising_steps=N, seed=seed + 1, callback=None)
    assert c.seed == seed + 1


def test_different_seeds_different_canvases():                              # invariant 11 (S)
    inits = set()
    for seed in range(20):
        m = MockModel(1000, 8, flat(0))
        _, steps, _ = run(m, max_new_tokens=8, max_denoising_steps=1, seed=seed)
        inits.add(tuple(steps[0].canvas[0]))
    assert len(inits) == 20


def test_unseeded_runs_report_their_seed():
    m = MockModel(100, 8, random_logits(0))
    r = S.generate(m, [2, 3], max_new_tokens=8, max_denoising_steps=3)
    again = S.generate(MockModel(100, 8, random_logits(0)), [2, 3], max_new_tokens=8, max_denoising_steps=3,
                       seed=r.seed)
    assert r.seed is not None and (r.sequences == again.sequences).all()


@SETTINGS
@given(shapes, st.integers(0, 1000))
def test_greedy(shape, seed):                                               # invariant 12
    V, C, N, B = shape
    m = MockModel(V, C, random_logits(seed), eos=[V + 1])
    res, steps, _ = run(m, prompts_for(B, seed), max_new_tokens=C, max_denoising_steps=N, greedy=True,
                        stability_threshold=None, confidence_threshold=None)
    for e in steps:
        assert (e.sampled == e.argmax).all() and e.accepted.all() and (e.next_canvas == e.argmax).all()
    for c in m.denoises:                                                    # SC is the one-hot limit
        if c[2] is not None:
            p, _ = S.softmax_entropy(c[2])
            assert set(np.unique(p)) <= {0.0, 1.0}


@SETTINGS
@given(st.integers(2, 9), st.integers(1, 40), st.integers(1, 3), st.integers(0, 100))
def test_length_and_tokens_per_forward(C, max_new, B, seed):                 # invariants 13, 17
    m = MockModel(30, C, random_logits(seed), eos=[31])
    res, steps, commits = run(m, prompts_for(B, seed), max_new_tokens=max_new, max_denoising_steps=3, seed=seed)
    # passes recounted from the events: a row counts a step while it is neither done nor finished earlier
    finished, passes = np.zeros(B, bool), np.zeros(B, int)
    for k in range(len(res.steps_per_canvas)):
        for e in (e for e in steps if e.canvas_index == k):
            passes += e.active & ~finished
        finished = commits[k].finished
    assert res.passes.tolist() == passes.tolist()
    K = math.ceil(max_new / C)
    assert res.sequences.shape == (B, max(len(p) for p in prompts_for(B, seed)) + K * C)
    assert all(len(t) == K * C for t in res.tokens)
    tpf = np.asarray(res.tokens_per_forward)
    assert ((0 < tpf) & (tpf <= C)).all()
    assert np.allclose(tpf, [np.count_nonzero(t != 0) / p for t, p in zip(res.tokens, res.passes)])


@SETTINGS
@given(st.integers(2, 8), st.integers(1, 4), st.integers(0, 100))
def test_commits_and_positions(C, K, seed):                                  # invariants 14, 15
    m = MockModel(30, C, random_logits(seed), eos=[31])
    prompt = [2, 7, 9][: 1 + seed % 3]
    P = len(prompt)
    res, steps, commits = run(m, prompt, max_new_tokens=K * C, max_denoising_steps=2, seed=seed)
    assert [e[1] for e in m.encodes] == [0] + [P + j * C for j in range(K - 1)]           # 15: positions
    assert (m.encodes[0][0] == prompt).all()
    for j in range(1, K):
        assert (m.encodes[j][0] == commits[j - 1].tokens[0]).all()                    # 15: the argmax canvas
    for canvas, start, _, _ in m.denoises:
        assert start == P + C * ((start - P) // C)
    starts = sorted({d[1] for d in m.denoises})
    assert starts == [P + j * C for j in range(K)]                                    # 15: same positions
    for j, c in enumerate(commits):                                                   # 14: prefix immutability
        assert (c.sequences[0] == res.tokens[0][: (j + 1) * C]).all()


def test_eos_ends_generation():                                              # invariant 16
    C = 6

    def fn(canvas, cache, sc, m):
        k = (cache.length - 2) // C                                           # canvas index
        toks = [[10, 11, 12, 13, 14, 15], [20, 1, 21, 106, 1, 22], [30] * 6][k]
        return peaked(lambda c: toks)(canvas, cache, sc, m)
    m = MockModel(200, C, fn, eos=[1, 106, 50])
    res, _, commits = run(m, [2, 3], max_new_tokens=4 * C)
    assert res.canvases == 2 and res.finished.all()
    assert res.tokens[0].tolist() == [10, 11, 12, 13, 14, 15, 20, 1, 0, 0, 0, 0]
    assert np.isclose(res.tokens_per_forward, 8 / res.passes[0])


def test_eos_in_a_batch_pads_finished_rows():                               # invariant 16 (batch)
    C = 4

    def fn(canvas, cache, sc, m):
        k = (cache.length - 1) // C
        row = cache.tokens[0]
        toks = {3: [[5, 6, 106, 7], [8, 8, 8, 8], [9, 9, 9, 9]], 4: [[5, 6, 7, 8], [5, 1, 7, 1], [9, 9, 9, 9]]}[row][k]
        return peaked(lambda c: toks)(canvas, cache, sc, m)
    m = MockModel(200, C, fn, eos=[1, 106, 50])
    res, _, commits = run(m, [[3], [4]], max_new_tokens=3 * C)
    assert res.canvases == 2 and res.finished.tolist() == [True, True]
    assert res.tokens[0].tolist() == [5, 6, 106, 0, 0, 0, 0, 0]             # later canvas of a finished row: pad
    assert res.tokens[1].tolist() == [5, 6, 7, 8, 5, 1, 0, 0]
    assert [e[0].tolist() for e in m.encodes[2:]] == [[5, 6, 106, 0], [5, 6, 7, 8]]   # pad canvas is committed
    assert res.sequences.tolist() == [[3, 5, 6, 106, 0, 0, 0, 0, 0], [4, 5, 6, 7, 8, 5, 1, 0, 0]]


def test_renoise_is_uniform_and_independent():                              # invariant 5 (S, fixed seed)
    V, C = 16, 32
    m = MockModel(V, C, flat(0, scale=3.0), eos=[V + 1])
    res, steps, _ = run(m, max_new_tokens=C, max_denoising_steps=200, entropy_bound=1e-3,
                        stability_threshold=None, confidence_threshold=None, seed=5)
    renoised = np.concatenate([e.next_canvas[~e.accepted] for e in steps])
    previous = np.concatenate([e.canvas[~e.accepted] for e in steps])
    n = renoised.size
    for x in (renoised, (renoised - previous) % V):
        chi2 = ((np.bincount(x, minlength=V) - n / V) ** 2 / (n / V)).sum()
        assert chi2 < 37.7                                                  # p = 0.001, 15 dof
    assert (renoised == 0).any() and (renoised == 1).any()                  # specials are not excluded


# ----------------------------------------------------------------------------------------------
# infilling


@SETTINGS
@given(st.integers(2, 8), st.integers(1, 3), st.integers(0, 1000), st.data())
def test_infill_positions_never_change(C, K, seed, data):
    V = 40
    mask = data.draw(st.lists(st.booleans(), min_size=K * C, max_size=K * C))
    fixed = np.where(mask, np.random.default_rng(seed).integers(5, V, K * C), -1)
    m = MockModel(V, C, random_logits(seed))
    res, steps, _ = run(m, max_new_tokens=K * C, max_denoising_steps=4, infill=fixed, seed=seed)
    for e in steps:
        h = fixed[e.canvas_index * C:(e.canvas_index + 1) * C]
        for a in (e.canvas, e.next_canvas, e.argmax):
            assert (a[0][h >= 0] == h[h >= 0]).all()
    t = res.tokens[0]
    keep = fixed[: len(t)] >= 0
    assert (t[keep] == fixed[: len(t)][keep]).all()


@SETTINGS
@given(st.integers(2, 8), st.integers(1, 3), st.integers(0, 1000))
def test_infill_all_fixed_is_identity(C, K, seed):
    fixed = np.random.default_rng(seed).integers(5, 40, K * C)
    m = MockModel(40, C, random_logits(seed), eos=[1])
    res = S.generate(m, [2], max_new_tokens=K * C, max_denoising_steps=5, infill=fixed, seed=seed)
    assert (res.tokens[0] == fixed).all()
    assert res.steps_per_canvas == [2] * K                                  # certain + stable: stops at s + 1


def test_infill_does_not_change_the_draws():
    """Free positions see the same random stream with and without an infill template."""
    C = 6
    fixed = np.array([-1, -1, 7, -1, -1, -1])
    _, a, _ = run(MockModel(40, C, flat(0)), max_new_tokens=C, max_denoising_steps=1, seed=3)
    _, b, _ = run(MockModel(40, C, flat(0)), max_new_tokens=C, max_denoising_steps=1, seed=3, infill=fixed)
    free = fixed < 0
    assert (a[0].canvas[0][free] == b[0].canvas[0][free]).all() and b[0].canvas[0][2] == 7


def test_infill_errors():
    m = MockModel(40, 4, flat(0))
    with pytest.raises(MinidiffError, match="longer than"):
        S.generate(m, [2], max_new_tokens=4, infill=[5] * 5)
    with pytest.raises(MinidiffError, match="infill ids"):
        S.generate(m, [2], max_new_tokens=4, infill=[5, 40])


# ----------------------------------------------------------------------------------------------
# configuration


def test_config_defaults_are_the_reference():
    c = S.GenerationConfig()
    assert (c.max_new_tokens, c.max_denoising_steps, c.entropy_bound, c.t_min, c.t_max, c.stability_threshold,
            c.confidence_threshold) == (256, 48, 0.1, 0.4, 0.8, 1, 0.005)


def test_config_from_hf_json(tmp_path):
    (tmp_path / "generation_config.json").write_text(
        '{"confidence_threshold": null, "max_denoising_steps": 12, "sampler_config": {"_cls_name": '
        '"EntropyBoundSamplerConfig", "entropy_bound": 0.25}, "eos_token_id": [1, 106, 50], "pad_token_id": 0, '
        '"t_max": null, "transformers_version": "5.23.0", "return_dict_in_generate": true}')
    c = S.GenerationConfig.from_model_folder(tmp_path)
    assert (c.max_denoising_steps, c.entropy_bound, c.eos_token_id, c.confidence_threshold, c.t_max) == \
        (12, 0.25, [1, 106, 50], 0.005, 0.8)
    assert S.GenerationConfig.from_model_folder(tmp_path / "nope") == S.GenerationConfig()
    (tmp_path / "generation_config.json").write_text('{"max_denoising_steps": -3}')
    with pytest.raises(MinidiffError, match="max_denoising_steps"):
        S.GenerationConfig.from_model_folder(tmp_path)


def test_model_folder_config_is_used(tmp_path):
    (tmp_path / "generation_config.json").write_text('{"max_denoising_steps": 3, "stability_threshold": null}')
    m = MockModel(40, 4, flat(0), folder=tmp_path)
    assert S.generate(m, [2], max_new_tokens=4, seed=0).steps_per_canvas == [3]


@pytest.mark.parametrize("kw, msg", [
    (dict(max_denoising_steps=0), "max_denoising_steps"), (dict(max_denoising_steps=-2), "max_denoising_steps"),
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(entropy_bound=0), "entropy_bound"),
    (dict(entropy_bound=-1.0), "entropy_bound"), (dict(t_min=0.8, t_max=0.8), "t_max must be greater"),
    (dict(t_min=0.9, t_max=0.8), "t_max must be greater"), (dict(t_min=-0.1), "t_min"),
    (dict(stability_threshold=-1), "stability_threshold"), (dict(confidence_threshold=0.0), "confidence_threshold"),
    (dict(seed=-1), "seed"), (dict(eos_token_id="x"), "eos_token_id"), (dict(bogus=1), "unknown generation option"),
    (dict(self_conditioning_dtype="fp8"), "self_conditioning_dtype"), (dict(max_denoising_steps=2.5), "max_denoising"),
])
def test_bad_options(kw, msg):
    with pytest.raises(MinidiffError, match=msg):
        S.generate(MockModel(40, 4, flat(0)), [2], **kw)


def test_bad_prompts():
    m = MockModel(40, 4, flat(0), ctx=10)
    for bad, msg in [([], "empty prompt"), ([2, 40], "out of range"), ([[2], []], "empty prompt"),
                     ([2.5], "integers"), (list(range(2, 9)), "exceeds the model's context")]:
        with pytest.raises(MinidiffError, match=msg):
            S.generate(m, bad)


def test_context_limits_canvases():
    m = MockModel(40, 4, flat(0), ctx=14)
    res = S.generate(m, [2, 3], max_new_tokens=40, max_denoising_steps=1, seed=0)
    assert res.canvases == 3 and res.context_limited                       # 2 + 3*4 <= 14


def test_max_length_quirk():
    m = MockModel(40, 4, flat(0))
    assert S.generate(m, [2, 3], max_length=11, max_denoising_steps=1, seed=0).canvases == 3     # ceil(9/4)
    assert S.generate(m, [2, 3], max_length=11, max_new_tokens=4, max_denoising_steps=1, seed=0).canvases == 1


def test_auto_self_conditioning_follows_the_checkpoint_dtype_in_config(tmp_path):
    """"auto" rounds the self-conditioning logits to bf16 exactly when config.json says the checkpoint is
    bf16 (read once, into ModelConfig.checkpoint_dtype); otherwise they pass as they are."""
    import json
    import shutil

    import minidiff
    from minidiff.generation_config import GenerationConfig
    tiny = Path(__file__).parent / "golden" / "tiny"
    z = np.float32(1 + 2 ** -10) * np.ones((2, 3), np.float32)        # not a bf16 value: rounding shows
    model = minidiff.load(tiny)
    assert model.config.checkpoint_dtype == "bfloat16"
    assert (S._sc_rounding(model, GenerationConfig())(z) == S.round_bf16(z)).all()
    for key, value in (("dtype", "float32"), ("torch_dtype", "float32"), (None, None)):
        folder = tmp_path / str(key)
        shutil.copytree(tiny, folder)
        cfg = json.loads((folder / "config.json").read_text())
        for k in ("dtype", "torch_dtype"):
            cfg.pop(k, None)
            cfg.get("text_config", {}).pop(k, None)
        if key:
            cfg[key] = value
        (folder / "config.json").write_text(json.dumps(cfg))
        m = minidiff.load(folder)
        assert m.config.checkpoint_dtype == value
        assert (S._sc_rounding(m, GenerationConfig())(z) == z).all()
