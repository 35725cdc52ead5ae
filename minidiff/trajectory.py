"""`minidiff generate --trajectory F.safetensors`: every step of a generation, for step-by-step replay.

A `Trajectory` is a `generate` callback that keeps what each step drew and decided; `save` writes it as a
safetensors file (schema in docs/trace.md#trajectories). With it, another runtime can teacher-force: take
step i's input canvas (and, with `--trajectory-logits`, minidiff's logits) from the file, run its own
step, and find the first step and position where it disagrees, instead of a divergence much later.

    canvases.init       [K, B, C] int64    each canvas's random draw (docs/randomness.md)
    canvases.committed  [K, B, C] int64    what was committed (after stop-id padding)
    canvases.steps      [K]       int64    executed denoising steps of each canvas
    steps.*             [S, B, C]          per executed step, S = sum of canvases.steps:
        canvas (input), u (float64 uniforms), noise (renoising ids), sampled, argmax, entropy (float32),
        accepted (bool), next_canvas; steps.done / steps.active [S, B] bool; steps.canvas_index,
        steps.step [S] int64; steps.temperature [S] float32 (NaN: no temperature schedule);
        steps.logits [S, B, C, V] float32 tempered logits (only when asked for: S·B·C·V·4 bytes)
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from .backend import to_numpy

SCHEMA_VERSION = 1
STEP_FIELDS = ("canvas", "u", "noise", "sampled", "argmax", "entropy", "accepted", "next_canvas", "done", "active")


class Trajectory:
    """A `generate` callback recording every step and commit (NumPy copies)."""

    def __init__(self, keep_logits: bool = False):
        self.keep_logits = keep_logits
        self.steps = {name: [] for name in STEP_FIELDS + ("canvas_index", "step", "temperature")}
        self.logits, self.init, self.committed = [], [], []

    def __call__(self, e) -> None:
        if e.kind == "commit":
            self.committed.append(np.array(e.tokens, dtype=np.int64))
            return
        if e.init is not None:
            self.init.append(np.array(e.init, dtype=np.int64))
        for name in STEP_FIELDS:
            self.steps[name].append(np.array(getattr(e, name)))
        self.steps["canvas_index"].append(e.canvas_index)
        self.steps["step"].append(e.step)
        self.steps["temperature"].append(np.nan if e.temperature is None else e.temperature)
        if self.keep_logits:
            self.logits.append(np.array(to_numpy(e.logits), dtype=np.float32))

    def tensors(self, prompts) -> dict:
        """The file's tensors; `prompts` are the prompt ids of each row (right-padded with -1 in the file)."""
        P = max(len(p) for p in prompts)
        prompt_ids = np.full((len(prompts), P), -1, dtype=np.int64)
        for b, p in enumerate(prompts):
            prompt_ids[b, :len(p)] = p
        steps_per_canvas = np.bincount(np.asarray(self.steps["canvas_index"], dtype=np.int64),
                                       minlength=len(self.init))
        out = {"prompt_ids": prompt_ids, "canvases.init": np.stack(self.init),
               "canvases.committed": np.stack(self.committed[:len(self.init)]),
               "canvases.steps": steps_per_canvas.astype(np.int64)}
        dtypes = {"u": np.float64, "entropy": np.float32, "accepted": np.bool_, "done": np.bool_,
                  "active": np.bool_, "canvas_index": np.int64, "step": np.int64, "temperature": np.float32}
        for name, parts in self.steps.items():
            out[f"steps.{name}"] = np.ascontiguousarray(np.stack([np.asarray(p) for p in parts]),
                                                        dtype=dtypes.get(name, np.int64))
        if self.keep_logits:
            out["steps.logits"] = np.ascontiguousarray(np.stack(self.logits))
        return out


def metadata(result, model) -> dict:
    """The file's metadata: how to replay it (strings only)."""
    from . import __version__
    cfg = {k: v for k, v in dataclasses.asdict(result.config).items()}
    return {"schema": "minidiff-trajectory", "schema_version": str(SCHEMA_VERSION),
            "minidiff_version": __version__, "model": str(model.folder),
            "seed": "" if result.seed is None else str(result.seed),
            "vocab_size": str(model.config.vocab_size), "canvas_length": str(model.config.canvas_length),
            "generation_config": json.dumps(cfg)}
