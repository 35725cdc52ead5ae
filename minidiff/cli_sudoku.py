"""`minidiff sudoku`: solve Sudoku puzzles with a Sudoku-trained DiffusionGemma, watching the grid settle.

The layout (tools/train_sudoku.py trains such a model): the puzzle's 81 cells (digits, 0 for a blank) are
the user turn of the model's chat template; the 81 digits of the solution are the first 81 positions of the
canvas. The givens are held on the canvas (the sampler's infill: fixed in every step's input, entropy 0),
so the model only fills the blanks; the answer is checked (sudoku.check) before it is reported solved.

    minidiff sudoku 530070000600195000098000060800060003400803001700020006060000280000419005000080079
    minidiff sudoku --random medium --seed 3
    minidiff sudoku --plain - < puzzles.txt > answers.txt     # one 81-digit answer a line
    minidiff sudoku --model DIR ...                            # another Sudoku model than the embedded one

Without --model the embedded Sudoku model (minidiff/sudoku_model/, trained by minidiff) answers.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np

from . import sudoku
from .cli_generate import BOLD, CYAN, DIM, GREEN, RED, RESET, Redrawn
from .errors import MinidiffError

MAX_INPUT_BYTES = 8 << 20          # --plain: 8 MB of puzzles (about 100,000) at most
EMBEDDED = Path(__file__).parent / "sudoku_model"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("puzzle", nargs="?", help="81 characters, digits with 0 or . for a blank (spaces ignored)")
    p.add_argument("--model", metavar="DIR", help="a Sudoku model folder (tools/train_sudoku.py; default: the "
                                                  "embedded one, minidiff/sudoku_model)")
    p.add_argument("--random", choices=[b[0] for b in sudoku.BINS], help="solve a fresh random puzzle of this bin")
    p.add_argument("--plain", metavar="FILE", help="read puzzles from FILE ('-': stdin), one a line; print one "
                                                   "81-digit answer a line, in order")
    p.add_argument("--batch", type=int, default=16, metavar="N", help="--plain: puzzles per model call (16)")
    p.add_argument("--seed", type=int, default=0, help="sampler (and --random) seed (0)")
    p.add_argument("--steps", type=int, metavar="N", help="denoising steps at most (the model's setting)")
    p.add_argument("--t-min", type=float, metavar="T", help="the sampler's last temperature (the model's setting)")
    p.add_argument("--t-max", type=float, metavar="T", help="the sampler's first temperature (the model's setting)")
    p.add_argument("--no-hold", action="store_true", help="do not hold the givens on the canvas")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    v = p.add_argument_group("display")
    v.add_argument("--live", dest="live", action="store_true", default=None,
                   help="live grid (default: on when stdout is a terminal)")
    v.add_argument("--no-live", dest="live", action="store_false")
    v.add_argument("--no-color", action="store_true")


class Solver:
    """A Sudoku model folder with its tokenizer and template: puzzles in, answers out."""

    def __init__(self, folder=None, device="cpu"):
        from . import load
        from .chat import ChatTemplate
        from .tokenizer import Tokenizer
        if folder is None:
            if not (EMBEDDED / "config.json").is_file():
                raise MinidiffError(f"the embedded Sudoku model is missing from {EMBEDDED}: pass --model DIR")
            folder = EMBEDDED
        self.model = load(str(folder), device=device)
        self.tok = Tokenizer.from_folder(self.model.folder)
        self.template = ChatTemplate.from_folder(self.model.folder)
        if self.template is None:
            raise MinidiffError(f"{folder}: no chat template (chat_template.jinja): not a Sudoku model folder")
        self.digit_ids = []
        for d in "0123456789":
            ids = self.tok.encode(d)
            if len(ids) != 1 or not 0 <= ids[0] < self.model.config.vocab_size:
                raise MinidiffError(f"{folder}: the tokenizer has no single token for {d!r}: not a Sudoku model")
            self.digit_ids.append(ids[0])
        if self.model.config.canvas_length < 81:
            raise MinidiffError(f"{folder}: canvas of {self.model.config.canvas_length} positions, a grid needs 81")
        self.digit_of = {t: d for d, t in enumerate(self.digit_ids) if d}

    def prompt(self, puzzle) -> list[int]:
        return self.tok.encode(self.template.render([{"role": "user", "content": sudoku.to_text(puzzle)}]))

    def held(self, puzzle) -> np.ndarray:
        """The givens on the canvas (-1 = free)."""
        return np.array([self.digit_ids[d] if d else -1 for d in puzzle], dtype=np.int64)

    def digits(self, canvas) -> list[int]:
        return [self.digit_of.get(int(t), 0) for t in canvas[:81]]

    @staticmethod
    def overrides(steps=None, t_min=None, t_max=None) -> dict:
        """The sampler settings given for solve(); None keeps the model folder's generation_config.json."""
        return {k: v for k, v in (("max_denoising_steps", steps), ("t_min", t_min), ("t_max", t_max)) if v is not None}

    def check(self, steps=None, t_min=None, t_max=None) -> None:
        """Those settings against the model's generation_config.json now, so that a bad value is an error before
        anything is solved or printed (generate checks them again as it starts)."""
        from .generation_config import resolve_config
        resolve_config(self.model, **self.overrides(steps, t_min, t_max))

    def solve(self, puzzles, seed=0, hold=True, steps=None, callback=None, t_min=None, t_max=None):
        """-> (answers as 81-int lists, the sampler's GenerateResult) for a batch of puzzles (81-int lists)."""
        from .sampler import generate
        over = dict(self.overrides(steps, t_min, t_max), seed=seed, max_new_tokens=self.model.config.canvas_length)
        res = generate(self.model, [self.prompt(p) for p in puzzles], callback=callback,
                       infill=[self.held(p) for p in puzzles] if hold else None, **over)
        answers = [self.digits(t) for t in res.tokens]
        if hold:   # held cells are the givens; a stop id drawn before cell 81 pads the commit after it
            answers = [[g or a for g, a in zip(p, ans)] for p, ans in zip(puzzles, answers)]
        return answers, res


