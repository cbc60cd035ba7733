"""Fine-tune the dense teacher (FiC) when the user gives none, and cache it.

A plain cross-entropy run of the pre-trained encoder on the task. The result is saved
under ``<output_dir>/teacher`` with its metrics; a later run with the same config finds
it there and skips the work.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from .config import Config, config_to_dict
from .console import Console
from .data import TaskData, model_inputs
from .distributed import DistContext, make_strategy
from .losses import task_loss
from .metrics import main_metric
from .teachers import load_classifier
from .train import build_loaders, evaluate, linear_warmup_decay, param_groups, set_epoch


def _fingerprint(cfg: Config) -> dict:
    c = config_to_dict(cfg)
    return {"model": c["model"]["name_or_path"], "data": c["data"],
            "teacher_training": c["teacher_training"], "seed": c["train"]["seed"]}


def finetune_teacher(cfg: Config, ctx: DistContext, data: TaskData,
                     tokenizer: PreTrainedTokenizerBase, console: Console
                     ) -> tuple[str, dict[str, float]]:
    """Return (path, dev metrics) of a dense teacher fine-tuned on the task."""
    out = Path(cfg.output_dir) / "teacher"
    marker = out / "capscale_teacher.json"
    if marker.is_file():
        info = json.loads(marker.read_text())
        if info.get("fingerprint") == _fingerprint(cfg):
            console.log(f"reusing the fine-tuned teacher in {out}")
            return str(out), info["metrics"]
    tcfg = cfg.teacher_training
    loaders = build_loaders(cfg, ctx, data, tokenizer, tcfg.batch_size)
    total = len(loaders.train) * tcfg.epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)
    torch.manual_seed(cfg.train.seed)
    model = load_classifier(cfg.model.name_or_path, data.num_labels, data.label_names,
                            cfg.model.trust_remote_code).to(ctx.device)
    strategy = make_strategy(ctx, cfg.distributed)
    wrapped, opt, sched = strategy.prepare_student(
        model, param_groups(model, tcfg.lr, tcfg.weight_decay, [], 0.0),
        linear_warmup_decay(int(tcfg.warmup_ratio * total), total),
        micro_batch_size=tcfg.batch_size, grad_clip=cfg.train.grad_clip)
    wrapped.train()
    step, start = 0, time.perf_counter()
    with console.progress("fine-tuning the dense teacher", total) as bar:
        epoch = 0
        while step < total:
            set_epoch(loaders.train, epoch)
            for batch in loaders.train:
                if step >= total:
                    break
                loss = task_loss(wrapped(**model_inputs(batch, ctx.device)).logits,
                                 batch["labels"].to(ctx.device))
                strategy.backward_and_step(loss, wrapped, opt, sched, cfg.train.grad_clip)
                loss = loss.detach()
                step += 1
                bar.advance(1, f"ce={loss.item():.3f}")
            epoch += 1
    metrics = evaluate(wrapped, loaders.eval, ctx, data.num_labels)
    key = main_metric(data.num_labels)
    console.log(f"dense teacher: {key} {metrics[key]:.4f} after {step} steps "
                f"({time.perf_counter() - start:.0f} s)")
    plain = strategy.plain_copy(wrapped, lambda: load_classifier(  # collective
        cfg.model.name_or_path, data.num_labels, data.label_names, cfg.model.trust_remote_code))
    if ctx.is_main:
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
        marker.write_text(json.dumps({"fingerprint": _fingerprint(cfg), "metrics": metrics,
                                      "steps": step}, indent=1))
    ctx.barrier()
    return str(out), metrics
