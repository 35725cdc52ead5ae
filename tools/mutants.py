"""Mutation testing: would the test suite notice a plausible bug? Each mutant is one small textual patch to
`minidiff/` (a bug someone could really write: a window off by one, RMSNorm with 1 + w, the nibble order
reversed, the acceptance rule with < instead of <=, ...). For each, a scratch copy of the repository gets
the patch, the tests that should catch it run there, and the mutant is *killed* if they fail. A mutant
that survives means a class of bugs the tests cannot see: the run fails.

    python tools/mutants.py                 # every mutant, with torch if it is installed
    python tools/mutants.py --no-torch      # as on a machine without torch (oracle tests skip)
    python tools/mutants.py -k router -v    # the mutants whose name contains "router", test output shown

How to add one (docs/mutation.md): when you add a feature, add the bugs it could have to MUTANTS below:
a name, the bug class, the file, the exact text to find (it must occur once) and its replacement, and the
tests that should catch it. Run this tool: a survivor means the feature needs a better test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FORWARD = ["tests/test_golden.py", "tests/test_ops.py", "tests/test_cpu_fast.py", "tests/test_model_oracle.py"]
TRAIN = ["tests/test_train_fd.py", "tests/test_train_ops.py", "tests/test_train_layer.py", "tests/test_train_objective.py",
         "tests/test_train_forward.py",
         "tests/test_train.py"]
ORACLE = ["tests/test_trace.py", "tests/test_compare.py", "tests/test_golden.py", "tests/test_trace_oracle.py"]
SAMPLER = ["tests/test_sampler.py", "tests/test_sampler_mocks.py", "tests/test_golden_trajectory.py",
           "tests/test_generate_oracle.py", "tests/test_trajectory.py", "tests/test_sampler_minimal.py"]
FORMATS = ["tests/test_quant.py", "tests/test_cpu_fast.py", "tests/test_quant_ct.py"]
SAFETY = ["tests/test_hostile.py", "tests/test_bad_inputs.py", "tests/test_loader.py"]
CLI = ["tests/test_cli_generate.py", "tests/test_hostile.py"]
NATIVE = ["tests/test_native.py"]


@dataclass
class Mutant:
    name: str
    kind: str          # the bug class it stands for
    file: str
    find: str
    replace: str
    tests: list


M = Mutant
MUTANTS = [
    # ---------------------------------------------------------------- the forward pass
    M("rmsnorm-one-plus-w", "norm: Gemma 2/3's (1 + w) instead of Gemma 4's w", "minidiff/ops.py",
      "        y *= w\n", "        y *= 1 + w\n", FORWARD),
    M("gelu-constant", "activation: wrong GELU-tanh constant", "minidiff/ops.py",
      "    y *= 0.044715\n", "    y *= 0.04715\n", FORWARD),
    M("rope-rotate-half-sign", "RoPE: rotate_half with the wrong sign", "minidiff/ops.py",
      "xp.concatenate([-x[..., half:], x[..., :half]], axis=-1)", "xp.concatenate([x[..., half:], -x[..., :half]], axis=-1)",
      FORWARD),
    M("canvas-position-off-by-one", "positions: the canvas starts one position late", "minidiff/model.py",
      "positions = xp.arange(cache.length, cache.length + C)", "positions = xp.arange(cache.length + 1, cache.length + C + 1)",
      FORWARD),
    M("attention-scaled", "attention: 1/sqrt(d) scaling (Gemma 4 uses 1.0)", "minidiff/ops.py",
      "scores = (qg @ kt).reshape(nkv, rep, T, -1)", "scores = (qg @ kt * hd ** -0.5).reshape(nkv, rep, T, -1)",
      FORWARD),
    M("window-off-by-one", "mask: sliding window one key too wide", "minidiff/ops.py",
      "mask &= kp[None, :] > qp[:, None] - window", "mask &= kp[None, :] >= qp[:, None] - window", FORWARD),
    M("causal-excludes-self", "mask: a query does not see itself", "minidiff/ops.py",
      "mask = kp[None, :] <= qp[:, None]", "mask = kp[None, :] < qp[:, None]", FORWARD),
    M("sliding-cache-keeps-w", "cache: sliding layers keep W positions instead of W - 1", "minidiff/model.py",
      "keep = cfg.sliding_window - 1", "keep = cfg.sliding_window", FORWARD),
    M("router-no-renormalise", "router: top-k weights not renormalised", "minidiff/ops.py",
      "    top = top / top.sum(axis=-1, keepdims=True)\n", "    top = top\n", FORWARD),
    M("router-no-h-scale", "router: the H^-1/2 factor dropped", "minidiff/ops.py",
      '* w["router.scale"] * cfg.hidden_size ** -0.5', '* w["router.scale"]', FORWARD),
    M("router-no-per-expert-scale", "router: per_expert_scale dropped", "minidiff/ops.py",
      'return idx, top * w["router.per_expert_scale"][idx]', "return idx, top", FORWARD),
    M("router-reads-normed", "router: reads the normed input, not the raw residual", "minidiff/model.py",
      "idx, weight = route(xp, res, w, cfg)",
      'idx, weight = route(xp, rms_norm(xp, res, w["pre_feedforward_layernorm_2.weight"], eps), w, cfg)', FORWARD),
    M("experts-gate-up-swapped", "experts: up rows used as the gate", "minidiff/ops.py",
      "act = gelu_tanh(xp, gu[:, :ie]) * gu[:, ie:]", "act = gelu_tanh(xp, gu[:, ie:]) * gu[:, :ie]", FORWARD),
    M("experts-no-routing-weight", "experts: routing weights not applied", "minidiff/ops.py",
      "    y *= weight.reshape(-1, 1)", "    y *= 1.0", FORWARD),
    M("experts-group-start", "experts: each expert's rows start one group late (every grouped path)", "minidiff/ops.py",
      "return order, counts, xp.cumsum(counts) - counts", "return order, counts, xp.cumsum(counts) - counts[0]",
      FORWARD + NATIVE),
    M("layer-scalar-one-mode", "layer_scalar: the decoder's used in both modes", "minidiff/model.py",
      'scalar = w["encoder_layer_scalar"] if mode == "encode" else w["layer_scalar"]', 'scalar = w["layer_scalar"]',
      FORWARD),
    M("no-softcap", "head: the final softcap dropped", "minidiff/ops.py",
      "        xp.tanh(z, out=z)\n", "        z += 0\n", FORWARD),
    M("no-embed-scale", "embedding: sqrt(H) scale dropped", "minidiff/model.py",
      "return take_rows(self.embed_tokens, ids) * self.embed_scale", "return take_rows(self.embed_tokens, ids)",
      FORWARD),
    M("denoise-no-post-norm", "denoiser: the weightless norm after the input is dropped", "minidiff/model.py",
      "h = rms_norm(xp, x, eps=eps)                                          # post_norm", "h = x  # post_norm",
      FORWARD),
    M("no-v-norm", "attention: v_norm dropped", "minidiff/model.py",
      "v = rms_norm(xp, v_raw, eps=eps)", "v = v_raw", FORWARD),
    M("subnormal-flush-too-wide", "attention: the subnormal flush cuts real probabilities", "minidiff/ops.py",
      "eb[eb < -87.0] = -xp.inf", "eb[eb < -8.0] = -xp.inf", FORWARD),
    M("prefill-pieces-forget-cache", "encoder: long prompts in pieces without the cache between them",
      "minidiff/model.py", "out = self.encode(ids[s:s + self.prefill_chunk], cache, return_hidden, tap)",
      "out = self.encode(ids[s:s + self.prefill_chunk], None, return_hidden, tap)", FORWARD),
    M("bf16-buffer-shared", "weights: the bf16 fast path writes into a buffer with dirty low halves",
      "minidiff/tensors.py", 'scratch(key + "/bf16", shape, zeroed=True)', "scratch(key, shape)", FORWARD),
    M("head-block-overlap", "head: vocabulary blocks misplaced", "minidiff/ops.py",
      "out[:, v0:v0 + block] = x @ expand(embed_tokens, slice(v0, v0 + block)", "out[:, v0:v0 + block] = x @ expand(embed_tokens, slice(max(0, v0 - 1), max(0, v0 - 1) + block)",
      FORWARD),
    # ---------------------------------------------------------------- the oracle tools
    M("compare-reports-last", "compare: names the last bad tensor, not the first", "minidiff/compare.py",
      "elif first_bad is None and diverged is None:", "elif diverged is None:", ORACLE),
    M("compare-ids-as-lists", "compare: router ids compared in order (a port's tie order flagged)",
      "minidiff/compare.py", "same = (np.sort(a, axis=-1) == np.sort(b, axis=-1)).all(axis=-1)",
      "same = (a == b).all(axis=-1)", ORACLE),
    M("trace-commits-first-step", "trace: the commit takes the first step's argmax", "minidiff/trace.py",
      'rec.add("denoiser_sc.logits", logits)', 'rec.add("denoiser_sc.logits", logits); logits = rec.tensors["denoiser.logits"][0]',
      ORACLE),
    M("trace-tap-before-scalar", "trace: a layer's hidden recorded before layer_scalar", "minidiff/model.py",
      '("experts", y), ("hidden", h)):', '("experts", y), ("hidden", h / scalar)):', ORACLE),
    M("trajectory-u-float32", "trajectory: the uniforms stored in float32", "minidiff/trajectory.py",
      'dtypes = {"u": np.float64,', 'dtypes = {"u": np.float32,', ["tests/test_trajectory.py"]),
    M("reference-rope-sign", "reference ops: the plain RoPE rotates the wrong way", "minidiff/reference_ops.py",
      "out[t, :, i] = x[t, :, i] * c - x[t, :, i + half] * s", "out[t, :, i] = x[t, :, i] * c + x[t, :, i + half] * s",
      ["tests/test_reference_ops.py"]),
    M("minimal-no-renoise", "minimal sampler: keeps every sample (no renoising)", "minidiff/sampler_minimal.py",
      "canvas = np.where(accepted, sampled, noise)", "canvas = sampled", ["tests/test_sampler_minimal.py"]),
    M("gpu-plan-token", "GPU: a sorted row reads the wrong token", "minidiff/kernels/moe_experts.py",
      "return ExpertRows(order, (order // k).astype(xp.int32)", "return ExpertRows(order, (order % idx.shape[0]).astype(xp.int32)",
      ["tests/test_gpu_host.py", "tests/test_kernel_emulator.py"]),
    M("rope-tables-swapped", "RoPE: cos and sin tables swapped (model and trainer share them)", "minidiff/ops.py",
      "return xp.cos(ang).astype(dtype)[..., None, :], xp.sin(ang).astype(dtype)[..., None, :]",
      "return xp.sin(ang).astype(dtype)[..., None, :], xp.cos(ang).astype(dtype)[..., None, :]", FORWARD + TRAIN),
    M("cache-unverified", "kernel cache: a library loaded because it exists, not because minidiff built it",
      "minidiff/kernels/lowbit_matmul.py", "        if not _verified(path):", "        if not path.exists():",
      ["tests/test_kernel_cache.py"]),
    M("cache-relative-xdg", "kernel cache: a relative XDG_CACHE_HOME used (a checkout's ./cache)",
      "minidiff/kernels/lowbit_matmul.py", "    if not os.path.isabs(base):", "    if not base:", ["tests/test_kernel_cache.py"]),
    M("cache-no-smoke-test", "kernel cache: whatever the compiler wrote is cached", "minidiff/kernels/lowbit_matmul.py",
      'if smoke.stdout.strip() == "ok" and digest:', "if digest:", ["tests/test_kernel_cache.py"]),
    M("cache-open-folder-kept", "kernel cache: what a folder open to others held is trusted",
      "minidiff/kernels/lowbit_matmul.py", "                    old.unlink()\n", "                    pass\n",
      ["tests/test_kernel_cache.py"]),
    M("compare-vacuous-pass", "compare: a pass when only input ids were compared", "minidiff/compare.py",
      '"ok": all(r["ok"] for r in rows) and any(not INPUTS.search(r["name"]) for r in rows)}',
      '"ok": all(r["ok"] for r in rows) and bool(rows)}', ["tests/test_compare.py"]),
    M("compare-schema-unchecked", "compare: traces of two schema versions compared name by name",
      "minidiff/compare.py", "    if va is not None and vb is not None and va != vb:", "    if False:",
      ["tests/test_compare.py"]),
    M("loader-no-cpu-kernel", "loader: the CPU kernel never bound to 4-bit weights (silently slow)", "minidiff/loader.py",
      "            lowbit_matmul.bind(w)\n", "            pass\n", NATIVE),
    M("checkpoint-dtype-ignored", "config: the checkpoint's dtype not read (bf16 self-conditioning rounding lost)",
      "minidiff/config.py", "checkpoint_dtype=next(", "checkpoint_dtype=None and next(", SAMPLER),
    M("kernel-lane-group", "GPU kernel (as replayed on the CPU): every lane group loads the warp's first weight "
      "row, the bug the first GPU run found", "minidiff/kernels/moe_experts_emulator.py", "    f += g\n", "",
      ["tests/test_kernel_emulator.py"]),
    M("resume-other-data", "training: --resume goes on with other pairs than the run's (no exact resume)",
      "minidiff/train/trainer.py", 'if resume and meta.get("data_sha256", fingerprint) != fingerprint:', "if False:",
      TRAIN),
    M("pairs-size-cap", "training: a pairs file is read whole, however large it unzips (a gzip bomb)",
      "minidiff/train/trainer.py", ".read(MAX_PAIRS_BYTES + 1)", ".read()", ["tests/test_train.py"]),
    M("head-loss-last-block", "training: the head in blocks of rows keeps only the last block's loss",
      "minidiff/train/objective.py", "        losses.append(block_loss)", "        losses = [block_loss]", TRAIN),
    M("rmsnorm-backward-no-projection", "training: RMSNorm's backward without the normalisation term",
      "minidiff/train/ops.py", "dx = r * (dn - n * xp.mean(dn * n, axis=-1, keepdims=True))", "dx = r * dn", TRAIN),
    M("decoder-grad-stops-at-cache", "training: the denoiser's gradient does not reach the encoder's cache",
      "minidiff/train/objective.py", "        dkeys[i] += dpk\n", "", TRAIN),
    M("training-reads-padding", "training: the encoder loss counts the padding of shorter examples",
      "minidiff/train/objective.py", "pairs = xp.arange(S)[None, :] < (batch.lengths - 1)[:, None]",
      "pairs = xp.arange(S)[None, :] < (S - 1 + 0 * batch.lengths)[:, None]", TRAIN),
    M("training-window-off-by-one", "training: a sliding layer's canvas reads one cache position too many",
      "minidiff/train/objective.py", "ok &= j >= starts[:, None] - (cfg.sliding_window - 1)",
      "ok &= j >= starts[:, None] - cfg.sliding_window", TRAIN),
    M("training-canvas-context-of-the-last-row", "training: every canvas of a batch reads the context of the latest one",
      "minidiff/train/objective.py", "ok = j < starts[:, None]", "ok = j < starts.max()", TRAIN),
    M("sitting-ends-without-checkpoint", "training: a sitting ended by the clock keeps no checkpoint",
      "minidiff/train/trainer.py", "if step + 1 == end or (step + 1) % settings.save_every == 0 or out_of_time:",
      "if step + 1 == end or (step + 1) % settings.save_every == 0:", TRAIN),
    M("template-keeps-thoughts", "chat: the default template keeps an earlier answer's thoughts",
      "minidiff/default_model/chat_template.jinja", "piece.split('<|channel>')[0]", "piece", ["tests/test_chat.py"]),
    M("adamw-no-bias-correction", "training: AdamW without bias correction", "minidiff/train/trainer.py",
      "m_hat, v_hat = m / (1 - b1 ** (step + 1)), v / (1 - b2 ** (step + 1))", "m_hat, v_hat = m, v", TRAIN),
    M("resume-reseeds", "training: a resumed run draws from a fresh generator", "minidiff/train/trainer.py",
      '        rng.bit_generator.state = meta["rng"]\n', "", TRAIN),
    M("portable-rng-half-dropped", "portable randomness: the buffered 32-bit half discarded",
      "minidiff/portable_rng.py", "        self.half = x >> 32\n", "        self.half = None\n",
      ["tests/test_portable_rng.py", "tests/test_trajectory.py"]),
    M("portable-rng-no-rejection", "portable randomness: Lemire without the rejection step",
      "minidiff/portable_rng.py", "while (m & M32) < threshold:", "while False:", ["tests/test_portable_rng.py"]),
    # ---------------------------------------------------------------- the sampler
    M("accept-strict", "acceptance: < instead of <= at the entropy bound", "minidiff/sampler.py",
      "keep_sorted = (c - s) <= xp.float32(bound)", "keep_sorted = (c - s) < xp.float32(bound)", SAMPLER),
    M("accept-inclusive-sum", "acceptance: inclusive instead of exclusive prefix sum", "minidiff/sampler.py",
      "keep_sorted = (c - s) <= xp.float32(bound)", "keep_sorted = c <= xp.float32(bound)", SAMPLER),
    M("temperature-reversed", "temperature: schedule runs backwards", "minidiff/sampler.py",
      "(np.float32(n) / np.float32(N))", "(np.float32(N - n + 1) / np.float32(N))", SAMPLER),
    M("draw-order-swapped", "randomness: noise drawn before the uniforms", "minidiff/sampler.py",
      "        u = rng.random((B, C))                              # draw: uniforms for the categorical sample\n"
      "        noise = rng.integers(0, V, size=(B, C))             # draw: renoising ids for every position\n",
      "        noise = rng.integers(0, V, size=(B, C))\n        u = rng.random((B, C))\n", SAMPLER),
    M("sc-not-rounded", "self-conditioning: bf16 checkpoints' SC logits not rounded to bf16", "minidiff/sampler.py",
      'return round_bf16 if kind == "bfloat16" else (lambda z: z)', "return (lambda z: z)", SAMPLER),
    M("frozen-rows-move", "stopping: a finished row's canvas keeps changing", "minidiff/sampler.py",
      "next_canvas[done] = canvas[done]", "next_canvas = next_canvas", SAMPLER),
    M("confidence-max", "stopping: max entropy instead of mean", "minidiff/sampler.py",
      "(H.mean(axis=-1) < np.float32(cfg.confidence_threshold))",
      "(H.max(axis=-1) < np.float32(cfg.confidence_threshold))", SAMPLER),
    M("stability-any", "stopping: stable if any earlier argmax matches", "minidiff/sampler.py",
      "stable = (history == argmax[None]).all(axis=(0, 2))",
      "stable = (history == argmax[None]).any(axis=(0, 2))", SAMPLER),
    M("eos-dropped", "stop ids: the stop id itself replaced by pad", "minidiff/sampler.py",
      "out[(seen > 0) & ~((seen == 1) & is_eos)] = pad", "out[seen > 0] = pad", SAMPLER),
    M("commit-sample", "commit: the last sample instead of the argmax", "minidiff/sampler.py",
      "    return argmax, steps\n", "    return canvas, steps\n", SAMPLER),
    M("infill-not-held", "infill: held tokens not re-imposed on the next canvas", "minidiff/sampler.py",
      "next_canvas = np.where(held, hold, np.where(accepted, sampled, noise))",
      "next_canvas = np.where(accepted, sampled, noise)", SAMPLER),
    M("passes-count-all", "reporting: frozen rows counted as forward passes", "minidiff/sampler.py",
      "passes += ~(done | finished)", "passes += 1", SAMPLER),
    M("bound-hard-coded", "acceptance: the configured entropy bound ignored", "minidiff/sampler.py",
      "accepted = entropy_bound_accept(H, cfg.entropy_bound)", "accepted = entropy_bound_accept(H, 0.1)",
      SAMPLER),
    M("entropy-sign", "entropy: log-softmax without the log-sum", "minidiff/sampler.py",
      "        d -= xp.log(s)                                    # log-softmax\n", "", SAMPLER),
    M("cdf-float32", "sampling: the CDF accumulated in float32", "minidiff/sampler.py",
      "cdf = pb.astype(xp.float64)", "cdf = pb.astype(xp.float32)", SAMPLER),
    # ---------------------------------------------------------------- the formats
    M("int4-nibbles-reversed", "int4: nibble order reversed in a word", "minidiff/formats.py",
      "    u = xp.ascontiguousarray(packed).view(xp.uint32)[..., None]        # [..., words, 1]\n"
      "    shifts = xp.arange(0, 32, 4, dtype=xp.uint32)\n",
      "    u = xp.ascontiguousarray(packed).view(xp.uint32)[..., None]        # [..., words, 1]\n"
      "    shifts = xp.arange(28, -4, -4, dtype=xp.uint32)\n", FORMATS),
    M("int4-fast-offset", "int4: the fast path's code offset off by one", "minidiff/formats.py",
      "        q -= INT4_OFFSET", "        q -= 7", FORMATS),
    M("int4-fast-planes-swapped", "int4: the fast path puts the high nibble first", "minidiff/formats.py",
      "for plane, shift in ((0, 0), (1, 4)):", "for plane, shift in ((0, 4), (1, 0)):", FORMATS),
    M("nvfp4-nibbles-swapped", "NVFP4: the even input in the high nibble", "minidiff/formats.py",
      "np.stack([packed & 0xF, packed >> 4], axis=-1)", "np.stack([packed >> 4, packed & 0xF], axis=-1)", FORMATS),
    M("e4m3-bias", "FP8 E4M3: exponent bias 8", "minidiff/formats.py",
      "(1 + m / 8.0) * 2.0 ** (e - 7.0)", "(1 + m / 8.0) * 2.0 ** (e - 8.0)", FORMATS),
    M("fp4-table", "FP4 E2M1: a wrong magnitude", "minidiff/formats.py",
      "[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]", "[0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 6.0]", FORMATS),
    M("nvfp4-scale-convention", "NVFP4: compressed-tensors' global scale multiplied, not divided", "minidiff/formats.py",
      "    s = e4m3_to_f32(scale_bits)                                                # [out, in/16]\n"
      "    eff = s / np.float32(global_scale)",
      "    s = e4m3_to_f32(scale_bits)                                                # [out, in/16]\n"
      "    eff = s * np.float32(global_scale)", FORMATS),
    # ---------------------------------------------------------------- the CPU kernel for 4-bit experts
    M("native-nibble-lanes", "CPU kernel: the high nibble taken as the even input", "minidiff/kernels/lowbit_matmul.c",
      "shift = {0, 8, 16, 24, 0, 8, 16, 24, 4, 12, 20, 28, 4, 12, 20, 28}",
      "shift = {4, 12, 20, 28, 4, 12, 20, 28, 0, 8, 16, 24, 0, 8, 16, 24}", NATIVE),
    M("native-int4-offset", "CPU kernel: int4 code offset off by one", "minidiff/kernels/lowbit_matmul.c",
      "__builtin_convertvector(q - 8, v16)", "__builtin_convertvector(q - 7, v16)", NATIVE),
    M("native-fp4-magnitude", "CPU kernel: FP4 normal numbers twice too large", "minidiff/kernels/lowbit_matmul.c",
      "(2 + m) << e, v16) * 0.25f", "(2 + m) << e, v16) * 0.5f", NATIVE),
    M("native-fp4-sign", "CPU kernel: FP4 sign read from the wrong bit", "minidiff/kernels/lowbit_matmul.c",
      "(q >> 3) << 31", "(q >> 2) << 31", NATIVE),
    M("native-scale-group", "CPU kernel: inputs scaled by the next group's scale", "minidiff/kernels/lowbit_matmul.c",
      "group_scale(f, m, row, j / (f->group / 2))", "group_scale(f, m, row, (j + 8) / (f->group / 2) % (f->k / f->group))", NATIVE),
    M("native-no-padding", "CPU kernel: expert runs not padded to the 4-token tile", "minidiff/kernels/lowbit_matmul.py",
      "padded = -(-counts // 4) * 4", "padded = counts + 0", NATIVE),
    M("native-column-order", "CPU kernel: inputs passed in their own order, not the kernel's", "minidiff/kernels/lowbit_matmul.py",
      "out[at, :self.k // 2] = a[:, 0::2]", "out[at, :self.k // 2] = a[:, 1::2]", NATIVE),
    M("bf16-truncate", "bf16: narrowing truncates instead of rounding to nearest even", "minidiff/tensors.py",
      "rounded = u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))", "rounded = u", FORMATS + ["tests/test_loader.py"]),
    # ---------------------------------------------------------------- untrusted input and the command line
    M("path-escape", "security: links out of the folder followed", "minidiff/folder.py",
      "if not any(real == d or d in real.parents for d in self.inside):", "if False:", SAFETY),
    M("dotdot-names", "security: '..' in an index's file names accepted", "minidiff/folder.py",
      'if p.is_absolute() or name.startswith(("/", "\\\\")) or ".." in p.parts', 'if p.is_absolute() or False',
      SAFETY),
    M("pipes-opened", "security: non-regular files opened", "minidiff/folder.py",
      "if not stat.S_ISREG(st.st_mode):", "if False:", SAFETY),
    M("overlap-accepted", "safetensors: overlapping tensors accepted", "minidiff/weights.py",
      "if b1 < e0:", "if False:", SAFETY),
    M("shape-floats", "safetensors: float shapes accepted", "minidiff/weights.py",
      "all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)", "all(0 <= d <= MAX_DIM for d in shape)", SAFETY),
    M("config-no-upper-bound", "config: sizes without an upper bound", "minidiff/config.py",
      'n_layers = _int(tc, "num_hidden_layers", w, hi=L["layers"])', 'n_layers = _int(tc, "num_hidden_layers", w)',
      SAFETY),
    M("nan-logits-pass", "garbage: NaN logits returned", "minidiff/model.py",
      "if not bool(xp.isfinite(logits).all()):", "if False:", SAFETY),
    M("quantize-nan", "quantize: NaN weights quantized", "minidiff/quantize.py",
      "if not np.isfinite(W).all():", "if False:", SAFETY),
    M("trace-overwrites-model", "trace: --out may be a file of the model", "minidiff/trace.py",
      "if os.path.samefile(entry.path, out):", "if False:", SAFETY),
    M("terminal-escapes-raw", "terminal: control characters written raw", "minidiff/cli_generate.py",
      'if (keep_lines and ch in "\\n\\t") or unicodedata.category(ch) not in ("Cc", "Cf", "Cs"):', "if True:",
      CLI),
    M("argv-not-utf8", "CLI: invalid UTF-8 passed on to the tokenizer", "minidiff/cli.py",
      '        text.encode("utf-8")\n', '        text.encode("utf-8", "surrogateescape")\n', CLI),
    M("template-fallback", "chat: a broken template silently becomes a raw prompt", "minidiff/cli_generate.py",
      "            self.template = ChatTemplate.from_folder(self.model.folder)\n",
      "            try:\n                self.template = ChatTemplate.from_folder(self.model.folder)\n"
      "            except MinidiffError:\n                self.template = None\n", CLI),
    M("regex-unchecked", "security: backtracking regexes compiled as they are", "minidiff/schemes.py",
      "if len(pattern) > MAX_PATTERN or risky(sre.parse(pattern), False) or unbounded > 5:", "if False:", SAFETY
      + ["tests/test_quant.py"]),
]

# Equivalent mutants are left out of MUTANTS on purpose; each with why no test can kill it:
EQUIVALENT = {
    "RoPE angles of every position shifted by one": "attention sees only relative positions: q·k is unchanged",
    "the soft embedding not scaled by sqrt(H)": "the self-conditioning pre_norm (RMSNorm) right after cancels any "
                                                "scale, up to eps",
    "inverse-CDF `<` instead of `<=`": "differs only when a uniform lands exactly on a float64 CDF value",
    "JSON parse accepting 1e400": "config.py's own finiteness check refuses the value with the same error",
}


def scratch_copy() -> Path:
    d = Path(tempfile.mkdtemp(prefix="minidiff-mutants-"))
    for part in ("minidiff", "tests", "tools", "pyproject.toml"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, d / part, ignore=shutil.ignore_patterns("__pycache__", ".hypothesis"))
        else:
            shutil.copy(src, d / part)
    return d


def no_torch_dir(base: Path) -> Path:
    """A folder that, first on sys.path, makes `import torch` / `import transformers` fail: as without torch."""
    d = base / "_no_torch"
    d.mkdir(exist_ok=True)
    for mod in ("torch", "transformers", "compressed_tensors"):
        (d / f"{mod}.py").write_text(f"raise ModuleNotFoundError('hidden by tools/mutants.py --no-torch', name={mod!r})\n")
    return d


def run_tests(work: Path, tests: list, no_torch: bool, timeout: int, verbose: bool) -> tuple[bool, float, str]:
    tests = [t for t in tests if (work / t.split("::")[0]).exists()]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        ([str(no_torch_dir(work))] if no_torch else []) + [str(work)]), PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           "--hypothesis-seed=0", *tests]
    t = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=timeout)
        failed, out = p.returncode not in (0, 5), p.stdout[-3000:] + p.stderr[-2000:]
    except subprocess.TimeoutExpired:
        failed, out = True, "timed out (counted as killed: the suite notices a hang)"
    if verbose:
        print(out)
    return failed, time.monotonic() - t, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-torch", action="store_true", help="hide torch/transformers: the torch-free suite")
    ap.add_argument("-k", default="", help="only mutants whose name contains this")
    ap.add_argument("--timeout", type=int, default=180, help="seconds per mutant (a hang counts as killed)")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    chosen = [m for m in MUTANTS if args.k in m.name]
    counts = {m.name: (ROOT / m.file).read_text().count(m.find) for m in chosen}
    stale = [f"{m.name}: its text occurs {counts[m.name]} times in {m.file}" for m in chosen if counts[m.name] != 1]
    if stale:                                   # before any test runs: a stale mutant is a quick, clear failure
        print("\n".join(stale) + "\nfix these mutants (each text must occur once)")
        return 2
    work = scratch_copy()
    try:
        # the unmutated code must pass every test set used below (here, with or without torch): then a
        # failure under a mutant, collection errors included, can only come from the mutation
        for tests in {tuple(m.tests) for m in chosen}:
            failed, secs, out = run_tests(work, list(tests), args.no_torch, args.timeout, False)
            if failed:
                print(f"the unmutated code fails {' '.join(tests)}: fix it before mutating\n" + out)
                return 2
        rows, survivors = [], []
        for m in chosen:
            path = work / m.file
            original = path.read_text()
            if original.count(m.find) != 1:
                print(f"{m.name}: its text occurs {original.count(m.find)} times in {m.file}; fix the mutant")
                return 2
            path.write_text(original.replace(m.find, m.replace))
            try:
                killed, secs, out = run_tests(work, m.tests, args.no_torch, args.timeout, args.verbose)
            finally:
                path.write_text(original)
            rows.append(dict(name=m.name, kind=m.kind, killed=killed, seconds=round(secs, 1)))
            print(f"{'killed ' if killed else 'SURVIVED'} {secs:6.1f}s  {m.name:30s} {m.kind}", flush=True)
            if not killed:
                survivors.append(m.name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    n = len(rows)
    print(f"\n{n - len(survivors)} of {n} mutants killed ({'without' if args.no_torch else 'with'} torch)"
          + (f"; survivors: {', '.join(survivors)}" if survivors else ""))
    if args.json:
        Path(args.json).write_text(json.dumps({"no_torch": args.no_torch, "mutants": rows,
                                               "equivalent_left_out": EQUIVALENT}, indent=1))
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
