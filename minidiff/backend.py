"""The array-module switch: one model, two backends.

minidiff's model code is written once against `xp`, an array module that is either NumPy (CPU, the
default) or CuPy (GPU). Nothing else in the package imports cupy directly.

On the CPU the BLAS threads the matrix products; the rest of the heavy work (widening stored weights,
the sampler's passes over the 262,144-entry vocabulary, the softcap) is split into row blocks here
(`parallel`, `rowwise`), and weights widened for one use land in reused buffers (`scratch`).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor

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


# ----------------------------------------------------------------------------------------------
# threads and scratch buffers (CPU)


def num_threads() -> int:
    """Threads for the work the BLAS does not thread (widening weights, the sampler's vocab-wide passes):
    MINIDIFF_THREADS, else the CPUs this process may run on."""
    v = os.environ.get("MINIDIFF_THREADS", "")
    if v.isdigit() and int(v) > 0:
        return min(int(v), 256)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


_POOL: ThreadPoolExecutor | None = None


def parallel(fn, items) -> list:
    """[fn(item) for item in items], spread over `num_threads()` threads. NumPy releases the GIL inside
    its array loops, so independent pieces of a big conversion run truly in parallel."""
    global _POOL
    items = list(items)
    n = num_threads()
    # serial when there is nothing to share, or when called from one of the pool's own threads (a task
    # waiting for tasks queued behind it in the same pool would wait forever)
    if n == 1 or len(items) < 2 or threading.current_thread().name.startswith("minidiff-pool"):
        return [fn(it) for it in items]
    if _POOL is None or _POOL._max_workers != n:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(n, thread_name_prefix="minidiff-pool")
    return list(_POOL.map(fn, items))


def split(n: int, parts: int) -> list[slice]:
    """[0, n) cut into at most `parts` contiguous slices of nearly equal length."""
    parts = max(1, min(parts, n))
    bounds = [n * i // parts for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


_SCRATCH: dict = {}


def scratch(key: str, shape: tuple, xp=np, zeroed: bool = False):
    """A reused float32 work buffer of `shape`, one per key: the widened weights of one use land here and are
    overwritten by the next, so memory stays flat however long the run. Contents are whatever the last
    user of the key left (zeros when first made with zeroed=True)."""
    n = int(np.prod(shape, dtype=np.int64))
    buf = _SCRATCH.get((key, xp.__name__))
    if buf is None or buf.size < n:
        buf = _SCRATCH[(key, xp.__name__)] = (xp.zeros if zeroed else xp.empty)(n, dtype=xp.float32)
    return buf[:n].reshape(shape)


def rowwise(fn, a, *more, max_rows: int | None = None):
    """fn(a[s], *(m[s] for m in more)) for row blocks s of a [R, ...] NumPy array, spread over the threads,
    for work where each row's result depends on that row alone (so the blocks give the very bits one call
    would). max_rows bounds a block (and so the temporaries fn makes). CuPy arrays go through in one
    call: the GPU is its own parallelism."""
    R = a.shape[0]
    if array_module(a) is not np:
        return [fn(a, *more)]
    parts = max(num_threads(), -(-R // max_rows) if max_rows else 1)
    return parallel(lambda s: fn(a[s], *(m[s] for m in more)), split(R, parts))
