"""For test modules that need a GPU: CuPy, or the whole module is skipped."""

import pytest


def cupy_with_a_gpu():
    """CuPy, or skip the calling module (CuPy not installed, or no usable CUDA device)."""
    cupy = pytest.importorskip("cupy")
    try:
        usable = cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        usable = False
    if not usable:
        pytest.skip("no usable CUDA device", allow_module_level=True)
    return cupy
