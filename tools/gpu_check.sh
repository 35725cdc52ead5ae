#!/usr/bin/env bash
# The device check, prepared for a lent GPU machine (one call of the `device` tool; on an H200, 2026-11-26: compile
# and tests 1.5 minutes, the benchmark 2 minutes before transformers was added to it):
#   1. compile every kernels_cuda/*.cu (NVRTC as CuPy does, nvcc with the register report)
#   2. validate the kernels against their NumPy references, the GPU model against the CPU model, and
#      training through CuPy against training through NumPy
#   3. the full-size benchmark (30 layers, int4 and bf16 experts, prompts 1K and 8K), transformers beside it
# Everything printed goes to $OUT/check.log, the benchmark's JSON to $OUT/bench_gpu.json (written after each
# row, so a stage cut by its timeout keeps what it measured). Run from the repository root:
#     bash tools/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
echo "== compile"; timeout 90 $PY tools/compile_kernels.py
echo "== GPU tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu_kernels.py tests/test_cupy_backend.py \
    tests/test_gpu_train.py
echo "== benchmark"; timeout "${BENCH_TIMEOUT:-270}" $PY tools/bench_gpu.py --transformers --json "$OUT/bench_gpu.json"
} 2>&1 | tee -a "$OUT/check.log"
