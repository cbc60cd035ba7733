"""Every shipped encoder family pruned end to end with CAP, unstructured and structured.

For each family a tiny model (3 layers, hidden 32, 4 heads, FFN 48; ALBERT: 3 groups
applied twice; random weights; the configs of tests/structured_models.py with the
packaged MiniLM tokenizer's vocabulary) is saved with that tokenizer and used as student
and teacher. ``capscale.recipe.CAPRecipe`` prunes it on a 3-class word task (the CSV of
tests/distributed_helpers.py, re-tokenised by WordPiece) with PrC + FiC + SnC (bank
mode) and KD:

* unstructured CAP-m: movement, 24 steps, cubic schedule to 90% (top-k per logical
  matrix: a fused Q/K/V map as three, a GLU input as two halves);
* structured CAP-f: heads and FFN neurons at levels 0.25 / 0.5, 4 retraining steps each.

Each run is exported by ``recipe.finish()`` as the real job does; the export is
re-loaded with transformers alone (``trust_remote_code`` for the structured one) and
its logits on an evaluation batch compared with the masked student's. Written:
``bench/results/encoders.json`` (one record per family and method) and
``encoders.md`` (the support table of the README).

    PYTHONPATH=. python bench/encoders.py                    # all families
    PYTHONPATH=. python bench/encoders.py --families modernbert --out /tmp/enc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import torch
from distributed_helpers import make_assets
from structured_models import CONFIGS
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from capscale.checks import load_run_config
from capscale.console import Console
from capscale.data import model_inputs
from capscale.distributed import DistContext
from capscale.models.loading import resolve_model_path
from capscale.recipe import CAPRecipe

FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "deberta",
            "modernbert", "albert", "distilbert", "mpnet")
LAYOUT = {"deberta": "fused Q/K/V, per head (in_proj), per-head q/v biases",
          "modernbert": "fused Q/K/V stacked (Wqkv), gated FFN (Wi)",
          "albert": "shared layers (3 groups x 2 applications here)",
          "mpnet": "per-head relative position bias shared by all layers",
          "deberta-v2": "separate Q/K/V, per-head position projections",
          "distilbert": "separate Q/K/V (q_lin, ...)"}
METHODS = {
    "unstructured": ["pruning.method=movement", "pruning.final_sparsity=0.9",
                     "pruning.initial_warmup=2", "pruning.final_warmup=6",
                     "train.max_steps=24", "pruning.score_lr=0.05"],
    "structured": ["pruning.method=structured", "structured.levels=[0.25,0.5]",
                   "structured.retrain_steps=4", "structured.importance_fraction=0.5"],
}


def save_family(family: str, root: Path, tokenizer: Any) -> Path:
    cfg = CONFIGS[family]()
    cfg.vocab_size = tokenizer.vocab_size
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(cfg)
    path = root / family
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def run_one(family: str, method: str, model_dir: Path, data: dict[str, str], out: Path
            ) -> dict[str, Any]:
    overrides = [f"model.name_or_path={model_dir}", f"model.teacher={model_dir}",
                 f"data.train_file={data['train']}", f"data.validation_file={data['validation']}",
                 "data.max_length=24", f"output_dir={out}", "cap.num_negatives=16",
                 "cap.snapshot_schedule=epoch", "train.batch_size=8", "train.epochs=4",
                 "train.eval_batch_size=16", "train.lr=1e-3", "train.progress=false",
                 *METHODS[method]]
    t0 = time.perf_counter()
    recipe = CAPRecipe(load_run_config(None, overrides), DistContext(),
                       Console(enabled=False, progress=False))
    recipe.setup()
    recipe.train()
    inputs = model_inputs(next(iter(recipe.loaders.eval)), "cpu")
    student = recipe.student.model.eval()
    with torch.no_grad():
        masked = student(**inputs).logits
    recipe.finish(export=True)
    seconds = time.perf_counter() - t0
    report = json.loads((out / "pruned" / "sparsity_report.json").read_text())
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        out / "pruned" / "model", trust_remote_code=method == "structured").eval()
    with torch.no_grad():
        diff = float((reloaded(**inputs).logits - masked).abs().max())
    encoder = sum(p.numel() for n, p in reloaded.named_parameters()
                  if n.startswith(reloaded.base_model_prefix))
    record = {"family": family, "method": method, "steps": recipe.state.step,
              "seconds": round(seconds, 1), "max_abs_logit_diff": diff,
              "model_class": type(reloaded).__name__, "loaded_encoder_params": encoder}
    if method == "unstructured":
        record.update(linear_sparsity=report["linear_sparsity"],
                      logical_matrices=sorted({k.split(".", 1)[1] for k in report["per_matrix"]}),
                      shared_layers=report["shared_layers"])
    else:
        record.update(head_sparsity=report["head_sparsity"], ffn_sparsity=report["ffn_sparsity"],
                      encoder_sparsity=report["encoder_sparsity"],
                      exported_encoder_parameters=report["exported_encoder_parameters"],
                      encoder_parameters=report["encoder_parameters"],
                      layer_applications=report["layer_applications"])
    return record


def markdown(records: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by = {(r["family"], r["method"]): r for r in records}
    lines = [f"# Encoder families: CAP end to end ({meta['command']})", "",
             f"Machine: {meta['machine']}; load average before: {meta['load_before']}.", "",
             "| family | layout | unstructured CAP-m: sparsity, logical matrices, export max "
             "abs logit diff | structured CAP-f: heads / FFN pruned, encoder params kept, "
             "export max abs logit diff |", "|---|---|---|---|"]
    for fam in dict.fromkeys(r["family"] for r in records):
        u, s = by.get((fam, "unstructured")), by.get((fam, "structured"))
        ucell = (f"{u['linear_sparsity']:.1%}, {len(u['logical_matrices'])} per layer, "
                 f"{u['max_abs_logit_diff']:.1e}") if u else "not run"
        scell = (f"{s['head_sparsity']:.0%} / {s['ffn_sparsity']:.0%}, "
                 f"{s['exported_encoder_parameters']:,} of {s['encoder_parameters']:,}, "
                 f"{s['max_abs_logit_diff']:.1e}") if s else "not run"
        lines.append(f"| {fam} | {LAYOUT.get(fam, 'separate Q/K/V (BERT layout)')} | "
                     f"{ucell} | {scell} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    load_before = os.getloadavg()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = make_assets(root / "assets")
        for family in args.families:
            model_dir = save_family(family, root / "models", tokenizer)
            for method in METHODS:
                rec = run_one(family, method, model_dir, data, root / "runs" / family / method)
                print(json.dumps(rec), flush=True)
                records.append(rec)
    meta = {"command": "PYTHONPATH=. python bench/encoders.py "
                       + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch "
                       f"{torch.__version__}, one thread",
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "encoders.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    (out / "encoders.md").write_text(markdown(records, meta))
    print(markdown(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
