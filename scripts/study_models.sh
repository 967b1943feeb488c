#!/usr/bin/env bash
# After `scripts/train_models.sh RUN_DIR`: regenerate docs/activation_study.md (+ PNGs) from studies of the four
# checkpoints. (The bundled model is trained and bundled by scripts/train_bundled.sh.)
#   scripts/study_models.sh RUN_DIR
# The flags are the ones the committed document was made with (the document prints its own command).
set -euo pipefail
RUN=${1:?usage: scripts/study_models.sh RUN_DIR}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
sparseinfer activation-study "$RUN/relu2" "$RUN/relu" "$RUN/reglu" "$RUN/swiglu" \
  --text "$RUN/corpus/calibration.txt" --corpus "$RUN/corpus" --out "$ROOT/docs" --work "$RUN/studies" \
  --tokens 16384 --seq-len 256 --predictor-epochs 10 --no-progress
