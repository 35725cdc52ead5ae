"""CPU benchmark: minidiff vs transformers on the same machine, in one run.

Times, on the "small" random config (hidden 512, 8 layers with 2 full, 32 experts top-4, vocab 32768,
canvas 256), fp32:
  - encoder prefill of prompts of several lengths,
  - one denoiser step (canvas 256 over the prompt cache), without and with self-conditioning.
Prints a table with the ratio (transformers time / minidiff time: > 1 means minidiff is faster) and
writes JSON.

    python tools/bench_cpu.py [--repeats 5] [--json bench_cpu.json]
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import minidiff  # noqa: E402
import tinyckpt  # noqa: E402


def best_of(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times), float(np.median(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--prompt-lengths", default="16,256,1024")
    ap.add_argument("--canvas", type=int, default=256)
    ap.add_argument("--json", default="bench_cpu.json")
    args = ap.parse_args()

    torch.set_grad_enabled(False)
    ref = tinyckpt.build_model(tinyckpt.SMALL, canvas_length=args.canvas, seed=0, attn_implementation="sdpa")
    with tempfile.TemporaryDirectory() as d:
        tinyckpt.save(ref, d)
        model = minidiff.load(d)
        V = model.config.vocab_size
        rng = np.random.default_rng(0)
        rows = []
        for P in [int(x) for x in args.prompt_lengths.split(",")]:
            prompt = rng.integers(0, V, P)
            tp = torch.tensor(prompt)[None]
            t_md = best_of(lambda: model.encode(prompt), args.repeats)
            t_hf = best_of(lambda: ref.model.encoder(input_ids=tp, use_cache=True), args.repeats)
            rows.append(("encoder prefill", P, t_md, t_hf))
        prompt = rng.integers(0, V, 64)
        canvas = rng.integers(0, V, args.canvas)
        cache = model.encode(prompt)
        hf_cache = ref.model.encoder(input_ids=torch.tensor(prompt)[None], use_cache=True).past_key_values
        tc = torch.tensor(canvas)[None]
        sc = model.denoise(canvas, cache) / np.float32(0.8)
        tsc = torch.tensor(sc)[None]
        rows.append(("denoiser step", 64, best_of(lambda: model.denoise(canvas, cache), args.repeats),
                     best_of(lambda: ref(decoder_input_ids=tc, past_key_values=hf_cache), args.repeats)))
        rows.append(("denoiser step + self-cond", 64,
                     best_of(lambda: model.denoise(canvas, cache, sc), args.repeats),
                     best_of(lambda: ref(decoder_input_ids=tc, past_key_values=hf_cache,
                                         self_conditioning_logits=tsc), args.repeats)))

    print(f"{'what':28s} {'prompt':>6s} {'minidiff ms':>12s} {'transformers ms':>16s} {'ratio':>6s}")
    out = []
    for what, P, (md, md_med), (hf, hf_med) in rows:
        print(f"{what:28s} {P:6d} {md * 1e3:12.1f} {hf * 1e3:16.1f} {hf / md:6.2f}")
        out.append(dict(what=what, prompt_len=P, canvas=args.canvas, minidiff_s=md, minidiff_median_s=md_med,
                        transformers_s=hf, transformers_median_s=hf_med, ratio_hf_over_minidiff=hf / md))
    print("ratio = transformers time / minidiff time (best of repeats); > 1 means minidiff is faster")
    meta = dict(config="tinyckpt.SMALL", dtype="float32", torch=torch.__version__, numpy=np.__version__,
                threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": out}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
