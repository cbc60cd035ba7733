"""bf16 against fp32 on the demo's protocol (CPU): accuracy, losses, masks, time.

Runs ``capscale/configs/demo_minilm_tweets.yaml`` (the real MiniLM on tweets sentiment,
CAP-m to 90% encoder sparsity, 300 steps) twice, one process after the other, with
``train.precision=fp32`` then ``bf16`` (``cap.reference_dtype`` auto: the frozen
references in bf16 too). The fp32 run fine-tunes the teacher; the bf16 run reuses that
very teacher (``model.teacher``), so the two differ only in the pruning run's
arithmetic. Recorded: the verified export's dev accuracy, the loss of the first 20 steps
(the largest relative gap), the overlap of the final masks (the fraction of the fp32
run's kept encoder weights that the bf16 run keeps too: the exports' non-zero
patterns), and the pruning phase's wall time.

    python bench/precision.py   # -> bench/results/precision.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONFIG = "capscale/configs/demo_minilm_tweets.yaml"


def _load() -> str:
    return Path("/proc/loadavg").read_text().strip() if Path("/proc/loadavg").exists() else ""


def run(out: Path, precision: str, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "capscale.run", "--config", CONFIG,
           f"output_dir={out}", f"train.precision={precision}", "train.progress=false",
           "checkpoint.every_steps=0", *extra]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, env={**os.environ, "TOKENIZERS_PARALLELISM":
                                                   "false"})
    results = json.loads((out / "results.json").read_text())
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    return {"command": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - t0, 1),
            "results": results, "losses": [h["loss"] for h in history]}


def kept(model_dir: Path) -> dict[str, torch.Tensor]:
    """The non-zero pattern of every encoder linear weight of an export."""
    from safetensors.torch import load_file
    state: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(f))
    return {k: v != 0 for k, v in state.items()
            if ".encoder." in k and k.endswith(".weight") and v.dim() == 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="outputs/bench_precision")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for both runs")
    args = ap.parse_args()
    root = ROOT / args.out
    load = [_load()]
    fp32 = run(root / "fp32", "fp32", args.overrides)
    bf16 = run(root / "bf16", "bf16", [f"model.teacher={root / 'fp32' / 'teacher'}",
                                       *args.overrides])
    load.append(_load())
    a, b = kept(root / "fp32" / "pruned" / "model"), kept(root / "bf16" / "pruned" / "model")
    both = sum(int((a[k] & b[k]).sum()) for k in a)
    kept_fp32 = sum(int(a[k].sum()) for k in a)
    key = "accuracy"

    def metric(r: dict[str, Any]) -> float:
        """The verified export's dev accuracy (reloaded, fp32)."""
        verified = r["results"].get("export_verified") or {}
        return float((verified.get("metrics") or r["results"]["pruned_metrics"])[key])
    first = min(20, len(fp32["losses"]), len(bf16["losses"]))
    record = {
        "command": "python bench/precision.py " + " ".join(args.overrides),
        "machine": f"{os.cpu_count()}-core CPU, {platform.machine()}, torch {torch.__version__}",
        "load_average_at_start_and_end": load,
        "protocol": f"{CONFIG}: 300 CAP steps, the same fine-tuned teacher for both runs",
        "fp32": {"accuracy": metric(fp32), "pruning_s": fp32["results"]["seconds"]["pruning"],
                 "sparsity": fp32["results"]["sparsity"], "command": fp32["command"]},
        "bf16": {"accuracy": metric(bf16), "pruning_s": bf16["results"]["seconds"]["pruning"],
                 "sparsity": bf16["results"]["sparsity"], "command": bf16["command"]},
        "accuracy_gap_points": round(100 * (metric(bf16) - metric(fp32)), 2),
        "first_steps": first,
        "max_relative_loss_gap_first_steps": max(
            abs(x - y) / abs(x) for x, y in zip(fp32["losses"][:first], bf16["losses"][:first])),
        "mask_overlap": both / max(kept_fp32, 1),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "precision.json").write_text(json.dumps(record, indent=1) + "\n")
    md = ["# bf16 against fp32, the demo's protocol (CPU)", "",
          f"`{record['command']}` on {record['machine']}; load {load}.", "",
          "| precision | dev accuracy | pruning phase (s) | encoder sparsity |",
          "|---|---|---|---|"]
    for name in ("fp32", "bf16"):
        r = record[name]
        md.append(f"| {name} | {r['accuracy']:.4f} | {r['pruning_s']:.0f} | "
                  f"{r['sparsity']['encoder_sparsity']:.4f} |")
    md += ["", f"- accuracy gap (bf16 - fp32): {record['accuracy_gap_points']:+.2f} points",
           f"- largest relative loss gap over the first {first} steps: "
           f"{record['max_relative_loss_gap_first_steps']:.4f}",
           f"- mask overlap (fp32-kept weights the bf16 run keeps too): "
           f"{record['mask_overlap']:.4f}", ""]
    (RESULTS / "precision.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
