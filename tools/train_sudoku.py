"""Train a small DiffusionGemma to solve Sudoku with `minidiff train`, evaluate it, and ship it as
minidiff/sudoku_model/ (`minidiff sudoku`'s default; docs/training.md#sudoku has the runs).

The layout: the prompt is `<bos><|turn>` + the 81 cells (digits, 0 = blank) + `<turn|><|turn>`; the canvas
(82 tokens) is the 81 digits of the solution + `<turn|>`. Tokens: each digit is the token of its character
(ids 48–57, their ASCII codes), the Gemma special ids for pad/eos/bos/turns; 128 in all, written as a
`tokenizers` tokenizer.json. The model: 4 layers (3 sliding, 1 full), hidden 128, 8 experts top-2.

    python tools/train_sudoku.py --out /tmp/sudoku --puzzles 2000 --steps 600 --batch 16   # make, train, eval
    python tools/train_sudoku.py --out /tmp/sudoku --eval-only --per-bin 50 [--quantized]
    python tools/train_sudoku.py --out /tmp/e --run RUN --eval-only --per-bin 200 --medium 1000 --ship
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minidiff import sudoku  # noqa: E402

SPECIAL = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<|turn>", 106: "<turn|>"}
TEMPLATE = "{{ bos_token }}<|turn>{{ messages[0]['content'] }}<turn|><|turn>"
CANVAS = 82
TEXT = dict(vocab_size=128, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, head_dim=32, global_head_dim=64, num_global_key_value_heads=1,
            sliding_window=256, layer_types=["sliding_attention"] * 3 + ["full_attention"], num_experts=8,
            top_k_experts=2, moe_intermediate_size=64, max_position_embeddings=1024, rms_norm_eps=1e-6,
            final_logit_softcapping=30.0, pad_token_id=0, bos_token_id=2, eos_token_id=[1, 106],
            rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                             "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                                "rope_theta": 1000000.0}})


def make_folder(out: Path) -> None:
    """tokenizer.json, chat_template.jinja, config.json, generation_config.json and random weights."""
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from minidiff.config import parse_config
    from minidiff.weights import expected_tensors
    out.mkdir(parents=True, exist_ok=True)
    def name(i):
        return SPECIAL.get(i) or (chr(i) if chr(i) in "0123456789." else f"<unused{i}>")
    vocab = {name(i): i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True) for t in SPECIAL.values()])
    tok.save(str(out / "tokenizer.json"))
    (out / "chat_template.jinja").write_text(TEMPLATE + "\n")
    config = {"architectures": ["DiffusionGemmaForBlockDiffusion"], "model_type": "diffusion_gemma",
              "canvas_length": CANVAS, "dtype": "float32", "text_config": dict(TEXT, model_type="diffusion_gemma_text"),
              "bos_token_id": 2, "eos_token_id": [1, 106], "pad_token_id": 0}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({
        "max_new_tokens": CANVAS, "max_denoising_steps": 48, "t_min": 0.4, "t_max": 0.8, "stability_threshold": 1,
        "confidence_threshold": 0.005, "eos_token_id": [1, 106], "pad_token_id": 0,
        "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1}}, indent=2) + "\n")
    cfg = parse_config(config)
    rng = np.random.default_rng(0)
    save_file({n: (0.02 * rng.standard_normal(s)).astype(np.float32) if len(s) >= 2 else np.ones(s, np.float32)
               for n, s in expected_tensors(cfg).items()}, str(out / "model.safetensors"))


def puzzles(n: int, seed: int) -> list:
    """n (puzzle, solution) text pairs, givens drawn uniformly from 25 to 50."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, s = sudoku.generate(rng, rng.randint(25, 50))
        out.append([sudoku.to_text(p), sudoku.to_text(s)])
    return out


