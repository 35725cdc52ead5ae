"""The entropy-bound renoising sampler: how DiffusionGemma turns noise into text.

Block-autoregressive outer loop, diffusion inner loop (docs/sampler.md has the picture):

    encode(prompt)                                   -> KV cache
    for each canvas k (C tokens at positions P + kC ... P + kC + C - 1):
        canvas <- C uniform random ids, sc <- None
        for n = N, N-1, ..., 1 (steps remaining; step index i = N - n):
            z      = denoise(canvas, cache, sc) / T(n)    T(n) = t_min + (t_max - t_min) * n / N
            p      = softmax(z);  H = entropy(p)          per position
            sample = categorical(p)                       inverse CDF of a uniform draw
            accept = lowest-entropy prefix whose exclusive entropy sum <= entropy_bound
            canvas = where(accept, sample, fresh uniform noise)
            sc     = z                                    self-conditioning for the next step
            stop early when argmax(z) is stable and mean(H) < confidence_threshold
        commit argmax(z) of the last step: append it, encode it into the cache
        stop at the first stop id (it is kept, the rest of the canvas becomes pad)

Reference: Hugging Face transformers 5.23.0 `DiffusionGemmaGenerationMixin.generate` (HF below); every
rule here reproduces it, float32 rounding included. All random draws come from one
`numpy.random.Generator` in a fixed order (the portable randomness protocol, docs/randomness.md), so any
runtime that follows the protocol replays minidiff's trajectories token for token.

The sampler needs only `model.encode`, `model.denoise` and `model.config` (+ `model.folder`, optional),
so a mock denoiser can stand in for the model (tests/test_sampler*.py).
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .backend import array_module, rowwise, to_numpy
from .errors import MinidiffError
from .generation_config import GenerationConfig, resolve_config

# ----------------------------------------------------------------------------------------------
# The per-step math, vectorised over [..., C, V]. Every function is pure; `xp` is numpy or cupy.


_xp = array_module  # the array module (numpy / cupy) of an array


def temperature(n: int, N: int, t_min: float | None, t_max: float | None):
    """T(n) = t_min + (t_max - t_min) * n / N with n = steps remaining (N at the first step, 1 at the last; §S6).

    Computed in float32 exactly as HF does (n/N as float32, the Python-float span cast to float32).
    None (no schedule) when t_min or t_max is None: the logits are then used as they are (T = 1).
    """
    if t_min is None or t_max is None:
        return None
    return np.float32(t_min) + np.float32(t_max - t_min) * (np.float32(n) / np.float32(N))


def softmax_entropy(z):
    """z [..., V] float32 -> (p [..., V] float32 softmax, H [...] float32 entropy in nats).

    Per row:  m = max(z),  e = exp(z - m),  s = sum(e),  p = e / s,  H = -sum(p · ((z - m) - log(s))).
    Rows are independent, so row blocks run on separate threads with the same bits as one pass.
    """
    xp = _xp(z)
    V = z.shape[-1]
    z2 = z.reshape(-1, V)                                 # [R, V]
    p = xp.empty_like(z2)
    H = xp.empty(z2.shape[0], dtype=xp.float32)

    def rows(zb, pb, Hb):
        d = zb - zb.max(axis=-1, keepdims=True)           # z - m
        xp.exp(d, out=pb)                                 # e
        s = pb.sum(axis=-1, keepdims=True)
        pb /= s                                           # p
        d -= xp.log(s)                                    # log-softmax
        d *= pb
        Hb[...] = -d.sum(axis=-1)
    rowwise(rows, z2, p, H, max_rows=64)
    return p.reshape(z.shape), H.reshape(z.shape[:-1])


def sample_inverse_cdf(p, u, chunk_elems: int = 1 << 23):
    """One categorical draw per row by inverse CDF (the protocol's sampling rule).

    p [R, V] probabilities (float32), u [R] uniforms in [0, 1) (float64) -> [R] int64 indices:
        cdf   = cumsum(p, float64)                 (sequential, float64)
        index = count(cdf <= u * cdf[-1])          clamped to V - 1
    Blocks of at most `chunk_elems` float64 values (bounded memory) run on separate threads.
    """
    xp = _xp(p)
    R, V = p.shape
    out = xp.empty(R, dtype=xp.int64)

    def rows(pb, ub, ob):
        cdf = pb.astype(xp.float64)                       # [r, V]
        xp.cumsum(cdf, axis=-1, out=cdf)
        thr = xp.asarray(ub, dtype=xp.float64) * cdf[:, -1]   # [r]
        ob[...] = (cdf <= thr[:, None]).sum(axis=-1)
    rowwise(rows, p, xp.asarray(u), out, max_rows=max(1, chunk_elems // V))
    return xp.minimum(out, V - 1)


def entropy_bound_accept(H, bound: float):
    """H [..., C] float32 entropies -> [..., C] bool: which positions keep their sampled token (§S3).

    Sort ascending (stable), accept the prefix whose EXCLUSIVE prefix sum is <= bound:
        accept order[r]  <=>  cumsum(s)[r] - s[r] <= bound,   s = H[order]
    The cumsum accumulates in float64 and rounds each term to float32 (torch's CPU cumsum), the
    difference and the comparison are float32 (HF). At least one position is always accepted.
    """
    xp = _xp(H)
    order = xp.argsort(H, axis=-1, kind="stable")                     # [..., C]
    s = xp.take_along_axis(H, order, axis=-1)                         # sorted entropies
    c = xp.cumsum(s.astype(xp.float64), axis=-1).astype(xp.float32)   # inclusive prefix sums
    keep_sorted = (c - s) <= xp.float32(bound)                        # exclusive sum <= bound
    accept = xp.zeros(H.shape, dtype=bool)
    xp.put_along_axis(accept, order, keep_sorted, axis=-1)
    return accept


def round_bf16(x):
    """float32 -> float32 holding the nearest bfloat16 (round to nearest, ties to even), as torch's .to(bf16):
    bf16_to_f32(f32_to_bf16_bits(x)), computed in place on 32-bit words, row blocks on separate threads."""
    xp = _xp(x)
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    out = xp.empty_like(x)

    def rows(xb, ob):
        u, o = xb.view(xp.uint32), ob.view(xp.uint32)
        xp.right_shift(u, 16, out=o)
        o &= xp.uint32(1)
        o += xp.uint32(0x7FFF)
        o += u                                            # u + 0x7FFF + lsb, wrapping like the reference
        o &= xp.uint32(0xFFFF0000)
        o[xp.isnan(xb)] = xp.uint32(0x7FC00000)
    def as_rows(a):
        return a.reshape(-1, a.shape[-1] if a.ndim else 1)
    rowwise(rows, as_rows(x), as_rows(out), max_rows=64)
    return out


def eos_fill(tokens: np.ndarray, eos_ids, pad: int) -> np.ndarray:
    """tokens [B, C] -> copy where, per row, everything after the FIRST stop id is pad (that id is kept)."""
    is_eos = np.isin(tokens, eos_ids)
    seen = np.cumsum(is_eos, axis=-1)
    out = tokens.copy()
    out[(seen > 0) & ~((seen == 1) & is_eos)] = pad
    return out


# ----------------------------------------------------------------------------------------------
# What generate reports


@dataclass
class StepEvent:
    """Passed to `callback` after every denoising step (kind "step") and every commit (kind "commit").

    Arrays are NumPy, one row per prompt. For "step": `canvas` is the step's input canvas, `sampled` the
    categorical draws, `argmax` the argmax canvas (the draft), `accepted` the positions that kept their
    sample, `entropy` the per-position entropy (nats), `next_canvas` = accepted samples + fresh noise,
    `done` the rows that met the adaptive stop, `active` the rows that ran the denoiser this step.
    The step's random draws (docs/randomness.md) come along: `u` [B, C] float64 uniforms, `noise` [B, C]
    renoising ids and, at a canvas's first step only, `init` [B, C] (the canvas draw); `logits` [B, C, V]
    are the tempered logits (rows not in `active` hold stale values; on the device for CuPy).
    For "commit": `tokens` [B, C] is the committed canvas (after stop-id padding) and `sequences` the
    generated tokens so far (list of 1-D arrays), `finished` the rows that met a stop id.
    """
    kind: str
    canvas_index: int
    step: int = 0                      # 0-based step index i within the canvas
    max_steps: int = 0                 # N
    temperature: float | None = None
    canvas: np.ndarray | None = None
    sampled: np.ndarray | None = None
    argmax: np.ndarray | None = None
    accepted: np.ndarray | None = None
    entropy: np.ndarray | None = None
    next_canvas: np.ndarray | None = None
    done: np.ndarray | None = None
    active: np.ndarray | None = None
    fixed: np.ndarray | None = None    # [B, C] bool: infill positions held by the caller
    init: np.ndarray | None = None
    u: np.ndarray | None = None
    noise: np.ndarray | None = None
    logits: object = None
    tokens: np.ndarray | None = None
    sequences: list | None = None
    finished: np.ndarray | None = None


@dataclass
class GenerateResult:
    """Output of `generate`.

    sequences           prompt + whole canvases. One prompt: 1-D [P + kC]. A batch: 2-D [B, P_max + kC],
                        prompts left-padded with pad (HF's layout); `tokens` has the generated part per row.
    tokens              list of 1-D arrays [kC]: the generated tokens of each row (pad after a stop id)
    steps_per_canvas    executed denoising steps of each canvas (the batch runs them together)
    passes              [B] denoiser passes that counted for each row (HF `decoder_forward_passes`)
    tokens_per_forward  non-pad generated tokens / passes (float for one prompt, [B] for a batch)
    finished            [B] bool: the row met a stop id
    """
    sequences: np.ndarray
    tokens: list
    prompt_lengths: list
    steps_per_canvas: list
    passes: np.ndarray
    tokens_per_forward: object
    finished: np.ndarray
    seed: int | None
    config: GenerationConfig
    elapsed_s: float = 0.0
    context_limited: bool = False      # fewer canvases than asked because the context would overflow

    @property
    def canvases(self) -> int:
        return len(self.steps_per_canvas)


# ----------------------------------------------------------------------------------------------
# The loop


def generate(model, prompt_ids, config: GenerationConfig | None = None, *, callback: Callable | None = None,
             infill=None, rng: np.random.Generator | None = None, **overrides) -> GenerateResult:
    """Generate after `prompt_ids` (1-D ids, or a list of them for a batch) with the entropy-bound sampler.

    config     a GenerationConfig (default: the model folder's generation_config.json over the defaults)
    overrides  any GenerationConfig field, e.g. max_new_tokens=64, seed=0, confidence_threshold=None
    callback   called with a StepEvent after every step and every commit
    infill     tokens the caller fixes in the generated region: 1-D ids with -1 = free, position 0 = the
               first generated token (a list of those for a batch). Held in the input canvas of every step
               and in the committed canvas; counted as certain (entropy 0).
    rng        a numpy.random.Generator to draw from (overrides seed); all draws follow docs/randomness.md

    The algorithm (sampler_minimal.py is the same for one prompt, without the options):
        encode the prompt;  for each canvas: denoise_canvas, then commit_canvas;  until a stop id or K canvases
    """
    t_start = time.perf_counter()
    setup = Setup.make(model, prompt_ids, resolve_config(model, config, **overrides), infill, rng)
    B, C = len(setup.prompts), setup.C
    tokens = np.zeros((B, 0), dtype=np.int64)               # [B, k*C] generated so far
    finished = np.zeros(B, dtype=bool)                      # row met a stop id
    passes = np.zeros(B, dtype=np.int64)                    # denoiser passes that count (HF)
    steps_per_canvas, caches = [], [None] * B
    for k in range(setup.K):
        # the encoder: the prompt for the first canvas, afterwards the last committed canvas
        for b in range(B):
            caches[b] = model.encode(setup.prompts[b]) if k == 0 else model.encode(tokens[b, -C:], caches[b])
        argmax, steps = denoise_canvas(model, setup, caches, k, finished, passes, callback)
        steps_per_canvas.append(steps)
        new, finished = commit_canvas(argmax, finished, setup.eos_ids, setup.pad)
        tokens = np.concatenate([tokens, new], axis=1)
        if callback is not None:
            callback(StepEvent("commit", k, tokens=new, finished=finished.copy(), fixed=setup.held(k)[1],
                               sequences=[tokens[b].copy() for b in range(B)]))
        if finished.all():
            break
    return setup.report(tokens, passes, finished, steps_per_canvas, time.perf_counter() - t_start)


@dataclass
class Setup:
    """Everything a generation fixes before its first random draw."""
    cfg: GenerationConfig
    V: int                      # vocabulary
    C: int                      # canvas length
    N: int                      # denoising steps per canvas at most
    K: int                      # canvases at most (max_new_tokens / C, within the context)
    eos_ids: list               # stop ids the model can produce
    pad: int | None
    prompts: list               # [B] 1-D int64 prompt ids
    batched: bool
    fixed: np.ndarray           # [B, K*C] infill ids, -1 = free
    rng: np.random.Generator
    seed: int | None
    sc_round: Callable          # how the self-conditioning logits are rounded (the checkpoint's dtype)
    context_limited: bool

    @classmethod
    def make(cls, model, prompt_ids, cfg: GenerationConfig, infill, rng) -> "Setup":
        mc = model.config
        V, C = int(mc.vocab_size), int(mc.canvas_length)
        eos_ids = cfg.eos_token_id if cfg.eos_token_id is not None else list(getattr(mc, "eos_token_ids", []) or [])
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else getattr(mc, "pad_token_id", None)
        if pad is not None and not 0 <= pad < V:    # committed canvases are encoded: pad must be a token
            raise MinidiffError(f"pad_token_id {pad} is outside the vocabulary [0, {V})")
        eos_ids = [e for e in eos_ids if e < V]      # a stop id the model cannot produce never stops anything
        batched, prompts = _as_prompt_list(prompt_ids, V)
        P_max = max(len(p) for p in prompts)               # HF's prompt width (left padding)
        max_new = cfg.max_new_tokens
        if cfg.max_length is not None and cfg.max_new_tokens == 256:   # HF: max_length wins only over the default
            max_new = cfg.max_length - P_max
            if max_new <= 0:
                raise MinidiffError(f"max_length {cfg.max_length} leaves no room after a prompt of {P_max} tokens")
        K = math.ceil(max_new / C)
        ctx = getattr(mc, "max_position_embeddings", None)
        context_limited = False
        if ctx is not None:
            if P_max + C > ctx:
                raise MinidiffError(f"prompt of {P_max} tokens plus one canvas of {C} exceeds the model's context "
                                    f"of {ctx} positions")
            if (ctx - P_max) // C < K:
                K, context_limited = (ctx - P_max) // C, True
        fixed = _as_infill(infill, len(prompts), batched, K * C, V)
        seed = cfg.seed
        if rng is None:
            seed = secrets.randbits(63) if seed is None else seed
            rng = np.random.default_rng(seed)
        else:
            seed = None
        return cls(cfg, V, C, cfg.max_denoising_steps, K, eos_ids, pad, prompts, batched, fixed, rng, seed,
                   _sc_rounding(model, cfg), context_limited)

    def held(self, k: int):
        """Canvas k's infill: (ids [B, C] with -1 = free, held [B, C] bool)."""
        hold = self.fixed[:, k * self.C:(k + 1) * self.C]
        return hold, hold >= 0

    def report(self, tokens, passes, finished, steps_per_canvas, elapsed) -> "GenerateResult":
        B, P = len(self.prompts), [len(p) for p in self.prompts]
        P_max = max(P)
        n_valid = (tokens != self.pad).sum(axis=1) if self.pad is not None else np.full(B, tokens.shape[1])
        tpf = n_valid / passes
        seqs = np.full((B, P_max + tokens.shape[1]), self.pad if self.pad is not None else 0, dtype=np.int64)
        for b in range(B):
            seqs[b, P_max - P[b]:P_max] = self.prompts[b]
        seqs[:, P_max:] = tokens
        return GenerateResult(
            sequences=seqs if self.batched else seqs[0], tokens=[tokens[b] for b in range(B)], prompt_lengths=P,
            steps_per_canvas=steps_per_canvas, passes=passes, tokens_per_forward=tpf if self.batched else float(tpf[0]),
            finished=finished, seed=self.seed, config=self.cfg, elapsed_s=elapsed,
            context_limited=self.context_limited)


def denoise_canvas(model, setup: Setup, caches, k: int, finished, passes, callback=None):
    """Canvas k from uniform noise to its draft: -> (argmax [B, C] of the last step, executed steps).
    (docs/sampler.md: the step rules §S2–§S10.)

    Each step n = N, N-1, ..., 1 (steps remaining): denoise every row still running, temper by T(n), draw,
    accept the lowest-entropy positions within the bound, renoise the rest, self-condition the next step
    on this step's logits; a row stops when its argmax is stable and its mean entropy is low.
    `passes` [B] is incremented in place for the rows that count (HF's decoder_forward_passes).
    """
    cfg, rng, B, C, V, N = setup.cfg, setup.rng, len(setup.prompts), setup.C, setup.V, setup.N
    hold, held = setup.held(k)
    init = rng.integers(0, V, size=(B, C))                  # draw: a fresh canvas over ALL ids, specials included
    canvas = np.where(held, hold, init)                     # [B, C]
    argmax = canvas.copy()                                  # placeholder until step 0
    sc, z = None, None                                      # [B, C, V] self-conditioning / tempered logits
    entropy = np.zeros((B, C), dtype=np.float32)
    done = np.zeros(B, dtype=bool)                          # row met the adaptive stop in this canvas
    history = np.full((cfg.stability_threshold or 0, B, C), -1, dtype=np.int64)
    steps = 0
    for n in range(N, 0, -1):
        steps += 1
        passes += ~(done | finished)
        T = temperature(n, N, cfg.t_min, cfg.t_max)
        u = rng.random((B, C))                              # draw: uniforms for the categorical sample
        noise = rng.integers(0, V, size=(B, C))             # draw: renoising ids for every position
        active = ~done                                      # done rows keep their state (HF freezes them)
        rows = np.flatnonzero(active)
        z = _tempered_logits(model, canvas, caches, sc, rows, T, z)
        sampled, new_argmax = canvas.copy(), argmax.copy()
        sampled[rows], new_argmax[rows], entropy[rows] = _draw(z if len(rows) == B else z[rows], u[rows], cfg.greedy)

        # infill: held positions are certain and are re-imposed on both canvases
        H = np.where(held, np.float32(0), entropy)
        accepted = entropy_bound_accept(H, cfg.entropy_bound)                # [B, C]
        next_canvas = np.where(held, hold, np.where(accepted, sampled, noise))
        new_argmax = np.where(held, hold, new_argmax)
        next_canvas[done] = canvas[done]                    # frozen rows keep their canvas
        if cfg.adaptive_stopping:
            stable, history = _stable(history, new_argmax, cfg.stability_threshold)
            done |= active & stable & (H.mean(axis=-1) < np.float32(cfg.confidence_threshold))

        if callback is not None:
            callback(StepEvent("step", k, steps - 1, N, None if T is None else float(T), canvas=canvas,
                               sampled=sampled, argmax=new_argmax, accepted=accepted, entropy=H,
                               next_canvas=next_canvas, done=done.copy(), active=active, fixed=held,
                               init=init if steps == 1 else None, u=u, noise=noise, logits=z))
        canvas, argmax = next_canvas, new_argmax
        # the next step self-conditions on this step's tempered logits (greedy: their one-hot limit)
        sc = _one_hot_logits(z, argmax, rows) if cfg.greedy else setup.sc_round(z)
        if cfg.adaptive_stopping and done.all():
            break
    return argmax, steps


def _tempered_logits(model, canvas, caches, sc, rows, T, z):
    """z [B, C, V] float32 with the rows in `rows` replaced by denoise(canvas, cache, sc) / T (one call per row)."""
    for b in rows:
        raw = model.denoise(canvas[b], caches[b], self_conditioning_logits=None if sc is None else sc[b])  # [C, V]
        if z is None:
            xp = _xp(raw)
            z = xp.zeros((len(canvas),) + raw.shape, dtype=xp.float32)    # reused by every step
        with np.errstate(over="ignore"):
            z[b] = raw if T is None else raw / T
        if T is not None and not bool(_xp(z).isfinite(z[b]).all()):
            raise MinidiffError(f"temperature {float(T):.3g} is too small: logits / T overflow float32 "
                                "(raise t_min / t_max)")
    return z


def _draw(z, u, greedy: bool):
    """z [b, C, V] tempered logits, u [b, C] -> host arrays (sampled, argmax, entropy), each [b, C]."""
    xp = _xp(z)
    amax = z.argmax(axis=-1)
    if greedy:                                              # T -> 0: one-hot distributions, H = 0
        return to_numpy(amax), to_numpy(amax), np.zeros(amax.shape, dtype=np.float32)
    p, H = softmax_entropy(z)                               # [b, C, V], [b, C]
    samp = sample_inverse_cdf(p.reshape(-1, z.shape[-1]), xp.asarray(u.reshape(-1))).reshape(H.shape)
    return to_numpy(samp), to_numpy(amax), to_numpy(H)


def _stable(history, argmax, s: int):
    """-> (stable [B]: argmax equals each of the last s argmax canvases, the updated history [s, B, C])."""
    if s == 0:
        return np.ones(argmax.shape[0], dtype=bool), history
    stable = (history == argmax[None]).all(axis=(0, 2))
    history = np.roll(history, -1, axis=0)
    history[-1] = argmax
    return stable, history


def commit_canvas(argmax, finished, eos_ids, pad):
    """The draft [B, C] becomes the committed canvas: -> (tokens [B, C], finished [B])  (§S8, §S14, §S16).

    A row that meets a stop id is finished; after its first stop id the canvas is pad, and a row finished
    in an earlier canvas commits pad only.
    """
    new = argmax.copy()
    now = finished | np.isin(new, eos_ids).any(axis=-1) if eos_ids else finished.copy()
    if pad is not None and now.any():
        new[finished] = pad                                 # rows finished earlier: the whole canvas is pad
        if eos_ids:
            new = eos_fill(new, eos_ids, pad)
    return new, now


# ----------------------------------------------------------------------------------------------
# helpers


def _one_hot_logits(z, argmax: np.ndarray, rows):
    """Greedy mode's self-conditioning: logits whose softmax is exactly one-hot at the argmax."""
    xp = _xp(z)
    out = z.copy()
    sub = xp.full(z[rows].shape, -1e4, dtype=xp.float32)              # exp(-1e4) == 0 in float32
    xp.put_along_axis(sub, xp.asarray(argmax[rows])[..., None], 0.0, axis=-1)
    out[rows] = sub
    return out


def _sc_rounding(model, cfg: GenerationConfig):
    """HF passes the SC logits in the embedding dtype: bf16 for a bf16 checkpoint, else unchanged."""
    kind = cfg.self_conditioning_dtype
    if kind == "auto":
        kind = "bfloat16" if getattr(model.config, "checkpoint_dtype", None) == "bfloat16" else "float32"
    return round_bf16 if kind == "bfloat16" else (lambda z: z)


def _as_prompt_list(prompt_ids, V: int):
    """-> (batched, [1-D int64 arrays]). A 1-D sequence is one prompt; a list of them / 2-D array a batch."""
    if isinstance(prompt_ids, np.ndarray) or (isinstance(prompt_ids, (list, tuple)) and
                                              (len(prompt_ids) == 0 or np.isscalar(prompt_ids[0]))):
        arr = np.asarray(prompt_ids)
        if arr.ndim == 1:
            batched, rows = False, [arr]
        elif arr.ndim == 2:
            batched, rows = True, list(arr)
        else:
            raise MinidiffError(f"prompt_ids must be 1-D or 2-D, got shape {arr.shape}")
    elif isinstance(prompt_ids, (list, tuple)):
        batched, rows = True, [np.asarray(r) for r in prompt_ids]
    else:
        raise MinidiffError(f"prompt_ids must be a sequence of token ids, got {type(prompt_ids).__name__}")
    if not rows:
        raise MinidiffError("empty batch of prompts")
    out = []
    for r in rows:
        if r.ndim != 1 or r.size == 0:
            raise MinidiffError("empty prompt: give at least one token")
        if not np.issubdtype(r.dtype, np.integer):
            raise MinidiffError(f"prompt ids must be integers, got {r.dtype}")
        if r.min() < 0 or r.max() >= V:
            raise MinidiffError(f"prompt id out of range [0, {V})")
        out.append(r.astype(np.int64))
    return batched, out


def _as_infill(infill, B: int, batched: bool, width: int, V: int) -> np.ndarray:
    """-> [B, width] int64, -1 = free. width = canvases * C; a template longer than that is an error."""
    fixed = np.full((B, width), -1, dtype=np.int64)
    if infill is None:
        return fixed
    rows = list(infill) if batched else [infill]
    if len(rows) != B:
        raise MinidiffError(f"infill has {len(rows)} rows for {B} prompts")
    for b, r in enumerate(rows):
        if r is None:
            continue
        r = np.asarray(r, dtype=np.int64).reshape(-1)
        if r.size > width:
            raise MinidiffError(f"infill template of {r.size} tokens is longer than the {width} tokens to generate "
                                "(raise max_new_tokens)")
        if r.size and (r.min() < -1 or r.max() >= V):
            raise MinidiffError(f"infill ids must be -1 (free) or in [0, {V})")
        fixed[b, :r.size] = r
    return fixed
