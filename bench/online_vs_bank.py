"""Online mode against bank mode: same task, same teacher, same steps.

For each task (a tiny 2-layer BERT on a synthetic 3-class corpus, and the packaged
MiniLM on the tweets corpus with a small budget) and each ``cap.mode``:

* setup seconds (bank mode: encoding the training set into the PrC / FiC banks),
* median step seconds (online mode runs the references on every batch),
* bytes per rank of the banks or queues (and of the frozen model copies online mode
  keeps: the PrC model and the SnC snapshots), and what a bank sharded over 2 / 8 ranks
  would hold per rank,
* accuracy after the same number of steps.

Usage::

    python bench/online_vs_bank.py                # both tasks, CPU: several minutes
    python bench/online_vs_bank.py --quick        # tiny task only, few steps (smoke)

Writes ``bench/results/online_vs_bank.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from capscale.checks import load_run_config  # noqa: E402
from capscale.console import Console  # noqa: E402
from capscale.contrastive.online import OnlineObjective  # noqa: E402
from capscale.distributed import DistContext  # noqa: E402
from capscale.models.loading import load_tokenizer  # noqa: E402
from capscale.recipe import CAPRecipe  # noqa: E402
from capscale.train.hooks import LoopHook  # noqa: E402

CACHE = ROOT / "bench" / "cache" / "online_vs_bank"
# Scores from 0, as the recorded results (the schema's default is now magnitude).
COMMON = ["pruning.method=movement", "pruning.final_sparsity=0.8",
          "pruning.score_warm_start=none", "cap.num_negatives=1024",
          "cap.queue_size=1024", "cap.snapshot_schedule=epoch", "cap.max_snapshots=4",
          "train.progress=false", "train.eval_batch_size=64"]


def tiny_task(steps: int) -> list[str]:
    """A 2-layer, 64-wide BERT and a 3-class corpus whose words give the label away."""
    from transformers import BertConfig, BertForSequenceClassification
    CACHE.mkdir(parents=True, exist_ok=True)
    model_dir, csv = CACHE / "tiny_bert", CACHE / "tiny.csv"
    if not (model_dir / "config.json").is_file():
        tok = load_tokenizer("minilm")
        torch.manual_seed(0)
        BertForSequenceClassification(BertConfig(
            vocab_size=tok.vocab_size, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, max_position_embeddings=64,
            num_labels=3)).save_pretrained(model_dir)
        tok.save_pretrained(model_dir)
    words = ["awful bad sad", "plain okay table", "great happy lovely"]
    rng = random.Random(0)
    rows = ["sentence,label"] + [
        " ".join(rng.choice((words[i % 3] + " the a of").split()) for _ in range(8))
        + f",{i % 3}" for i in range(1200)]
    csv.write_text("\n".join(rows) + "\n")
    return [f"model.name_or_path={model_dir}", f"data.train_file={csv}",
            "data.text_column=sentence", "data.label_column=label", "data.max_length=16",
            "train.batch_size=32", "train.lr=0.001", "teacher_training.max_steps=60",
            "teacher_training.lr=0.001", f"train.max_steps={steps}"]


def minilm_task(steps: int) -> list[str]:
    return ["model.name_or_path=minilm", "data.preset=tweets", "data.max_length=48",
            "data.max_train_samples=1000", "data.max_eval_samples=300",
            "train.batch_size=16", "train.lr=0.0001", "teacher_training.max_steps=80",
            f"train.max_steps={steps}"]


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _model_bytes(model: nn.Module) -> int:
    return sum(_bytes(p) for p in model.parameters()) + sum(_bytes(b) for b in model.buffers())


class StepTimer(LoopHook):
    """Seconds of each step's phases (capscale.train.hooks.Phases), summed per step."""

    def __init__(self) -> None:
        self.current = 0.0
        self.durations: list[float] = []

    def listen(self, name: str, seconds: float) -> None:
        self.current += seconds

    def before_step(self, step: int) -> None:
        self.current = 0.0

    def after_step(self, record: dict[str, Any]) -> None:
        self.durations.append(self.current)


def run_mode(overrides: list[str], mode: str, out_dir: Path) -> dict[str, Any]:
    cfg = load_run_config(None, [*COMMON, *overrides, f"cap.mode={mode}",
                             f"output_dir={out_dir}"])
    cfg.train.epochs = 1_000  # max_steps decides; epochs only set the snapshot points
    ctx, console = DistContext(), Console(enabled=False, progress=False)
    run = CAPRecipe(cfg, ctx, console)
    t0 = time.perf_counter()
    run.setup()  # fine-tunes (or reuses) the teacher, then the mode's own set-up
    setup_s = time.perf_counter() - t0 - run.seconds["teacher"]
    timer = StepTimer()
    run.phases.listeners.append(timer.listen)
    run.train([timer])
    durations = timer.durations
    obj = run.objective
    if isinstance(obj, OnlineObjective):
        state = obj.memory_bytes()
        copies = [m for name in ("prc", "snc") for m, _ in obj.references.get(name, [])
                  if m is not run.teacher]
        copies_bytes = sum(_model_bytes(m) for m in copies)
    else:
        state = sum(_bytes(b) for b in obj.buffers() if b.dim() >= 2)  # the bank tensors
        copies_bytes = 0
    data, teacher_metrics = run.data, run.teacher_metrics
    metrics, sparsity = run.state.evals[-1]["metrics"], run.controller.report()
    n = len(data.train)
    rec: dict[str, Any] = {
        "mode": mode, "train_examples": n, "steps": run.state.step,
        "setup_s": round(setup_s, 2),
        "step_s_median": round(statistics.median(durations), 4),
        "step_s_mean": round(statistics.fmean(durations), 4),
        "state_bytes_per_rank": state, "frozen_copies_bytes_per_rank": copies_bytes,
        "accuracy": metrics["accuracy"],
        "teacher_accuracy": (teacher_metrics or {}).get("accuracy"),
        "linear_sparsity": sparsity["linear_sparsity"],
    }
    if mode == "bank":
        rec["sharded_bytes_per_rank"] = {str(w): math.ceil(state * math.ceil(n / w) / n)
                                         for w in (2, 8)}
    return rec


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=None, help="steps per run")
    p.add_argument("--quick", action="store_true", help="tiny task only, 10 steps")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 is fastest for the tiny model and on a busy CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    tasks = {"tiny_bert_synthetic": tiny_task(args.steps or (10 if args.quick else 150))}
    if not args.quick:
        tasks["minilm_tweets"] = minilm_task(args.steps or 40)
    results: dict[str, Any] = {"device": "cpu", "threads": args.threads, "tasks": {}}
    dest = ROOT / "bench" / "results" / "online_vs_bank.json"
    dest.parent.mkdir(parents=True, exist_ok=True)
    for name, overrides in tasks.items():
        out = CACHE / name
        results["tasks"][name] = [run_mode(overrides, mode, out) for mode in ("bank", "online")]
        for r in results["tasks"][name]:
            print(f"{name:22s} {r['mode']:6s} setup {r['setup_s']:7.2f} s  step "
                  f"{r['step_s_median']:.3f} s  state {r['state_bytes_per_rank'] / 2**20:8.2f} "
                  f"MiB  copies {r['frozen_copies_bytes_per_rank'] / 2**20:7.1f} MiB  "
                  f"acc {r['accuracy']:.3f}")
        dest.write_text(json.dumps(results, indent=1))  # after each task: keep partials
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
