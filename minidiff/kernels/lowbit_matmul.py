"""The launcher of lowbit_matmul.c, the CPU's one kernel: 4-bit weights (int4, NVFP4) used without NumPy
widening them.

NumPy turns 4-bit codes into float32 in several passes over memory (split the nibbles, cast, scale),
which costs more than the matrix product that follows and more than widening bf16. `lowbit_matmul.c`
(plain C with vector types, beside this file) does two things:

    lowbit_matmul   the routed experts: each weight row decoded into a buffer that stays in cache and used
                    at once for all the expert's tokens (`experts`, while each expert sees few tokens: a
                    denoiser step gives about 16; a long prefill, hundreds, goes to the BLAS)
    lowbit_widen    any 4-bit Linear widened to float32 in one pass, for the BLAS (`widener`, for the dense
                    layers and long prefills)

The loader offers it to each 4-bit weight (`bind`): the experts' `moe`, every Linear's `kernel_widen`
(ops.py's docstring has the protocol). It is optional: built on first use with the system C compiler
(`$CC`, else `cc`) into a per-user cache, loaded with ctypes, and skipped -- NumPy does the work as
before -- when there is no compiler, when `MINIDIFF_NATIVE=0`, or when a weight is in a form it does not
read. `status()` says which. Decoded weights equal formats.py's dequantizers bit for bit; products equal
lowbit_matmul_reference.py ("dequantize, then X @ W.T") up to the order of the float32 additions
(tests/test_native.py).
"""

import ctypes
import fcntl
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from .. import formats
from ..backend import num_threads, parallel
from ..ops import gelu_tanh, group_by_expert

SOURCE = Path(__file__).with_name("lowbit_matmul.c")
MAX_MEAN_TOKENS = 64            # tokens per expert on average; above (a long prefill) widening + BLAS is faster
MAX_TOKENS = 4 * MAX_MEAN_TOKENS   # and at most this many for any one expert
ROWS_PER_ITEM = 32              # rows of one matrix per work item: small enough to balance the threads
CC_SECONDS = 60                 # a compile that takes longer is abandoned (the NumPy path takes over)

SCALE_KINDS = {"F32": 0, "BF16": 1, "E4M3": 2}
# -ffp-contract=fast: multiply-adds as FMA instructions (ISO C mode turns that off; the BLAS uses them too)
FLAGS = ["-O3", "-ffp-contract=fast", "-std=c11", "-shared", "-fPIC"]


class Format(ctypes.Structure):
    _fields_ = [("e4m3", ctypes.c_void_p), ("fp4", ctypes.c_int32), ("scale_kind", ctypes.c_int32),
                ("k", ctypes.c_int64), ("kp", ctypes.c_int64), ("group", ctypes.c_int64)]


