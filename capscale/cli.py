"""The ``capscale`` command: prune, evaluate, export, report and inspect.

::

    capscale prune --config capscale/configs/demo_minilm_tweets.yaml [key=value ...]
    capscale evaluate --config X.yaml [--model outputs/run/pruned/model] [key=value ...]
    capscale export --config X.yaml [--checkpoint latest|DIR] [--out DIR] [key=value ...]
                    [--formats onnx int8 sparse] [--add-to EXPORT_DIR]
    capscale report outputs/run
    capscale inspect MODEL [--trust-remote-code] [--adapter SPEC]
    capscale plan --config X.yaml [--world 1 8 ...] [--device-memory GIB] [--device cuda|cpu]
                  [--train-examples N] [--json PATH] [key=value ...]

With no subcommand the arguments go to ``prune``, so ``capscale --config X.yaml``,
``python -m capscale.run --config X.yaml`` and ``accelerate launch capscale/run.py
--config X.yaml`` are the same call of :func:`main`. Every subcommand returns 2 with a
one-line message for a config, data or model error; ``prune`` returns 3 when a
non-finite loss stopped the run, 4 when the written export did not reproduce the
student (capscale.export.verify; the trained student is kept as a checkpoint);
``inspect`` returns 1 when no adapter fits the model; ``plan`` returns 1 when no
strategy fits the device at some world size as configured.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from capscale.errors import INPUT_ERRORS, describe

SUBCOMMANDS = ("prune", "evaluate", "export", "report", "inspect", "plan")


def setup_environment() -> None:
    """Process settings that must precede the heavy imports."""
    import torch

    if not torch.cuda.is_available():  # DeepSpeed (imported by transformers) probes otherwise
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    # Keep transformers' per-load reports and bars out of capscale's own output.
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors on one line (exit code 2, as argparse's own)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"capscale: usage error: {message} (see {self.prog} --help)\n")


def _parser(name: str, doc: str, config: bool = True) -> argparse.ArgumentParser:
    p = _Parser(prog=f"capscale {name}", description=doc)
    if config:
        p.add_argument("--config", help="YAML config (a path, or a name in capscale/configs)")
        p.add_argument("overrides", nargs="*", help="key=value overrides")
    return p


def launch_rank() -> int:
    """This process' rank as the launcher set it (torchrun / accelerate: ``RANK``; srun:
    ``SLURM_PROCID``), before any process group exists; 0 when launched alone."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key, "")
        if value.isdigit():
            return int(value)
    return 0


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn the input errors every subcommand can hit into exit code 2 and one line."""
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except INPUT_ERRORS as err:
            print(describe(err), file=sys.stderr)
            return 2
    return run


def _run_config(args: argparse.Namespace) -> Any:
    """The checked run config of a subcommand's ``--config`` and ``key=value``
    arguments; a ConfigError when neither is given (nothing to run)."""
    from capscale.checks import load_run_config
    from capscale.errors import ConfigError

    if args.config is None and not args.overrides:
        raise ConfigError("no --config given: capscale prune --config X.yaml [key=value ...]"
                          " (a path, or a name in capscale/configs such as "
                          "demo_minilm_tweets.yaml)")
    return load_run_config(args.config, args.overrides)


def prune_cmd(argv: list[str]) -> int:
    """``capscale prune``: the whole job (see capscale.job.prune)."""
    import torch

    from capscale.console import Console
    from capscale.distributed import init_distributed, shutdown_distributed
    from capscale.export.verify import ExportMismatch
    from capscale.job import prune
    from capscale.train.checkpoint import checkpoint_root, list_checkpoints
    from capscale.train.tf32 import set_tf32

    p = _parser("prune", "Prune an encoder with CAP, evaluate it, export it.")
    args = p.parse_args(argv)
    try:
        cfg = _run_config(args)
    except INPUT_ERRORS as err:  # every rank finds it: the first one says it
        if launch_rank() == 0:
            print(describe(err), file=sys.stderr)
        return 2
    if cfg.train.num_threads:
        torch.set_num_threads(cfg.train.num_threads)
    ctx = init_distributed(cfg.strategy, cfg.train.collective_timeout_s)
    console = Console(enabled=ctx.is_main, progress=cfg.train.progress)
    if set_tf32(ctx.device, cfg.train.tf32, cfg.train.precision):
        console.log("fp32 matmuls and convolutions in TF32 on the GPU (train.tf32)")
    code = 1
    try:
        prune(cfg, ctx, console)
        code = 0
    except INPUT_ERRORS as err:
        print(describe(err), file=sys.stderr)
        code = 2
    except FloatingPointError as err:
        found = list_checkpoints(checkpoint_root(cfg.checkpoint.dir, cfg.output_dir))
        kept = (f"the last good checkpoint is {found[-1]} (resume=latest continues from it)"
                if found else "no checkpoint was written (see checkpoint.every_steps)")
        print(f"capscale: {err}; {kept}; or set train.on_nonfinite=skip", file=sys.stderr)
        code = 3
    except ExportMismatch as err:
        found = list_checkpoints(checkpoint_root(cfg.checkpoint.dir, cfg.output_dir))
        kept = (f"the trained student is kept in {found[-1]} (capscale export --checkpoint "
                "latest, or resume=latest under zero3 / fsdp2, writes it again)" if found
                else "no checkpoint was kept (checkpoint.final is off)")
        print(f"capscale: export error: {err}; {kept}", file=sys.stderr)
        code = 4
    finally:
        shutdown_distributed(ctx, ok=code == 0)
    return code


def _capscale_loader(model_dir: str) -> bool:
    """Whether ``model_dir`` is a physically smaller capscale export, whose only remote
    code is the loader capscale wrote beside it (capscale.export.hf_pruned_model)."""
    from capscale.export.huggingface import REMOTE_CODE
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return False
    auto_map = json.loads(path.read_text()).get("auto_map") or {}
    return bool(auto_map) and all(str(v).startswith(f"{REMOTE_CODE}.")
                                  for v in auto_map.values())


@_guarded
def evaluate_cmd(args: argparse.Namespace) -> int:
    """Task metrics of an exported (or any Hugging Face) model on the config's eval split."""
    from capscale.console import Console
    from capscale.data import check_lengths, eval_loader, load_task_data
    from capscale.distributed import DistContext
    from capscale.models.loading import (
        check_teacher,
        load_classifier,
        load_tokenizer,
        model_max_tokens,
    )
    from capscale.tasks import get_task
    from capscale.train.evaluation import evaluate

    cfg = _run_config(args)
    task = get_task(cfg.data.task_type)
    model_dir = args.model or str(Path(cfg.output_dir) / "pruned" / "model")
    data = load_task_data(cfg.data)
    check_teacher(model_dir, data.num_labels, task=task)  # the same check as a teacher
    limit = model_max_tokens(model_dir, what="--model")
    tokenizer = load_tokenizer(model_dir)
    check_lengths(data, tokenizer, cfg.data, limit)  # QA: long questions skipped
    model = load_classifier(model_dir, data.num_labels, data.label_names,
                            cfg.model.trust_remote_code or _capscale_loader(model_dir), task)
    loader, reference = eval_loader(data, tokenizer, cfg.data, cfg.train.eval_batch_size)
    metrics = evaluate(model, loader, DistContext(), task, data.num_labels, reference)
    Console(progress=False).table(f"evaluation of {model_dir}",
                                  [(k, f"{v:.4f}") for k, v in metrics.items()])
    print(json.dumps(metrics))
    return 0


