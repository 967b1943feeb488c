#!/usr/bin/env bash
# Rebuild the corpus and our four small LMs (ReLU², ReLU, ReGLU, SwiGLU) from nothing but the package
# registries:  scripts/train_models.sh RUN_DIR [extra `sparseinfer train` flags, e.g. --steps 2000]
# Writes RUN_DIR/corpus (splits, tokenizer.json, token files, manifest.json) and RUN_DIR/{relu2,relu,reglu,swiglu}
# (HF checkpoints + train_log.json). `sparseinfer train`'s defaults are the recipe of docs/activation_study.md.
# On a 2-core CPU the four models train at the same time, one thread each (measured: two 1-thread runs side by
# side make 1.4x the tokens/s of one 2-thread run, and the four then see identical machine conditions).
set -euo pipefail
RUN=${1:?usage: scripts/train_models.sh RUN_DIR [train flags]}
shift
[ -f "$RUN/corpus/train.npy" ] || sparseinfer corpus "$RUN/corpus"
pids=()
for act in relu2 relu reglu swiglu; do
  # Each run saves its state every 200 steps; running the script again after an interruption resumes it.
  [ -f "$RUN/$act/model.safetensors" ] && continue
  resume=()
  [ -f "$RUN/$act/train_state.pt" ] && resume=(--resume)
  sparseinfer train --activation "$act" --corpus "$RUN/corpus" --out "$RUN/$act" --threads 1 --no-progress \
    --save-every 200 "${resume[@]}" "$@" &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid"; done  # fails (set -e) if any training failed
