"""Benchmark one full generation step (denoise + sampling over the vocabulary): minidiff vs transformers.

    python tools/bench_step.py [--steps 4] [--prompt-len 16] [--json bench_step.json]

Both sides run their real `generate` loop on the same "small" checkpoint (tests/tinyckpt.py SMALL: hidden 512,
8 layers, 32 experts top-4, vocab 32768, canvas 256; fp32, eager attention on the transformers side), one
canvas, a fixed number of steps (no early stop), on this machine, one run. A step's time is taken between
consecutive steps; the denoiser's share is timed around the model call; sampling = step - denoiser
(softmax, entropy, categorical draw, argmax, acceptance, renoising, SC bookkeeping). Step 0 (no
self-conditioning) is reported apart from the median of the later steps. Needs torch + transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def bench_minidiff(folder, prompt, steps):
    import minidiff
    model = minidiff.load(folder)
    denoise_times, step_marks = [], []
    real = model.denoise

    def timed(*a, **k):
        t = time.perf_counter()
        out = real(*a, **k)
        denoise_times.append(time.perf_counter() - t)
        return out
    model.denoise = timed
    model.generate(prompt, max_new_tokens=model.config.canvas_length, max_denoising_steps=steps, seed=0,
                   stability_threshold=None, confidence_threshold=None,
                   callback=lambda e: step_marks.append(time.perf_counter()) if e.kind == "step" else None)
    # step i (i >= 1) spans from the callback of step i-1 to its own: draws, denoise, sampling, bookkeeping
    step_times = [step_marks[i] - step_marks[i - 1] for i in range(1, len(step_marks))]
    return denoise_times, step_times


def bench_transformers(ref, prompt, steps):
    import torch
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import EntropyBoundSamplerConfig
    forward_times, step_times = [], []
    real_forward, real_step = ref.forward, ref._denoising_step

    def timed_forward(*a, **k):
        t = time.perf_counter()
        out = real_forward(*a, **k)
        forward_times.append(time.perf_counter() - t)
        return out

    def timed_step(*a, **k):
        t = time.perf_counter()
        out = real_step(*a, **k)
        step_times.append(time.perf_counter() - t)
        return out
    ref.forward, ref._denoising_step = timed_forward, timed_step
    torch.manual_seed(0)
    with torch.no_grad():
        ref.generate(input_ids=torch.tensor([prompt]), max_new_tokens=ref.config.canvas_length,
                     max_denoising_steps=steps, sampler_config=EntropyBoundSamplerConfig(entropy_bound=0.1),
                     t_min=0.4, t_max=0.8, stability_threshold=None, confidence_threshold=None,
                     eos_token_id=[10 ** 6], pad_token_id=0)
    ref.forward, ref._denoising_step = real_forward, real_step
    return forward_times, step_times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="denoising steps to time (>= 2)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--json", default="bench_step.json", help="where to write the results")
    args = ap.parse_args(argv)

    import torch
    import tinyckpt
    torch.set_num_threads(os.cpu_count() or 1)
    ref = tinyckpt.build_model(tinyckpt.SMALL, canvas_length=256, seed=0, embed_std=1.5)
    V = ref.config.text_config.vocab_size
    prompt = list(np.random.default_rng(0).integers(5, V, args.prompt_len))
    with tempfile.TemporaryDirectory() as tmp:
        folder = tinyckpt.save(ref, tmp)
        md_denoise, md_step = bench_minidiff(folder, prompt, args.steps)
    hf_forward, hf_step_all = bench_transformers(ref, prompt, args.steps)

    # minidiff: step i (i >= 1) = time between callbacks i-1 and i; it contains denoise call i
    md_rows = [(md_step[i - 1], md_denoise[i]) for i in range(1, len(md_denoise))]
    hf_rows = [(hf_step_all[i], hf_forward[i]) for i in range(1, len(hf_step_all))]
    hf0 = (hf_step_all[0], hf_forward[0])

    def summary(rows):
        step = float(np.median([r[0] for r in rows]))
        den = float(np.median([r[1] for r in rows]))
        return {"step_s": step, "denoise_s": den, "sampling_s": step - den, "sampling_share": (step - den) / step}
    res = {
        "config": "tinyckpt.SMALL (hidden 512, 8 layers, 32 experts top-4, vocab 32768), canvas 256, fp32",
        "prompt_len": args.prompt_len, "steps_timed": args.steps,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "numpy": np.__version__, "torch": torch.__version__},
        "minidiff": summary(md_rows),
        "transformers": {**summary(hf_rows), "step0_s": hf0[0], "step0_denoise_s": hf0[1]},
        "minidiff_step0_denoise_s": md_denoise[0],
    }
    Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    print(f"one generation step, steps 1..{args.steps - 1} (median), {res['config']}, {os.cpu_count()} CPU cores")
    print(f"{'':14}{'step':>10}{'denoise':>10}{'sampling':>10}{'sampling %':>12}")
    for name in ("minidiff", "transformers"):
        r = res[name]
        print(f"{name:14}{r['step_s'] * 1e3:>8.0f}ms{r['denoise_s'] * 1e3:>8.0f}ms{r['sampling_s'] * 1e3:>8.0f}ms"
              f"{r['sampling_share'] * 100:>11.1f}%")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
