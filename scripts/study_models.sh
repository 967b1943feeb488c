#!/usr/bin/env bash
# After `scripts/train_models.sh RUN_DIR`: build the bundled ReLU² model (bf16 + CETT-0.2 sidecar) into the package
# data and regenerate docs/activation_study.md (+ PNGs) from studies of the four checkpoints.
#   scripts/study_models.sh RUN_DIR
# The flags are the ones the committed bundle and document were made with (the document prints its own command).
set -euo pipefail
RUN=${1:?usage: scripts/study_models.sh RUN_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
sparseinfer bundle-model "$RUN/relu2" --text "$RUN/corpus/calibration.txt" \
  --out "$ROOT/server/sparseinfer/data/relu2-small" --tokens 32768 --seq-len 256 --predictor-epochs 10
sparseinfer activation-study "$RUN/relu2" "$RUN/relu" "$RUN/reglu" "$RUN/swiglu" \
  --text "$RUN/corpus/calibration.txt" --corpus "$RUN/corpus" --out "$ROOT/docs" --work "$RUN/studies" \
  --tokens 16384 --seq-len 256 --predictor-epochs 10 --no-progress
