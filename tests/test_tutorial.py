"""docs/tutorial.md's examples and exercise answers run and print what the page says; exercise 7
(retrain the memoriser with your own pairs) works end to end."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_examples_and_answers():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "check_docs.py"), str(ROOT / "docs" / "tutorial.md")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "; 0 failed" in p.stdout and "51 doctest lines" in p.stdout


def test_exercise_7_retrain_the_memoriser_with_your_own_pairs(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    out = tmp_path / "mymodel"
    shutil.copytree(ROOT / "minidiff" / "default_model", out)
    pairs = [["What is the capital of France?", "Paris."], ["Name a prime number", "Seven is prime."]]
    (tmp_path / "pairs.json").write_text(json.dumps({"pairs": pairs}))
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "train_default_model.py"), "--pairs",
                        str(tmp_path / "pairs.json"), "--out", str(out), "--steps", "300", "--batch", "4"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-2000:]
    for prompt, answer in pairs:
        p = subprocess.run([sys.executable, "-m", "minidiff", "generate", "--model", str(out), prompt, "--seed", "0",
                            "-q"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stdout.strip() == answer, (prompt, p.stdout, p.stderr)
