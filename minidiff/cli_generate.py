"""`minidiff generate` and `minidiff chat`: text in, text out, with a live view of the denoising canvas.

On a terminal the canvas being denoised is redrawn after every step (docs/cli.md):

    canvas 2/4  step 13/48  T 0.63  accepted 7/32  mean H 1.21 nats
    the quick brown ▒fox jumps▒ over ...        draft (argmax): accepted / renoised / held
    ▁▁▂█▇▁▁▃▆█▁▁▂▂▁▁▁▇██▆▅▁▁▂▁▁▁▁▃▁▁           per-position entropy, 0 .. log V

then the final text replaces it. Piped (not a terminal), only the final text is printed. A closing line on
stderr gives canvases, steps per canvas, tokens per forward and tokens/s. Ctrl-C prints what is committed
and exits 130 (`chat`: cancels the reply being generated).
"""

from __future__ import annotations

import argparse
import math
import re
import shutil
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np

from .cli import int_list, utf8_text
from .errors import MinidiffError
from .output import check_output_file

RANDOM_NOTE = ("Without --model, the embedded tiny default model is used: a toy that memorised 30 prompts "
               "(docs/default_model.md); on any other prompt its text is gibberish. It is there to try the "
               "tool offline.")


# ----------------------------------------------------------------------------------------------
# arguments


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR|HUB_ID", default=None,
                   help="model folder or Hugging Face hub id (default: the embedded default model, a 0.7 M-parameter memoriser of 30 prompts)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="NumPy (cpu) or CuPy (cuda)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="cuda only: fp32 = as on the CPU (same trajectories); bf16 = tensor-core kernels, bf16 activations")
    s = p.add_argument_group("sampler (defaults: the model's generation_config.json, else the reference's)")
    s.add_argument("--max-new-tokens", type=int, metavar="N", help="rounded up to whole canvases (256)")
    s.add_argument("--steps", "--max-denoising-steps", dest="max_denoising_steps", type=int, metavar="N",
                   help="denoising steps per canvas at most (48)")
    s.add_argument("--entropy-bound", type=float, metavar="NATS", help="acceptance budget per step (0.1)")
    s.add_argument("--t-min", type=float, metavar="T", help="temperature end point (0.4)")
    s.add_argument("--t-max", type=float, metavar="T", help="temperature at the first step (0.8)")
    s.add_argument("--stability-threshold", type=int, metavar="S", help="steps the argmax must stay equal (1)")
    s.add_argument("--confidence-threshold", type=float, metavar="H", help="mean entropy to stop below (0.005)")
    s.add_argument("--no-early-stop", action="store_true", help="always run every denoising step")
    s.add_argument("--eos-token-id", type=int_list, metavar="IDS", help="stop ids, comma-separated ([1,106,50])")
    s.add_argument("--greedy", action="store_true", help="temperature 0: sample = argmax (not in the reference)")
    s.add_argument("--seed", type=int, help="random seed (default: a fresh one, printed in the closing line)")
    c = p.add_argument_group("prompt format")
    c.add_argument("--system", metavar="TEXT", help="system message (chat format)")
    c.add_argument("--think", dest="enable_thinking", action="store_true", default=False,
                   help="thinking mode: the model reasons in a thought channel first")
    c.add_argument("--no-think", dest="enable_thinking", action="store_false", help="no thinking (default)")
    c.add_argument("--show-thoughts", action="store_true", help="print the thought channel before the answer")
    v = p.add_argument_group("display")
    v.add_argument("--live", dest="live", action="store_true", default=None,
                   help="live denoising view (default: on when stdout is a terminal)")
    v.add_argument("--no-live", dest="live", action="store_false", help="no live view")
    v.add_argument("--no-color", action="store_true", help="live view without ANSI colours")
    v.add_argument("--quiet", "-q", action="store_true", help="no closing statistics line")


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Generate text after PROMPT with DiffusionGemma's entropy-bound sampler. " + RANDOM_NOTE)
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (default: read from stdin)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--chat", dest="format", action="store_const", const="chat",
                     help="wrap PROMPT as a user turn with the model's chat template (default when it has one)")
    fmt.add_argument("--raw", dest="format", action="store_const", const="raw",
                     help="use PROMPT as is (<bos> + tokens)")
    p.add_argument("--infill", metavar="TEMPLATE",
                   help="fix tokens of the answer: text is held, [[N]] marks N free tokens to fill, e.g. "
                        "'def add(a, b):[[12]]print(add(1, 2))'; the rest of the canvases is free")
    p.add_argument("--trajectory", metavar="F.safetensors",
                   help="write every step's draws, canvases, argmax, entropies and acceptance to F "
                        "(for step-by-step replay in another runtime: docs/trace.md)")
    p.add_argument("--trajectory-logits", action="store_true",
                   help="with --trajectory: also every step's tempered logits (steps × canvas × vocab floats)")
    _add_common(p)


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Multi-turn chat (/reset, /think, /nothink, /exit). " + RANDOM_NOTE)
    _add_common(p)


