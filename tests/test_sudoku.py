"""The Sudoku generator, solver and checker (minidiff/sudoku.py)."""

import random
import time

import pytest

from minidiff import sudoku
from minidiff.errors import MinidiffError

# a published hard puzzle (17 givens) with its unique solution
HARD = "000000010400000000020000000000050407008000300001090000300400200050100000000806000"


def test_solver_finds_the_unique_solution_of_a_17_given_puzzle():
    p = sudoku.parse(HARD)
    sols = sudoku.solve(p, limit=2)
    assert len(sols) == 1 and sudoku.check(p, sols[0])


def test_solver_sees_several_solutions_and_none():
    empty = [0] * 81
    assert len(sudoku.solve(empty, limit=2)) == 2
    clash = sudoku.parse(HARD)
    clash[1] = 1                                              # two 1s in the first row
    assert sudoku.solve(clash, limit=2) == []


@pytest.mark.parametrize("givens, bin_", [(45, "easy"), (34, "medium"), (27, "hard")])
def test_generated_puzzles_are_unique_and_binned(givens, bin_):
    rng = random.Random(givens)
    t = time.perf_counter()
    for _ in range(5):
        puzzle, solution = sudoku.generate(rng, givens)
        n = sum(1 for d in puzzle if d)
        assert n <= givens + 4                               # uniqueness may stop the removal a little early
        assert sudoku.solve(puzzle, 2) == [solution] and sudoku.check(puzzle, solution)
        if n == givens:
            assert sudoku.difficulty(puzzle) == bin_
    assert time.perf_counter() - t < 30


def test_checker_rejects():
    p = sudoku.parse(HARD)
    s = sudoku.solve(p)[0]
    bad = list(s)
    bad[0], bad[1] = bad[1], bad[0]                           # still digits, breaks a column or box
    assert not sudoku.check(p, bad)                          # the two columns now hold a digit twice
    other = list(s)
    i = next(i for i in range(81) if p[i])
    other[i] = other[i] % 9 + 1
    assert not sudoku.check(p, other)
    assert not sudoku.check(p, s[:80]) and not sudoku.check(p, [0] + s[1:])


def test_parse():
    assert sudoku.parse(HARD.replace("0", ".")) == sudoku.parse(HARD)
    assert sudoku.to_text(sudoku.parse(HARD)) == HARD
    with pytest.raises(MinidiffError, match="81 characters"):
        sudoku.parse("12x")


def test_the_sudoku_model_pipeline_runs(tmp_path):
    """tools/train_sudoku.py: the folder it makes loads, tokenizes a puzzle as its layout says, trains a step
    with minidiff train, and its evaluation reports per bin (an untrained model solves nothing)."""
    import json
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import train_sudoku as ts
    from minidiff.chat import ChatTemplate
    from minidiff.tokenizer import Tokenizer
    from minidiff.train.trainer import Settings, train

    ts.make_folder(tmp_path / "init")
    tok, tpl = Tokenizer.from_folder(tmp_path / "init"), ChatTemplate.from_folder(tmp_path / "init")
    ids = tok.encode(tpl.render([{"role": "user", "content": HARD}]))
    assert ids[:2] == [2, 105] and ids[-2:] == [106, 105] and ids[2:83] == [ord(c) for c in HARD]
    data = ts.puzzles(4, seed=0)
    assert all(sudoku.check(sudoku.parse(p), sudoku.parse(s)) for p, s in data)
    (tmp_path / "train.json").write_text(json.dumps({"pairs": data}))
    train(tmp_path / "init", tmp_path / "train.json", tmp_path / "run", Settings(steps=1, batch=2, warmup=1))
    report = ts.evaluate(tmp_path / "run", data[:1])
    (stats,) = report.values()
    assert stats["puzzles"] == 1 and 0 <= stats["cell_accuracy"] <= 1 and stats["exact"] == 0.0
