#!/usr/bin/env bash
# The package as a user gets it: build the wheel and the sdist, install the wheel into a fresh virtual
# environment outside the checkout, and run every command from the installed files (CI runs this).
#
#     bash tools/check_install.sh             # uses a scratch folder under /tmp, removed at the end
#
# Checks: every subcommand's --help; generate on the embedded default model; train (a few steps, from the
# embedded model); sudoku --plain - on stdin; the CPU kernel built from the installed lowbit_matmul.c and
# the CUDA kernels compiled (NVRTC) from the installed .cu files; then the sdist's own tests (a torch-free
# subset: golden files, helpers and the tools the tests import must all be in it).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
WORK="$(mktemp -d /tmp/minidiff-install.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
PY="${PYTHON:-python3}"

echo "== build (wheel + sdist) from $ROOT"
"$PY" -m build -q -o "$WORK/dist" "$ROOT" > "$WORK/build.log" 2>&1 || { tail -20 "$WORK/build.log"; exit 1; }
ls "$WORK/dist"

echo "== fresh venv, the wheel installed"
"$PY" -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "$(ls "$WORK"/dist/*.whl)[test,nvrtc]"
cd "$WORK"                                          # outside the checkout: only the installed files count
python - <<'PY'
import minidiff, pathlib
where = pathlib.Path(minidiff.__file__).parent
assert "site-packages" in str(where), where
print("minidiff", minidiff.__version__, "from", where)
PY

echo "== every subcommand's --help"
minidiff --help > /dev/null
for cmd in generate chat trace compare train sudoku quantize; do
  minidiff "$cmd" --help > /dev/null || { echo "minidiff $cmd --help failed"; exit 1; }
  echo "ok  minidiff $cmd --help"
done

echo "== generate (the embedded default model, offline)"
HF_HUB_OFFLINE=1 minidiff generate "Write a haiku about the sea" --seed 0 < /dev/null | tee generate.txt
test -s generate.txt

echo "== train (3 steps from the embedded model)"
printf '{"pairs": [["Say hi", "hi"], ["Say bye", "bye"], ["Count", "1 2 3"]]}\n' > pairs.json
minidiff train --data pairs.json --out run --steps 3 --batch 2 --save-every 3 < /dev/null
test -f run/model.safetensors && test -f run/trainer_state.json

echo "== sudoku --plain - (the embedded Sudoku model)"
echo "530070000600195000098000060800060003400803001700020006060000280000419005000080079" \
  | minidiff sudoku --plain - | tee sudoku.txt
grep -Eq '^[1-9]{81}$' sudoku.txt

echo "== kernels from the installed files"
python - <<'PY'
from minidiff.kernels import lowbit_matmul
lib = lowbit_matmul.library()
print("CPU kernel:", lowbit_matmul.status(), "from", lowbit_matmul.SOURCE)
assert lib is not None, lowbit_matmul.status()
PY
python "$ROOT/tools/compile_kernels.py" --require | tee compile.txt
grep -q "site-packages/minidiff/kernels/moe_experts.cu" compile.txt

echo "== the sdist's own tests (torch-free subset)"
mkdir sdist && tar -xzf "$(ls "$WORK"/dist/*.tar.gz)" -C sdist
cd sdist/minidiff-*
test -f LICENSE && test -f tests/conftest.py && test -d tests/golden
python -m pytest -p no:cacheprovider -q tests/test_golden.py tests/test_golden_trajectory.py tests/test_ops.py \
  tests/test_native.py tests/test_kernel_emulator.py tests/test_kernels_compile.py tests/test_sampler_minimal.py
echo "check_install: ok"
