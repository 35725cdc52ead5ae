"""GPU benchmark at the release's full size: DiffusionGemma 26B-A4B with random weights made on the device.

No download: the config is the release's (30 layers, 5 sliding : 1 full, hidden 2816, 128 experts top-8 of
width 704, vocabulary 262144), the weights random bf16 words (or int4 words + scales) written straight into
GPU memory in the layout minidiff loads (gpu.py). Batch 1, canvas 256. Per expert format (bf16, int4) and
prompt length (1K, 8K):

    prefill_ms          encoding the prompt
    step_ms             one denoiser step with self-conditioning, reading the prompt's cache (median)
    sampler_ms          the sampler's own per-step work on [256, 262144] (softmax, entropy, draw, acceptance)
    commit_ms           encoding a committed canvas
    canvas_ms_steps_16  a whole canvas at 16 fixed steps, measured through sampler.generate
    tok_s_steps_16      256 / canvas time; tok_s_steps_48 from the per-step numbers (48 steps + commit)
    peak_gb             peak GPU memory held by CuPy's pool (weights + cache + work buffers)
    profile             share of a step per op (experts, head, soft embedding, attention, linears)

and the machine's two ceilings, measured in the same run: device-to-device copy bandwidth and a bf16
matmul rate, with the floor per step they imply (bytes of the weights a step must read over bandwidth,
its FLOPs over the matmul rate). Prints a table, writes JSON.

transformers beside it (`--transformers`, in a separate process after minidiff's rows, bf16, sdpa attention,
the same config with transformers' own random init): prefill, denoiser step, commit and peak memory, and
tok/s at 16 and 48 steps from the per-step numbers (16 · step + commit), the same formula as minidiff's
tok_s_steps_48. It needs a transformers with DiffusionGemma (5.17 has it).

    python tools/bench_gpu.py --json docs/bench/gpu_H100.json            # everything (about 5 minutes)
    python tools/bench_gpu.py --layers 6 --contexts 1024 --formats int4   # a quick look
    python tools/bench_gpu.py --transformers --json out.json             # and transformers on the same GPU
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cupy as cp  # noqa: E402

import minidiff  # noqa: E402
import minidiff.model  # noqa: E402
import minidiff.ops  # noqa: E402
from minidiff import gpu  # noqa: E402
from minidiff.config import parse_config  # noqa: E402
from minidiff.model import Model  # noqa: E402
from minidiff.sampler import entropy_bound_accept, sample_inverse_cdf, softmax_entropy  # noqa: E402
from minidiff.weights import expected_tensors  # noqa: E402

GROUP = 32


def release_config(layers: int) -> dict:
    kinds = (["sliding_attention"] * 5 + ["full_attention"]) * math.ceil(layers / 6)
    return {"architectures": ["DiffusionGemmaForBlockDiffusion"], "canvas_length": 256, "text_config": dict(
        vocab_size=262144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
        num_global_key_value_heads=2, sliding_window=1024, layer_types=kinds[:layers - 1] + ["full_attention"],
        num_experts=128, top_k_experts=8, moe_intermediate_size=704, max_position_embeddings=262144,
        rms_norm_eps=1e-6, final_logit_softcapping=30.0, eos_token_id=[1, 106], pad_token_id=0,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                            "rope_theta": 1000000.0}})}


def random_bf16_bits(shape, scale_exp=-6):
    """Random bf16 words: random sign and mantissa, exponent within 2^(scale_exp-2) .. 2^scale_exp."""
    words = cp.random.randint(0, 1 << 16, size=shape, dtype=cp.int32).astype(cp.uint16)
    exp = (127 + scale_exp - (words & 3)).astype(cp.uint16)          # a few exponents
    return (words & cp.uint16(0x807F)) | (exp << cp.uint16(7))


def random_weights(cfg, fmt: str) -> dict:
    """name -> device weight, as minidiff.load(device="cuda", precision="bf16") would build them."""
    out = {}
    for name, shape in expected_tensors(cfg).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, N, K = shape
            if fmt == "bf16":
                out[name] = gpu.DeviceExperts("bf16", random_bf16_bits(shape), shape, bf16_moe=True, name=name)
            else:
                words = cp.random.randint(0, 1 << 16, size=(E, N, K // 8, 2), dtype=cp.int32).astype(cp.uint16)
                words = words.view(cp.uint32).reshape(E, N, K // 8)
                scales = cp.random.uniform(0.001, 0.003, (E, N, K // GROUP)).astype(cp.float32)
                out[name] = gpu.DeviceExperts("int4", words, shape, scales, GROUP, bf16_moe=True, name=name)
        elif len(shape) == 2 and shape[0] * shape[1] >= 4096:
            out[name] = gpu.DeviceHalf(random_bf16_bits(shape), name, bf16_gemm=True)
        else:
            out[name] = cp.random.uniform(0.6, 1.4, shape).astype(cp.float32)
    return out


def timed(fn, reps=5, warm=1):
    """Median milliseconds of fn() over reps runs (device events around each)."""
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(cp.cuda.get_elapsed_time(a, b))
    return float(np.median(times))


def ceilings() -> dict:
    n = 1 << 29                                                        # 2 GiB of float32
    a, b = cp.empty(n, cp.float32), cp.empty(n, cp.float32)
    a.fill(1.0)
    ms = timed(lambda: b.__setitem__(Ellipsis, a), reps=10)
    bw = 2 * a.nbytes / (ms / 1e3)                                     # bytes read + written
    m = cp.random.standard_normal((8192, 8192)).astype(cp.float16)
    ms_mm = timed(lambda: m @ m, reps=10)
    return {"copy_gb_s": bw / 1e9, "matmul_f16_tflop_s": 2 * 8192 ** 3 / (ms_mm / 1e3) / 1e12}


def floor_ms(cfg, fmt: str, ceil: dict) -> float:
    """Bytes every step must read (experts: all of them at 2048 assignments; dense; the embedding twice:
    head and self-conditioning) over bandwidth, vs its FLOPs over the matmul rate: the larger."""
    L, H, V, E, Ie = cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size, cfg.num_experts, cfg.moe_intermediate_size
    expert_w = L * E * 3 * Ie * H
    dense_w = sum(int(np.prod(s)) for n, s in expected_tensors(cfg).items()
                  if len(s) == 2 and "embed" not in n)
    bytes_ = expert_w * (2 if fmt == "bf16" else 0.5 + 4 / GROUP) + dense_w * 2 + 2 * V * H * 2
    flops = 2 * 256 * (8 * 3 * Ie * H * L + dense_w + 2 * V * H)
    return max(bytes_ / (ceil["copy_gb_s"] * 1e9), flops / (ceil["matmul_f16_tflop_s"] * 1e12)) * 1e3


def profile_step(model, canvas, cache, sc) -> dict:
    """Milliseconds per op kind in one step (each call synchronised: the shares, not the total)."""
    names = ["experts", "tied_head", "soft_embedding", "attention", "linear"]
    spent = {n: 0.0 for n in names}
    saved = {n: getattr(minidiff.ops, n) for n in names}
    where = (minidiff.ops, minidiff.model)     # the model calls them by name; ops.mlp calls linear

    def wrap(n):
        def f(*a, **k):
            cp.cuda.Device().synchronize()
            t = time.perf_counter()
            r = saved[n](*a, **k)
            cp.cuda.Device().synchronize()
            spent[n] += (time.perf_counter() - t) * 1e3
            return r
        return f
    for n in names:
        for m in where:
            if hasattr(m, n):
                setattr(m, n, wrap(n))
    try:
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        model.denoise(canvas, cache, sc)
        cp.cuda.Device().synchronize()
        total = (time.perf_counter() - t) * 1e3
    finally:
        for n in names:
            for m in where:
                if hasattr(m, n):
                    setattr(m, n, saved[n])
    spent["other"] = total - sum(spent.values())
    return {k: round(v / total, 3) for k, v in spent.items()}


def bench(cfg, fmt: str, P: int, ceil: dict) -> dict:
    pool = cp.get_default_memory_pool()
    model = Model(cfg, random_weights(cfg, fmt), xp=cp)
    V, C = cfg.vocab_size, cfg.canvas_length
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, P)
    cache = model.encode(prompt)
    row = {"engine": "minidiff", "experts": fmt, "prompt": P}
    row["prefill_ms"] = timed(lambda: model.encode(prompt), reps=3)
    canvas = rng.integers(0, V, C)
    sc = model.denoise(canvas, cache) / np.float32(0.8)
    row["step_ms"] = timed(lambda: model.denoise(canvas, cache, sc), reps=7)

    def sampler_work():
        p, H = softmax_entropy(sc)
        sample_inverse_cdf(p, cp.asarray(rng.random(C)))
        entropy_bound_accept(H[None], 0.1)
    row["sampler_ms"] = timed(sampler_work, reps=7)
    row["commit_ms"] = timed(lambda: model.encode(canvas, cache), reps=3)

    def one_canvas():
        minidiff.sampler.generate(model, prompt, seed=0, max_new_tokens=C, max_denoising_steps=16,
                                  stability_threshold=None, confidence_threshold=None, eos_token_id=[])
    total = timed(one_canvas, reps=2)
    row["canvas_ms_steps_16"] = total - row["prefill_ms"]             # generate encodes the prompt too
    row["tok_s_steps_16"] = C / (row["canvas_ms_steps_16"] / 1e3)
    per_step = row["canvas_ms_steps_16"] / 16
    row["tok_s_steps_48"] = C / ((48 * per_step + row["commit_ms"]) / 1e3)
    row["floor_step_ms"] = floor_ms(cfg, fmt, ceil)
    row["step_over_floor"] = row["step_ms"] / row["floor_step_ms"]
    row["profile"] = profile_step(model, canvas, cache, sc)
    row["peak_gb"] = pool.total_bytes() / 1e9
    return row                                  # (the caller frees the pool once this frame is gone)


def transformers_rows(layers: int, contexts: list, device: str = "cuda", text_overrides: dict | None = None) -> list:
    """transformers' DiffusionGemma at the same config (bf16, its own random init) timed like minidiff: one
    dict a prompt length. Runs in its own process (main() starts it): torch and CuPy keep separate pools."""
    import copy
    import torch
    from transformers.models.diffusion_gemma import (DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion,
                                                     DiffusionGemmaTextConfig)
    from transformers.models.gemma4 import Gemma4VisionConfig
    torch.set_grad_enabled(False)
    c = release_config(layers)
    text = dict(c["text_config"], **(text_overrides or {}))
    vision = Gemma4VisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                                patch_size=4, position_embedding_size=16, pooling_kernel_size=2, intermediate_size=32)
    cfg = DiffusionGemmaConfig(text_config=DiffusionGemmaTextConfig(**text), vision_config=vision,
                               canvas_length=c["canvas_length"])
    cfg._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    with torch.device(device):
        model = DiffusionGemmaForBlockDiffusion(cfg).eval()
    V, C = text["vocab_size"], c["canvas_length"]
    rng = np.random.default_rng(0)

    def ms(fn, reps, prepare=lambda: None):
        """Median milliseconds of fn(prepare()) over reps runs after one warm-up; prepare is not timed."""
        times = []
        for r in range(reps + 1):
            arg = prepare()
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            fn(arg)
            if device == "cuda":
                torch.cuda.synchronize()
            if r:
                times.append((time.perf_counter() - t) * 1e3)
        return float(np.median(times))

    rows = []
    for P in contexts:
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        prompt = torch.tensor(rng.integers(0, V, P), device=device)[None]
        canvas = torch.tensor(rng.integers(0, V, C), device=device)[None]
        row = {"engine": "transformers", "experts": "bf16", "prompt": P}
        row["prefill_ms"] = ms(lambda _: model.model.encoder(input_ids=prompt, use_cache=True), 3)
        cache = model.model.encoder(input_ids=prompt, use_cache=True).past_key_values
        sc = (model(decoder_input_ids=canvas, past_key_values=cache).logits / 0.8).to(torch.bfloat16)
        row["step_ms"] = ms(lambda _: model(decoder_input_ids=canvas, past_key_values=cache,
                                            self_conditioning_logits=sc), 7)
        row["commit_ms"] = ms(lambda kv: model.model.encoder(input_ids=canvas, past_key_values=kv, use_cache=True), 3,
                              prepare=lambda: copy.deepcopy(cache))           # a commit extends its own copy
        for steps in (16, 48):
            row[f"tok_s_steps_{steps}"] = C / ((steps * row["step_ms"] + row["commit_ms"]) / 1e3)
        row["peak_gb"] = torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None
        rows.append(row)
        cache = sc = None                       # free them before the next prompt length
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--contexts", default="1024,8192")
    ap.add_argument("--formats", default="int4,bf16")
    ap.add_argument("--json", default=None)
    ap.add_argument("--transformers", action="store_true", help="also time transformers (bf16) on the same GPU")
    ap.add_argument("--transformers-worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.transformers_worker:                # the child process of --transformers: rows as JSON on stdout
        print(json.dumps(transformers_rows(args.layers, [int(p) for p in args.contexts.split(",")])))
        return
    cfg = parse_config(release_config(args.layers))
    dev = cp.cuda.runtime.getDeviceProperties(0)
    name = dev["name"].decode() if isinstance(dev["name"], bytes) else str(dev["name"])
    ceil = ceilings()
    print(f"{name}: copy {ceil['copy_gb_s']:.0f} GB/s, f16 matmul {ceil['matmul_f16_tflop_s']:.0f} TFLOP/s; "
          f"{args.layers} layers", flush=True)
    rows = []
    for fmt in args.formats.split(","):
        for P in [int(p) for p in args.contexts.split(",")]:
            rows.append(bench(cfg, fmt, P, ceil))
            cp.get_default_memory_pool().free_all_blocks()
            r = rows[-1]
            print(f"{fmt:<5} P={P:<5} prefill {r['prefill_ms']:8.1f} ms  step {r['step_ms']:7.2f} ms "
                  f"(floor {r['floor_step_ms']:.2f}, ×{r['step_over_floor']:.1f})  sampler {r['sampler_ms']:5.2f} ms  "
                  f"commit {r['commit_ms']:6.1f} ms  16 steps: {r['tok_s_steps_16']:7.0f} tok/s  "
                  f"48: {r['tok_s_steps_48']:6.0f} tok/s  peak {r['peak_gb']:5.1f} GB  profile {r['profile']}",
                  flush=True)
            save(args, name, ceil, rows)
    if args.transformers:
        cp.get_default_memory_pool().free_all_blocks()
        child = subprocess.run([sys.executable, __file__, "--transformers-worker", "--layers", str(args.layers),
                                "--contexts", args.contexts], capture_output=True, text=True)
        if child.returncode:
            print("transformers:", (child.stderr.strip().splitlines() or ["failed"])[-1], flush=True)
        else:
            for r in json.loads(child.stdout.strip().splitlines()[-1]):
                rows.append(r)
                mine = [m for m in rows if m.get("engine") != "transformers" and m["prompt"] == r["prompt"]]
                ratio = "  ".join(f"{m['experts']} ×{r['step_ms'] / m['step_ms']:.2f}" for m in mine)
                print(f"transformers bf16 P={r['prompt']:<5} prefill {r['prefill_ms']:8.1f} ms  step {r['step_ms']:7.2f} ms  "
                      f"commit {r['commit_ms']:6.1f} ms  16 steps: {r['tok_s_steps_16']:7.0f} tok/s  "
                      f"peak {r['peak_gb']:5.1f} GB  (its step / minidiff's: {ratio})", flush=True)
            save(args, name, ceil, rows)


def save(args, name, ceil, rows):
    """The JSON, rewritten after every row: a run cut short keeps what it measured."""
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": name, "layers": args.layers, "ceilings": ceil,
                                               "rows": rows, "made_by": "tools/bench_gpu.py"}, indent=1) + "\n")


if __name__ == "__main__":
    main()
