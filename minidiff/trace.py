"""`minidiff trace`: export the reference tensors of one input for checking other runtimes.

Writes a float32 safetensors file (schema in docs/trace.md):
    prompt_ids [P] int64, canvas_ids [C] int64
    encoder.embeddings [P, H]          scaled token embeddings
    encoder.hidden_states [L, P, H]    the residual stream after each layer (before the final norm)
    encoder.final_norm [P, H]          final RMSNorm of the last layer (= transformers' last hidden state)
    denoiser.logits [C, V]             softcapped logits of the canvas, no self-conditioning
    denoiser.sc_logits [C, V]          (with --self-conditioning-temperature T) logits of a second step
                                       self-conditioned on denoiser.logits / T
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

from .backend import to_numpy
from .cli import int_list
from .errors import MinidiffError
from .output import Temporaries, check_output_file, io_error
from .model import rms_norm


def trace(model, prompt_ids, canvas_ids, sc_temperature=None) -> dict:
    """The tensors of the trace schema, as float32/int64 NumPy arrays."""
    xp = model.xp
    cache, hidden = model.encode(prompt_ids, return_hidden=True)
    out = {
        "prompt_ids": np.asarray(prompt_ids, dtype=np.int64),
        "canvas_ids": np.asarray(canvas_ids, dtype=np.int64),
        "encoder.embeddings": model.embed(xp.asarray(np.asarray(prompt_ids))),
        "encoder.hidden_states": hidden,
        "encoder.final_norm": rms_norm(xp, hidden[-1], model.final_norm, model.config.rms_norm_eps),
    }
    logits = model.denoise(canvas_ids, cache)
    out["denoiser.logits"] = logits
    if sc_temperature is not None:
        out["denoiser.sc_logits"] = model.denoise(canvas_ids, cache, logits / np.float32(sc_temperature))
    return {k: np.ascontiguousarray(to_numpy(v)).astype(np.int64 if k.endswith("_ids") else np.float32)
            for k, v in out.items()}


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: the embedded tiny model)")
    p.add_argument("--prompt-ids", required=True, type=int_list, help="comma-separated prompt token ids, e.g. 2,17,300")
    p.add_argument("--canvas-ids", required=True, type=int_list, help="comma-separated canvas token ids")
    p.add_argument("--self-conditioning-temperature", type=float, default=None, metavar="T",
                   help="also export a second, self-conditioned step on logits / T")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def _refuse_model_file(out: Path, folder) -> None:
    """--out must not replace a file of the model it reads (its weights, its config, …)."""
    if not out.exists() or folder is None:
        return
    for entry in os.scandir(folder):
        try:
            if os.path.samefile(entry.path, out):
                raise MinidiffError(f"--out {out}: is {entry.name} of the model being traced; choose another file")
        except OSError:
            continue


def run(args) -> int:
    import minidiff
    from safetensors.numpy import save_file

    prompt, canvas = args.prompt_ids, args.canvas_ids
    T = args.self_conditioning_temperature
    if T is not None and not (np.isfinite(T) and T > 0):
        raise MinidiffError(f"--self-conditioning-temperature must be > 0, got {T}")
    out = check_output_file(Path(args.out), "--out")
    model = minidiff.load(args.model, device=args.device)
    _refuse_model_file(out, model.folder)
    tensors = trace(model, prompt, canvas, T)
    meta = {"minidiff_version": minidiff.__version__, "model": str(model.folder),
            "self_conditioning_temperature": "" if T is None else repr(T),
            "schema": "docs/trace.md"}
    with Temporaries() as temps:
        tmp = temps.new(out)
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except OSError as e:
            raise io_error(out, e)
        except Exception as e:   # safetensors reports I/O failures (a full disk) as its own error type
            raise MinidiffError(f"{out}: cannot write ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})")
        temps.commit(tmp, out)
    summary = {k: list(v.shape) for k, v in tensors.items()}
    print(json.dumps({"wrote": str(out), "tensors": summary}), file=sys.stdout)
    return 0
