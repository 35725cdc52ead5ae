"""The sampler pinned without torch: generate on the golden bf16 checkpoint reproduces committed trajectories
(tools/make_golden_trajectories.py) token for token, with the same steps, passes and tokens per forward.

tests/test_generate_oracle.py checks trajectories against transformers where torch is installed; this file
keeps a change to the sampler (a rounding, a draw order, a count) visible where it is not.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_golden_trajectories import GOLDEN, models, run  # noqa: E402

CASES = json.loads((GOLDEN / "trajectories.json").read_text())["cases"]


@pytest.fixture(scope="module")
def loaded():
    return models()


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_trajectory_is_reproduced(loaded, case):
    assert run(loaded[case["model"]], case["prompt"], case["kwargs"]) == case["result"]


def test_the_cases_exercise_what_they_pin():
    """Early stops, rows that stop at different steps, stop ids, several canvases and both rounding modes."""
    res = {c["name"]: c["result"] for c in CASES}
    assert any(min(r["steps_per_canvas"]) < 48 for n, r in res.items() if n.startswith("default"))
    assert any(len(set(r["passes"])) > 1 for n, r in res.items() if "batch" in n)
    assert any(all(r["finished"]) for n, r in res.items() if "batch" in n)
    assert any(len(r["steps_per_canvas"]) >= 2 for r in res.values())
    assert {"tiny-float32-sc", "tiny-greedy", "tiny-infill"} <= set(res)
