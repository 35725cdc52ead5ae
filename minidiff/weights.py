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

import json
import mmap
import struct
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .errors import MinidiffError
from .tensors import HalfTensor, bf16_to_f32, f32_to_bf16_bits  # noqa: F401  (re-exported)

# safetensors dtype -> (numpy dtype of the raw bits, bytes per element)
DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
    "U64": np.uint64, "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
MAX_HEADER = 100 * 1024 * 1024


class SafetensorsFile:
    """One .safetensors file: parsed header + a read-only memory map of its data."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise MinidiffError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8 or n > MAX_HEADER:
                    raise MinidiffError(f"{self.path}: header length {n} runs past the end of the file ({size} bytes)")
                raw = f.read(n)
        except OSError as e:
            raise MinidiffError(f"{self.path}: cannot read ({e.strerror})")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise MinidiffError(f"{self.path}: malformed safetensors header ({e})")
        if not isinstance(header, dict):
            raise MinidiffError(f"{self.path}: malformed safetensors header (not a JSON object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        data_len = size - self.data_start
        self.entries = {}
        for name, e in header.items():
            try:
                dtype, shape, (begin, end) = e["dtype"], [int(s) for s in e["shape"]], e["data_offsets"]
            except (KeyError, TypeError, ValueError):
                raise MinidiffError(f"{self.path}: malformed header entry for tensor {name!r}")
            if dtype not in DTYPES:
                raise MinidiffError(f"{self.path}: tensor {name!r} has unknown dtype {dtype!r}")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(DTYPES[dtype]).itemsize
            if not (0 <= begin <= end) or end - begin != nbytes or any(s < 0 for s in shape):
                raise MinidiffError(f"{self.path}: tensor {name!r}: data_offsets {[begin, end]} do not match "
                                    f"dtype {dtype} and shape {shape}")
            if end > data_len:
                raise MinidiffError(f"{self.path}: truncated file: tensor {name!r} needs bytes up to {end} "
                                    f"but the data section has {data_len}")
            self.entries[name] = (dtype, tuple(shape), begin)
        self._mm = None

    def raw(self, name: str) -> np.ndarray:
        """The stored bits as a read-only NumPy view (BF16 -> uint16, F8 -> uint8). Reads lazily."""
        dtype, shape, begin = self.entries[name]
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if self.data_start < self.path.stat().st_size else b""
        count = int(np.prod(shape, dtype=np.int64))
        return np.frombuffer(self._mm, dtype=DTYPES[dtype], count=count, offset=self.data_start + begin).reshape(shape)


class Checkpoint:
    """All tensors of a model folder: a single model.safetensors or shards with an index."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        self.files: dict[str, SafetensorsFile] = {}
        self.where: dict[str, str] = {}  # tensor name -> file name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AssertionError):
                raise MinidiffError(f"{index}: malformed index (expected a JSON object with a 'weight_map')")
            for fname in sorted(set(weight_map.values())):
                if not (self.folder / fname).is_file():
                    raise MinidiffError(f"{index}: points to missing shard {fname}")
                self.files[fname] = SafetensorsFile(self.folder / fname)
            for name, fname in weight_map.items():
                if name not in self.files[fname].entries:
                    raise MinidiffError(f"{index}: tensor {name} is not in shard {fname}")
                self.where[name] = fname
        else:
            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise MinidiffError(f"{self.folder}: no model.safetensors or model.safetensors.index.json")
            for p in shards:
                self.files[p.name] = f = SafetensorsFile(p)
                for name in f.entries:
                    if name in self.where:
                        raise MinidiffError(f"{self.folder}: tensor {name} is in both {self.where[name]} and {p.name} "
                                            "(and there is no model.safetensors.index.json to choose)")
                    self.where[name] = p.name

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
        raw = self.raw(name)
        return bf16_to_f32(raw) if dtype == "BF16" else raw.astype(np.float32)


def open_checkpoint(folder) -> Checkpoint:
    return Checkpoint(Path(folder))


# ----------------------------------------------------------------------------------------------
# the text-weight catalogue: every tensor the forward pass reads, with its expected shape

DEC = "model.decoder"
ENC = "model.encoder.language_model"


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple]:
    """Names and shapes of the text weights, as stored in the release (see architecture.md §4)."""
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
    (raw bf16/f16 words, or packed int4/NVFP4 objects from `minidiff.quant`) that widen on use.
    """
    out = {}
    for name, shape in expected_tensors(cfg).items():
        if ckpt.has(name) and ckpt.dtype(name) in FLOAT_DTYPES:
            if tuple(ckpt.shape(name)) != shape:
                raise MinidiffError(f"{ckpt.file_of(name)}: tensor {name} has shape {list(ckpt.shape(name))}, "
                                    f"expected {list(shape)} from config.json")
            out[name] = _plain(ckpt, name, shape)
            continue
        from . import quant  # only needed for low-bit checkpoints
        q = quant.load_quantized(ckpt, name, shape, cfg.quantization_config)
        if q is None and ckpt.has(name):   # e.g. an integer tensor under a float weight's name
            raise MinidiffError(f"{ckpt.file_of(name)}: tensor {name} has dtype {ckpt.dtype(name)}, expected a float type")
        if q is None:
            raise MinidiffError(f"{ckpt.folder}: missing tensor {name} (shape {list(shape)})")
        out[name] = q
    return out