def sampler_overrides(args) -> dict:
    kw = {}
    for name in ("max_new_tokens", "max_denoising_steps", "entropy_bound", "t_min", "t_max", "stability_threshold",
                 "confidence_threshold", "eos_token_id", "seed"):
        v = getattr(args, name, None)
        if v is not None:
            kw[name] = v
    if args.no_early_stop:
        kw["stability_threshold"] = kw["confidence_threshold"] = None
    if args.greedy:
        kw["greedy"] = True
    return kw


# ----------------------------------------------------------------------------------------------
# the session: model + tokenizer + template + sampler settings


class Session:
    def __init__(self, args, want_chat: bool | None):
        from . import load
        from .chat import ChatTemplate
        from .generation_config import resolve_config
        from .tokenizer import Tokenizer

        self.model = load(args.model, device=args.device, precision=args.precision)
        self.tok = Tokenizer.from_folder(self.model.folder)
        if self.tok.vocab_size > self.model.config.vocab_size:
            raise MinidiffError(f"tokenizer has {self.tok.vocab_size} tokens, the model only {self.model.config.vocab_size}")
        self.template = None
        if want_chat is not False:     # a template that is there but broken is an error, never a silent --raw
            self.template = ChatTemplate.from_folder(self.model.folder)
            if self.template is None and want_chat:
                raise MinidiffError(f"no chat template in {self.model.folder} (no chat_template.jinja); "
                                    "use --raw for a plain prompt")
        self.overrides = sampler_overrides(args)
        self.config = resolve_config(self.model, None, **self.overrides)    # validates the options now
        mc = self.model.config
        self.stop_ids = set(self.config.eos_token_id if self.config.eos_token_id is not None else mc.eos_token_ids)
        self.pad = self.config.pad_token_id if self.config.pad_token_id is not None else mc.pad_token_id

    def prompt_ids(self, messages=None, raw: str | None = None, enable_thinking=False) -> list[int]:
        """The prompt's ids; text longer than the context could ever hold (16 characters a position) is
        refused before the tokenizer sees it."""
        limit = 16 * self.model.config.max_position_embeddings
        if raw is not None:
            if len(raw) > limit:
                raise MinidiffError(f"prompt of {len(raw)} characters cannot fit the model's context "
                                    f"of {self.model.config.max_position_embeddings} positions")
            return self.tok.encode(raw, add_bos=True)
        return self.tok.encode(self.template.render(messages, enable_thinking=enable_thinking, max_chars=limit))

    def text(self, tokens) -> str:
        from .chat import response_ids
        return self.tok.decode(response_ids(tokens, self.stop_ids, self.pad))


def parse_infill(template: str, tok, limit: int) -> list[int]:
    """'text[[N]]text' -> ids with -1 for each free token; at most `limit` (the context) in all."""
    out = []
    for part in re.split(r"(\[\[\d+\]\])", template):
        m = re.fullmatch(r"\[\[(\d+)\]\]", part)
        n = int(m.group(1)) if m and len(m.group(1)) <= 12 else (limit + 1 if m else 0)
        if m:
            out += [-1] * min(n, limit + 1 - len(out))
        elif part:
            out += tok.encode(part)
        if len(out) > limit:
            raise MinidiffError(f"--infill: the template is longer than the model's context of {limit} positions")
    if not out:
        raise MinidiffError("--infill: empty template")
    return out


# ----------------------------------------------------------------------------------------------
# live view

BARS = " ▁▂▃▄▅▆▇█"
GREEN, RED, CYAN, DIM, BOLD, RESET = "\x1b[32m", "\x1b[31m", "\x1b[36m", "\x1b[2m", "\x1b[1m", "\x1b[0m"


def for_terminal(text: str, keep_lines: bool = True) -> str:
    """Text safe to write to a terminal: control and format characters (ESC sequences that move the cursor
    or retitle the window, C1 controls, bidirectional overrides, lone surrogates) are shown as \\x1b /
    \\u202e escapes instead of acting. With keep_lines, newlines and tabs stay as they are."""
    out = []
    for ch in text:
        if (keep_lines and ch in "\n\t") or unicodedata.category(ch) not in ("Cc", "Cf", "Cs"):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
    return "".join(out)


class Redrawn:
    """A block of lines on a terminal that each `draw` replaces (cursor up over the last block, erase);
    subclasses set `out` (the stream) and `lines` (0)."""
    out = None
    lines = 0

    def draw(self, lines: list[str]):
        if self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()
        self.lines = len(lines)

    def clear(self):
        if self.lines:
            self.out.write(f"\x1b[{self.lines}F\x1b[J")
            self.out.flush()
            self.lines = 0


