#!/usr/bin/env bash
# Set up, then prune the real all-MiniLM-L6-v2 on tweets sentiment to 90% encoder
# sparsity with CAP (movement pruning + PrC/FiC/SnC + KD), on CPU, no hub needed.
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.max_steps=50`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${PYTHON:-python3}" -m capscale.run --config capscale/configs/demo_minilm_tweets.yaml "$@"
