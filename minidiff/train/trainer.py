"""`minidiff train`: fine-tune (or train from scratch) a DiffusionGemma on (prompt, answer) pairs with
minidiff's own gradients. The objective is the release's (objective.py); the optimiser AdamW with a linear
warm-up and a cosine decay to 10 %, global gradient-norm clipping at 1.0. Deterministic for a seed.

A run writes a checkpoint folder in the release's layout (config.json, model.safetensors in float32, the
tokenizer and chat template of the source) plus `trainer_state.safetensors` (AdamW's moments) and
`trainer_state.json` (step, the random generator's state, the settings, the loss history): `--resume`
continues exactly where it stopped, with the same result as a run that never stopped.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import MinidiffError
from ..output import Temporaries, write_atomic
from .objective import Batch, load_params, loss_and_grads

TURN_END, EOS = 106, 1
T_LO, T_HI, SC_PROB = 1e-3, 1 - 1e-3, 0.5
SUPPORT = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
           "special_tokens_map.json")


@dataclass
class Settings:
    steps: int = 300
    batch: int = 4
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.99)
    eps: float = 1e-8
    clip: float = 1.0
    seed: int = 2026
    save_every: int = 100


# ----------------------------------------------------------------------------------------------
# data


def encode_pairs(pairs, folder, canvas: int, max_canvases: int):
    """(prompt, answer) -> (prompt ids with the chat template's generation prompt, answer + <turn|> filled
    with EOS to whole canvases, number of canvases)."""
    from ..chat import ChatTemplate
    from ..tokenizer import Tokenizer
    tok, tpl = Tokenizer.from_folder(folder), ChatTemplate.from_folder(folder)
    prompts = tpl.render_many([[{"role": "user", "content": prompt}] for prompt, _ in pairs])
    out = []
    for (prompt, answer), text in zip(pairs, prompts):
        p = tok.encode(text)
        r = tok.encode(answer) + [TURN_END]
        n = math.ceil(len(r) / canvas)
        if n > max_canvases:
            raise MinidiffError(f"the answer to {prompt[:40]!r} needs {n} canvases (at most {max_canvases})")
        out.append((np.array(p, np.int64), np.array(r + [EOS] * (n * canvas - len(r)), np.int64), n))
    return out


MAX_PAIRS_BYTES = 1 << 30      # a pairs file's JSON, after any gunzip: more is refused, not read (memory)


def read_pairs(path) -> list:
    """[(prompt, answer), ...] from {"pairs": [["prompt", "answer"], ...]}: a .json file or a gzipped one
    (recognised by its first bytes, whatever its name)."""
    from ..folder import parse_json
    try:
        with open(path, "rb") as f:
            gzipped = f.read(2) == b"\x1f\x8b"
            f.seek(0)
            raw = (gzip.GzipFile(fileobj=f) if gzipped else f).read(MAX_PAIRS_BYTES + 1)
        if len(raw) > MAX_PAIRS_BYTES:
            unzipped = " unzipped" if gzipped else ""
            raise MinidiffError(f"{path}: more than {MAX_PAIRS_BYTES >> 20} MiB of JSON{unzipped}")
        d = parse_json(raw.decode("utf-8"), str(path))
    except (OSError, EOFError, zlib.error, UnicodeError) as e:      # gzip's errors: OSError, EOFError, zlib.error
        raise MinidiffError(f"{path}: cannot read ({getattr(e, 'strerror', None) or e})")
    pairs = d.get("pairs") if isinstance(d, dict) else None
    if not isinstance(pairs, list) or not pairs or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) and s for s in p) for p in pairs):
        raise MinidiffError(f'{path}: expected {{"pairs": [["prompt", "answer"], ...]}} with non-empty strings')
    return [tuple(p) for p in pairs]


# ----------------------------------------------------------------------------------------------
# one step


def lr_at(step: int, s: Settings) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to 0.1 over the run."""
    warm = min(1.0, (step + 1) / s.warmup)
    return s.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / s.steps))))


def batch_grads(xp, params, cfg, examples, rng, s: Settings):
    """Draw a batch and its corruption, -> (dec loss, enc loss, grads of their sum, tokens seen).
    Every draw comes from `rng`, in a fixed order: the examples, then per example b, t, mask, noise, SC."""
    C, V = cfg.canvas_length, cfg.vocab_size
    chosen = rng.choice(len(examples), size=min(s.batch, len(examples)), replace=False)
    drawn = []
    for i in chosen:                                                    # the draws only: the maths is batched
        p, r, n = examples[i]
        b = int(rng.integers(0, n))
        t = T_LO + (T_HI - T_LO) * rng.random()
        corrupt = rng.random(C) < t
        noise = rng.integers(0, V, C)
        use = bool(rng.random() < SC_PROB)
        x0 = r[b * C:(b + 1) * C]
        drawn.append((np.concatenate([p, r]), len(p) + b * C, np.where(corrupt, noise, x0), use))
    batch = Batch(xp, drawn, pad=cfg.pad_token_id)
    dec, enc, grads = loss_and_grads(xp, params, cfg, batch)
    return dec, enc, grads, sum(len(ids) for ids, *_ in drawn)


