"""Weights kept in their stored form and widened to float32 only where, and when, they are used.

The forward pass computes in float32, but the release stores 50 GB of bf16 (45 GB of it routed experts)
and the low-bit checkpoints store 4-bit codes. Widening everything at load would double (or, for 4-bit,
octuple) the memory, so the large tensors stay as they are on disk (memory-mapped) and each use widens
only the part it needs into a reused scratch buffer:

    embedding rows      E[ids]                     (`take_rows`)
    the tied head       x @ E[v0:v1].T, block by block over the vocabulary
    routed experts      the experts a chunk of tokens was routed to, a few experts at a time

Every such weight is a `Stored` tensor: it has a `shape`, `expand_into(index, out)` (float32 values of
`self[index]` along the first axis, written into `out`), and `dequantize()` (the whole tensor, the plain
reference). `HalfTensor` below holds raw bf16/f16 words; `minidiff.formats` adds the int4 and NVFP4 types.
Plain float32 arrays (and CuPy arrays) are used as they are; `expand` accepts either.

This module sits under the loader (`weights.py`) and the formats (`formats.py`), which both build on it;
the ops (`ops.py`) call `expand` and `is_stored`, the model `take_rows`. It imports only `backend`.
"""

from __future__ import annotations

import numpy as np

from .backend import array_module, num_threads, parallel, scratch, split


# ----------------------------------------------------------------------------------------------
# bfloat16 <-> float32 (NumPy has no bfloat16: a bf16 value is the top half of a float32 word)


def bf16_to_f32(bits):
    """Raw bfloat16 bits (uint16) -> float32: the bf16 value is the top half of the f32 word."""
    xp = array_module(bits)
    return (xp.asarray(bits).astype(xp.uint32) << 16).view(xp.float32)


def to_float32(raw, dtype: str):
    """Raw words of a float safetensors dtype ("BF16", "F16", "F32", "F64") as float32 values: bf16
    widened (exact), the others cast by NumPy (a float32 array comes back as it is, not copied)."""
    return bf16_to_f32(raw) if dtype == "BF16" else np.asarray(raw, dtype=np.float32)


def f32_to_bf16_bits(x):
    """float32 -> raw bfloat16 bits, round to nearest even (as torch's .to(bfloat16) does). NumPy or CuPy."""
    xp = array_module(x)
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    u = x.view(xp.uint32)
    rounded = u + xp.uint32(0x7FFF) + ((u >> 16) & xp.uint32(1))
    out = (rounded >> 16).astype(xp.uint16)
    return xp.where(xp.isnan(x), xp.uint16(0x7FC0), out)


# ----------------------------------------------------------------------------------------------
# stored tensors


class Stored:
    """A weight kept in its stored form. Subclasses define `shape`, `nbytes` and `_expand_one(i, out)`
    (the float32 values of self[i], i an index along the first axis, written into out)."""

    shape: tuple
    nbytes: int
    name: str = "?"

    def _expand_one(self, i: int, out: np.ndarray) -> None:
        raise NotImplementedError

    def expand_into(self, index, out: np.ndarray) -> np.ndarray:
        """float32 values of self[index] (index: a slice or 1-D integer array over the first axis) -> out.

        2-D tensors (a vocabulary, a Linear's rows) are widened in a few row blocks, one per thread;
        3-D tensors (fused experts) one expert per task.
        """
        if isinstance(index, slice):
            ids = range(*index.indices(self.shape[0]))
        else:
            ids = [int(i) for i in np.asarray(index).reshape(-1)]
        assert out.shape == (len(ids),) + tuple(self.shape[1:]), (out.shape, self.shape)
        if len(self.shape) == 3 or not isinstance(index, slice) or ids.step != 1:
            parallel(lambda j: self._expand_one(ids[j], out[j]), range(len(ids)))
        else:
            start = ids.start
            parallel(lambda s: self._expand_rows(slice(start + s.start, start + s.stop), out[s]),
                     split(len(ids), num_threads()))
        return out

    def _expand_rows(self, rows: slice, out: np.ndarray) -> None:
        """Rows `rows` of a 2-D tensor into out (default: row by row; subclasses do it in one go)."""
        for j, i in enumerate(range(rows.start, rows.stop)):
            self._expand_one(i, out[j])

    def dequantize(self) -> np.ndarray:
        """The whole tensor as float32 (a new array): the reference, and what the GPU path uploads."""
        return self.expand_into(slice(None), np.empty(self.shape, dtype=np.float32))

    def __getitem__(self, i) -> np.ndarray:
        """self[i] along the first axis as a new float32 array."""
        i = int(i)
        if not 0 <= i < self.shape[0]:
            raise IndexError(f"index {i} out of range [0, {self.shape[0]})")
        out = np.empty(self.shape[1:], dtype=np.float32)
        self._expand_one(i, out)
        return out

    def __len__(self):
        return self.shape[0]

    def __array__(self, dtype=None, copy=None):  # np.asarray(W) works, but costs a full widening
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype)

    def __repr__(self):
        return f"{type(self).__name__}({self.name}, shape={list(self.shape)}, {self.nbytes} bytes)"


