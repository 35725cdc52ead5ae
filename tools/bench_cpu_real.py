"""CPU benchmark at the release's real width: minidiff (bf16, int4, NVFP4) vs transformers (fp32, bf16), same machine.

The release is too large for this benchmark's machines, so it builds a 2-layer checkpoint with the release's
real widths (hidden 2816, 16 heads, head dim 256 sliding / 512 full, 128 experts top-8 of width 704, dense
MLP 2112, vocab 262144; one sliding and one full layer; random weights, bf16 on disk) with transformers,
and int4 and NVFP4 copies of it with `minidiff quantize` (minidiff-int4-numpy runs the int4 copy with
MINIDIFF_NATIVE=0: the experts widened by NumPy instead of the CPU kernel). Each engine then runs in its own process (so each one's
peak RSS is its own) with the same number of threads, and times, as medians of `--repeats` runs:

  prefill 1024        encoder pass over a 1024-token prompt
  step c1024          one denoiser step, canvas 256, over a 1024-token cache, no self-conditioning
  step+sc c1024       the same with self-conditioning logits (the step every later denoising step runs)
  step c8192          one denoiser step over an 8192-token cache
  sampler             minidiff's own per-step work at the real vocabulary (softmax, entropy, draw,
                      acceptance, bf16 rounding of the self-conditioning logits) on [256, 262144] logits

`--long 32768` adds a 32K-token prefill for minidiff bf16 (peak RSS against the 1K prefill: memory stays
linear in context). Writes JSON and prints a table; ratios are transformers time / minidiff time
(> 1: minidiff is faster).

    python tools/bench_cpu_real.py [--threads 2] [--repeats 3] [--json docs/bench/cpu_real.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

REAL_2LAYER = dict(
    vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=2,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=2, sliding_window=1024, layer_types=["sliding_attention", "full_attention"],
    num_experts=128, top_k_experts=8, moe_intermediate_size=704,
)
CASES = [("prefill", 1024, False), ("step", 1024, False), ("step+sc", 1024, True), ("step", 8192, False)]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2]


def timed(fn, repeats):
    fn()                                              # warm-up: page in the weights, allocate buffers
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return median(ts)


def peak_rss_gb() -> float:
    """This process's peak resident memory: VmHWM, which starts afresh at exec (getrusage's ru_maxrss would
    carry over the parent's peak into every worker, e.g. after the parent built the checkpoint)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2 ** 20                   # kB
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


# ------------------------------------------------------------------------------------- workers


def worker_minidiff(folder, repeats, long_prefill):
    import numpy as np
    import minidiff
    from minidiff.kernels import lowbit_matmul as native
    model = minidiff.load(folder)
    V, C = model.config.vocab_size, 256
    rng = np.random.default_rng(0)
    out = {"load_rss_gb": peak_rss_gb(), "cpu_kernel": native.status()}
    canvas = rng.integers(0, V, C)
    for kind, L, sc in CASES:
        prompt = rng.integers(0, V, L)
        if kind == "prefill":
            out[f"{kind}_{L}_s"] = timed(lambda: model.encode(prompt), repeats)
            continue
        cache = model.encode(prompt)
        s = (model.denoise(canvas, cache) / np.float32(0.8)) if sc else None
        out[f"{kind}_c{L}_s"] = timed(lambda: model.denoise(canvas, cache, s), repeats)
        del cache, s
    out["peak_rss_gb"] = peak_rss_gb()
    if long_prefill:
        prompt = rng.integers(0, V, long_prefill)
        t = time.perf_counter()
        model.encode(prompt)
        out[f"prefill_{long_prefill}_s"] = time.perf_counter() - t
        out[f"prefill_{long_prefill}_peak_rss_gb"] = peak_rss_gb()
    return out


