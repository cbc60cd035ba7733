"""Bit-for-bit parity of a fixed-seed run across a code change.

Runs the real entry point (``python -m capscale.run``) on the tiny offline task of the
tests (a 2-layer BERT, 64 training rows) with movement pruning + CAP, once with the
contrastive banks (``cap.mode=bank``) and once online (``cap.mode=online``), one thread,
fixed seed, and records every step's loss components, the evaluations, and the SHA-256
of the exported masks and weights. Run it on two commits and compare::

    python bench/refactor_parity.py --label before   # on the old commit
    python bench/refactor_parity.py --label after    # on the new one

Each label goes to ``bench/results/refactor_parity.json``; when both are there the file
also says, per mode, whether every recorded value is identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from _tiny_run import overrides, setup  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "refactor_parity.json"
TIMING = {"examples_per_s"}  # wall-clock dependent: not part of the comparison


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run(mode: str, tmp: Path, assets: dict[str, Path]) -> dict:
    out = tmp / mode
    # score_warm_start pinned: the recorded labels ran before its default became magnitude
    args = overrides(assets, out, **{"cap.mode": mode, "report.enabled": "false",
                                     "train.seed": 7, "pruning.score_warm_start": "none"})
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CAPSCALE_CPU="1",
               HF_HUB_OFFLINE="1")
    subprocess.run([sys.executable, "-m", "capscale.run", *args], check=True, env=env,
                   cwd=ROOT, capture_output=True)
    history = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
               for line in (out / "history.jsonl").read_text().splitlines()]
    return {"steps": len(history), "history": history,
            "evals": json.loads((out / "evals.json").read_text()),
            "masks_sha256": sha(out / "pruned" / "masks.safetensors"),
            "weights_sha256": sha(out / "pruned" / "model" / "model.safetensors")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--label", required=True)
    args = ap.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        assets = setup(Path(tmp))
        record = {"commit": commit, "modes": {m: run(m, Path(tmp), assets)
                                             for m in ("bank", "online")}}
    data = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    data[args.label] = record
    if "before" in data and "after" in data:
        data["identical"] = {m: data["before"]["modes"][m] == data["after"]["modes"][m]
                             for m in ("bank", "online")}
    RESULTS.write_text(json.dumps(data, indent=1))
    print(json.dumps({k: v for k, v in data.items() if k in ("identical",)} or
                     {"written": args.label, "commit": commit}))


if __name__ == "__main__":
    main()
