"""`minidiff quantize SRC DST`: a bf16/fp32 checkpoint -> an int4 (W4A16) checkpoint.

The output is a compressed-tensors `pack-quantized` checkpoint (the bit layout is written out in
`minidiff/formats.py`): symmetric int4, one scale per group of `--group-size` inputs, in the source's
float dtype (bf16 for the release). `--scope experts` quantizes the routed experts only;
`--scope all-linear` (the default) also the attention projections and the dense MLP. Never
quantized: the tied embedding / lm_head, the router, the self-conditioning MLP (vLLM builds it as a
plain Linear), norms and scalars, and the vision tower; they are copied bit for bit. The fused experts
are written unfused, `…experts.{e}.{gate,up,down}_proj.weight_packed|weight_scale|weight_shape`.

`--format nvfp4` writes compressed-tensors `nvfp4-pack-quantized` (NVFP4A16) instead, and
`--format nvfp4-modelopt` the ModelOpt layout with `hf_quant_config.json`.

Streaming: one output shard per source shard, written tensor by tensor (the fused experts expert by
expert) straight into a pre-sized file whose header is computed from the shapes up front, so memory
stays at one tensor (one expert) plus the page cache, whatever the size of the model. Each shard is
written as `NAME.partial` and renamed when complete; the index and then `config.json` are written
last, so an interrupted run never leaves a folder that loads.

A group size that does not divide a projection's input width (the release's down projections have
2112 and 704 inputs: 128 divides neither) is halved for that projection until it does (64), and the
config gets one config group per group size. A projection that cannot be quantized at all stays in
the source dtype and is listed in `ignore`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from . import formats as Q
from .config import read_config_json
from .errors import MinidiffError
from .folder import ModelFolder
from .output import Temporaries, destination_lock, temp_path, write_file
from .tensors import f32_to_bf16_bits, to_float32
from .weights import DTYPES, open_checkpoint

FORMATS = ("int4", "nvfp4", "nvfp4-modelopt")
# not copied: what quantize writes itself, and a training run's optimizer state (the copy is a new model)
SUPPORT_SKIP = {"config.json", "model.safetensors.index.json", "hf_quant_config.json", "trainer_state.json"}
CT_VERSION = "0.20.0"  # the compressed-tensors release whose config layout we write

# The quantizable projections: (kind, regex over dense tensor names, group name, module suffix).
# Module names are what compressed-tensors targets: the dense name without `.weight`, and, for the
# fused experts, one module per expert and projection.
LINEAR_RE = re.compile(r"^(?P<m>model\.decoder\.layers\.\d+\.(?P<p>self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj))\.weight$")
EXPERT_RE = re.compile(r"^(?P<m>model\.decoder\.layers\.\d+\.experts)\.(?P<p>gate_up_proj|down_proj)$")


def target_regex(proj: str) -> str:
    """compressed-tensors target of one projection kind ("self_attn.q_proj", "experts.gate_proj")."""
    if proj.startswith("experts."):
        return r"re:.*\.experts\.\d+\." + proj.split(".", 1)[1] + "$"
    return "re:.*\\." + proj.replace(".", "\\.") + "$"


DENSE_LINEARS = [  # Linear modules never quantized: listed in `ignore`
    "lm_head", r"re:.*\.router\.proj$", r"re:.*self_conditioning\.(gate|up|down)_proj$",
    r"re:.*vision_tower.*", r"re:.*embed_vision.*",
]
MODELOPT_EXCLUDE = ["lm_head", "*router*", "*self_conditioning*", "*vision_tower*", "*embed_vision*"]


# ------------------------------------------------------------------------------------------------
# CLI

def add_quantize_arguments(p):
    p.add_argument("src", help="source checkpoint: a folder (bf16/fp16/fp32 safetensors + config.json), a hub id, "
                               "or 'default' (the embedded default model)")
    p.add_argument("dst", help="output folder (created)")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=32,
                   help="int4: inputs per scale (default 32); NVFP4 always uses 16")
    p.add_argument("--scope", choices=("experts", "all-linear"), default="all-linear",
                   help="quantize the routed experts only, or also attention and the dense MLP (default)")
    p.add_argument("--format", choices=FORMATS, default="int4",
                   help="int4 = compressed-tensors pack-quantized W4A16 (default); nvfp4 = compressed-tensors "
                        "nvfp4-pack-quantized; nvfp4-modelopt = NVIDIA ModelOpt layout")
    p.add_argument("--force", action="store_true", help="replace the checkpoint files already in DST")


def run_quantize(args) -> int:
    from .loader import resolve
    convert(resolve(args.src), args.dst, group_size=args.group_size, scope=args.scope, fmt=args.format,
            force=args.force, progress=Progress(sys.stderr))
    return 0


# ------------------------------------------------------------------------------------------------
# planning: what becomes of each source tensor

class Job:
    """One source tensor and what to do with it: copy it, or quantize it as `module` (2-D) or as
    E per-expert modules (3-D fused experts)."""

    def __init__(self, name, dtype, shape, action, projs=(), group=None):
        self.name, self.dtype, self.shape, self.action = name, dtype, tuple(shape), action
        self.projs = projs      # [(module suffix or full module name, row slice)] for quantized jobs
        self.group = group      # {proj kind: effective group size}


def _effective_group(n: int, g: int, fmt: str) -> int | None:
    """The group size used for a projection with n inputs, or None if it cannot be quantized."""
    if fmt != "int4":
        return Q.NVFP4_GROUP if n % Q.NVFP4_GROUP == 0 else None
    while g >= 8:
        if n % g == 0:
            return g
        g //= 2
    return None


def conversion_jobs(ckpt, scope: str, group_size: int, fmt: str):
    """-> (jobs per source file, {proj kind: group size or None}, notes)."""
    kinds: dict[str, set] = {}  # proj kind -> set of input widths
    items = []
    for name in ckpt.names():
        shape, dtype = tuple(ckpt.shape(name)), ckpt.dtype(name)
        m = LINEAR_RE.match(name)
        if m and len(shape) == 2 and scope == "all-linear":
            items.append((name, dtype, shape, "linear", m))
            kinds.setdefault(m["p"], set()).add(shape[1])
            continue
        m = EXPERT_RE.match(name)
        if m and len(shape) == 3:
            items.append((name, dtype, shape, "experts", m))
            for p in (("gate_proj", "up_proj") if m["p"] == "gate_up_proj" else ("down_proj",)):
                kinds.setdefault("experts." + p, set()).add(shape[2])
            continue
        items.append((name, dtype, shape, "copy", None))
    group = {}
    notes = []
    for kind, widths in sorted(kinds.items()):
        gs = [_effective_group(n, group_size, fmt) for n in sorted(widths)]
        g = None if None in gs else min(gs)
        group[kind] = g
        if g is None:
            notes.append(f"note: {kind} (inputs {sorted(widths)}) cannot be quantized as {fmt}: kept in the source dtype")
        elif fmt == "int4" and g != group_size:
            notes.append(f"note: {kind} has {sorted(widths)} inputs, not a multiple of {group_size}: group size {g}")
    jobs: dict[str, list[Job]] = {}
    for name, dtype, shape, what, m in items:
        if what != "copy":
            ps = ["experts.gate_proj", "experts.up_proj"] if what == "experts" and m["p"] == "gate_up_proj" else \
                ["experts.down_proj"] if what == "experts" else [m["p"]]
            if any(group[p] is None for p in ps):
                what = "copy"
            elif dtype not in ("BF16", "F16", "F32"):
                raise MinidiffError(f"{ckpt.file_of(name)}: tensor {name} has dtype {dtype}; quantize needs a "
                                    f"bf16/fp16/fp32 checkpoint")
        if what == "copy":
            job = Job(name, dtype, shape, "copy")
        elif what == "linear":
            job = Job(name, dtype, shape, "linear", [(m["m"], m["p"])], group)
        else:
            job = Job(name, dtype, shape, "experts", [(m["m"], p) for p in ps], group)
        jobs.setdefault(ckpt.file_of(name).name, []).append(job)
    return jobs, group, notes


def _module_tensors(module: str, out: int, n: int, g: int, fmt: str, scale_dtype: str):
    """(name, safetensors dtype, shape) of the tensors that store one quantized [out, n] Linear."""
    if fmt == "int4":
        return [(module + ".weight_packed", "I32", (out, -(-n // 8))),
                (module + ".weight_scale", scale_dtype, (out, n // g)),
                (module + ".weight_shape", "I64", (2,))]
    main = module + (".weight_packed" if fmt == "nvfp4" else ".weight")
    second = module + (".weight_global_scale" if fmt == "nvfp4" else ".weight_scale_2")
    return [(main, "U8", (out, n // 2)),
            (module + ".weight_scale", "F8_E4M3", (out, n // Q.NVFP4_GROUP)),
            (second, "F32", (1,) if fmt == "nvfp4" else ())]


def _expert_modules(job: Job):
    """[(expert index, module name, source row slice)] of a fused expert job."""
    E, rows, _ = job.shape
    base = job.projs[0][0]
    if len(job.projs) == 2:  # gate_up_proj: rows [0, I) gate, [I, 2I) up
        half = rows // 2
        return [(e, f"{base}.{e}.gate_proj", slice(0, half)) for e in range(E)] + \
               [(e, f"{base}.{e}.up_proj", slice(half, rows)) for e in range(E)]
    return [(e, f"{base}.{e}.down_proj", slice(0, rows)) for e in range(E)]


def job_outputs(job: Job, fmt: str):
    """(name, dtype, shape) of every tensor the job writes."""
    if job.action == "copy":
        return [(job.name, job.dtype, job.shape)]
    if job.action == "linear":
        (module, kind), = job.projs
        out, n = job.shape
        return _module_tensors(module, out, n, job.group[kind], fmt, job.dtype)
    res = []
    n = job.shape[2]
    for e, module, rows in _expert_modules(job):
        kind = "experts." + module.rsplit(".", 1)[1]
        res += _module_tensors(module, rows.stop - rows.start, n, job.group[kind], fmt, job.dtype)
    return res


# ------------------------------------------------------------------------------------------------
# the streaming safetensors writer

class ShardWriter:
    """A safetensors file whose header is fixed up front; tensors are written in any order into a
    pre-sized `NAME.partial`, which `close()` renames to NAME once every tensor is in."""

    def __init__(self, path: Path, entries, tmp: Path | None = None):
        self.path = Path(path)
        self.tmp = Path(tmp) if tmp is not None else temp_path(self.path)
        # safetensors' own order: larger itemsize first (keeps every tensor aligned), then by name
        order = sorted(entries, key=lambda t: (-np.dtype(DTYPES[t[1]]).itemsize, t[0]))
        header, off = {"__metadata__": {"format": "pt"}}, 0
        self.slots = {}
        for name, dtype, shape in order:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
            self.slots[name] = (dtype, tuple(shape), off, nbytes)
            off += nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-(8 + len(blob)) % 8)
        self.data_start = 8 + len(blob)
        self.size = off
        self.written = set()
        self.f = open(self.tmp, "wb")
        self.f.write(len(blob).to_bytes(8, "little") + blob)
        self.f.truncate(self.data_start + off)

    def write(self, name: str, arr: np.ndarray):
        dtype, shape, off, nbytes = self.slots[name]
        arr = np.asarray(arr)
        if not arr.flags.c_contiguous:
            arr = arr.copy()
        if arr.dtype != np.dtype(DTYPES[dtype]) or tuple(arr.shape) != shape:
            raise AssertionError(f"{name}: writing {arr.dtype} {arr.shape}, header says {dtype} {shape}")
        self.f.seek(self.data_start + off)
        flat = arr.reshape(-1).view(np.uint8)
        step = 1 << 26
        for i in range(0, flat.size, step):  # memory views of the source mmap: no copies
            self.f.write(memoryview(flat[i:i + step]))
        self.written.add(name)

    def close(self, rename: bool = True):
        """Finish the file; rename it to its final name unless the caller does (rename=False)."""
        missing = set(self.slots) - self.written
        if missing:
            raise AssertionError(f"{self.path.name}: tensors never written: {sorted(missing)[:3]}")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        if rename:
            os.replace(self.tmp, self.path)

    def abort(self):
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)





# ------------------------------------------------------------------------------------------------
# progress on stderr

class Progress:
    def __init__(self, stream=None):
        self.stream = stream
        self.tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self.t0 = time.monotonic()
        self.done = self.total = 0
        self.last = 0.0

    def start(self, total: int):
        self.total, self.t0 = total, time.monotonic()

    def note(self, msg: str):
        if self.stream is not None:
            if self.tty:
                self.stream.write("\r\033[K")
            self.stream.write(msg + "\n")
            self.stream.flush()

    def advance(self, nbytes: int, label: str, shard: str, force=False):
        self.done += nbytes
        if self.stream is None:
            return
        now = time.monotonic()
        if not (self.tty or force) or (not force and now - self.last < 0.2):
            return
        self.last = now
        el = max(now - self.t0, 1e-9)
        rate = self.done / el
        eta = (self.total - self.done) / rate if rate > 0 else 0
        line = (f"[{shard}] {self.done / 1e9:6.2f}/{self.total / 1e9:.2f} GB {100 * self.done / max(self.total, 1):3.0f}% "
                f"{rate / 1e6:6.1f} MB/s eta {int(eta) // 60}m{int(eta) % 60:02d}s  {label}")
        if self.tty:
            self.stream.write("\r\033[K" + line[: shutil.get_terminal_size((120, 20)).columns - 1])
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------------
# quantizing one tensor

def _as_float32(ckpt, name: str, rows=None, expert=None) -> np.ndarray:
    """A (slice of a) float source tensor as float32, reading only that slice."""
    raw = ckpt.raw(name)
    if expert is not None:
        raw = raw[expert]
    if rows is not None:
        raw = raw[rows]
    return to_float32(raw, ckpt.dtype(name))


def _write_module(w: ShardWriter, module: str, W: np.ndarray, g: int, fmt: str, scale_dtype: str):
    if not np.isfinite(W).all():
        raise MinidiffError(f"{module}: the weight holds NaN or infinite values; refusing to quantize it")
    out, n = W.shape
    if fmt == "int4":
        scale = Q.int4_scales(W, g, scale_dtype)                       # float32 [out, n/g]
        packed = Q.pack_int4(Q.quantize_int4(W, scale))                # int32 [out, ceil(n/8)]
        if scale_dtype == "BF16":
            scale_out = f32_to_bf16_bits(scale)                      # exact: values are bf16
        else:
            scale_out = scale.astype(np.float16 if scale_dtype == "F16" else np.float32)
        w.write(module + ".weight_packed", packed)
        w.write(module + ".weight_scale", scale_out)
        w.write(module + ".weight_shape", np.array([out, n], dtype=np.int64))
    elif fmt == "nvfp4":
        gs = Q.nvfp4_global_scale(W)
        packed, sbits = Q.quantize_nvfp4(W, global_scale=gs)
        w.write(module + ".weight_packed", packed)
        w.write(module + ".weight_scale", sbits)
        w.write(module + ".weight_global_scale", np.array([gs], dtype=np.float32))
    else:
        amax = max(float(np.abs(W).max()), float(np.finfo(np.float32).tiny))
        s2 = np.float32(np.float32(amax) / np.float32(Q.FP4_MAX * Q.E4M3_MAX))
        packed, sbits = Q.quantize_nvfp4(W, scale_2=s2)
        w.write(module + ".weight", packed)
        w.write(module + ".weight_scale", sbits)
        w.write(module + ".weight_scale_2", np.array(s2, dtype=np.float32))


def _run_job(ckpt, job: Job, w: ShardWriter, fmt: str, prog: Progress, shard: str):
    if job.action == "copy":
        w.write(job.name, ckpt.raw(job.name))
        prog.advance(_nbytes(job), job.name, shard)
        return
    if job.action == "linear":
        (module, kind), = job.projs
        _write_module(w, module, _as_float32(ckpt, job.name), job.group[kind], fmt, job.dtype)
        prog.advance(_nbytes(job), job.name, shard)
        return
    mods = _expert_modules(job)
    per = _nbytes(job) // len(mods)
    for e, module, rows in mods:
        kind = "experts." + module.rsplit(".", 1)[1]
        W = _as_float32(ckpt, job.name, rows=rows, expert=e)
        _write_module(w, module, W, job.group[kind], fmt, job.dtype)
        prog.advance(per, f"{job.name}[{e}]", shard)


def _nbytes(job: Job) -> int:
    return int(np.prod(job.shape, dtype=np.int64)) * np.dtype(DTYPES[job.dtype]).itemsize


# ------------------------------------------------------------------------------------------------
# the quantization config

def quantization_config(group: dict, fmt: str, scope: str) -> dict:
    """The `quantization_config` of config.json (compressed-tensors layout, or ModelOpt's)."""
    dense_kept = [target_regex(k) for k, g in sorted(group.items()) if g is None]
    if fmt == "nvfp4-modelopt":
        excl = list(MODELOPT_EXCLUDE) + ["*" + k.replace("experts.", "experts.*.") for k, g in sorted(group.items())
                                         if g is None]
        if scope == "experts":
            excl += ["*self_attn*", "*mlp*"]
        # ModelOpt's export (and vLLM's reader) take the exclusions from `ignore`, next to `config_groups`;
        # older readers from `exclude_modules`: both are written, with the same list
        weights = {"num_bits": 4, "type": "float", "group_size": Q.NVFP4_GROUP, "dynamic": False}
        return {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": Q.NVFP4_GROUP,
                "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                              "input_activations": None}},
                "ignore": excl, "exclude_modules": excl, "kv_cache_quant_algo": None, "kv_cache_scheme": None,
                "producer": {"name": "minidiff"}}
    by_size: dict[int, list] = {}
    for kind, g in sorted(group.items()):
        if g is not None:
            by_size.setdefault(g, []).append(target_regex(kind))
    groups = {}
    for i, (g, targets) in enumerate(sorted(by_size.items(), reverse=True)):
        if fmt == "int4":
            weights = {"num_bits": 4, "type": "int", "symmetric": True, "group_size": g, "strategy": "group",
                       "dynamic": False, "actorder": None, "block_structure": None, "observer": "minmax",
                       "observer_kwargs": {}}
            form = "pack-quantized"
        else:
            weights = {"num_bits": 4, "type": "float", "symmetric": True, "group_size": g,
                       "strategy": "tensor_group", "dynamic": False, "actorder": None, "block_structure": None,
                       "observer": "static_minmax", "observer_kwargs": {}, "scale_dtype": "torch.float8_e4m3fn",
                       "zp_dtype": "torch.float8_e4m3fn"}
            form = "nvfp4-pack-quantized"
        groups[f"group_{i}"] = {"targets": targets, "weights": weights, "input_activations": None,
                                "output_activations": None, "format": form}
    ignore = list(DENSE_LINEARS) + dense_kept
    if scope == "experts":
        ignore += [r"re:.*\.self_attn\.[qkvo]_proj$", r"re:.*\.mlp\.(gate|up|down)_proj$"]
    return {"config_groups": groups, "format": "pack-quantized" if fmt == "int4" else "nvfp4-pack-quantized",
            "global_compression_ratio": None, "ignore": ignore, "kv_cache_scheme": None,
            "quant_method": "compressed-tensors", "quantization_status": "compressed", "sparsity_config": {},
            "transform_config": {}, "version": CT_VERSION}


# ------------------------------------------------------------------------------------------------
# the whole conversion

def _support_files(source: ModelFolder, prog) -> list[tuple[Path, Path]]:
    """(relative path, resolved path) of the files to copy from SRC as they are. Links that leave SRC and
    anything that is not a regular file (a pipe, a device) are skipped with a note, never followed."""
    out = []
    for dirpath, dirnames, filenames in os.walk(source.root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                             and not os.path.islink(os.path.join(dirpath, d)))
        for fn in sorted(filenames):
            rel = Path(os.path.relpath(os.path.join(dirpath, fn), source.root))
            if fn.startswith(".") or rel.suffix == ".safetensors" or rel.as_posix() in SUPPORT_SKIP \
                    or fn.endswith(".partial"):
                continue
            try:
                path = source.path(rel.as_posix())
            except MinidiffError as e:
                prog.note(f"skipped {rel}: {str(e).split(': ', 1)[-1]}")
                continue
            if path is not None:
                out.append((rel, path))
    return out


def convert(src, dst, group_size: int = 32, scope: str = "all-linear", fmt: str = "int4",
            force: bool = False, progress: Progress | None = None) -> Path:
    """Quantize the checkpoint in `src` into `dst` (see the module docstring). Returns dst."""
    src, dst = Path(src), Path(dst)
    prog = progress or Progress(None)
    if fmt not in FORMATS:
        raise MinidiffError(f"unknown format {fmt!r} (choose from {', '.join(FORMATS)})")
    if group_size not in (32, 64, 128):
        raise MinidiffError(f"--group-size {group_size}: choose 32, 64 or 128")
    if scope not in ("experts", "all-linear"):
        raise MinidiffError(f"--scope {scope!r}: choose experts or all-linear")
    source = ModelFolder(src)
    config = read_config_json(source)
    if config.get("quantization_config") or source.has("hf_quant_config.json"):
        raise MinidiffError(f"{src}: the checkpoint is already quantized; quantize needs a bf16/fp16/fp32 source")
    if dst.exists() and not dst.is_dir():
        raise MinidiffError(f"{dst}: exists and is not a folder")
    if dst.is_dir() and source.root == dst.resolve():
        raise MinidiffError("SRC and DST are the same folder")
    if dst.is_dir() and any(dst.resolve() == d or d in dst.resolve().parents for d in source.inside):
        raise MinidiffError(f"{dst}: DST must not be inside SRC")
    ckpt = open_checkpoint(source)
    jobs, group, notes = conversion_jobs(ckpt, scope, group_size, fmt)
    if not any(g is not None for g in group.values()):
        raise MinidiffError(f"{src}: found no expert or linear weights to quantize "
                            f"(expected model.decoder.layers.N.experts.gate_up_proj, …)")
    files = sorted({ckpt.file_of(n).name for n in ckpt.names()})  # source file names
    single = not source.has("model.safetensors.index.json")
    if single and len(files) > 1:
        raise MinidiffError(f"{src}: several .safetensors files but no model.safetensors.index.json")
    support = _support_files(source, prog)

    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MinidiffError(f"{dst}: cannot create ({e.strerror})")
    with destination_lock(dst), Temporaries() as temps:
        ours = [p for p in dst.iterdir() if p.name in ("config.json", "model.safetensors.index.json",
                                                       "hf_quant_config.json") or p.suffix == ".safetensors"]
        if ours and not force:
            raise MinidiffError(f"{dst}: already holds a checkpoint ({ours[0].name}); pass --force to replace it")
        for n in notes:
            prog.note(n)
        total = sum(_nbytes(j) for js in jobs.values() for j in js)
        prog.start(total)
        weight_map, total_size, done = {}, 0, []        # done: (temporary, final name), renamed at the end
        try:
            for i, fname in enumerate(files):
                out_name = "model.safetensors" if single else f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
                entries = [t for j in jobs.get(fname, []) for t in job_outputs(j, fmt)]
                w = ShardWriter(dst / out_name, entries, tmp=temps.new(dst / out_name))
                try:
                    for j in jobs.get(fname, []):
                        _run_job(ckpt, j, w, fmt, prog, f"{i + 1}/{len(files)}")
                    w.close(rename=False)
                except BaseException:
                    w.f.close()
                    raise
                done.append((w.tmp, dst / out_name))
                total_size += w.size
                for name, _, _ in entries:
                    weight_map[name] = out_name
                prog.advance(0, f"wrote {out_name}", f"{i + 1}/{len(files)}", force=not prog.tty)

            # support files (tokenizer, chat template, generation config, …), subfolders included
            for rel, path in support:
                (dst / rel).parent.mkdir(parents=True, exist_ok=True)
                tmp = temps.new(dst / rel)
                shutil.copyfile(path, tmp)
                done.append((tmp, dst / rel))
            qcfg = quantization_config(group, fmt, scope)
            texts = []
            if not single:
                texts.append(("model.safetensors.index.json", json.dumps(
                    {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))},
                    indent=2) + "\n"))
            if fmt == "nvfp4-modelopt":
                hf = {"producer": {"name": "minidiff", "version": "0.1.0"},
                      "quantization": {k: v for k, v in qcfg.items() if k not in ("quant_method", "producer")}}
                texts.append(("hf_quant_config.json", json.dumps(hf, indent=2) + "\n"))
            config["quantization_config"] = qcfg
            for name, text in texts:
                tmp = temps.new(dst / name)
                write_file(tmp, text)
                done.append((tmp, dst / name))
            cfg_tmp = temps.new(dst / "config.json")
            write_file(cfg_tmp, json.dumps(config, indent=2, sort_keys=True) + "\n")
        except OSError as e:
            raise MinidiffError(f"{dst}: cannot write ({e.strerror or e}); nothing in it was replaced")
        # everything is written: only now does the old checkpoint go, config.json first (the folder stops
        # looking complete), then the new files are renamed into place, config.json last
        finals = {final for _, final in done} | {dst / "config.json"}
        stale = [p for p in dst.iterdir() if p.name.startswith(".") and p.name.endswith(".partial")
                 and p not in temps.pending]              # temporaries of runs that died (we hold the lock)
        for p in sorted(ours, key=lambda p: p.name != "config.json") + stale:
            if p not in finals:
                p.unlink(missing_ok=True)
        (dst / "config.json").unlink(missing_ok=True)
        for tmp, final in done:
            temps.commit(tmp, final)
        temps.commit(cfg_tmp, dst / "config.json")
    prog.note(f"done: {dst} ({total_size / 1e9:.2f} GB of tensors from {total / 1e9:.2f} GB, "
              f"{time.monotonic() - prog.t0:.0f} s)")
    return dst