def worker_sampler(repeats):
    """minidiff's per-step sampler work at V = 262144 (what generate does between two denoiser calls)."""
    import numpy as np
    from minidiff import sampler
    rng = np.random.default_rng(0)
    C, V = 256, 262144
    z = (rng.standard_normal((1, C, V), dtype=np.float32) * 4)
    u = rng.random((1, C))

    def step():
        p, H = sampler.softmax_entropy(z)
        sampler.sample_inverse_cdf(p.reshape(-1, V), u.reshape(-1))
        sampler.entropy_bound_accept(H, 0.1)
        z.argmax(axis=-1)
        sampler.round_bf16(z)
    return {"sampler_s": timed(step, repeats)}


def worker_transformers(folder, dtype, repeats):
    import numpy as np
    import torch
    from transformers.models.diffusion_gemma import DiffusionGemmaForBlockDiffusion
    torch.set_grad_enabled(False)
    ref = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=getattr(torch, dtype),
                                                          attn_implementation="sdpa").eval()
    V, C = ref.config.text_config.vocab_size, 256
    rng = np.random.default_rng(0)
    out = {"load_rss_gb": peak_rss_gb()}
    tc = torch.tensor(rng.integers(0, V, C))[None]
    for kind, L, sc in CASES:
        prompt = torch.tensor(rng.integers(0, V, L))[None]
        if kind == "prefill":
            out[f"{kind}_{L}_s"] = timed(lambda: ref.model.encoder(input_ids=prompt, use_cache=True), repeats)
            continue
        cache = ref.model.encoder(input_ids=prompt, use_cache=True).past_key_values
        s = (ref(decoder_input_ids=tc, past_key_values=cache).logits / 0.8).to(ref.dtype) if sc else None
        out[f"{kind}_c{L}_s"] = timed(lambda: ref(decoder_input_ids=tc, past_key_values=cache,
                                                  self_conditioning_logits=s), repeats)
        del cache, s
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def build(folder: Path, int4: Path, nvfp4: Path):
    """The 2-layer real-width checkpoint (bf16) and its int4 and NVFP4 copies, unless already there."""
    if not (folder / "config.json").is_file():
        import torch
        sys.path.insert(0, str(ROOT / "tests"))
        import tinyckpt
        print(f"building {folder} (2 layers at real width, bf16) ...", flush=True)
        m = tinyckpt.build_model(REAL_2LAYER, canvas_length=256, seed=0, dtype=torch.bfloat16, embed_std=0.05)
        tinyckpt.save(m, folder)
        del m
    if not (int4 / "config.json").is_file():
        print(f"quantizing to {int4} (minidiff quantize defaults: int4, group 32, all linears) ...", flush=True)
        subprocess.run([sys.executable, "-m", "minidiff.cli", "quantize", str(folder), str(int4)], check=True)
    if not (nvfp4 / "config.json").is_file():
        print(f"quantizing to {nvfp4} (minidiff quantize --format nvfp4) ...", flush=True)
        subprocess.run([sys.executable, "-m", "minidiff.cli", "quantize", str(folder), str(nvfp4), "--format", "nvfp4"],
                       check=True)


