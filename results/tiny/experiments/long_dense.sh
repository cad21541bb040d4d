#!/bin/bash
# Round 4b: the tiny dense stage for many more steps, on a GPU (results/tiny/experiments/README.md).
# usage (repository root, stage 0 already in runs/tiny/vision-tiny, e.g. after `make demo`):
#   NAME=long11k STEPS=11000 WORKERS=12 bash results/tiny/experiments/long_dense.sh 32000 OUTDIR
# generates a mini suite with TRAIN_SIZE training conversations into runs/gpu/data (kept if there), trains
# tiny_dense on it for STEPS steps (checkpoints at STEPS/2 and STEPS) and tars both into OUTDIR.
set -e
T0=$(date +%s); SIZE=$1; OUT_DIR=$2; NAME=${NAME:-tiny_dense}
mkdir -p "$OUT_DIR" runs/gpu/run
if [ -f runs/gpu/data/_SUITE.json ]; then  # kept from an earlier call: only if it is the size asked for
    python3 -c "import json, sys; sys.exit(json.load(open('runs/gpu/data/_SUITE.json'))['params']['train_size'] != $SIZE)" \
        || { echo "runs/gpu/data holds another train size: remove it"; exit 2; }
else
    python3 -m stgc.cli data --out runs/gpu/data --train-size "$SIZE" --quiet
fi
echo "data: $(( $(date +%s) - T0 )) s"
rm -rf runs/gpu/run/vision-tiny && cp -r runs/tiny/vision-tiny runs/gpu/run/vision-tiny
python3 -m stgc.cli train tiny_dense --output-dir "runs/gpu/run/$NAME" \
    data.train=runs/gpu/data/train data.tokenizer=runs/gpu/data/tokenizer \
    training.dataloader_workers="${WORKERS:-8}" training.logging_steps=200 \
    training.max_steps="$STEPS" training.save_steps=$(( STEPS / 2 )) > "$OUT_DIR/train.log" 2>&1
for ck in "runs/gpu/run/$NAME"/checkpoint-*; do tar czf "$OUT_DIR/$(basename "$ck").tgz" -C "$(dirname "$ck")" "$(basename "$ck")"; done
echo "total: $(( $(date +%s) - T0 )) s"
