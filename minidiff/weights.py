"""Safetensors in: a lazy, memory-mapped reader and the text-weight catalogue of the release.

A safetensors file is
    [8 bytes: header length N, little-endian u64][N bytes: JSON header][data]
and the header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the start of the data). We parse it ourselves (so every malformed file gets a precise
error), memory-map the data and hand out NumPy views: nothing is read until it is used, and the
vision tensors are never touched. NumPy has no bfloat16, so BF16 tensors are widened from their raw
16 bits: float32 bits = bf16 bits << 16.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from pathlib import Path

import numpy as np

from .config import DEC, ENC, ModelConfig
from .errors import MinidiffError
from .folder import ModelFolder, _show, parse_json, plain_name
from .tensors import HalfTensor, to_float32

# safetensors dtype -> (numpy dtype of the raw bits, bytes per element)
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100 * 1024 * 1024


MAX_DIMS, MAX_DIM = 8, 2 ** 40


class SafetensorsFile:
    """One .safetensors file: parsed, checked header + a read-only memory map of its data.

    `path` is a file that `ModelFolder.path` has already checked (inside the folder, regular). The header
    is untrusted: every entry must be {"dtype": known string, "shape": list of ints, "data_offsets":
    [begin, end]} with end - begin = the bytes its dtype and shape need, inside the data section, and no
    two tensors may share bytes. Error lines name the file and the tensor, never the file's bytes.
    """

    def __init__(self, path: Path, shown=None):
        self.path = Path(path)
        where = self.shown = str(shown or path)
        try:
            with open(self.path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                head = f.read(8)
                if len(head) < 8:
                    raise MinidiffError(f"{where}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER:
                    raise MinidiffError(f"{where}: header length field is larger than {MAX_HEADER // 2 ** 20} MiB "
                                        "(not a safetensors file?)")
                if n > size - 8:
                    raise MinidiffError(f"{where}: header length runs past the end of the file ({size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise MinidiffError(f"{where}: cannot read ({e.strerror})")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MinidiffError(f"{where}: malformed safetensors header (not UTF-8 text)")
        header = parse_json(text, f"{where} (header)")
        if not isinstance(header, dict):
            raise MinidiffError(f"{where}: malformed safetensors header (not a JSON object)")
        meta = header.pop("__metadata__", {})
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise MinidiffError(f"{where}: __metadata__ must map names to strings")
        self.metadata = meta                          # {str: str} (the trace's schema, order, …)
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {}
        spans = []
        for name, e in header.items():
            dtype, shape, begin, end = _entry(e, name, where)
            nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
            if end - begin != nbytes:
                raise MinidiffError(f"{where}: tensor {name!r}: data_offsets {[begin, end]} do not match "
                                    f"dtype {dtype} and shape {shape} ({nbytes} bytes)")
            if end > data_len:
                raise MinidiffError(f"{where}: truncated file: tensor {name!r} needs bytes up to {end} "
                                    f"but the data section has {data_len}")
            self.entries[name] = (dtype, tuple(shape), begin)
            if nbytes:
                spans.append((begin, end, name))
        spans.sort()
        for (b0, e0, n0), (b1, _, n1) in zip(spans, spans[1:]):
            if b1 < e0:
                raise MinidiffError(f"{where}: tensors {n0!r} and {n1!r} overlap in the file (data_offsets)")
        self._mm = None

    def raw(self, name: str) -> np.ndarray:
        """The stored bits as a read-only NumPy view (BF16 -> uint16, F8 -> uint8). Reads lazily."""
        dtype, shape, begin = self.entries[name]
        if self._mm is None:
            try:
                with open(self.path, "rb") as f:
                    self._mm = (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                                if self.data_start < os.fstat(f.fileno()).st_size else b"")
            except (OSError, ValueError) as e:
                raise MinidiffError(f"{self.shown}: cannot map ({getattr(e, 'strerror', None) or e})")
        if self.data_start + begin + math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize > len(self._mm):
            raise MinidiffError(f"{self.shown}: the file shrank while it was in use")
        count = math.prod(shape)
        return np.frombuffer(self._mm, dtype=DTYPES[dtype], count=count, offset=self.data_start + begin).reshape(shape)


def _entry(e, name, where):
    """(dtype, shape, begin, end) of one header entry, every field type- and range-checked."""
    bad = f"{where}: malformed header entry for tensor {name!r}"
    if not isinstance(e, dict):
        raise MinidiffError(f"{bad} (not an object)")
    dtype, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise MinidiffError(f"{where}: tensor {name!r} has unknown dtype {dtype!r}"[:300])
    if (not isinstance(shape, list) or len(shape) > MAX_DIMS
            or not all(type(d) is int and 0 <= d <= MAX_DIM for d in shape)):
        raise MinidiffError(f"{bad} (shape must be a list of at most {MAX_DIMS} non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(type(o) is int for o in offsets):
        raise MinidiffError(f"{bad} (data_offsets must be two integers)")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise MinidiffError(f"{where}: tensor {name!r}: data_offsets {offsets} are not 0 <= begin <= end")
    return dtype, shape, begin, end


class Checkpoint:
    """All tensors of a model folder: a single model.safetensors or shards with an index."""

    def __init__(self, folder):
        self.dir = folder if isinstance(folder, ModelFolder) else ModelFolder(folder)
        self.folder = self.dir.shown
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        index_name = "model.safetensors.index.json"
        index = self.folder / index_name
        if self.dir.has(index_name):
            d = self.dir.read_json(index_name)
            weight_map = d.get("weight_map") if isinstance(d, dict) else None
            if not isinstance(weight_map, dict):
                raise MinidiffError(f"{index}: malformed index (expected a JSON object with a 'weight_map' object)")
            for name, fname in weight_map.items():
                if not isinstance(fname, str) or "/" in fname or not fname.endswith(".safetensors"):
                    raise MinidiffError(f"{index}: weight_map[{name!r}] must be the name of a .safetensors file "
                                        f"in the folder, got {_show(fname)}"[:300])
                plain_name(fname, str(index))
            for fname in sorted(set(weight_map.values())):
                path = self.dir.path(fname, str(index))
                if path is None:
                    raise MinidiffError(f"{index}: points to missing shard {fname}")
                self.files[fname] = SafetensorsFile(path, self.folder / fname)
            for name, fname in weight_map.items():
                if name not in self.files[fname].entries:
                    raise MinidiffError(f"{index}: tensor {name!r} is not in shard {fname}"[:300])
                self.where[name] = fname
        else:
            # model.safetensors alone when it is there (as transformers reads a folder): other .safetensors
            # files beside it (minidiff train's trainer_state.safetensors, say) are not weights
            shards = [n for n in self.dir.names(".safetensors") if n == "model.safetensors"] \
                or self.dir.names(".safetensors")
            if not shards:
                raise MinidiffError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
            for fname in shards:
                path = self.dir.path(fname)
                if path is None:       # a dangling link
                    raise MinidiffError(f"{self.folder / fname}: a link to nothing")
                self.files[fname] = f = SafetensorsFile(path, self.folder / fname)
                for name in f.entries:
                    if name in self.where:
                        raise MinidiffError(f"{self.folder}: tensor {name!r} is in both {self.where[name]} and "
                                            f"{fname} (and there is no model.safetensors.index.json to choose)"[:400])
                    self.where[name] = fname

    def names(self) -> list[str]:
        return list(self.where)

    def has(self, name: str) -> bool:
        return name in self.where

    def file_of(self, name: str) -> Path:
        return self.folder / self.where[name]

    def _entry(self, name):
        if name not in self.where:
            raise MinidiffError(f"{self.folder}: missing tensor {name}")
        return self.files[self.where[name]].entries[name]

    def shape(self, name: str) -> tuple:
        return self._entry(name)[1]

    def dtype(self, name: str) -> str:
        return self._entry(name)[0]

    def raw(self, name: str) -> np.ndarray:
        self._entry(name)
        return self.files[self.where[name]].raw(name)

    def get(self, name: str) -> np.ndarray:
        """The tensor as float32 (from BF16, F16, F32 or F64)."""
        dtype = self.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise MinidiffError(f"{self.file_of(name)}: tensor {name} has dtype {dtype}, expected a float type")
        return to_float32(self.raw(name), dtype)


def open_checkpoint(folder) -> Checkpoint:
    return Checkpoint(folder)


# ----------------------------------------------------------------------------------------------
# the text-weight catalogue: every tensor the forward pass reads, with its expected shape

def expected_tensors(cfg: ModelConfig) -> dict[str, tuple]:
    """Names and shapes of the text weights, as stored in the release (docs/architecture.md §9)."""
    H, I, E, Ie, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts, cfg.moe_intermediate_size, cfg.vocab_size
    nh = cfg.num_attention_heads
    t = {
        f"{DEC}.embed_tokens.weight": (V, H),
        f"{DEC}.norm.weight": (H,),
        f"{DEC}.self_conditioning.pre_norm.weight": (H,),
        f"{DEC}.self_conditioning.gate_proj.weight": (I, H),
        f"{DEC}.self_conditioning.up_proj.weight": (I, H),
        f"{DEC}.self_conditioning.down_proj.weight": (H, I),
    }
    for i, layer in enumerate(cfg.layers):
        p, hd, kv = f"{DEC}.layers.{i}.", layer.head_dim, layer.num_kv_heads
        t[p + "self_attn.q_proj.weight"] = (nh * hd, H)
        t[p + "self_attn.k_proj.weight"] = (kv * hd, H)
        if layer.is_sliding:  # full layers have no v_proj: V is the raw k_proj output
            t[p + "self_attn.v_proj.weight"] = (kv * hd, H)
        t[p + "self_attn.o_proj.weight"] = (H, nh * hd)
        t[p + "self_attn.q_norm.weight"] = (hd,)
        t[p + "self_attn.k_norm.weight"] = (hd,)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                     "pre_feedforward_layernorm_2", "post_feedforward_layernorm_2"):
            t[p + norm + ".weight"] = (H,)
        t[p + "mlp.gate_proj.weight"] = (I, H)
        t[p + "mlp.up_proj.weight"] = (I, H)
        t[p + "mlp.down_proj.weight"] = (H, I)
        t[p + "router.proj.weight"] = (E, H)
        t[p + "router.scale"] = (H,)
        t[p + "router.per_expert_scale"] = (E,)
        t[p + "experts.gate_up_proj"] = (E, 2 * Ie, H)
        t[p + "experts.down_proj"] = (E, H, Ie)
        t[p + "layer_scalar"] = (1,)
        t[f"{ENC}.layers.{i}.layer_scalar"] = (1,)
    return t


# the tensors kept in their stored precision and widened per use (tensors.py): the vocabulary-sized
# embedding (also the head) and the fused experts; 90 % of the release. The rest is widened at load.
STORED = (f"{DEC}.embed_tokens.weight", "experts.gate_up_proj", "experts.down_proj")


def _plain(ckpt: Checkpoint, name: str, shape: tuple):
    """A float tensor as the model uses it: big bf16/f16 tensors stay memory-mapped (`HalfTensor`),
    float32 ones are used straight from the memory map, the rest are widened to float32 now."""
    dtype = ckpt.dtype(name)
    if dtype in ("BF16", "F16") and name.endswith(STORED):
        return HalfTensor(ckpt.raw(name), dtype, name)
    if dtype == "F32":
        return ckpt.raw(name)
    return ckpt.get(name)


def load_text_weights(ckpt: Checkpoint, cfg: ModelConfig) -> dict:
    """Check every expected tensor (presence, shape, dtype) and return name -> array.

    Small float tensors come back as float32 arrays; the embedding and the experts as `Stored` tensors
    (raw bf16/f16 words, or packed int4/NVFP4 objects from `minidiff.formats`) that widen on use.
    """
    out = {}
    for name, shape in expected_tensors(cfg).items():
        if ckpt.has(name) and ckpt.dtype(name) in FLOAT_DTYPES:
            if tuple(ckpt.shape(name)) != shape:
                raise MinidiffError(f"{ckpt.file_of(name)}: tensor {name} has shape {list(ckpt.shape(name))}, "
                                    f"expected {list(shape)} from config.json")
            out[name] = _plain(ckpt, name, shape)
            continue
        from .schemes import load_quantized  # only needed for low-bit checkpoints
        q = load_quantized(ckpt, name, shape, cfg.quantization_config)
        if q is None and ckpt.has(name):   # e.g. an integer tensor under a float weight's name
            raise MinidiffError(f"{ckpt.file_of(name)}: tensor {name} has dtype {ckpt.dtype(name)}, expected a float type")
        if q is None:
            raise MinidiffError(f"{ckpt.folder}: missing tensor {name} (shape {list(shape)})")
        out[name] = q
    return out