class LiveView(Redrawn):
    """Redraws the canvas under the committed text after every step (stdout must be a terminal)."""

    def __init__(self, tok, stream, vocab_size: int, color: bool = True, min_interval: float = 0.03):
        self.tok, self.out, self.color = tok, stream, color
        self.logV = math.log(vocab_size)
        self.lines = 0
        self.last = 0.0
        self.min_interval = min_interval
        self.committed = ""
        self.n_canvases = None

    def c(self, code, s):
        return f"{code}{s}{RESET}" if self.color else s

    def __call__(self, e):
        if e.kind == "commit":
            return
        now = time.perf_counter()
        last_step = e.step + 1 == e.max_steps or bool(e.done.all())
        if now - self.last < self.min_interval and not last_step:
            return
        self.last = now
        self.draw(self.frame(e))

    def frame(self, e) -> list[str]:
        width = max(20, shutil.get_terminal_size((80, 24)).columns - 1)
        row = 0
        acc, H, draft, held = e.accepted[row], e.entropy[row], e.argmax[row], e.fixed[row]
        C = len(draft)
        T = "-" if e.temperature is None else f"{e.temperature:.2f}"
        head = (f"canvas {e.canvas_index + 1}  step {e.step + 1}/{e.max_steps}  T {T}  "
                f"accepted {int(acc.sum())}/{C}  mean H {float(H.mean()):.2f} nats")
        # the draft (argmax) canvas, one piece per position, coloured by what the step did
        cells, strip = [], []
        for j in range(C):
            piece = for_terminal(self.tok.piece(draft[j]).replace("\n", "↵").replace("\t", "→"), False) or "·"
            level = min(len(BARS) - 1, int(round(float(H[j]) / self.logV * (len(BARS) - 1))))
            bar = BARS[level] if float(H[j]) > 0 or level else BARS[0]
            bar = bar if bar != " " else "_"
            if held[j]:
                cells.append(self.c(CYAN + BOLD, piece)); strip.append(self.c(CYAN, bar))
            elif acc[j]:
                cells.append(self.c(GREEN, piece)); strip.append(self.c(GREEN, bar))
            else:
                cells.append(self.c(DIM + RED, piece)); strip.append(self.c(DIM + RED, bar))
        lines = [self.c(BOLD, head)]
        committed = [for_terminal(line, False) for line in self.committed.splitlines()[-3:]]
        lines += _wrap_cells(committed, width, plain=True)
        lines += _wrap_cells(cells, width, plain=False, visible=[
            len(for_terminal(self.tok.piece(d).replace("\n", "↵").replace("\t", "→"), False)) or 1 for d in draft])
        lines += _wrap_cells(strip, width, plain=False, visible=[1] * C)
        legend = (self.c(GREEN, "accepted") + "  " + self.c(DIM + RED, "renoised") + "  " + self.c(CYAN, "held")
                  + "  entropy " + BARS[1:] + f" (0..{self.logV:.1f})")
        return lines + [legend]



def _wrap_cells(cells, width, plain, visible=None):
    """Lay cells out in lines of at most `width` visible characters (so redraws know their height)."""
    if plain:
        out = []
        for line in cells:
            while len(line) > width:
                out.append(line[:width])
                line = line[width:]
            out.append(line)
        return out
    lines, cur, n = [], "", 0
    for cell, w in zip(cells, visible):
        w = min(w, width)
        if n + w > width and cur:
            lines.append(cur)
            cur, n = "", 0
        cur += cell
        n += w
    lines.append(cur)
    return lines


# ----------------------------------------------------------------------------------------------
# running


def _generate(session, ids, show_live, args, infill=None, committed_prefix="", record=None):
    """One generation with the live view and Ctrl-C handling. -> (result | None, committed text).
    record: another callback that sees every event (the --trajectory recorder)."""
    from .sampler import generate

    state = {"tokens": None}
    view = LiveView(session.tok, sys.stdout, session.model.config.vocab_size, color=not args.no_color) \
        if show_live else None

    def callback(e):
        if record is not None:
            record(e)
        if e.kind == "commit":
            state["tokens"] = e.sequences[0]
            if view is not None:
                view.committed = committed_prefix + session.text(e.sequences[0])
        if view is not None:
            view(e)

    overrides = dict(session.overrides)
    if infill is not None and "max_new_tokens" not in overrides:
        C = session.model.config.canvas_length
        overrides["max_new_tokens"] = max(session.config.max_new_tokens, math.ceil(len(infill) / C) * C)
    try:
        result = generate(session.model, ids, callback=callback, infill=infill, **overrides)
    except KeyboardInterrupt:
        if view is not None:
            view.clear()
        tokens = state["tokens"]
        return None, "" if tokens is None else session.text(tokens)
    if view is not None:
        view.clear()
    return result, session.text(result.tokens[0])


