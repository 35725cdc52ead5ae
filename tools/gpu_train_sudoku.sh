#!/usr/bin/env bash
# A Sudoku training sitting on a lent GPU, for device time left after tools/gpu_check.sh: the committed run in
# tools/sudoku_checkpoint/ goes on through CuPy for M minutes (default 4), is evaluated (50 held-out puzzles a
# bin, givens held, the release sampler on the CPU), and the checkpoint lands in $OUT to be committed here:
#     bash tools/gpu_train_sudoku.sh [M]        then copy $OUT/sudoku_checkpoint/* over tools/sudoku_checkpoint/
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
MIN="${1:-4}"
rm -rf "$OUT/sudoku_checkpoint" && cp -r tools/sudoku_checkpoint "$OUT/sudoku_checkpoint"
$PY -m minidiff train --data "$OUT/sudoku_checkpoint/train_pairs.json" --out "$OUT/sudoku_checkpoint" --resume \
    --device cuda --stop-after-minutes "$MIN" 2>&1 | tail -n 30 | tee "$OUT/sudoku_train.log"
$PY tools/train_sudoku.py --out "$OUT/sudoku_eval" --run "$OUT/sudoku_checkpoint" --eval-only --per-bin 50 \
    2>&1 | tee "$OUT/sudoku_eval.log"