def evaluate(folder: Path, items: list, seed: int = 0, batch: int = 16) -> dict:
    """Exact-solution and cell accuracy (over the blanks) per difficulty bin, mean denoising steps: what
    `minidiff sudoku --plain` answers (the givens held on the canvas, batches of `batch`)."""
    from minidiff.cli_sudoku import Solver
    solver = Solver(str(folder))
    stats = {}
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        puzzles = [sudoku.parse(p) for p, _ in chunk]
        answers, res = solver.solve(puzzles, seed=seed + i)
        for p, (_, solution), answer in zip(puzzles, chunk, answers):
            blanks = [j for j in range(81) if not p[j]]
            b = stats.setdefault(sudoku.difficulty(p), {"n": 0, "solved": 0, "cells": 0.0, "steps": 0})
            b["n"] += 1
            b["solved"] += sudoku.check(p, answer)
            b["cells"] += sum(answer[j] == int(solution[j]) for j in blanks) / max(1, len(blanks))
            b["steps"] += res.steps_per_canvas[0]          # a batch denoises together: its step count
    return {k: {"puzzles": v["n"], "exact": v["solved"] / v["n"], "cell_accuracy": v["cells"] / v["n"],
                "mean_steps": v["steps"] / v["n"]} for k, v in stats.items()}


def held_out(run: Path, counts: dict, exclude=()) -> list:
    """(puzzle, solution) texts per bin, drawn from a fixed generator (seed 99), none of them a puzzle the
    model trained on: every *pairs*.json(.gz) in the run folder, the data its trainer_state.json names, and the
    `exclude` files; a drawn training puzzle is drawn again. No training data found at all: an error."""
    from minidiff.train.trainer import read_pairs
    missing = [f for f in exclude if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"--exclude {missing[0]}: no such file")
    files = sorted(run.glob("*pairs*.json*")) + [Path(f) for f in exclude]
    if (run / "trainer_state.json").is_file():
        files.append(Path(json.loads((run / "trainer_state.json").read_text())["data"]))
    seen = set()
    for f in dict.fromkeys(f.resolve() for f in files if f.is_file()):     # each file once (the glob and the
        seen |= {p for p, _ in read_pairs(f)}                              # trainer state may name the same)
    if not seen:
        raise SystemExit(f"{run}: no training data found (--exclude FILE): cannot tell held-out puzzles from "
                         "trained ones")
    rng = random.Random(99)
    items = []
    for name, n in counts.items():
        drawn = 0
        while drawn < n:
            p, s = sudoku.random_puzzle(rng, name)
            if sudoku.to_text(p) not in seen:
                items.append([sudoku.to_text(p), sudoku.to_text(s)])
                drawn += 1
    return items


SHIPPED = Path(__file__).resolve().parents[1] / "minidiff" / "sudoku_model"


def ship(run: Path, out: Path) -> int:
    """The run's float32 checkpoint -> a bf16 model folder (minidiff sudoku's default). -> parameters"""
    from make_default_model import write_bf16_folder
    n = write_bf16_folder(run, out)
    state = json.loads((run / "trainer_state.json").read_text())
    (out / "training.json").write_text(json.dumps({"steps": state["step"], "settings": state["settings"]}) + "\n")
    return n


def write_readme(folder: Path, report: dict, n_params: int) -> None:
    """README.md of the shipped folder: what it solves, from the evaluation of that folder."""
    lines = [f"| {b} | {r['puzzles']} | {100 * r['exact']:.1f} % | {100 * r['cell_accuracy']:.1f} % | "
             f"{r['mean_steps']:.1f} |" for b, r in report.items()]
    g = json.loads((folder / "generation_config.json").read_text())
    (folder / "README.md").write_text(SHIPPED_README.format(params=n_params / 1e6, table="\n".join(lines),
                                                            t_min=g["t_min"], t_max=g["t_max"],
                                                            steps=g["max_denoising_steps"]))


