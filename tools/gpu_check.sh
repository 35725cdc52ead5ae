#!/usr/bin/env bash
# The device check, prepared for a lent GPU machine (one call of the `device` tool, about 6 minutes):
#   1. compile every kernels_cuda/*.cu (NVRTC as CuPy does, nvcc with the register report)
#   2. validate the kernels against their NumPy references and the GPU model against the CPU model
#   3. the full-size benchmark (30 layers, bf16 and int4 experts, prompts 1K and 8K)
# Logs and JSON go to $OUT (or ./gpu_out). Run from the repository root:  bash tools/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)" | tee -a "$OUT/gpu.txt"
$PY tools/compile_kernels.py 2>&1 | tee "$OUT/compile.log"
timeout 240 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu_kernels.py tests/test_cupy_backend.py tests/test_gpu_train.py \
    2>&1 | tee "$OUT/gpu_tests.log"
timeout 420 $PY tools/bench_gpu.py --json "$OUT/bench_gpu.json" 2>&1 | tee "$OUT/bench.log"
