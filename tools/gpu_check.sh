#!/usr/bin/env bash
# The device check, prepared for a lent GPU machine (one call of the `device` tool; on an H200, 2026-11-26: compile
# and tests 1.5 minutes, the benchmark 2 minutes before transformers was added to it):
#   1. compile every minidiff/kernels/*.cu (NVRTC as CuPy does, nvcc with the register report)
#   2. validate the kernels against their NumPy references, the GPU model against the CPU model, and
#      training through CuPy against training through NumPy
#   3. the full-size benchmark (30 layers, int4 and bf16 experts, prompts 1K and 8K), then transformers beside
#      it at 15 layers (its random initialisation does not fit an 80 GB card at 30; on an H100, 2026-11-26, the
#      15-layer run took 50 s)
# transformers: the machine's image has 5.17, which has no DiffusionGemma; carry the reference version as a wheel
# (`pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl transformers==5.23.0`, with .whl
# in .git/info/exclude and in the call's carry): it is installed into /tmp/site when present.
# Everything printed goes to $OUT/check.log, the benchmark's JSON to $OUT/bench_gpu.json (written after each
# row, so a stage cut by its timeout keeps what it measured). Run from the repository root:
#     bash tools/gpu_check.sh
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
if ls .whl/transformers-*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/transformers-*.whl && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
{
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import cupy, numpy; print('cupy', cupy.__version__, 'numpy', numpy.__version__)"
echo "== compile"; timeout 90 $PY tools/compile_kernels.py
echo "== GPU tests"
timeout 150 $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_gpu_kernels.py tests/test_cupy_backend.py \
    tests/test_gpu_train.py
echo "== benchmark"; timeout "${BENCH_TIMEOUT:-200}" $PY tools/bench_gpu.py --json "$OUT/bench_gpu.json"
echo "== beside transformers"; timeout 150 $PY tools/bench_gpu.py --layers 15 --contexts 1024 --transformers \
    --json "$OUT/bench_gpu_15layers.json"
} 2>&1 | tee -a "$OUT/check.log"
