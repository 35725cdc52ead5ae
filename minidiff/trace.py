"""`minidiff trace`: export every intermediate of one input, for checking other runtimes layer by layer.

The file is a float32/int64 safetensors file in schema version 2 (docs/trace.md has every name and shape).
One trace runs, in this order:

    encoder.*        the prompt through the encoder (causal) at positions 0 … P-1
    cache.prompt.*   the KV cache it leaves
    denoiser.*       one denoising step on the canvas (no self-conditioning)
    denoiser_sc.*    (with a self-conditioning temperature T) a second step, self-conditioned on logits / T
    commit.*         the argmax of the last step committed: encoded at positions P … P+C-1
    cache.commit.*   the KV cache after the commit
    next.*           (with next-canvas ids) one denoising step on the next canvas, after the commit

Each pass records its embeddings, then per layer i: `layers.{i}.attention` (o_proj output),
`dense_mlp`, `router_ids`, `router_weights`, `experts` (each after its post-norm), `hidden` (the layer's
output), then `final_norm` (and `logits` for a denoising step). The names, in computation order, are in
the file's metadata (`order`), so `minidiff compare` can report the first tensor that goes wrong.
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

SCHEMA_VERSION = 2


class Recorder:
    """Collects tap(name, array) calls under a pass prefix, in order; a long prompt's pieces are joined."""

    def __init__(self):
        self.tensors: dict[str, list] = {}

    def tap(self, prefix: str):
        def record(name, value):
            self.tensors.setdefault(f"{prefix}.{name}", []).append(np.asarray(to_numpy(value)))
        return record

    def add(self, name: str, value):
        self.tensors[name] = [np.asarray(to_numpy(value))]

    def result(self) -> dict:
        """name -> float32 (ids: int64) array, in the order first recorded."""
        out = {}
        for name, parts in self.tensors.items():
            a = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
            ints = name.endswith(("_ids", ".ids")) or np.issubdtype(a.dtype, np.integer)
            out[name] = np.ascontiguousarray(a, dtype=np.int64 if ints else np.float32)
        return out


def trace(model, prompt_ids, canvas_ids, sc_temperature=None, next_canvas_ids=None) -> dict:
    """Every tensor of the trace schema (docs/trace.md), as NumPy arrays in computation order."""
    rec = Recorder()
    rec.add("prompt_ids", np.asarray(prompt_ids, dtype=np.int64))
    rec.add("canvas_ids", np.asarray(canvas_ids, dtype=np.int64))
    cache = model.encode(prompt_ids, tap=rec.tap("encoder"))
    _add_cache(rec, "cache.prompt", cache)

    logits = model.denoise(canvas_ids, cache, tap=rec.tap("denoiser"))
    rec.add("denoiser.logits", logits)
    if sc_temperature is not None:
        logits = model.denoise(canvas_ids, cache, logits / np.float32(sc_temperature), tap=rec.tap("denoiser_sc"))
        rec.add("denoiser_sc.logits", logits)

    committed = to_numpy(logits.argmax(axis=-1)).astype(np.int64)   # what the sampler would commit
    rec.add("commit.ids", committed)
    cache = model.encode(committed, cache, tap=rec.tap("commit"))
    _add_cache(rec, "cache.commit", cache)

    if next_canvas_ids is not None:
        rec.add("next.canvas_ids", np.asarray(next_canvas_ids, dtype=np.int64))
        rec.add("next.logits", model.denoise(next_canvas_ids, cache, tap=rec.tap("next")))
    return rec.result()


def _add_cache(rec: Recorder, prefix: str, cache) -> None:
    """Per layer: keys [S_i, nkv, hd] (normed, RoPE'd) and values [S_i, nkv, hd]; S_i = what the layer keeps."""
    for i, (k, v) in enumerate(zip(cache.keys, cache.values)):
        rec.add(f"{prefix}.layers.{i}.keys", k)
        rec.add(f"{prefix}.layers.{i}.values", v)


def add_arguments(p):
    p.add_argument("model", nargs="?", default=None, help="model folder or hub id (default: the embedded default model)")
    p.add_argument("--prompt-ids", required=True, type=int_list, help="comma-separated prompt token ids, e.g. 2,17,300")
    p.add_argument("--canvas-ids", required=True, type=int_list, help="comma-separated canvas token ids")
    p.add_argument("--self-conditioning-temperature", type=float, default=None, metavar="T",
                   help="also export a second, self-conditioned step on logits / T")
    p.add_argument("--next-canvas-ids", type=int_list, default=None,
                   help="also export a denoising step on this canvas after the commit")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                   help="cuda only: bf16 runs the tensor-core kernels (compare it against an fp32 trace)")


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


def save_tensors(out: Path, tensors: dict, meta: dict) -> None:
    """Write a safetensors file atomically (a temporary beside it, renamed when complete)."""
    from safetensors.numpy import save_file
    with Temporaries() as temps:
        tmp = temps.new(out)
        try:
            save_file(tensors, str(tmp), metadata=meta)
        except OSError as e:
            raise io_error(out, e)
        except Exception as e:   # safetensors reports I/O failures (a full disk) as its own error type
            raise MinidiffError(f"{out}: cannot write ({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})")
        temps.commit(tmp, out)


def run(args) -> int:
    import minidiff

    T = args.self_conditioning_temperature
    if T is not None and not (np.isfinite(T) and T > 0):
        raise MinidiffError(f"--self-conditioning-temperature must be > 0, got {T}")
    out = check_output_file(Path(args.out), "--out")
    model = minidiff.load(args.model, device=args.device, precision=args.precision)
    _refuse_model_file(out, model.folder)
    tensors = trace(model, args.prompt_ids, args.canvas_ids, T, args.next_canvas_ids)
    meta = {"schema": "minidiff-trace", "schema_version": str(SCHEMA_VERSION),
            "minidiff_version": minidiff.__version__, "model": str(model.folder),
            "self_conditioning_temperature": "" if T is None else repr(T),
            "order": json.dumps(list(tensors))}
    save_tensors(out, tensors, meta)
    print(json.dumps({"wrote": str(out), "schema_version": SCHEMA_VERSION, "tensors": len(tensors)}),
          file=sys.stdout)
    return 0
