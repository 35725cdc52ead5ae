"""The array-module switch: one model, two backends.

minidiff's model code is written once against `xp`, an array module that is either NumPy (CPU, the
default) or CuPy (GPU). Nothing else in the package imports cupy directly.
"""

import numpy as np

from .errors import MinidiffError


def get_xp(device: str = "cpu"):
    """Return the array module for `device` ("cpu" -> numpy, "cuda" -> cupy)."""
    if device == "cpu":
        return np
    if device == "cuda":
        try:
            import cupy
        except ImportError:
            raise MinidiffError("device 'cuda' needs CuPy: pip install 'minidiff[cuda12]' or 'minidiff[cuda13]'")
        try:
            cupy.cuda.runtime.getDeviceCount()
        except Exception as e:  # no driver / no GPU
            raise MinidiffError(f"device 'cuda': no usable GPU ({type(e).__name__})")
        return cupy
    raise MinidiffError(f"unknown device {device!r} (choose 'cpu' or 'cuda')")


def array_module(a):
    """The array module that owns `a`: cupy for GPU arrays (they carry __cuda_array_interface__), else numpy."""
    if hasattr(a, "__cuda_array_interface__"):
        import cupy
        return cupy
    return np


def to_numpy(a):
    """Bring an array of either backend to host memory as a NumPy array."""
    return a.get() if hasattr(a, "get") else np.asarray(a)
