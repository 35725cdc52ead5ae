"""docs/tutorial.md's examples and exercise answers run and print what the page says (section 7 trains a
model from scratch with `minidiff train` and asks it a question: no torch needed)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_tutorial_examples_and_answers():
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "check_docs.py"), str(ROOT / "docs" / "tutorial.md")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    assert "; 0 failed" in p.stdout and "51 doctest lines" in p.stdout and "5 console commands" in p.stdout
