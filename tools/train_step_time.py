"""Seconds per training step of `minidiff train` for a model, a batch size and a device, and the step count that
fits a time budget: used to size a fine-tune to a lent GPU's minutes (tools/gpu_train_sudoku.sh), where
stopping a cosine schedule early would leave the learning rate high.

    python tools/train_step_time.py --model tools/sudoku_checkpoint --data PAIRS.json --batch 256 --device cuda \
        --budget-s 300
prints one JSON line: {"step_s": ..., "setup_s": ..., "steps": N} (N fits budget_s after setup_s, less 10 %).
The timed steps are real steps (a throw-away copy of the weights, learning rate 1e-9): 5 warm-up, 20 timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidiff.backend import get_xp  # noqa: E402
from minidiff.train.objective import load_params  # noqa: E402
from minidiff.train.trainer import Settings, adamw_step, batch_grads, encode_pairs, read_pairs  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--budget-s", type=float, default=None)
    args = ap.parse_args()
    xp = get_xp(args.device)
    sync = (lambda: xp.cuda.Device().synchronize()) if args.device == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    cfg, params = load_params(args.model, "float32", xp)
    pairs = read_pairs(args.data)
    examples = encode_pairs(pairs, Path(args.model), cfg.canvas_length, max_canvases=64)
    setup = time.perf_counter() - t0
    s, rng, state = Settings(batch=args.batch, lr=1e-9), np.random.default_rng(0), {}
    for i in range(25):
        if i == 5:
            sync()
            t = time.perf_counter()
        _, _, grads, _ = batch_grads(xp, params, cfg, examples, rng, s)
        adamw_step(xp, params, grads, state, i, s.lr, s)
    sync()
    step_s = (time.perf_counter() - t) / 20
    out = {"step_s": round(step_s, 4), "setup_s": round(setup, 1), "batch": args.batch, "device": args.device}
    if args.budget_s is not None:
        out["steps"] = max(1, int(0.9 * (args.budget_s - setup) / step_s))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
