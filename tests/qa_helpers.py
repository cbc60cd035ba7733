"""Tiny extractive-QA assets and the 2-rank QA worker (tests/test_qa.py).

The model is a real ``BertForQuestionAnswering`` (hidden 32, 2 layers, random weights)
saved next to the packaged MiniLM WordPiece tokenizer, which tokenises the English of
tests/data/squad_tiny*.json like any BERT-uncased checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DATA = Path(__file__).resolve().parent / "data"
SQUAD = DATA / "squad_tiny.json"
SQUAD_V2 = DATA / "squad_tiny_v2.json"
GLOBAL_BATCH = 8
NO_SUP = {f"cap.modules.{m}.w_sup": 0 for m in ("prc", "fic", "snc")}


def save_qa_model(path: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """A 2-layer, 32-wide BERT QA model and the MiniLM tokenizer, saved to ``path``."""
    import transformers
    from transformers import AutoTokenizer

    from capscale.models.loading import resolve_model_path

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=128, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout)
    transformers.BertForQuestionAnswering(cfg).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(path)
    return path


def qa_overrides(model: Path, out: Path, data: Path = SQUAD, **extra: Any) -> dict[str, Any]:
    """A short CAP-m run on the tiny SQuAD file (SQuAD weights: w_u 0.5, tau 0.1, T 2)."""
    base: dict[str, Any] = {
        "model.name_or_path": str(model), "data.task_type": "qa",
        "data.train_file": str(data), "data.validation_file": str(data),
        "data.max_length": 64, "data.qa.doc_stride": 16,
        "data.qa.version_2_with_negative": data == SQUAD_V2,
        **NO_SUP, **{f"cap.modules.{m}.w_unsup": 0.5 for m in ("prc", "fic", "snc")},
        "cap.temperature": 0.1, "cap.num_negatives": 32, "cap.representation": "cls",
        "cap.max_snapshots": 2, "loss.kd_temperature": 2.0,
        "pruning.method": "movement", "pruning.final_sparsity": 0.5,
        "pruning.initial_warmup": 0, "pruning.final_warmup": 2,
        "train.batch_size": GLOBAL_BATCH, "train.eval_batch_size": 16, "train.lr": 1e-3,
        "train.max_steps": 6, "train.epochs": 2, "train.progress": False,
        "report.enabled": False, "report.trackers": [], "output_dir": str(out)}
    base.update(extra)
    return base


def as_list(overrides: dict[str, Any]) -> list[str]:
    import json
    return [f"{k}={json.dumps(v) if isinstance(v, list | bool) else v}"
            for k, v in overrides.items()]


def build_qa_run(overrides: dict[str, Any], ctx: Any) -> Any:
    """A set-up CAPRecipe (banks filled) with one SnC snapshot taken."""
    from capscale.checks import load_run_config
    from capscale.console import Console
    from capscale.recipe import CAPRecipe

    run = CAPRecipe(load_run_config(None, as_list(overrides)), ctx, Console(enabled=False))
    run.setup()
    run.snapshot(True, "test snapshot")
    return run


def window_rows(run: Any, start: int, stop: int) -> dict[str, torch.Tensor]:
    """Training windows ``[start, stop)``, collated."""
    from capscale.data import Collator
    ds = run.loaders.train.dataset
    return Collator(0)([ds[i] for i in range(start, stop)])


def first_losses(run: Any, ctx: Any) -> dict[str, float]:
    """Every loss component of the first global batch, averaged over ranks."""
    per = GLOBAL_BATCH // ctx.world_size
    run.controller.before_step(0)
    run.student.model.eval()  # no dropout: one process and two ranks see the same forward
    losses = run.loss(run.student.model, run.student.tap,
                      window_rows(run, ctx.rank * per, (ctx.rank + 1) * per), 0)
    run.student.model.train()
    return {k: float(ctx.all_reduce_sum(v.detach().float())) / ctx.world_size
            for k, v in losses.items()}


def bank_record(run: Any) -> dict[str, Any]:
    return {name: bank.vectors[:, bank.active_slots()].clone()
            for name, bank in run.objective.banks.items()}


def qa_worker(rank: int, world: int, strategy: str, overrides: dict[str, Any],
              out_dir: str) -> None:
    """One rank (of tests/rank_pool.py): the first batch's losses, the banks, the
    teacher's EM / F1 gathered over ranks, then a few steps of the real loop and the
    export."""
    from capscale.distributed import init_distributed
    ctx = init_distributed(strategy)  # the pool's process group, with this strategy
    run = build_qa_run({**overrides, "train.batch_size": GLOBAL_BATCH // world}, ctx)
    record = {"strategy": ctx.strategy, "losses": first_losses(run, ctx),
              "banks": bank_record(run), "teacher_metrics": run.evaluate(run.teacher)}
    run.train()
    results = run.finish(export=True)
    record["pruned_metrics"] = results["pruned_metrics"]
    record["steps"] = results["steps"]
    if rank == 0:
        torch.save(record, Path(out_dir) / "record.pt")
    dist.barrier()
