"""How often does logit noise change a trajectory? The measurement behind docs/randomness.md's warning.

Replaying minidiff's trajectories "token for token" needs the same random draws AND logits close enough
that no categorical draw, acceptance decision or argmax flips. This tool adds Gaussian noise of a given
size to every denoiser output of the embedded default model (what a port's float error looks like) and
counts, per noise level, the seeds whose generated tokens differ from the noise-free run, and the first
step at which the canvases part.

    python tools/divergence.py                       # 20 seeds, noise 1e-6 ... 1e-2, table + JSON
    python tools/divergence.py --seeds 50 --json docs/bench/divergence.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minidiff  # noqa: E402
from minidiff.chat import ChatTemplate  # noqa: E402
from minidiff.tokenizer import Tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# (name, model folder (None = the embedded default), chat prompt or prompt ids, max_new_tokens)
CASES = [("default model, memorised prompt", None, "Write a haiku about the sea", 256),
         ("default model, unfamiliar prompt", None, "Explain how a refrigerator works", 256),
         ("random tiny model", ROOT / "tests" / "golden" / "tiny", [2, 105, 7, 19, 250, 3, 44], 16)]


class Noisy:
    """The model with eps · N(0, 1) added to every denoiser output (its own generator, not the sampler's)."""

    def __init__(self, model, eps, seed):
        self.model, self.eps, self.rng = model, eps, np.random.default_rng(10_000 + seed)
        self.config, self.folder = model.config, model.folder

    def encode(self, *a, **k):
        return self.model.encode(*a, **k)

    def denoise(self, *a, **k):
        z = self.model.denoise(*a, **k)
        return z + (self.eps * self.rng.standard_normal(z.shape)).astype(np.float32)


def canvases(model, ids, seed, max_new):
    """(generated tokens, [every step's next canvas]) of one run."""
    steps = []
    res = minidiff.sampler.generate(model, ids, seed=seed, max_new_tokens=max_new,
                                    callback=lambda e: steps.append(e.next_canvas.copy()) if e.kind == "step" else None)
    return res.tokens[0], steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--eps", default="1e-6,1e-5,1e-4,1e-3,1e-2")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    rows = []
    for kind, folder, prompt, max_new in CASES:
        model = minidiff.load(folder)
        if isinstance(prompt, str):
            tok, tpl = Tokenizer.from_folder(model.folder), ChatTemplate.from_folder(model.folder)
            ids = tok.encode(tpl.render([{"role": "user", "content": prompt}]))
        else:
            ids = prompt
        clean = [canvases(model, ids, s, max_new) for s in range(args.seeds)]
        for eps in [float(e) for e in args.eps.split(",")]:
            differ, first = 0, []
            for s in range(args.seeds):
                toks, steps = canvases(Noisy(model, eps, s), ids, s, max_new)
                ref_toks, ref_steps = clean[s]
                if toks.shape != ref_toks.shape or (toks != ref_toks).any():
                    differ += 1
                part = next((i for i, (a, b) in enumerate(zip(steps, ref_steps)) if (a != b).any()),
                            None if len(steps) == len(ref_steps) else min(len(steps), len(ref_steps)))
                if part is not None:
                    first.append(part)
            rows.append({"prompt": kind, "eps": eps, "seeds": args.seeds, "tokens_differ": differ,
                         "trajectories_differ": len(first),
                         "median_first_divergent_step": float(np.median(first)) if first else None})
            r = rows[-1]
            print(f"{kind:<38} eps {eps:<7g} tokens differ {differ:>3}/{args.seeds}   trajectories differ "
                  f"{len(first):>3}/{args.seeds}   first divergent step (median) {r['median_first_divergent_step']}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"made_by": "tools/divergence.py", "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