def adamw_step(xp, params, grads, state, step: int, lr: float, s: Settings) -> float:
    """Clip the global gradient norm to s.clip, then AdamW (decoupled weight decay). -> the norm before."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    scale = min(1.0, s.clip / (norm + 1e-6))
    b1, b2 = s.betas
    for name, g in grads.items():
        g = g * scale
        m = state.setdefault(f"{name}.m", xp.zeros_like(params[name]))
        v = state.setdefault(f"{name}.v", xp.zeros_like(params[name]))
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1 ** (step + 1)), v / (1 - b2 ** (step + 1))
        params[name] *= 1 - lr * s.weight_decay
        params[name] -= lr * m_hat / (xp.sqrt(v_hat) + s.eps)
    return norm


TRAINABLE_EXCLUDE = ("layer_scalar",)      # buffers in the reference: not trained


# ----------------------------------------------------------------------------------------------
# checkpoints


def save_checkpoint(out: Path, source: Path, params: dict, state: dict, meta: dict) -> None:
    """The release layout (float32 weights) + the trainer's state, each file written atomically."""
    from safetensors.numpy import save_file
    from ..backend import to_numpy
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    for d in (config, config.get("text_config") or {}):
        for key in ("dtype", "torch_dtype"):
            if key in d:
                d[key] = "float32"
    with Temporaries() as temps:
        for name, tensors in (("model.safetensors", params), ("trainer_state.safetensors", state)):
            tmp = temps.new(out / name)
            save_file({k: np.ascontiguousarray(to_numpy(v), dtype=np.float32) for k, v in tensors.items()},
                      str(tmp), metadata={"format": "pt"})
            temps.commit(tmp, out / name)
    for f in SUPPORT:
        if (source / f).is_file() and source.resolve() != out.resolve():
            shutil.copyfile(source / f, out / f)
    write_atomic(out / "config.json", json.dumps(config, indent=2) + "\n")
    write_atomic(out / "trainer_state.json", json.dumps(meta, indent=1) + "\n")


def load_state(out: Path) -> tuple:
    from safetensors.numpy import load_file
    meta = json.loads((out / "trainer_state.json").read_text(encoding="utf-8"))
    return meta, load_file(str(out / "trainer_state.safetensors"))


# ----------------------------------------------------------------------------------------------
# the run


def train(source, data, out, settings: Settings, resume: bool = False, from_scratch: bool = False,
          progress=None, stop_after: int | None = None, xp=np, stop_after_seconds: float | None = None) -> dict:
    """Train and write checkpoints into `out`. -> the final trainer state (its `history` has the losses).
    stop_after: end this sitting after that many steps (saving a checkpoint); `resume` continues it.
    stop_after_seconds: end it at the first step that finishes after that much time (also with a checkpoint);
    the result does not depend on where sittings end."""
    out = Path(out)
    if resume:
        if not (out / "trainer_state.json").is_file():
            raise MinidiffError(f"--resume: {out} has no trainer_state.json")
        meta, state = load_state(out)
        settings = Settings(**{**meta["settings"], "betas": tuple(meta["settings"]["betas"])})   # the run's own
        cfg, params = load_params(out, "float32", xp)
        state = {k: xp.asarray(v) for k, v in state.items()}
        rng = np.random.default_rng()
        rng.bit_generator.state = meta["rng"]
        step0, history, source = meta["step"], meta["history"], out     # out holds the tokenizer and template
        origin = meta.get("source", str(out))                           # what the run started from, kept
        from_scratch = meta.get("from_scratch", from_scratch)
    else:
        from ..loader import resolve
        source = Path(resolve(source))
        cfg, params = load_params(source, "float32", xp)
        rng = np.random.default_rng(settings.seed)
        if from_scratch:
            init_params(xp, params, rng)
        state, step0, history, origin = {}, 0, [], str(source)
    pairs = read_pairs(data)
    fingerprint = hashlib.sha256(json.dumps(pairs).encode()).hexdigest()     # of the pairs, not the file's bytes
    if resume and meta.get("data_sha256", fingerprint) != fingerprint:
        raise MinidiffError(f"--resume: {data} holds other pairs than this run trained on (sha256 {fingerprint[:12]}…, "
                            f"the run's {meta['data_sha256'][:12]}…, from {meta.get('data')}): an exact resume needs "
                            "the same data")
    examples = encode_pairs(pairs, source, cfg.canvas_length, max_canvases=64)
    trainable = {n for n in params if not n.endswith(TRAINABLE_EXCLUDE)}
    t0 = time.perf_counter()
    tokens = 0
    end = settings.steps if stop_after is None else min(settings.steps, step0 + stop_after)
    step = step0 - 1
    for step in range(step0, end):
        dec, enc, grads, n = batch_grads(xp, params, cfg, examples, rng, settings)
        grads = {k: v for k, v in grads.items() if k in trainable}
        lr = lr_at(step, settings)
        norm = adamw_step(xp, params, grads, state, step, lr, settings)
        tokens += n
        history.append([step, round(dec, 6), round(enc, 6)])
        if progress:
            progress(step + 1, settings.steps, dec, enc, tokens / (time.perf_counter() - t0), lr, norm)
        out_of_time = stop_after_seconds is not None and time.perf_counter() - t0 >= stop_after_seconds
        if step + 1 == end or (step + 1) % settings.save_every == 0 or out_of_time:
            meta = {"step": step + 1, "rng": rng.bit_generator.state, "settings": asdict(settings),
                    "source": origin, "data": str(data), "data_sha256": fingerprint, "history": history,
                    "from_scratch": from_scratch}
            save_checkpoint(out, source, params, state, meta)
        if out_of_time:
            break
    return {"step": step + 1, "steps": settings.steps, "history": history}


