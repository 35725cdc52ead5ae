"""Compile every minidiff/kernels/*.cu for the GPUs minidiff targets, without a GPU (CI runs this).

The files are found in the minidiff that Python imports: the checkout, or an installed wheel (CI checks both).

Two compilers, each used when present:
    NVRTC  the runtime compiler CuPy uses (`cupy.RawModule`), from the pip package nvidia-cuda-nvrtc-cu12
           (or -cu13), called through ctypes with the options kernels/moe_experts.py passes: what compiles here
           compiles in CuPy
    nvcc   the CUDA toolkit's compiler, with `-Xptxas -v`: registers and spills per kernel

    python tools/compile_kernels.py            # sm_90 (H100/H200) and sm_80; a table, exit 1 on an error
    python tools/compile_kernels.py --require  # also fail when neither compiler is found
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ARCHS = ("sm_90", "sm_80")
OPTIONS = ("-std=c++14",)                      # = minidiff/kernels/moe_experts.py: module()


def kernel_files() -> list[Path]:
    """The .cu files of the minidiff package Python imports."""
    import minidiff.kernels
    return sorted(Path(minidiff.kernels.__file__).parent.glob("*.cu"))


def find_nvrtc():
    """libnvrtc from the pip packages (nvidia-cuda-nvrtc-cu12 / -cu13), else the system's; None if absent."""
    candidates = []
    try:
        import nvidia
        for base in nvidia.__path__:
            candidates += sorted(glob.glob(os.path.join(base, "cuda_nvrtc", "lib", "libnvrtc.so*")))
            candidates += sorted(glob.glob(os.path.join(base, "cu13", "lib", "libnvrtc.so*")))
    except ImportError:
        pass
    candidates += ["libnvrtc.so", "libnvrtc.so.12", "libnvrtc.so.13"]
    for c in candidates:
        if "builtins" in c or ".alt." in c:
            continue
        try:
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


def nvrtc_compile(lib, source: str, name: str, arch: str) -> tuple[bool, str]:
    """-> (ok, log). nvrtcCreateProgram / nvrtcCompileProgram / nvrtcGetCUBINSize, as CuPy calls them."""
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None):
        return False, "nvrtcCreateProgram failed"
    opts = [o.encode() for o in OPTIONS + (f"-arch={arch}",)]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    status = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    ok = status == 0
    if ok:
        cubin = ctypes.c_size_t()
        ok = lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin)) == 0 and cubin.value > 0
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return ok, log.value.decode(errors="replace").strip()


def nvcc_compile(nvcc: str, path: Path, arch: str) -> tuple[bool, str]:
    with tempfile.TemporaryDirectory() as tmp:
        p = subprocess.run([nvcc, "-cubin", f"-arch={arch}", *OPTIONS, "-O3", "-Xptxas", "-v", str(path),
                            "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True, timeout=300)
    log = p.stdout + p.stderr
    if p.returncode == 0:   # one line per kernel: registers and spills
        rows = re.findall(r"Compiling entry function '(\w+)'.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                          log, re.S)
        log = "\n".join(f"{k}: {regs} registers, {spill} bytes spilled" for k, spill, regs in rows)
    return p.returncode == 0, log.strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--require", action="store_true", help="fail when no compiler is found")
    args = ap.parse_args()
    files = kernel_files()
    lib, nvcc = find_nvrtc(), shutil.which("nvcc")
    if lib is None and nvcc is None:
        print("compile_kernels: no CUDA compiler here (pip install nvidia-cuda-nvrtc-cu12, or a CUDA toolkit)")
        return 1 if args.require else 0
    failed = 0
    for path in files:
        for arch in ARCHS:
            for tool, fn in (("nvrtc", lambda: nvrtc_compile(lib, path.read_text(), path.name, arch)),
                             ("nvcc", lambda: nvcc_compile(nvcc, path, arch))):
                if (tool == "nvrtc" and lib is None) or (tool == "nvcc" and nvcc is None):
                    continue
                ok, log = fn()
                failed += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {tool:<5} {arch}  {path}")
                if log and (not ok or tool == "nvcc"):
                    print("      " + log.replace("\n", "\n      "))
    print(f"{len(files)} kernel files, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