class HalfTensor(Stored):
    """A bf16 or f16 tensor held as its raw 16-bit words (usually a read-only memory map of the file).

    bf16 -> f32 is exact: the 16 bits become the top half of the float32 word (`bf16_to_f32`); here it is
    one shifting copy straight into the output buffer. f16 -> f32 is NumPy's exact cast.
    """

    def __init__(self, raw: np.ndarray, dtype: str, name: str = "?"):
        if dtype not in ("BF16", "F16"):
            raise ValueError(f"HalfTensor holds BF16 or F16, not {dtype}")
        self.raw, self.dtype, self.name = raw, dtype, name
        self.shape, self.nbytes = tuple(raw.shape), int(raw.nbytes)

    def _widen(self, src: np.ndarray, out: np.ndarray) -> None:
        if out.dtype == np.uint16:       # the top halves of float32 words whose low halves are zero
            np.copyto(out, src)
        elif self.dtype == "BF16":
            np.left_shift(src, 16, out=out.view(np.uint32), dtype=np.uint32)
        else:
            np.copyto(out, src.view(np.float16), casting="same_kind")

    def _expand_one(self, i, out):
        self._widen(self.raw[i], out)

    def _expand_rows(self, rows, out):
        self._widen(self.raw[rows], out)

    def expand_into(self, index, out, low_zero: bool = False):
        """Stored.expand_into; low_zero says that the low 16-bit halves of out's float32 words are zero
        already, so bf16 needs only its 16 bits copied into the top halves (40 % faster than a shift)."""
        if low_zero and self.dtype == "BF16" and np.little_endian:
            super().expand_into(index, out.view(np.uint16).reshape(out.shape + (2,))[..., 1])
            return out
        return super().expand_into(index, out)


# ----------------------------------------------------------------------------------------------
# what the model calls


def is_stored(w) -> bool:
    return isinstance(w, Stored)


def expand(w, index, key: str, xp=np):
    """w[index] (index: slice or integer array over the first axis) as float32, for one use.

    A plain array is indexed as it is (a view for slices); a `Stored` tensor is widened into the scratch
    buffer `key`, which the next call with the same key overwrites.
    """
    if not is_stored(w):
        return w[index]
    n = len(range(*index.indices(w.shape[0]))) if isinstance(index, slice) else int(index.size)
    shape = (n,) + tuple(w.shape[1:])
    if isinstance(w, HalfTensor) and w.dtype == "BF16":
        # a buffer that only ever receives widened bf16 keeps its low halves at zero (it starts zeroed)
        out = w.expand_into(index, scratch(key + "/bf16", shape, zeroed=True), low_zero=True)
    else:   # (a device weight, gpu.py, widens into a device buffer)
        out = w.expand_into(index, scratch(key, shape, getattr(w, "xp", np)))
    return out if xp is np else xp.asarray(out)


def take_rows(w, ids) -> np.ndarray:
    """Rows w[ids] of a 2-D weight as a new float32 array (embedding lookups): only those rows are widened."""
    if not is_stored(w):
        return w[ids]
    wxp = getattr(w, "xp", np)                  # where the weight lives (gpu.py: on the device)
    ids = wxp.asarray(ids)
    return w.expand_into(ids.reshape(-1), wxp.empty((ids.size,) + tuple(w.shape[1:]), dtype=wxp.float32)
                         ).reshape(ids.shape + tuple(w.shape[1:]))