def init_params(xp, params, rng):
    """From scratch: weights ~ N(0, 0.02) (the reference's initializer_range), norms and scales 1."""
    for name, w in params.items():
        if w.ndim >= 2:
            params[name] = xp.asarray((0.02 * rng.standard_normal(w.shape)).astype(np.float32))
        else:
            params[name] = xp.ones_like(w)


# ----------------------------------------------------------------------------------------------
# command line


def add_arguments(p):
    p.add_argument("--data", required=True, metavar="PAIRS.json", help='{"pairs": [["prompt", "answer"], ...]}')
    p.add_argument("--model", default=None, help="the model to start from (folder, hub id; default: the embedded one)")
    p.add_argument("--out", required=True, help="checkpoint folder (written every --save-every steps)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--seed", type=int, default=2026)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--from-scratch", action="store_true", help="random weights with the model's config and tokenizer")
    p.add_argument("--resume", action="store_true", help="continue the run saved in --out (its own settings)")
    p.add_argument("--stop-after", type=int, default=None, metavar="N",
                   help="end this sitting after N steps, with a checkpoint (--resume goes on later)")
    p.add_argument("--stop-after-minutes", type=float, default=None, metavar="M",
                   help="end this sitting at the first step that finishes after M minutes, with a checkpoint")
    p.add_argument("--force", action="store_true", help="replace a training run already in --out")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="NumPy (cpu) or CuPy (cuda); the draws stay on the host, so both see the same batches")


class Progress:
    """One line on stderr, redrawn in place on a terminal: step, losses, tokens/s, ETA."""

    def __init__(self, stream=sys.stderr):
        self.stream, self.t0, self.first = stream, time.perf_counter(), None
        self.tty = getattr(stream, "isatty", lambda: False)()

    def __call__(self, step, steps, dec, enc, tok_s, lr, norm):
        if self.first is None:                  # a resumed sitting starts mid-run: its own pace, not the run's
            self.first = step - 1
        left = (time.perf_counter() - self.t0) / (step - self.first) * (steps - step)
        line = (f"step {step}/{steps}  loss {dec + enc:.4f} (dec {dec:.4f} enc {enc:.4f})  {tok_s:.0f} tok/s  "
                f"lr {lr:.2e}  |g| {norm:.2f}  ETA {int(left // 60)}m{int(left % 60):02d}s")
        if self.tty:
            self.stream.write("\r\x1b[2K" + line + ("\n" if step == steps else ""))
        elif step == steps or step % 10 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def run(args) -> int:
    for name in ("steps", "batch", "warmup", "save_every"):
        if getattr(args, name) < 1:
            raise MinidiffError(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise MinidiffError(f"--lr must be > 0, got {args.lr}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise MinidiffError(f"--out {out}: is a file")
    if not args.resume and not args.force and (out / "trainer_state.json").exists():
        raise MinidiffError(f"--out {out}: holds a training run already (--resume continues it, --force replaces it)")
    s = Settings(steps=args.steps, batch=args.batch, lr=args.lr, warmup=args.warmup, seed=args.seed,
                 save_every=args.save_every)
    if args.stop_after is not None and args.stop_after < 1:
        raise MinidiffError("--stop-after must be at least 1")
    minutes = args.stop_after_minutes
    if minutes is not None and not (math.isfinite(minutes) and minutes > 0):
        raise MinidiffError(f"--stop-after-minutes must be > 0, got {minutes}")
    from ..backend import get_xp
    xp = get_xp(args.device)                           # before anything is written: a missing GPU is one error
    res = train(args.model, args.data, out, s, resume=args.resume, from_scratch=args.from_scratch,
                progress=Progress(), stop_after=args.stop_after, xp=xp,
                stop_after_seconds=None if minutes is None else 60 * minutes)
    h = res["history"][-1]
    print(json.dumps({"wrote": str(out), "step": res["step"], "of": res["steps"],
                      "loss": {"dec": h[1], "enc": h[2]}}))
    return 0