def _stats_line(result) -> str:
    steps = "/".join(str(s) for s in result.steps_per_canvas)
    n_tok = int(sum(np.count_nonzero(t != (result.config.pad_token_id or 0)) for t in result.tokens))
    rate = n_tok / result.elapsed_s if result.elapsed_s > 0 else float("inf")
    extra = "  (context full)" if result.context_limited else ""
    return (f"minidiff: {result.canvases} canvas{'es' if result.canvases != 1 else ''}, steps per canvas {steps}, "
            f"{float(np.mean(result.tokens_per_forward)):.2f} tokens/forward, {rate:.1f} tokens/s, "
            f"{result.elapsed_s:.2f} s, seed {result.seed}{extra}")


def _reply_text(session, text: str, args) -> str:
    from .chat import format_reply
    return _shown(format_reply(text, show_thoughts=args.show_thoughts))


def _shown(text: str) -> str:
    """What goes to stdout: as generated for a pipe or a file, escaped for a terminal (`for_terminal`)."""
    return for_terminal(text) if _tty(sys.stdout) else text


def _tty(stream) -> bool:
    """Whether a standard stream is an open terminal (a closed one is None, or raises)."""
    try:
        return stream is not None and stream.isatty()
    except (ValueError, OSError):
        return False


def run_generate(args) -> int:
    prompt = args.prompt
    if prompt is None:
        if _tty(sys.stdin) or sys.stdin is None:
            raise MinidiffError("empty prompt: give PROMPT or pipe text on stdin")
        prompt = utf8_text(sys.stdin.read(), "standard input")
    if not prompt.strip() and not args.infill:
        raise MinidiffError("empty prompt: give PROMPT or pipe text on stdin")
    if args.trajectory_logits and not args.trajectory:
        raise MinidiffError("--trajectory-logits needs --trajectory F.safetensors")
    trajectory_out = check_output_file(Path(args.trajectory), "--trajectory") if args.trajectory else None
    session = Session(args, want_chat={"chat": True, "raw": False}.get(args.format))
    if session.template is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = session.prompt_ids(messages, enable_thinking=args.enable_thinking)
    else:
        if args.system or args.enable_thinking:
            raise MinidiffError("--system and --think need the chat format (the model has no chat template)"
                                if args.format != "raw" else "--system and --think need --chat, not --raw")
        ids = session.prompt_ids(raw=prompt)
    infill = parse_infill(args.infill, session.tok, session.model.config.max_position_embeddings) \
        if args.infill else None
    live = args.live if args.live is not None else _tty(sys.stdout)
    record = None
    if args.trajectory:
        from .trace import _refuse_model_file
        from .trajectory import Trajectory
        _refuse_model_file(trajectory_out, session.model.folder)
        record = Trajectory(keep_logits=args.trajectory_logits)

    result, text = _generate(session, ids, live, args, infill=infill, record=record)
    if result is None:                                   # Ctrl-C: what is committed, then 130
        sys.stdout.write(_reply_text(session, text, args) + "\n")
        sys.stdout.flush()
        print("minidiff: interrupted (committed canvases printed)", file=sys.stderr)
        return 130
    if record is not None:
        from .trace import save_tensors
        from .trajectory import metadata
        save_tensors(trajectory_out, record.tensors([ids]), metadata(result, session.model))
    sys.stdout.write(_reply_text(session, text, args) if session.template is not None else _shown(text))
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not args.quiet:
        print(_stats_line(result), file=sys.stderr)
    return 0


def run_chat(args) -> int:
    if sys.stdin is None:
        raise MinidiffError("chat reads its turns from standard input, which is closed")
    session = Session(args, want_chat=True)
    interactive = _tty(sys.stdin)
    live = args.live if args.live is not None else _tty(sys.stdout)
    thinking = args.enable_thinking
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if interactive:
        print("minidiff chat: /reset clears the history, /think and /nothink switch thinking, /exit quits.",
              file=sys.stderr)
        if args.model is None:
            print("minidiff: " + RANDOM_NOTE, file=sys.stderr)
    while True:
        try:
            line = utf8_text(input("> " if interactive else ""), "input")
        except EOFError:
            return 0
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if line in ("/think", "/nothink"):
            thinking = line == "/think"
            print(f"minidiff: thinking {'on' if thinking else 'off'}", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        ids = session.prompt_ids(messages, enable_thinking=thinking)
        result, text = _generate(session, ids, live, args)
        from .chat import split_thoughts
        _, answer = split_thoughts(text)
        print(_reply_text(session, text, args))
        sys.stdout.flush()
        if result is None:
            print("minidiff: reply interrupted", file=sys.stderr)
        elif not args.quiet:
            print(_stats_line(result), file=sys.stderr)
        messages.append({"role": "assistant", "content": answer.strip("\n")})
