#!/usr/bin/env bash
# A Sudoku training sitting on a lent GPU, for the device time left after tools/gpu_check.sh: the committed run
# in tools/sudoku_checkpoint/ goes on through CuPy for M minutes (default 4; fractions allowed; a finished
# run has nothing left: start the next fine-tune there instead, `minidiff train --model ... --device cuda`). The weights and
# optimizer state land in $OUT/sudoku_checkpoint/ (three files, within what a device call brings back), the log
# in $OUT/sudoku.log. Back here, copy them over tools/sudoku_checkpoint/ and evaluate on the CPU:
#     bash tools/gpu_train_sudoku.sh [M]
#     cp <files_at>/sudoku_checkpoint/* tools/sudoku_checkpoint/
#     python tools/train_sudoku.py --out /tmp/e --run tools/sudoku_checkpoint --eval-only --per-bin 50
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT/sudoku_checkpoint"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
MIN="${1:-4}"
RUN="$(mktemp -d)/sudoku_checkpoint"
cp -r tools/sudoku_checkpoint "$RUN"
$PY -m minidiff train --data tools/sudoku_checkpoint/train_pairs.json --out "$RUN" --resume --device cuda \
    --stop-after-minutes "$MIN" 2>&1 | tr '\r' '\n' | tail -n 40 | tee "$OUT/sudoku.log"
cp "$RUN/model.safetensors" "$RUN/trainer_state.json" "$RUN/trainer_state.safetensors" "$OUT/sudoku_checkpoint/"
