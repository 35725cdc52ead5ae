"""Logits error of low-bit checkpoints against fp32, on tiny and "small" random DiffusionGemma models.

    python tools/quant_report.py [--configs tiny small] [--workdir DIR]

For each config: build a perturbed random model with transformers (tests/tinyckpt.py), save it in
fp32, quantize it with `minidiff quantize` (int4 g32, int4 g128, NVFP4), load every folder with
minidiff and compare the denoiser logits of the quantized models with the fp32 model's on the same
(prompt, canvas) pairs: max and mean |Δ|, top-1 (argmax) agreement over canvas positions, and the
denoising steps per canvas the entropy-bound sampler takes (same seed; random models rarely stop
early, so this often sits at max_denoising_steps). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import minidiff  # noqa: E402
from minidiff.quantize import convert  # noqa: E402

VARIANTS = [("int4 g32", dict(fmt="int4", group_size=32)),
            ("int4 g128", dict(fmt="int4", group_size=128)),
            ("NVFP4", dict(fmt="nvfp4"))]


def configs():
    import tinyckpt
    return {"tiny": (dict(tinyckpt.TINY, moe_intermediate_size=32), 8),
            "small": (dict(tinyckpt.SMALL), 32)}


def build(name: str, workdir: Path, seed: int = 0) -> Path:
    import tinyckpt
    text, canvas = configs()[name]
    path = workdir / f"{name}-fp32"
    if not (path / "config.json").is_file():
        tinyckpt.save(tinyckpt.build_model(text, canvas_length=canvas, seed=seed), path)
    return path


def logits_pairs(model, n_pairs: int, prompt_len: int, seed: int):
    rng = np.random.default_rng(seed)
    V, C = model.config.vocab_size, model.config.canvas_length
    out = []
    for _ in range(n_pairs):
        prompt, canvas = rng.integers(3, V, prompt_len), rng.integers(3, V, C)
        out.append(model.denoise(canvas, model.encode(prompt)))
    return np.stack(out)                                         # [pairs, C, V]


def steps_per_canvas(model, seed: int, canvases: int = 2):
    from minidiff import sampler
    rng = np.random.default_rng(seed + 1)
    prompt = rng.integers(3, model.config.vocab_size, 6)
    r = sampler.generate(model, prompt, max_new_tokens=canvases * model.config.canvas_length, seed=seed)
    return float(np.mean(r.steps_per_canvas))


def measure(name: str, workdir: Path, n_pairs: int = 4, prompt_len: int = 12, seed: int = 0,
            variants=VARIANTS, with_steps: bool = True) -> list[dict]:
    """One row per variant (fp32 first): max/mean |Δ logits|, top-1 agreement, steps per canvas."""
    src = build(name, workdir)
    ref = minidiff.load(src)
    L0 = logits_pairs(ref, n_pairs, prompt_len, seed)
    rows = [dict(config=name, variant="fp32", max=0.0, mean=0.0, top1=1.0, scale=float(np.abs(L0).mean()),
                 steps=steps_per_canvas(ref, seed) if with_steps else None, gb=_size(src))]
    for label, kw in variants:
        dst = workdir / f"{name}-{label.replace(' ', '-')}"
        if not (dst / "config.json").is_file():
            convert(src, dst, **kw)
        m = minidiff.load(dst)
        L = logits_pairs(m, n_pairs, prompt_len, seed)
        d = np.abs(L - L0)
        rows.append(dict(config=name, variant=label, max=float(d.max()), mean=float(d.mean()),
                         top1=float((L.argmax(-1) == L0.argmax(-1)).mean()), scale=rows[0]["scale"],
                         steps=steps_per_canvas(m, seed) if with_steps else None, gb=_size(dst)))
    return rows


def _size(folder: Path) -> float:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors")) / 1e6


def render(rows) -> str:
    lines = ["| config | weights | file MB | max abs Δ logit | mean abs Δ logit | top-1 agreement | steps/canvas |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps = "pending" if r["steps"] is None else f"{r['steps']:.1f}"
        lines.append(f"| {r['config']} | {r['variant']} | {r['gb']:.1f} | {r['max']:.3f} | {r['mean']:.4f} | "
                     f"{100 * r['top1']:.1f}% | {steps} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "small"], choices=["tiny", "small"])
    ap.add_argument("--workdir", type=Path, default=None, help="keep the checkpoints here (default: a temp dir)")
    ap.add_argument("--pairs", type=int, default=4, help="(prompt, canvas) pairs per config")
    ap.add_argument("--no-steps", action="store_true", help="skip the sampler column")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = a.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = []
        for name in a.configs:
            rows += measure(name, work, n_pairs=a.pairs, with_steps=not a.no_steps)
            print(f"{name}: done", file=sys.stderr)
        print(render(rows))
        print("\n(mean |logit| of the fp32 model: " + ", ".join(
            f"{r['config']} {r['scale']:.2f}" for r in rows if r["variant"] == "fp32") + ")")


if __name__ == "__main__":
    main()
