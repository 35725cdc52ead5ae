"""`minidiff sudoku` on a Sudoku-layout model with random weights (tools/train_sudoku.make_folder): the
command's contract, whatever the model's skill -- one answer line per puzzle line in order, the givens held,
the answer checked before it is called solved, bad input refused before anything runs."""

import io
import random
import sys
from pathlib import Path

import pytest

from minidiff import cli_sudoku, sudoku
from minidiff.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import train_sudoku  # noqa: E402

SOLVED = "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
PUZZLE = "530070000600195000098000060800060003400803001700020006060000280000419005000080079"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("sudoku") / "model"
    train_sudoku.make_folder(d)
    return str(d)


def stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


def test_plain_answers_every_line_in_order_with_the_givens_held(folder, monkeypatch, capsys):
    rng = random.Random(0)
    puzzles = [sudoku.generate(rng, 36)[0] for _ in range(5)] + [sudoku.parse(PUZZLE)]
    text = "\n".join(sudoku.to_text(p) if i % 2 else sudoku.to_text(p).replace("0", ".") for i, p in enumerate(puzzles))
    stdin(monkeypatch, (text + "\n").encode())
    assert main(["sudoku", "--model", folder, "--plain", "-", "--batch", "4", "--steps", "4"]) == 0
    out, err = capsys.readouterr()
    answers = out.splitlines()
    assert len(answers) == len(puzzles)
    for p, a in zip(puzzles, answers):
        assert len(a) == 81 and a.isdigit()
        assert all(d == 0 or int(a[i]) == d for i, d in enumerate(p))          # every given kept
    assert err.strip().startswith("minidiff: solved ") and err.strip().endswith(f" of {len(puzzles)}")


def test_a_full_grid_is_reported_solved_and_a_random_models_answer_is_not(folder, capsys):
    assert main(["sudoku", "--model", folder, SOLVED, "--no-live"]) == 0
    out = capsys.readouterr().out
    assert "solved in" in out and "not solved" not in out
    assert main(["sudoku", "--model", folder, PUZZLE, "--no-live", "--steps", "3"]) == 1   # untrained: clashes
    out = capsys.readouterr().out
    assert "not solved:" in out and out.count("------+-------+------") == 4                # puzzle and answer grids


def test_live_grid_redraws_and_clears(folder, monkeypatch, capsys):
    assert main(["sudoku", "--model", folder, "--random", "easy", "--seed", "1", "--live", "--steps", "3"]) in (0, 1)
    out = capsys.readouterr().out
    assert "step 1/3" in out and "\x1b[" in out and "answer:" in out


@pytest.mark.parametrize("data, msg", [
    (b"12345\n", "stdin line 1: a puzzle is 81 characters"),
    ((SOLVED + "\n\n").encode(), "stdin line 2: a puzzle is 81 characters"),
    ((SOLVED[:-1] + "x\n").encode(), "stdin line 1"),
    (b"\xff" * 81, "not UTF-8"),
])
def test_bad_input_is_one_line_and_nothing_is_solved(folder, monkeypatch, capsys, data, msg):
    stdin(monkeypatch, data)
    assert main(["sudoku", "--model", folder, "--plain", "-"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and msg in err


def test_oversized_input_and_bad_options(folder, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(cli_sudoku, "MAX_INPUT_BYTES", 200)
    stdin(monkeypatch, ((SOLVED + "\n") * 3).encode())
    assert main(["sudoku", "--model", folder, "--plain", "-"]) == 2
    assert "split the input" in capsys.readouterr().err
    assert main(["sudoku", "--model", folder, "--plain", str(tmp_path / "none.txt")]) == 2
    assert "No such file" in capsys.readouterr().err
    for argv in (["--batch", "0", "--plain", "-"], [SOLVED, "--random", "easy"], []):
        assert main(["sudoku", "--model", folder, *argv]) == 2
        assert capsys.readouterr().err.startswith("minidiff: error:")


def test_temperatures_reach_the_sampler_and_bad_ones_are_one_error(folder, monkeypatch, capsys):
    """--t-min/--t-max override the model's generation_config (the Sudoku model's own temperatures are
    tuned: docs/training.md); values the sampler's config refuses are one error line, nothing solved."""
    from minidiff import sampler
    seen, real = [], sampler.generate

    def spy(model, prompts, **kw):
        res = real(model, prompts, **kw)
        seen.append(res.config)                         # the settings the sampler ran with
        return res
    monkeypatch.setattr(sampler, "generate", spy)
    stdin(monkeypatch, (PUZZLE + "\n").encode())
    assert main(["sudoku", "--model", folder, "--plain", "-", "--steps", "2", "--t-min", "1.25", "--t-max", "2.5"]) == 0
    c = seen[-1]
    assert (c.t_min, c.t_max, c.max_denoising_steps) == (1.25, 2.5, 2)
    capsys.readouterr()
    for bad in (["--t-min", "2", "--t-max", "1"], ["--t-min", "nan"], ["--t-max", "-1"]):
        stdin(monkeypatch, (PUZZLE + "\n").encode())
        assert main(["sudoku", "--model", folder, "--plain", "-", "--steps", "2", *bad]) == 2, bad
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1 and err.startswith("minidiff: error:"), (bad, err)
        assert main(["sudoku", "--model", folder, PUZZLE, "--no-live", *bad]) == 2        # before the grid is drawn
        out, err = capsys.readouterr()
        assert out == "" and err.count("\n") == 1, (bad, out, err)


def test_a_folder_that_is_not_a_sudoku_model_is_refused(tmp_path, capsys):
    d = tmp_path / "m"
    train_sudoku.make_folder(d)
    (d / "chat_template.jinja").unlink()
    assert main(["sudoku", "--model", str(d), SOLVED]) == 2
    assert "not a Sudoku model folder" in capsys.readouterr().err


def test_without_model_the_embedded_sudoku_model_answers(capsys, monkeypatch):
    """No --model: minidiff/sudoku_model (trained by minidiff) answers, offline. It solves this classic
    30-given puzzle at seed 0 (exit 0, the answer checked), and most of 16 easy ones (it solves about 98 % of
    easy puzzles: fewer than 10 here means the shipped weights or their loading broke)."""
    assert (cli_sudoku.EMBEDDED / "config.json").is_file()
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False, raising=False)
    assert main(["sudoku", PUZZLE, "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("(seed 0)") and "not solved" not in out and "\nsolved in" in out
    rows = [line for line in out.split("answer:")[1].splitlines() if "|" in line]     # the grid's 9 rows
    assert SOLVED == "".join(c for c in "".join(rows) if c.isdigit())
    rng = random.Random(123)
    easy = [sudoku.to_text(sudoku.random_puzzle(rng, "easy")[0]) for _ in range(16)]
    stdin(monkeypatch, ("\n".join(easy) + "\n").encode())
    assert main(["sudoku", "--plain", "-"]) == 0
    out, err = capsys.readouterr()
    answers = out.splitlines()
    assert len(answers) == 16
    solved = sum(sudoku.check(sudoku.parse(p), sudoku.parse(a)) for p, a in zip(easy, answers))
    assert solved >= 10 and f"solved {solved} of 16" in err, (solved, err)


def test_a_missing_embedded_model_is_one_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(cli_sudoku, "EMBEDDED", tmp_path / "nowhere")
    assert main(["sudoku", PUZZLE]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "embedded Sudoku model is missing" in err and "--model" in err