class Matrix(ctypes.Structure):
    _fields_ = [("codes", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("code_stride", ctypes.c_int64),
                ("out_col", ctypes.c_int64), ("scale_div", ctypes.c_float), ("scale_mul", ctypes.c_float)]


# ----------------------------------------------------------------------------------------------
# building and loading the library

_LIB = None
_STATUS = "not tried"


def _cache_dir() -> Path:
    """$XDG_CACHE_HOME/minidiff/native, else ~/.cache/…; a relative XDG_CACHE_HOME is ignored (the XDG spec)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "minidiff" / "native"


def _private(d: Path) -> str | None:
    """Make d and its parent minidiff/ folder ours alone: created 0700, each a real folder (not a link) owned
    by this user, group/other access removed (and what a folder open to others held, deleted). None when it
    is safe to build and load from, else why not."""
    try:
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for f in (d.parent, d):
            st = os.lstat(f)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
                return f"{f} is {'not a folder' if not stat.S_ISDIR(st.st_mode) else 'owned by another user'}"
            if st.st_mode & 0o077:               # it was open to others: what is in it may be theirs
                os.chmod(f, 0o700)
                for old in d.glob("lowbit_matmul-*"):
                    old.unlink()
    except OSError as e:
        return f"cannot create {d}: {e.strerror or e}"
    return None


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags (a cache shared by two machines keeps two builds)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f.read(1 << 20).splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() + platform.machine()


def _digest(path: Path) -> str | None:
    """sha256 of a regular file of ours that nobody else may write (read without following a link), else None."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022 or st.st_size > 1 << 26:
            return None
        return hashlib.sha256(f.read()).hexdigest()


def _verified(path: Path) -> bool:
    """The library at path is the one minidiff built: its sha256 equals what the build recorded beside it."""
    try:
        recorded = path.with_suffix(".sha256").read_text()[:64]
    except (OSError, UnicodeDecodeError):
        return False
    return _digest(path) == recorded


SMOKE = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.lowbit_widen; lib.lowbit_matmul; print('ok')")


def _build(cc: str, out: Path) -> str | None:
    """Compile SOURCE into `out`: into a temporary name, loaded once in a child process (the smoke test),
    then its sha256 recorded beside it and renamed into place; None on success, else why not. Each compile
    may take CC_SECONDS (MINIDIFF_CC_SECONDS) at most."""
    limit = float(os.environ.get("MINIDIFF_CC_SECONDS", "") or CC_SECONDS)
    for flags in (["-march=native"], []):           # a compiler without -march=native still builds it
        try:
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        except OSError as e:
            return f"cannot write in {out.parent}: {e.strerror or e}"
        os.close(fd)
        try:
            r = subprocess.run([cc, *FLAGS, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                               timeout=limit, stdin=subprocess.DEVNULL)
            why = (r.stderr.strip().splitlines() or ["failed"])[-1]
            if r.returncode == 0:
                smoke = subprocess.run([sys.executable, "-c", SMOKE, tmp], capture_output=True, text=True,
                                       timeout=limit, stdin=subprocess.DEVNULL)
                digest = _digest(Path(tmp))
                if smoke.stdout.strip() == "ok" and digest:
                    Path(tmp).with_suffix(".sha256").write_text(digest)
                    os.replace(Path(tmp).with_suffix(".sha256"), out.with_suffix(".sha256"))
                    os.replace(tmp, out)
                    return None
                why = "what it built does not load as the kernel library"
        except subprocess.TimeoutExpired:
            return f"{cc} took more than {limit:g} s (MINIDIFF_CC_SECONDS)"
        except OSError as e:
            why = f"{type(e).__name__}"
        finally:
            for f in (tmp, str(Path(tmp).with_suffix(".sha256"))):
                if os.path.exists(f):
                    os.unlink(f)
    return f"{cc} could not build {SOURCE.name}: {why}"


_BUILDING = threading.Lock()        # one build at a time in this process; a lock file across processes


def library():
    """The loaded kernel library, or None (then `status()` says why). Built once per machine and source into
    a private cache, and loaded only when its content is what minidiff built (docs/security.md)."""
    global _LIB, _STATUS
    with _BUILDING:
        if _LIB is not None or _STATUS != "not tried":
            return _LIB
        _LIB, why, loud = _load()
        _STATUS = f"on ({why})" if _LIB is not None else f"off ({why})"
        if loud:                                 # a build or load that was tried and failed: said once, on stderr
            print(f"minidiff: note: the CPU kernel is {_STATUS}; 4-bit weights go through NumPy", file=sys.stderr)
        return _LIB


def _load():
    """-> (library or None, what happened, whether a failure should be said on stderr)."""
    if os.environ.get("MINIDIFF_NATIVE", "1") == "0":
        return None, "MINIDIFF_NATIVE=0", False
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        return None, "no C compiler: set CC or install one", False
    folder = _cache_dir()
    why = _private(folder)
    if why:
        return None, why, True
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([cc, *FLAGS]).encode() + _cpu_id().encode()).hexdigest()[:16]
    path = folder / f"lowbit_matmul-{key}.so"
    with open(folder / f"lowbit_matmul-{key}.lock", "a") as lock:  # another process building it: wait for it
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _verified(path):                  # absent, or not what minidiff built: (re)build it
            why = _build(cc, path)
            if why:
                return None, why, True
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            return None, f"could not load {path}: {e}", True
    lib.lowbit_widen.restype = None
    lib.lowbit_widen.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.lowbit_matmul.restype = ctypes.c_int
    lib.lowbit_matmul.argtypes = [ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib, path.name, False


def status() -> str:
    library()
    return _STATUS


def reset():
    """Forget the loaded library (tests switch MINIDIFF_NATIVE / CC)."""
    global _LIB, _STATUS
    with _BUILDING:
        _LIB, _STATUS = None, "not tried"


# ----------------------------------------------------------------------------------------------
# describing a stored expert tensor to the kernel


class KernelView:
    """All matrices of one 4-bit expert tensor (formats.QuantExperts) as the kernel reads them: matrix
    e * P + p is part p (gate, up; or down) of expert e. Built once per tensor; holds the arrays it points at."""

    def __init__(self, experts):
        first = experts.parts[0]
        self.P = len(first)
        self.rows = int(experts.shape[1])
        self.k = k = int(experts.shape[2])
        self.kp = _padded(k)
        fmt = _format_of(first[0])
        self.keep = []                                             # the arrays the matrices point into
        self.blocks = []                                           # (part, first row, end row) of one expert
        mats = []
        for e, parts in enumerate(experts.parts):
            col = 0
            for p, w in enumerate(parts):
                if _format_of(w) != fmt or w.shape[1] != k or w.shape[0] != first[p].shape[0]:
                    raise ValueError("mixed formats or shapes")       # (the kernel reads raw memory)
                mats.append(_matrix(w, col, self.keep))
                if e == 0:
                    self.blocks += [(p, r, min(r + ROWS_PER_ITEM, w.shape[0])) for r in range(0, w.shape[0], ROWS_PER_ITEM)]
                col += w.shape[0]
            if col != self.rows:
                raise ValueError("parts do not add up to the tensor's rows")
        self.matrices = (Matrix * len(mats))(*mats)
        self.format = _format_struct(fmt, k)
        self.blocks = np.array(self.blocks, dtype=np.int64).reshape(-1, 3)

    def columns(self, a, rows=None):
        """a [n, k] -> [n, kp] in the kernel's column order: the even inputs, the odd ones, zeros
        (rows: where each row of a goes; default in order)."""
        n = a.shape[0] if rows is None else int(rows[1])
        out = aligned_zeros((n, self.kp))
        at = slice(None) if rows is None else rows[0]
        out[at, :self.k // 2] = a[:, 0::2]
        out[at, self.k // 2:self.k] = a[:, 1::2]
        return out

    def run(self, X, Y, active, start, padded):
        """Y[start[e]:start[e] + padded[e], :] = X[same rows] @ W_eᵀ for the experts `active`, over the threads."""
        nb = len(self.blocks)
        items = np.empty((len(active), nb, 5), dtype=np.int64)
        items[:, :, 0] = active[:, None] * self.P + self.blocks[:, 0]
        items[:, :, 1:3] = self.blocks[:, 1:]
        items[:, :, 3] = start[active][:, None]
        items[:, :, 4] = padded[active][:, None]
        items = items.reshape(-1, 5)
        cost = np.cumsum((items[:, 2] - items[:, 1]) * items[:, 4])
        n = num_threads()
        cuts = np.searchsorted(cost, cost[-1] * np.arange(1, n) / n) if len(items) else []
        pieces = [p for p in np.split(np.arange(len(items)), cuts) if len(p)]
        lib = library()

        def call(ids):
            part = np.ascontiguousarray(items[ids[0]:ids[-1] + 1])
            rc = lib.lowbit_matmul(len(part), part.ctypes.data, ctypes.addressof(self.matrices),
                                   ctypes.addressof(self.format), X.ctypes.data, Y.ctypes.data, Y.shape[1])
            if rc:
                raise MemoryError("lowbit_matmul: out of memory") if rc == 1 else ValueError("lowbit_matmul: bad items")
        parallel(call, pieces)


def aligned_zeros(shape):
    """np.zeros(shape, float32) starting on a 64-byte boundary (a cache line: whole-vector loads stay in one)."""
    n = int(np.prod(shape))
    raw = np.zeros(n + 16, dtype=np.float32)
    skip = (-raw.ctypes.data % 64) // 4
    return raw[skip:skip + n].reshape(shape)


def _format_of(w):
    """(format, scale kind, group) of a 4-bit Linear, or None when the kernel does not read it."""
    if w.shape[1] % 2:
        return None
    if isinstance(w, formats.Int4Weight) and w.scale_dtype in ("F32", "BF16") and w.group_size % 16 == 0:
        return ("int4", w.scale_dtype, int(w.group_size))
    if isinstance(w, formats.NVFP4Weight):
        return ("nvfp4", "E4M3", formats.NVFP4_GROUP)
    return None


def _padded(k: int) -> int:
    """The row length of the kernel's buffers and of X: k rounded up to whole 16-float vectors."""
    return -(-k // 16) * 16


def _format_struct(fmt, k: int) -> Format:
    return Format(formats.E4M3.ctypes.data, fmt[0] == "nvfp4", SCALE_KINDS[fmt[1]], k, _padded(k), fmt[2])


def _matrix(w, out_col: int, keep: list) -> Matrix:
    """The kernel's view of a 4-bit Linear whose rows land at column out_col of Y; the arrays it points
    into are appended to `keep` (whoever holds the Matrix must hold them)."""
    codes, scales, stride, div, mul = _arrays(w)
    keep += [codes, scales]
    return Matrix(codes.ctypes.data, scales.ctypes.data, stride, out_col, div, mul)


def _arrays(w):
    """(codes uint8 [rows, stride], scales, stride, scale_div, scale_mul) of a 4-bit Linear whose scales
    are all finite (checked here once, as the NumPy path checks them at every use) and whose arrays have
    the sizes the kernel will read (the loader checked them; the kernel reads raw memory, so again here)."""
    rows, k = w.shape
    fmt = _format_of(w)
    if isinstance(w, formats.Int4Weight):
        w._scale(slice(None))                                      # raises on a non-finite scale
        codes = np.ascontiguousarray(w.packed).view(np.uint8)
        scales = np.ascontiguousarray(w.scale_raw)
        div, mul = 0.0, 1.0
    else:
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):    # reported just below
            eff = formats.nvfp4_group_scales(w.scale_bits, w.global_scale, w.scale_2)
        formats.check_finite(eff, w.name, w.where)
        codes = np.ascontiguousarray(w.packed, dtype=np.uint8)
        scales = np.ascontiguousarray(w.scale_bits, dtype=np.uint8)
        div, mul = (float(np.float32(w.global_scale)), 1.0) if w.global_scale is not None \
            else (0.0, float(np.float32(w.scale_2)))
    item = {"F32": 4, "BF16": 2, "E4M3": 1}[fmt[1]]
    if codes.ndim != 2 or codes.shape[0] != rows or codes.shape[1] < k // 2 or scales.shape != (rows, k // fmt[2]) \
            or scales.itemsize != item:
        raise ValueError("arrays do not match the weight's shape")
    return codes, scales, codes.shape[1], div, mul


def kernel_view(experts):
    """The KernelView of a stored expert tensor, or None when it does not apply (cached on the tensor)."""
    if not isinstance(experts, formats.QuantExperts) or library() is None:
        return None
    if not hasattr(experts, "_kernel_view"):
        try:
            experts._kernel_view = KernelView(experts) if _format_of(experts.parts[0][0]) else None
        except ValueError:
            experts._kernel_view = None
    return experts._kernel_view


class Widen:
    """One 4-bit Linear [rows, k] as the kernel reads it, for `lowbit_widen` (formats.QuantTensor's rows)."""

    def __init__(self, w):
        fmt = _format_of(w)
        if fmt is None:
            raise ValueError("not a form the kernel reads")
        self.keep = []
        self.matrix = _matrix(w, 0, self.keep)
        self.format = _format_struct(fmt, w.shape[1])

    def __call__(self, rows: slice, out: np.ndarray) -> None:
        assert out.flags.c_contiguous and out.dtype == np.float32 and out.shape[1] == self.format.k
        library().lowbit_widen(ctypes.addressof(self.matrix), ctypes.addressof(self.format),
                               rows.start, rows.stop, out.ctypes.data)


def widener(w):
    """A Widen for a 4-bit Linear, or None (then NumPy widens it); cached on the weight."""
    if library() is None:
        return None
    if not hasattr(w, "_native_widen"):
        try:
            w._native_widen = Widen(w)
        except ValueError:
            w._native_widen = None
    return w._native_widen


def experts(x, idx, weight, gate_up, down):
    """ops.experts for 4-bit stored experts, through the kernel; None when it does not apply (then ops
    widens and uses the BLAS). Tokens are grouped by expert as there, each expert's run padded with zero
    rows to a multiple of 4 (the kernel's token tile)."""
    T, k = idx.shape
    E, H = gate_up.shape[0], x.shape[1]
    if x.dtype != np.float32 or T * k > MAX_MEAN_TOKENS * E:
        return None
    gu_view, down_view = kernel_view(gate_up), kernel_view(down)
    if gu_view is None or down_view is None:
        return None
    order, counts, first = group_by_expert(np, idx, E)
    if counts.max() > MAX_TOKENS:
        return None
    padded = -(-counts // 4) * 4
    start = np.cumsum(padded) - padded                                 # [E] first row of each expert's run
    e = idx.reshape(-1)[order]
    row = start[e] + np.arange(T * k) - first[e]                       # row of assignment order[i]
    active = np.flatnonzero(counts)
    N = int(padded.sum())
    X = gu_view.columns(x[order // k], (row, N))                       # [N, kp >= H]
    GU = np.empty((N, gu_view.rows), dtype=np.float32)                 # [N, 2Ie]
    gu_view.run(X, GU, active, start, padded)
    ie = gu_view.rows // 2
    A = down_view.columns(gelu_tanh(np, GU[:, :ie]) * GU[:, ie:])      # [N, kp >= Ie]
    Y = np.empty((N, down_view.rows), dtype=np.float32)                # [N, H]
    down_view.run(A, Y, active, start, padded)
    y = np.empty((T * k, H), dtype=np.float32)
    y[order] = Y[row]
    y *= weight.reshape(-1, 1)                                         # routing weights
    return y.reshape(T, k, H).sum(axis=1)                              # [T, H]


def widen_rows(w, rows: slice, out: np.ndarray) -> bool:
    """Rows of a 4-bit Linear widened by the kernel into out; False when it does not read w's form."""
    fast = widener(w) if out.flags.c_contiguous else None
    if fast is not None:
        fast(rows, out)
    return fast is not None


def bind(w) -> None:
    """Offer the kernel to a 4-bit weight (the loader calls this on the CPU): expert tensors get `moe`, every
    4-bit Linear (the experts' parts too) `kernel_widen`; each checks at its call whether the kernel applies."""
    if isinstance(w, formats.QuantTensor):
        library()                               # built now, in the loading thread (a Ctrl-C here ends it at once)
    if isinstance(w, formats.QuantExperts):
        w.moe = lambda x, idx, weight, down: experts(x, idx, weight, w, down)
        for part in (p for parts in w.parts for p in parts):
            bind(part)
    elif isinstance(w, formats.QuantTensor):
        w.kernel_widen = lambda rows, out: widen_rows(w, rows, out)