SHIPPED_README = """# minidiff's Sudoku model

A DiffusionGemma of {params:.2f} M parameters (hidden 128, 4 layers, 8 experts top-2, an 82-token canvas, bf16)
trained by minidiff itself (`minidiff train`; its runs, commands and hours are in docs/training.md; the
last sitting's settings in training.json) to fill in Sudoku grids:
the puzzle is the prompt, the 81 digits of the solution are the canvas. `minidiff sudoku` uses it when no
`--model` is given:

    minidiff sudoku --random easy --seed 1          # a live grid settling as the entropy falls

Held-out puzzles, givens held, one try each with the release's sampler at this folder's settings
(generation_config.json: temperatures {t_max} -> {t_min}, {steps} steps at most; exact: the whole grid right;
cells: the blanks right):

| bin | puzzles | exact | cells | mean steps |
|---|---|---|---|---|
{table}

The goal was 80 % of medium puzzles solved exactly (docs/training.md has every run, and how the
temperatures were chosen on a validation draw). Answers are checked: `minidiff sudoku` says "solved" only
for a valid grid that keeps every given.
"""


QUANTIZED = {"int4-g32": ["--group-size", "32"], "int4-g128": ["--group-size", "128"], "nvfp4": ["--format", "nvfp4"]}


def evaluate_quantized(run: Path, out: Path, items: list) -> dict:
    """The trained model and its 4-bit copies (minidiff quantize, all linears) on the same puzzles and draws."""
    import subprocess
    report = {"float32": evaluate(run, items)}
    for name, flags in QUANTIZED.items():
        dst = out / name
        subprocess.run([sys.executable, "-m", "minidiff.cli", "quantize", str(run), str(dst), "--force", *flags],
                       check=True, capture_output=True)
        report[name] = evaluate(dst, items)
    return report


def main():
    from minidiff.train.trainer import Progress, Settings, train
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--puzzles", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--per-bin", type=int, default=20, help="evaluation puzzles per difficulty bin")
    ap.add_argument("--medium", type=int, help="evaluation puzzles of the medium bin (default: --per-bin)")
    ap.add_argument("--run", help="the trained model folder (default: OUT/run)")
    ap.add_argument("--exclude", nargs="*", default=[], metavar="PAIRS.json",
                    help="more training data whose puzzles the evaluation must not draw")
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--quantized", action="store_true", help="also evaluate int4 g32 / g128 and NVFP4 copies")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--ship", nargs="?", const=str(SHIPPED), metavar="DIR",
                    help="afterwards write the run as a bf16 model folder (default: minidiff/sudoku_model), "
                         "with the evaluation in its README")
    args = ap.parse_args()
    out = Path(args.out)
    base, run = out / "init", Path(args.run) if args.run else out / "run"
    if not args.eval_only:
        if not args.resume:
            make_folder(base)
            t = time.perf_counter()
            data = puzzles(args.puzzles, seed=1)
            (out / "train.json").write_text(json.dumps({"pairs": data}))
            print(f"{len(data)} training puzzles in {time.perf_counter() - t:.0f} s", flush=True)
        s = Settings(steps=args.steps, batch=args.batch, lr=args.lr, save_every=50)
        train(base, out / "train.json", run, s, resume=args.resume, from_scratch=not args.resume, progress=Progress())
    items = held_out(run, {name: args.per_bin for name, _, _ in sudoku.BINS} | (
        {"medium": args.medium} if args.medium else {}), args.exclude)
    if args.ship:                                   # what ships is evaluated: the bf16 copy
        n_params = ship(run, Path(args.ship))
        run = Path(args.ship)
    t = time.perf_counter()
    report = evaluate_quantized(run, out, items) if args.quantized else evaluate(run, items)
    print(json.dumps(report, indent=1))
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"evaluated in {time.perf_counter() - t:.0f} s")
    if args.ship:
        write_readme(run, report.get("float32", report), n_params)


if __name__ == "__main__":
    main()