@_guarded
def export_cmd(args: argparse.Namespace) -> int:
    """Bake a checkpoint's masks into a plain Hugging Face model directory, and write
    its extra formats (``--formats onnx int8 sparse``, each checked against it)."""
    from capscale.data import load_task_data
    from capscale.errors import ConfigError
    from capscale.export.card import run_facts
    from capscale.export.writer import export_checkpoint, write_run_formats
    from capscale.models.loading import adapter_for, load_classifier, load_tokenizer
    from capscale.pruning.methods import PRUNING_METHODS
    from capscale.tasks import get_task
    from capscale.train.checkpoint import checkpoint_root, find_checkpoint

    overrides = list(args.overrides)
    if args.formats:
        overrides.append(f"export.formats=[{','.join(args.formats)}]")
    cfg = _run_config(argparse.Namespace(config=args.config, overrides=overrides))
    task = get_task(cfg.data.task_type)
    data = load_task_data(cfg.data)
    if args.add_to:  # an existing export (a structured run's, say): formats only
        out = Path(args.add_to)
        if not (out / "model" / "config.json").is_file():
            raise ConfigError(f"--add-to {out}: not an export folder (no model/config.json)")
    else:
        path = find_checkpoint(args.checkpoint, checkpoint_root(  # verified, see resume
            cfg.checkpoint.dir, cfg.output_dir), option="--checkpoint")
        if path is None:
            raise ConfigError(f"--checkpoint {args.checkpoint}: no checkpoint found")
        m = cfg.model

        def load() -> tuple[Any, Any]:
            model = load_classifier(m.name_or_path, data.num_labels, data.label_names,
                                    m.trust_remote_code, task)
            return model, adapter_for(model, m.adapter, task)

        out = Path(args.out or Path(cfg.output_dir) / f"export-{path.name}")
        report = export_checkpoint(path, PRUNING_METHODS[cfg.pruning.method], cfg.pruning,
                                   load, out, load_tokenizer(m.name_or_path, m.trust_remote_code),
                                   {"checkpoint": str(path), "run": run_facts(cfg)})
        print(f"exported {path} to {out} (encoder sparsity "
              f"{100 * report['encoder_sparsity']:.2f}%)")
    if not set(cfg.export.formats) - {"pytorch"}:
        return 0
    formats = write_run_formats(out, cfg.export, data,
                                load_tokenizer(str(out / "model"), cfg.model.trust_remote_code),
                                cfg.data, cfg.train.eval_batch_size, task,
                                cfg.model.trust_remote_code, print)
    if not formats["ok"]:
        print(f"capscale: an export format failed its check; see {out / 'sparsity_report.json'}",
              file=sys.stderr)
    return 0 if formats["ok"] else 1


