#!/usr/bin/env bash
# Train the bundled ReLU² model (context 512) and bundle it into the package data (bf16 + CETT-0.2 sidecar).
#   scripts/train_bundled.sh RUN_DIR
# The run saves its state every 200 steps; after an interruption, run the script again: it resumes.
# ~47 min on the 2-core AMD EPYC VM (about 4,000 tokens/s at 2 threads); the flags are the committed model's.
set -euo pipefail
RUN=${1:?usage: scripts/train_bundled.sh RUN_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
[ -f "$RUN/corpus/train.npy" ] || sparseinfer corpus "$RUN/corpus"
OUT="$RUN/relu2-ctx512"
resume=()
[ -f "$OUT/train_state.pt" ] && resume=(--resume)
[ -f "$OUT/model.safetensors" ] || sparseinfer train --activation relu2 --corpus "$RUN/corpus" --out "$OUT" \
  --hidden 192 --layers 4 --heads 3 --neurons 768 --context 512 --batch 8 --steps 2800 --lr 0.003 \
  --warmup 100 --threads 2 --save-every 200 --no-progress "${resume[@]}"
sparseinfer bundle-model "$OUT" --text "$RUN/corpus/calibration.txt" \
  --out "$ROOT/server/sparseinfer/data/relu2-small" --tokens 32768 --seq-len 512 --predictor-epochs 10
