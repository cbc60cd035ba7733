#!/usr/bin/env bash
# The prepared GPU check (one H100 / H200, under 8 minutes), run from the repository root
# on a machine where capscale is installed (bash scripts/setup.sh):
#
#   bash bench/gpu_check.sh            # -> bench/results/gpu_check.json
#
# 1. RoBERTa-large-shaped CAP steps (355 M parameters, movement + PrC / FiC / SnC banks +
#    KD) at the paper's batch of 32 x 128 tokens on one GPU: fp32 (TF32 matmuls), bf16,
#    bf16 + activation checkpointing; tokens/s, the step's peak allocated memory and
#    `capscale plan`'s estimate for each (bench/scale_train.py --cuda).
# 2. The demo config (real MiniLM, tweets sentiment, CAP-m to 90%) end to end in bf16:
#    teacher fine-tuning, 300 pruning steps, the verified export's dev accuracy.
# 3. The 2:4 semi-structured kernel check (bench/nm_gpu_speed.py).
# Each part has its own time limit; a part that fails is recorded as failed and the
# others still run. Exits non-zero when any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
OUT=bench/results
WORK=${GPU_CHECK_WORK:-/tmp/capscale_gpu_check}
mkdir -p "$OUT" "$WORK"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 2)"; then
    echo "gpu_check: no CUDA device" >&2
    exit 2
fi
status=()
run_part() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$WORK/$name.log" 2>&1
    local rc=$?
    status+=("$name=$rc:$((SECONDS - t0))")
    echo "gpu_check: $name rc=$rc in $((SECONDS - t0)) s" >&2
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    > "$WORK/gpu.txt" 2>/dev/null || true
run_part scale_train 300 "$PY" bench/scale_train.py --cuda --guard-gib 120 \
    --work "$WORK/scale" --out "$OUT"
run_part demo_bf16 240 "$PY" -m capscale.run --config capscale/configs/demo_minilm_tweets.yaml \
    train.precision=bf16 train.progress=false checkpoint.every_steps=0 \
    "output_dir=$WORK/demo_bf16"
run_part nm_2to4 120 "$PY" bench/nm_gpu_speed.py
"$PY" - "$WORK" "$OUT" "${status[@]}" <<'EOF'
import json, sys, time
from pathlib import Path
work, out, parts = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
def read(p):
    try:
        return json.loads(Path(p).read_text())
    except (OSError, ValueError):
        return None
record = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
          "gpu": (work / "gpu.txt").read_text().strip() if (work / "gpu.txt").exists() else "",
          "parts": {p.split("=")[0]: {"rc": int(p.split("=")[1].split(":")[0]),
                                      "seconds": int(p.split(":")[-1])} for p in parts},
          "scale_train": read(out / "scale_train_gpu.json"),
          "demo_bf16": read(work / "demo_bf16" / "results.json"),
          "nm_2to4": read(out / "nm_gpu_speed.json")}
(out / "gpu_check.json").write_text(json.dumps(record, indent=1) + "\n")
print(json.dumps(record["parts"]))
sys.exit(0 if all(v["rc"] == 0 for v in record["parts"].values()) else 1)
EOF