def report_cmd(args: argparse.Namespace) -> int:
    """(Re)write the markdown / HTML report of a finished run."""
    from capscale.report.document import write_report

    if not (Path(args.output_dir) / "results.json").is_file():
        print(f"capscale: {args.output_dir} has no results.json: is it a finished run's "
              "output_dir?", file=sys.stderr)
        return 2
    print(write_report(args.output_dir, args.speed_batches, args.frontier))
    return 0


@_guarded
def inspect_cmd(args: argparse.Namespace) -> int:
    """Show how capscale reads an encoder (built on the meta device: no weights load): its
    class, adapter, layers and prunable matrices, or a suggested adapter when none fits."""
    from capscale.console import Console
    from capscale.models.inspection import inspect_model, parse_adapter_option, render

    spec = parse_adapter_option(args.adapter) if args.adapter else None
    found = inspect_model(args.model, args.trust_remote_code, spec)
    render(found, Console(progress=False), args.trust_remote_code)
    return 0 if found.fits else 1


@_guarded
def plan_cmd(args: argparse.Namespace) -> int:
    """Per-rank memory of the run by part for each strategy and world size, whether it
    fits the device, and the overrides that make it fit (capscale.report.plan_advice);
    nothing is loaded but the model's config."""
    from capscale.console import Console
    from capscale.report.plan_advice import plan_all, render, write_json

    cfg = _run_config(args)
    baseline = None if args.baseline_gib is None else int(args.baseline_gib * 2**30)
    found = plan_all(cfg, args.world, args.device_memory, args.device, args.train_examples,
                     baseline)
    if args.json != "-":
        render(found, args.device_memory, Console(progress=False))
    if args.json:
        write_json(found, args.device_memory, args.json)
    fits = all(any(a.plan.fits(args.device_memory) for a in advice)
               for advice in found.values())
    return 0 if fits else 1


