"""capscale entry point: prune an encoder with CAP, evaluate it, export it.

One process (CPU or one GPU)::

    python -m capscale.run --config capscale/configs/demo_minilm_tweets.yaml
    python -m capscale.run --config capscale/configs/bert_base_glue.yaml \
        data.dataset_config=qqp pruning.final_sparsity=0.97

The ``capscale`` command wraps the same entry point and its companions::

    capscale prune --config X.yaml [key=value ...]      # = python -m capscale.run
    capscale prune --config X.yaml resume=latest        # continue a killed run
    capscale evaluate --config X.yaml [--model DIR]
    capscale export --config X.yaml --checkpoint latest
    capscale report outputs/run

Several GPUs on one node (data parallel, or sharded with ZeRO-3 / FSDP2)::

    accelerate launch --config_file ds_configs/ddp.yaml capscale/run.py \
        --config capscale/configs/bert_base_glue.yaml
    accelerate launch --config_file ds_configs/zero3.yaml capscale/run.py \
        --config capscale/configs/roberta_large_zero3.yaml
    accelerate launch --config_file ds_configs/fsdp2.yaml capscale/run.py --config ...
    torchrun --nproc_per_node 8 capscale/run.py --config ... strategy=zero3

Two CPU processes (what CI runs)::

    CAPSCALE_CPU=1 torchrun --nproc_per_node 2 capscale/run.py --config ... strategy=fsdp2

Arguments after the config are ``key=value`` overrides of any config field.
Outputs in ``output_dir``: ``config.yaml``, ``teacher/`` (when fine-tuned here),
``pruned/model`` (plain Hugging Face), ``pruned/masks.safetensors``,
``pruned/sparsity_report.json``, ``history.jsonl``, ``evals.json``, ``results.json``,
``report/`` (markdown + HTML + plots), ``checkpoints/`` (with ``checkpoint.every_steps``),
``tracking/`` (TensorBoard, when installed).

Exit codes: 0 done; 2 a config, data or model error (one line on stderr says what to
change; nothing was loaded); 3 a non-finite loss stopped the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python capscale/run.py` / `accelerate launch capscale/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

if not torch.cuda.is_available():  # DeepSpeed (imported by transformers) probes otherwise
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import transformers
from transformers import PreTrainedTokenizerBase

from capscale.checkpoint import checkpoint_root, list_checkpoints, load_checkpoint, resolve_resume
from capscale.config import Config, ConfigError, config_to_dict, load_config, save_config
from capscale.console import Console
from capscale.data import DataError, TaskData, check_lengths, load_task_data
from capscale.distributed import DistContext, init_distributed, shutdown_distributed
from capscale.export import export_pruned
from capscale.metrics import main_metric
from capscale.teachers import ModelError, check_encoder, check_teacher, load_tokenizer


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="capscale", description=__doc__.split("\n")[0])
    p.add_argument("--config", help="YAML config (a path, or a name in capscale/configs)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
    return p.parse_args(argv)


def check_inputs(cfg: Config) -> tuple[TaskData, PreTrainedTokenizerBase, Path | None]:
    """Everything that can be wrong with the inputs, found before any model loads.

    Returns:
        the validated data, the tokenizer and the checkpoint to resume from (or None).

    Raises:
        ConfigError, DataError, ModelError: with a message saying what to change.
    """
    resume = resolve_resume(cfg)
    data = load_task_data(cfg.data)
    m = cfg.model
    check_encoder(m.name_or_path, m.adapter, m.trust_remote_code)
    if m.teacher is not None:
        check_teacher(m.teacher, data.num_labels, m.trust_remote_code)
    tokenizer = load_tokenizer(m.name_or_path, m.trust_remote_code)
    note = check_lengths(data, tokenizer, cfg.data)
    if note:
        data.notes.append(note)
    return data, tokenizer, resume


def prune(cfg: Config, ctx: DistContext, console: Console, export: bool = True,
          teacher_metrics: dict[str, float] | None = None) -> dict[str, Any]:
    """The whole job: data -> teacher -> CAP pruning -> export. Returns the results.

    ``export=False`` skips writing the pruned model (benchmarks that only need metrics).
    ``teacher_metrics``: the given ``model.teacher``'s dev metrics when already known
    (a benchmark reusing one teacher), so it is not evaluated again.
    """
    from capscale.finetune import finetune_teacher
    from capscale.report import Trackers, write_report
    from capscale.train import CAPPruner

    start = time.perf_counter()
    out = Path(cfg.output_dir)
    data, tokenizer, resume = check_inputs(cfg)
    if ctx.is_main:
        save_config(cfg, out / "config.yaml")
    for note in data.notes:
        console.log(note)
    key = main_metric(data.num_labels)
    teacher_path = cfg.model.teacher
    t0 = time.perf_counter()
    if teacher_path is None:
        teacher_path, teacher_metrics = finetune_teacher(cfg, ctx, data, tokenizer, console)
    teacher_seconds = time.perf_counter() - t0
    structured = cfg.pruning.method == "structured"
    if structured:
        from capscale.structured_train import StructuredCAPPruner as CAPPruner
    run = CAPPruner(cfg, ctx, data, tokenizer, teacher_path, console)
    if teacher_metrics is None and run.teacher is not None:
        from capscale.train import evaluate
        teacher_metrics = evaluate(run.teacher, run.loaders.eval, ctx, data.num_labels)
    point = load_checkpoint(run, resume) if resume is not None else None
    if point is not None:
        console.log(f"resumed from {resume} (step {run.step}, epoch {point.epoch}, "
                    f"{point.batches_done} batches into it)")
    trackers = None
    if ctx.is_main and cfg.report.trackers:
        trackers = Trackers(cfg.report.trackers, out.name, out / "tracking",
                            config_to_dict(cfg))
        for note in trackers.notes:
            console.log(note)
        run.record_hooks.append(trackers)
    try:
        result = run.run(point)
    finally:
        if trackers is not None:
            trackers.finish()
    results = {
        "task_metric": key,
        "teacher_metrics": teacher_metrics,
        "pruned_metrics": result.metrics,
        "sparsity": {k: result.sparsity[k] for k in (
            "linear_sparsity", "encoder_sparsity", "total_sparsity")},
        "steps": result.steps,
        "train_examples": len(data.train),
        "eval_examples": len(data.validation),
        "notes": data.notes,
        "seconds": {"teacher": teacher_seconds, "pruning": result.seconds},
        "world_size": ctx.world_size,
        "strategy": ctx.strategy,
    }
    if structured:  # the accuracy-vs-sparsity curve, one point per milestone
        results["curve"] = [{"level": e["level"], "encoder_sparsity": e["encoder_sparsity"],
                             key: e["metrics"][key]} for e in result.evals]
    if ctx.is_main:
        run.save_history(out)
    if export and structured:  # physically smaller: heads and FFN neurons sliced away
        run.export(out / "pruned", tokenizer, extra={"results": results})  # collective
    elif export:
        student = run.full_student()  # collective: gathers a sharded student
        if ctx.is_main:
            export_pruned(student, run.adapter, out / "pruned", tokenizer,
                          inplace=True, extra={"results": results})
    results["seconds"]["total"] = time.perf_counter() - start
    if ctx.is_main:
        (out / "results.json").write_text(json.dumps(results, indent=1))
        if cfg.report.enabled:
            console.log(f"report: {write_report(out, cfg.report.speed_batches)}")
    _summary(console, cfg, results)
    return results


def _summary(console: Console, cfg: Config, r: dict[str, Any]) -> None:
    key = r["task_metric"]
    t = r["teacher_metrics"][key] if r["teacher_metrics"] else float("nan")
    p = r["pruned_metrics"][key]
    rows = [
        (f"dense teacher {key}", f"{t:.4f}"),
        (f"pruned student {key}", f"{p:.4f}"),
        ("retained", f"{100 * p / t:.1f}%" if t == t and t else "n/a"),
        ("encoder sparsity (paper convention)", f"{100 * r['sparsity']['encoder_sparsity']:.2f}%"),
        ("prunable-matrix sparsity", f"{100 * r['sparsity']['linear_sparsity']:.2f}%"),
        ("sparsity over all parameters", f"{100 * r['sparsity']['total_sparsity']:.2f}%"),
        ("method", f"{cfg.pruning.method} + CAP" if any(
            getattr(cfg.cap, m).enabled for m in ("prc", "fic", "snc")) else cfg.pruning.method),
        ("train / eval examples", f"{r['train_examples']} / {r['eval_examples']}"),
        ("pruning steps", str(r["steps"])),
        ("time: teacher / pruning / total",
         f"{r['seconds']['teacher']:.0f} s / {r['seconds']['pruning']:.0f} s / "
         f"{r['seconds']['total']:.0f} s"),
        ("output", str(Path(cfg.output_dir) / "pruned" / "model")),
    ]
    console.table("capscale result", rows)
    for note in r["notes"]:
        console.log(f"note: {note}")


def quiet_libraries() -> None:
    """Keep transformers' per-load reports and bars out of capscale's own output."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    """Run from the command line; returns the exit code."""
    args = parse_args(argv)
    quiet_libraries()
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as err:
        print(f"capscale: config error: {err}", file=sys.stderr)
        return 2
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = init_distributed(cfg.strategy, cfg.train.collective_timeout_s)
    console = Console(enabled=ctx.is_main, progress=cfg.train.progress)
    code = 1
    try:
        prune(cfg, ctx, console)
        code = 0
    except (ConfigError, DataError, ModelError) as err:
        print(f"capscale: {type(err).__name__.replace('Error', '').lower()} error: {err}",
              file=sys.stderr)
        code = 2
    except FloatingPointError as err:
        found = list_checkpoints(checkpoint_root(cfg))
        kept = (f"the last good checkpoint is {found[-1]} (resume=latest continues from it)"
                if found else "no checkpoint was written (see checkpoint.every_steps)")
        print(f"capscale: {err}; {kept}; or set train.on_nonfinite=skip", file=sys.stderr)
        code = 3
    finally:
        shutdown_distributed(ctx, ok=code == 0)
    return code


def cli() -> None:
    """The ``capscale`` command: ``capscale prune|evaluate|export|report ...``."""
    from capscale.cli import main as cli_main

    sys.exit(cli_main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
