"""Every minidiff/kernels/*.cu compiles for the H100/H200 (sm_90) with NVRTC, the compiler CuPy uses, and with
nvcc where installed; a broken kernel must fail (so the check can fail). Skipped, with the reason, where
neither compiler exists. The kernels' results are checked on a GPU by tests/test_gpu_kernels.py."""

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import compile_kernels as ck  # noqa: E402

FILES = ck.kernel_files()
BROKEN = 'extern "C" __global__ void k(float* x) { x[0] = undefined_name; }'


def test_there_are_kernels():
    assert FILES, "minidiff/kernels/ holds no .cu file"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_nvrtc_compiles_for_sm90(path):
    lib = ck.find_nvrtc()
    if lib is None:
        pytest.skip("no NVRTC library (pip install nvidia-cuda-nvrtc-cu12)")
    ok, log = ck.nvrtc_compile(lib, path.read_text(), path.name, "sm_90")
    assert ok, log
    ok, log = ck.nvrtc_compile(lib, BROKEN, "broken.cu", "sm_90")
    assert not ok and "undefined_name" in log


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_nvcc_compiles_for_sm90_without_spills(path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no nvcc on PATH")
    ok, log = ck.nvcc_compile(nvcc, path, "sm_90")
    assert ok, log
    assert " 0 bytes spilled" in log and "bytes spilled" in log and all(
        line.endswith(" 0 bytes spilled") for line in log.splitlines()), log