def run_worker(args, name, *params, env_extra=None):
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads),
               MKL_NUM_THREADS=str(args.threads), MINIDIFF_THREADS=str(args.threads), **(env_extra or {}))
    cmd = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats), *map(str, params)]
    print(f"  {name} {' '.join(map(str, params))} ...", flush=True)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode:
        print(r.stderr[-3000:])
        return {"error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/minidiff_bench_real", help="where the checkpoints are built (kept)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--long", type=int, default=0, help="also a minidiff prefill of this many tokens (e.g. 32768)")
    ap.add_argument("--skip", default="", help="comma-separated engines to leave out (e.g. transformers-fp32)")
    ap.add_argument("--json", default="bench_cpu_real.json")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("params", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        import torch  # noqa: F401  (imported first in every worker, so library loading is the same)
        torch.set_num_threads(args.threads) if hasattr(torch, "set_num_threads") else None
        fn = {"minidiff": lambda: worker_minidiff(args.params[0], args.repeats, int(args.params[1])),
              "sampler": lambda: worker_sampler(args.repeats),
              "transformers": lambda: worker_transformers(args.params[0], args.params[1], args.repeats)}
        print(json.dumps(fn[args.worker]()))
        return

    base = Path(args.dir)
    bf16, int4, nvfp4 = base / "bf16", base / "int4", base / "nvfp4"
    if args.worker_build:
        build(bf16, int4, nvfp4)
        return
    # built in a child: a parent that kept the building's memory would starve the workers' page cache
    subprocess.run([sys.executable, __file__, "--worker-build", "--dir", str(base)], check=True)
    skip = set(filter(None, args.skip.split(",")))
    numpy_only = {"MINIDIFF_NATIVE": "0"}      # the 4-bit experts widened by NumPy, as before the CPU kernel
    engines = {                                 # name: (worker, its parameters, extra environment)
        "minidiff-bf16": ("minidiff", (bf16, args.long), None),
        "minidiff-int4": ("minidiff", (int4, 0), None),
        "minidiff-nvfp4": ("minidiff", (nvfp4, 0), None),
        "minidiff-int4-numpy": ("minidiff", (int4, 0), numpy_only),
        "transformers-fp32": ("transformers", (bf16, "float32"), None),
        "transformers-bf16": ("transformers", (bf16, "bfloat16"), None),
    }
    results = {name: run_worker(args, w, *params, env_extra=env)
               for name, (w, params, env) in engines.items() if name not in skip}
    results["minidiff-sampler"] = run_worker(args, "sampler")

    keys = [f"prefill_1024_s", "step_c1024_s", "step+sc_c1024_s", "step_c8192_s", "peak_rss_gb"]
    names = [n for n in results if n != "minidiff-sampler"]
    print(f"\n{'':18s}" + "".join(f"{n:>20s}" for n in names))
    print(f"{'cpu kernel':18s}" + "".join(f"{results[n].get('cpu_kernel', '-')[:18]:>20s}" for n in names))
    for k in keys:
        print(f"{k:18s}" + "".join(f"{results[n].get(k, float('nan')):20.2f}" for n in names))
    ratios = {}
    for md in ("minidiff-bf16", "minidiff-int4", "minidiff-nvfp4"):
        for hf in ("transformers-fp32", "transformers-bf16", "minidiff-bf16"):
            if hf == md:
                continue
            if md in results and hf in results and "error" not in results[md] and "error" not in results[hf]:
                ratios[f"{hf}_over_{md}"] = {k: results[hf][k] / results[md][k] for k in keys[:-1]}
    for name, r in ratios.items():
        print(f"{name:42s} " + "  ".join(f"{k.replace('_s', '')} {v:.2f}" for k, v in r.items()))
    smp = results["minidiff-sampler"].get("sampler_s")
    if smp is not None and "step+sc_c1024_s" in results.get("minidiff-bf16", {}):
        share = smp / (smp + results["minidiff-bf16"]["step+sc_c1024_s"])
        print(f"sampler work per step: {smp:.3f} s = {100 * share:.1f}% of a 2-layer real-width step "
              f"(denoise with self-conditioning + sampling)")
        results["minidiff-sampler"]["share_of_2layer_step"] = share
    import numpy as np
    meta = dict(config="2 layers at the release's width (hidden 2816, 128 experts top-8, vocab 262144), "
                       "random weights, bf16 on disk; int4 = minidiff quantize (defaults: group 32, all linears); "
                       "nvfp4 = minidiff quantize --format nvfp4; *-numpy: MINIDIFF_NATIVE=0 (no CPU kernel)",
                threads=args.threads, repeats=args.repeats, statistic="median", numpy=np.__version__,
                machine=platform.machine(), cpu=_cpu_name(), date=time.strftime("%Y-%m-%d"))
    Path(args.json).write_text(json.dumps({"meta": meta, "results": results, "ratios": ratios}, indent=1))
    print(f"wrote {args.json}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