def grid_lines(cells, styles=None, color=True) -> list[str]:
    """A 9x9 grid with box lines; styles[i] an ANSI prefix per cell (or None)."""
    out = []
    for r in range(9):
        if r in (3, 6):
            out.append("------+-------+------")
        row = []
        for c in range(9):
            if c in (3, 6):
                row.append("|")
            d = cells[r * 9 + c]
            s = str(d) if d else "."
            if color and styles and styles[r * 9 + c]:
                s = f"{styles[r * 9 + c]}{s}{RESET}"
            row.append(s)
        out.append(" ".join(row))
    return out


class LiveGrid(Redrawn):
    """Redraws the draft grid after every denoising step: givens cyan, accepted cells green, cells renoised
    this step dim red; the header line has the step, the cells settled and the mean entropy."""

    def __init__(self, solver, stream, color=True):
        self.solver, self.out, self.color, self.lines, self.last = solver, stream, color, 0, 0.0

    def __call__(self, e):
        if e.kind != "step":
            return
        now = time.perf_counter()
        if now - self.last < 0.03 and e.step + 1 < e.max_steps and not e.done.all():
            return
        self.last = now
        draft, acc, held, H = e.argmax[0], e.accepted[0], e.fixed[0], e.entropy[0]
        styles = [CYAN + BOLD if held[i] else GREEN if acc[i] else DIM + RED for i in range(81)]
        head = (f"step {e.step + 1}/{e.max_steps}  settled {int(acc[:81].sum())}/81  "
                f"mean entropy {float(H[:81].mean()):.3f} nats")
        legend = "given  accepted  renoised" if not self.color else \
            f"{CYAN}given{RESET}  {GREEN}accepted{RESET}  {DIM}{RED}renoised{RESET}"
        self.draw([head] + grid_lines(self.solver.digits(draft), styles, self.color) + [legend])


def read_puzzles(source) -> list[list[int]]:
    """Every line of FILE / stdin as a puzzle; the first bad line is an error naming it (nothing is solved)."""
    if source == "-":
        data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
    else:
        try:
            with open(source, "rb") as f:
                data = f.read(MAX_INPUT_BYTES + 1)
        except OSError as e:
            raise MinidiffError(f"{source}: {e.strerror or e}")
    if len(data) > MAX_INPUT_BYTES:
        raise MinidiffError(f"{source}: more than {MAX_INPUT_BYTES >> 20} MB of puzzles; split the input")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MinidiffError(f"{source}: not UTF-8 text (byte {e.start})")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            out.append(sudoku.parse(line))
        except MinidiffError as e:
            raise MinidiffError(f"{'stdin' if source == '-' else source} line {n}: {e}")
    return out


def run(args) -> int:
    if args.batch < 1:
        raise MinidiffError("--batch must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise MinidiffError("--steps must be at least 1")
    if sum(x is not None for x in (args.puzzle, args.random, args.plain)) != 1:
        raise MinidiffError("give one of: a puzzle, --random BIN, --plain FILE")
    sampling = dict(steps=args.steps, t_min=args.t_min, t_max=args.t_max)
    if args.plain is not None:
        puzzles = read_puzzles(args.plain)                 # all checked before the model loads
        solver = Solver(args.model, args.device)
        solver.check(**sampling)
        solved = 0
        for i in range(0, len(puzzles), args.batch):
            batch = puzzles[i:i + args.batch]
            answers, _ = solver.solve(batch, seed=args.seed, hold=not args.no_hold, **sampling)
            for p, a in zip(batch, answers):
                sys.stdout.write(sudoku.to_text(a) + "\n")
                solved += sudoku.check(p, a)
            sys.stdout.flush()
        print(f"minidiff: solved {solved} of {len(puzzles)}", file=sys.stderr)
        return 0
    if args.random is not None:
        puzzle, _ = sudoku.random_puzzle(random.Random(args.seed), args.random)
    else:
        puzzle = sudoku.parse(args.puzzle)
    solver = Solver(args.model, args.device)
    solver.check(**sampling)
    color = not args.no_color and sys.stdout.isatty()
    live = args.live if args.live is not None else sys.stdout.isatty()
    view = LiveGrid(solver, sys.stdout, color) if live else None
    givens = sum(1 for d in puzzle if d)
    print(f"puzzle ({givens} givens, {sudoku.difficulty(puzzle)}):")
    print("\n".join(grid_lines(puzzle)))
    try:
        answers, res = solver.solve([puzzle], seed=args.seed, hold=not args.no_hold, callback=view,
                                      **sampling)
    finally:
        if view is not None:
            view.clear()
    answer = answers[0]
    ok = sudoku.check(puzzle, answer)
    styles = [CYAN + BOLD if puzzle[i] else GREEN if ok else None for i in range(81)]
    print("answer:")
    print("\n".join(grid_lines(answer, styles, color)))
    bad = len(_clashes(answer))
    steps = res.steps_per_canvas[0]
    print(f"{'solved' if ok else f'not solved: {bad} cells clash with a peer or are blank'} "
          f"in {steps} denoising step{'s' if steps != 1 else ''}, {res.elapsed_s:.2f} s (seed {args.seed})")
    return 0 if ok else 1


def _clashes(grid) -> set[int]:
    """Cells that are blank or repeat a digit of their row, column or box."""
    return {i for i in range(81) if not grid[i] or any(grid[p] == grid[i] for p in sudoku.PEERS[i])}

