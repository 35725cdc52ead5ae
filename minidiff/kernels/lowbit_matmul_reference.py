"""What lowbit_matmul.c computes, stated in NumPy: the reference tests/test_native.py holds it to."""

import numpy as np

from ..ops import experts


def lowbit_widen(w) -> np.ndarray:
    """A 4-bit Linear (formats.Int4Weight / NVFP4Weight) [rows, k] as float32: its format's NumPy statement,
    bit for bit what the kernel writes."""
    out = np.empty(w.shape, dtype=np.float32)
    w._numpy_rows(slice(0, w.shape[0]), out)
    return out


def lowbit_matmul(x, idx, weight, gate_up, down) -> np.ndarray:
    """The routed experts of 4-bit expert tensors: every expert widened, then the grouped float32 products of
    ops.experts (X @ Wᵀ). The kernel agrees up to the order of its float32 additions."""
    def widened(ex):
        return np.stack([np.concatenate([lowbit_widen(p) for p in parts]) for parts in ex.parts])
    return experts(np, x, idx, weight, widened(gate_up), widened(down))