def main(argv: list[str] | None = None) -> int:
    """Dispatch ``capscale <subcommand> ...``; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    setup_environment()
    sub = argv.pop(0) if argv and argv[0] in SUBCOMMANDS else "prune"
    if sub == "prune":
        return prune_cmd(argv)
    if sub == "report":
        p = _parser("report", report_cmd.__doc__ or "", config=False)
        p.add_argument("output_dir")
        p.add_argument("--speed-batches", type=int, default=5)
        p.add_argument("--frontier", help="a bench/frontier.py results file: time at its "
                       "shape and plot this run among its points")
        return report_cmd(p.parse_args(argv))
    if sub == "inspect":
        p = _parser("inspect", inspect_cmd.__doc__ or "", config=False)
        p.add_argument("model", help="model folder, cached hub name or packaged name")
        p.add_argument("--trust-remote-code", action="store_true",
                       help="run the model's own configuration / modeling code")
        p.add_argument("--adapter", help="model.adapter to check: a name, an import path "
                       "pkg.module:ATTR, a YAML file or an inline YAML mapping")
        return inspect_cmd(p.parse_args(argv))
    if sub == "plan":
        p = _parser("plan", plan_cmd.__doc__ or "")
        p.add_argument("--world", type=int, nargs="+", default=[1],
                       help="ranks (one device each); several values: one table each")
        p.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                       help="memory of one device in GiB (default 80)")
        p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                       help="cuda (default): precision auto is bf16, fused attention, a "
                       "1 GiB runtime baseline; cpu: fp32, math attention, no baseline")
        p.add_argument("--baseline-gib", type=float, help="memory a rank holds before the "
                       "run allocates (default: 1 on cuda, 0 on cpu)")
        p.add_argument("--train-examples", type=int, metavar="N", help="training-set "
                       "size for the banks (default: the local data, or a known data set's)")
        p.add_argument("--json", metavar="PATH", help="also write the numbers as JSON "
                       "(- : print them instead of the tables)")
        return plan_cmd(p.parse_args(argv))
    if sub == "evaluate":
        p = _parser("evaluate", evaluate_cmd.__doc__ or "")
        p.add_argument("--model", help="model directory (default: <output_dir>/pruned/model)")
        return evaluate_cmd(p.parse_args(argv))
    p = _parser("export", export_cmd.__doc__ or "")
    p.add_argument("--checkpoint", default="latest", help="latest, or a checkpoint directory")
    p.add_argument("--out", help="destination (default: <output_dir>/export-<checkpoint>)")
    p.add_argument("--formats", nargs="+", metavar="FORMAT",
                   help="export.formats: pytorch (always written), onnx, int8, sparse")
    p.add_argument("--add-to", metavar="DIR", help="write --formats of an existing export "
                   "folder (e.g. <output_dir>/pruned) instead of exporting a checkpoint")
    return export_cmd(p.parse_args(argv))


def exit_program(code: int) -> None:
    """End a capscale *program* (the console script, ``python -m capscale.run``) with
    ``code``, without the interpreter's teardown.

    By then every result is written and the process group left; what remains are
    threads of the communication libraries (gloo, NCCL, DeepSpeed), which the
    interpreter's teardown can destroy mid-flight, so that a rank whose run succeeded
    aborts with "terminate called without an active exception" and the launcher or
    Slurm reports the job as failed. Output is flushed first. ``main`` itself returns
    normally, for callers that embed it.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def cli() -> None:
    """The ``capscale`` console script."""
    exit_program(main())


if __name__ == "__main__":
    cli()
