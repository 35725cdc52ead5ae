#!/usr/bin/env bash
# A Sudoku training sitting on a lent GPU, for the device time left after tools/gpu_check.sh. Two forms:
#     bash tools/gpu_train_sudoku.sh M                        # the committed run goes on for M minutes (--resume)
#     bash tools/gpu_train_sudoku.sh M PAIRS.json BATCH LR    # a new fine-tune of it on PAIRS, sized to M minutes
# The second probes the step time first (tools/train_step_time.py) and sets --steps so that the whole cosine
# schedule fits in M minutes (a schedule cut short would end at a high learning rate); --stop-after-minutes
# stays on as a guard. PAIRS may be gzipped (NAME.json.gz). The weights and optimizer state land in
# $OUT/sudoku_checkpoint/ (three files, within what a device call brings back), the log in $OUT/sudoku.log.
# Back here, copy them into a run folder and evaluate on the CPU:
#     cp -r tools/sudoku_checkpoint RUN && cp <files_at>/sudoku_checkpoint/* RUN/
#     python tools/train_sudoku.py --out /tmp/e --run RUN --eval-only --per-bin 50 --exclude PAIRS.json
set -uo pipefail
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT/sudoku_checkpoint"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
MIN="${1:-4}"
RUN="$(mktemp -d)/sudoku_checkpoint"
if [ $# -ge 2 ]; then
    DATA="$2"; BATCH="${3:-128}"; LR="${4:-1e-3}"
    case "$DATA" in *.gz) gunzip -c "$DATA" > "${RUN%/*}/pairs.json"; DATA="${RUN%/*}/pairs.json";; esac
    START=$(date +%s)
    PROBE=$($PY tools/train_step_time.py --model tools/sudoku_checkpoint --data "$DATA" --batch "$BATCH" \
            --device cuda --budget-s "$(( ${MIN%.*} * 60 - 30 ))" | tail -n 1)
    STEPS=$($PY -c "import json,sys; print(json.loads(sys.argv[1])['steps'])" "$PROBE") || exit 1
    echo "probe $PROBE ($(( $(date +%s) - START )) s) -> $STEPS steps" | tee "$OUT/sudoku.log"
    $PY -m minidiff train --model tools/sudoku_checkpoint --data "$DATA" --out "$RUN" --steps "$STEPS" \
        --batch "$BATCH" --lr "$LR" --warmup 100 --seed 6 --save-every 250 --device cuda \
        --stop-after-minutes "$MIN" 2>&1 | tr '\r' '\n' | tail -n 40 | tee -a "$OUT/sudoku.log"
else
    cp -r tools/sudoku_checkpoint "$RUN"
    $PY -m minidiff train --data tools/sudoku_checkpoint/train_pairs.json.gz --out "$RUN" --resume --device cuda \
        --stop-after-minutes "$MIN" 2>&1 | tr '\r' '\n' | tail -n 40 | tee "$OUT/sudoku.log"
fi
cp "$RUN/model.safetensors" "$RUN/trainer_state.json" "$RUN/trainer_state.safetensors" "$OUT/sudoku_checkpoint/"
