"""Fine-tune the dense teacher (FiC) when the user gives none, and cache it.

A plain cross-entropy run of the pre-trained encoder on the task. The result is saved
under ``<output_dir>/teacher`` with its metrics; a later run with the same config finds
it there and skips the work. ``train.gradient_checkpointing`` checkpoints its encoder
layers as it does the student's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import cast

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from capscale.config import Config, config_to_dict
from capscale.console import Console
from capscale.data import TaskData, build_loaders, loader_options, model_inputs
from capscale.distributed import DistContext, make_strategy
from capscale.models.loading import adapter_for, load_classifier, output_logits
from capscale.models.recompute import checkpoint_layers
from capscale.tasks import Task
from capscale.train.evaluation import evaluate
from capscale.train.hooks import Phases
from capscale.train.loop import TrainLoop
from capscale.train.state import RunState
from capscale.train.step import Student, Update, linear_warmup_decay, param_groups


def _fingerprint(cfg: Config) -> dict:
    c = config_to_dict(cfg)
    data = {k: v for k, v in c["data"].items() if k != "cache_tokenized"}  # changes no result
    return {"model": c["model"]["name_or_path"], "data": data,
            "teacher_training": c["teacher_training"], "seed": c["train"]["seed"]}


def finetune_teacher(cfg: Config, ctx: DistContext, data: TaskData,
                     tokenizer: PreTrainedTokenizerBase, task: Task, console: Console
                     ) -> tuple[str, dict[str, float]]:
    """Return (path, dev metrics) of a dense teacher fine-tuned on the task (cached)."""
    out = Path(cfg.output_dir) / "teacher"
    marker = out / "capscale_teacher.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("fingerprint") == _fingerprint(cfg):
            console.log(f"reusing the fine-tuned teacher in {out}")
            return str(out), info["metrics"]
    tcfg = cfg.teacher_training
    loaders = build_loaders(data, tokenizer, cfg.data, tcfg.batch_size,
                            cfg.train.eval_batch_size, cfg.train.seed, ctx.rank, ctx.world_size,
                            **loader_options(cfg.train.dataloader_workers, ctx.device))
    total = len(loaders.train) * tcfg.epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)

    def load() -> torch.nn.Module:
        return load_classifier(cfg.model.name_or_path, data.num_labels, data.label_names,
                               cfg.model.trust_remote_code, task)

    torch.manual_seed(cfg.train.seed)
    model = load().to(ctx.device)
    if cfg.train.gradient_checkpointing:  # the same gradients, less activation memory
        checkpoint_layers(model, adapter_for(model, cfg.model.adapter, task))
    strategy = make_strategy(ctx, cfg.distributed, cfg.train.precision)
    wrapped, opt, sched = strategy.prepare_student(
        model, param_groups(model, tcfg.lr, tcfg.weight_decay, [], 0.0),
        linear_warmup_decay(int(tcfg.warmup_ratio * total), total),
        micro_batch_size=tcfg.batch_size, grad_clip=cfg.train.grad_clip)
    student = Student(wrapped, opt, sched)
    phases = Phases()
    update = Update(strategy, student, ctx, cfg.train.grad_clip, phases)
    state = RunState()

    def step(batches: list[dict[str, torch.Tensor]]) -> dict[str, float]:
        (batch,) = batches  # one batch per optimiser step
        with phases("forward"), strategy.autocast():
            logits = output_logits(wrapped(**model_inputs(batch, ctx.device))).float()
        with strategy.precision.exact():
            losses = {"ce": task.loss(logits, batch["labels"].to(ctx.device))}
        return update(losses, state.step, state.batches_drawn)

    start = time.perf_counter()
    wrapped.train()
    TrainLoop(state, loaders.train, total, step, console, "fine-tuning the dense teacher",
              lr_fn=student.lr, world_size=ctx.world_size).run()
    metrics = evaluate(wrapped, loaders.eval, ctx, task, data.num_labels,
                       loaders.eval_reference, strategy.autocast)
    key = task.main_metric
    console.log(f"dense teacher: {key} {metrics[key]:.4f} after {state.step} steps "
                f"({time.perf_counter() - start:.0f} s)")
    plain = strategy.plain_copy(wrapped, load)  # collective
    if ctx.is_main:
        assert plain is not None  # the main rank gets the whole model
        cast(PreTrainedModel, plain).save_pretrained(out)
        tokenizer.save_pretrained(out)
        marker.write_text(json.dumps({"fingerprint": _fingerprint(cfg), "metrics": metrics,
                                      "steps": state.step}, indent=1))
    ctx.barrier()
    return str(out), metrics
