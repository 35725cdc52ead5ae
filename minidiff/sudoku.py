"""Sudoku: a fast puzzle generator with unique solutions, a solver and a checker (NumPy-free).

The data side of the Sudoku model (docs/training.md): puzzles are 81 cells in row-major order, 0 for a
blank; difficulty bins by the number of givens as in the launch demo: easy >= 40, medium 30–39, hard < 30.

    solve(grid, limit)      up to `limit` solutions (2 tells unique from not), depth-first with the most
                            constrained cell first, candidates as 9-bit masks
    generate(rng, givens)   a random full grid, then cells removed in random order while the solution stays
                            unique, down to `givens` (or as far as uniqueness allows)
    check(puzzle, answer)   the answer is a valid full grid that keeps every given
"""

from __future__ import annotations

import random

from .errors import MinidiffError

ALL = 0x3FE                                                 # bits 1..9
UNITS = [[r * 9 + c for c in range(9)] for r in range(9)] + [[r * 9 + c for r in range(9)] for c in range(9)] + \
        [[(br + r) * 9 + bc + c for r in range(3) for c in range(3)] for br in (0, 3, 6) for bc in (0, 3, 6)]
PEERS = [sorted({p for u in UNITS if i in u for p in u} - {i}) for i in range(81)]
BINS = (("easy", 40, 81), ("medium", 30, 39), ("hard", 17, 29))


def solve(grid, limit: int = 1) -> list[list[int]]:
    """Solutions of grid (81 ints, 0 = blank), at most `limit` of them."""
    g = list(grid)
    masks = [0] * 81
    for i in range(81):
        if g[i]:
            continue
        used = 0
        for p in PEERS[i]:
            used |= 1 << g[p]
        masks[i] = ALL & ~used
    out = []

    def search():
        best, best_n = -1, 10
        for i in range(81):                                 # the blank with the fewest candidates
            if g[i] == 0:
                n = bin(masks[i]).count("1")
                if n < best_n:
                    best, best_n = i, n
                    if n <= 1:
                        break
        if best < 0:
            out.append(list(g))
            return len(out) >= limit
        m = masks[best]
        while m:
            bit = m & -m
            m ^= bit
            d = bit.bit_length() - 1
            changed = [p for p in PEERS[best] if g[p] == 0 and masks[p] & bit]
            g[best] = d
            for p in changed:
                masks[p] &= ~bit
            if all(masks[p] for p in changed) and search():
                return True
            for p in changed:
                masks[p] |= bit
            g[best] = 0
        return False

    for i in range(81):                                    # givens must not clash
        if g[i] and any(g[p] == g[i] for p in PEERS[i]):
            return []
    search()
    return out


def random_solution(rng: random.Random) -> list[int]:
    """A uniformly shuffled full grid: fill the three diagonal boxes at random, solve the rest with a random
    digit order, then relabel the digits."""
    g = [0] * 81
    for b in (0, 4, 8):
        digits = rng.sample(range(1, 10), 9)
        for k, i in enumerate(UNITS[18 + b]):
            g[i] = digits[k]
    sol = solve(g, 1)[0]
    relabel = [0] + rng.sample(range(1, 10), 9)
    return [relabel[d] for d in sol]


def generate(rng: random.Random, givens: int) -> tuple[list[int], list[int]]:
    """(puzzle, solution) with a unique solution and as close to `givens` givens as uniqueness allows."""
    solution = random_solution(rng)
    puzzle = list(solution)
    for i in rng.sample(range(81), 81):
        if sum(1 for d in puzzle if d) <= givens:
            break
        keep, puzzle[i] = puzzle[i], 0
        if len(solve(puzzle, 2)) != 1:
            puzzle[i] = keep
    return puzzle, solution


def random_puzzle(rng: random.Random, bin_name: str) -> tuple[list[int], list[int]]:
    """(puzzle, solution) of the named bin: givens drawn within the bin (and within 24..50, where the
    generator's uniqueness-keeping removal lands reliably)."""
    _, lo, hi = next(b for b in BINS if b[0] == bin_name)
    return generate(rng, rng.randint(max(lo, 24), min(hi, 50)))


def difficulty(puzzle) -> str:
    n = sum(1 for d in puzzle if d)
    return next(name for name, lo, hi in BINS if lo <= n <= hi) if n >= 17 else "hard"


def check(puzzle, answer) -> bool:
    """answer is a full valid grid and agrees with every given of puzzle."""
    if len(answer) != 81 or any(not 1 <= d <= 9 for d in answer):
        return False
    if any(p and p != a for p, a in zip(puzzle, answer)):
        return False
    return all(sorted(answer[i] for i in u) == list(range(1, 10)) for u in UNITS)


def parse(line: str) -> list[int]:
    """81 characters, digits with 0 or '.' for a blank (spaces ignored) -> 81 ints."""
    s = "".join(line.split())
    if len(s) != 81 or any(ch not in "0123456789." for ch in s):
        raise MinidiffError(f"a puzzle is 81 characters of digits, 0 or . for a blank (got {len(s)}: {s[:20]!r}…)")
    return [0 if ch == "." else int(ch) for ch in s]


def to_text(grid) -> str:
    return "".join(str(d) for d in grid)
