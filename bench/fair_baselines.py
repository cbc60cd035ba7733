"""Fair baselines on the CPU protocol: every method, with and without CAP, at its own
best learning rate, over 3 seeds.

A shared learning rate can favour one side: on the fidelity benchmark's CPU protocol
movement + KD collapsed to the majority class on one of two seeds at the rate CAP used.
Here each of movement and soft movement (``soft_threshold: target``, so both reach the
sparsity asked), with KD alone and with CAP (PrC + FiC + SnC), first runs a small sweep
of learning rates at 90% on seed 0 (``sweep``), keeps the rate with the best dev
accuracy, then runs seeds 0, 1, 2 at 90% and 97% at that rate (``main``; seed 0 at 90%
is the sweep's run). The table says which rate each cell used. Every run starts its
scores from the weights' magnitude (``pruning.score_warm_start: magnitude``, scale 0.1;
``--warm-start 0`` for the reference's zero scores): at this budget movement + KD from
zero scores ends at the majority class at every rate tried (bench/short_schedule.py has
the mechanism), and a collapsed baseline would flatter CAP.

Protocol (the fidelity benchmark's ``cpu`` budget, shortened to fit two one-thread
workers in about two hours): packaged all-MiniLM-L6-v2, its teacher fine-tuned on the
packaged tweets corpus (cached by bench/fidelity.py in ``bench/cache/cpu``),
``--train-rows`` training rows (1500), the whole 3816-row dev set, length 64, batch 16,
``--steps`` optimiser steps (150), student started from the teacher, KD w_ce 0.1 /
w_kd 0.9 / T 2, cubic schedule warm-ups 10% / 20%.

    PYTHONPATH=. python bench/fidelity.py --budget cpu --teacher-only   # the teacher, once
    PYTHONPATH=. python bench/fair_baselines.py --worker 0/2 --threads 1 &
    PYTHONPATH=. python bench/fair_baselines.py --worker 1/2 --threads 1
    PYTHONPATH=. python bench/fair_baselines.py --report    # the table from what is done

Workers share ``bench/results/fair_baselines.json`` (resumable: finished runs are kept
and skipped); a worker that finishes its sweep runs waits for the other's before the
main runs. Writes ``fair_baselines.md`` next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ["movement", "soft_movement"]
LRS = (5e-5, 1e-4, 2e-4)
SWEEP_SPARSITY = 0.9
SPARSITIES = [0.9, 0.97]
SEEDS = [0, 1, 2]


def _fidelity() -> Any:
    """bench/fidelity.py (its budgets, teacher and run helpers)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fidelity
    return fidelity


def key(r: dict[str, Any]) -> tuple:
    return (r["method"], r["cap"], r["sparsity"], r["seed"], r["lr"])


def sweep_runs(lrs: tuple[float, ...]) -> list[dict[str, Any]]:
    return [{"phase": "sweep", "method": m, "cap": cap, "sparsity": SWEEP_SPARSITY,
             "seed": 0, "lr": lr} for m in METHODS for cap in (False, True) for lr in lrs]


def best_lr(done: list[dict[str, Any]], method: str, cap: bool) -> float | None:
    sweep = [r for r in done if r["phase"] == "sweep" and r["method"] == method
             and r["cap"] == cap]
    return max(sweep, key=lambda r: r["accuracy"])["lr"] if sweep else None


def main_runs(done: list[dict[str, Any]]) -> list[dict[str, Any]]:
    runs = []
    for m in METHODS:
        for cap in (False, True):
            lr = best_lr(done, m, cap)
            runs += [{"phase": "main", "method": m, "cap": cap, "sparsity": sp, "seed": s,
                      "lr": lr} for sp in SPARSITIES for s in SEEDS
                     if not (sp == SWEEP_SPARSITY and s == 0)]
    return runs


def cells(done: list[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """(method, cap, sparsity) -> the runs at that cell's chosen rate (sweep seed 0 included)."""
    out: dict[tuple, list[dict[str, Any]]] = {}
    for m in METHODS:
        for cap in (False, True):
            lr = best_lr(done, m, cap)
            for sp in SPARSITIES:
                out[(m, cap, sp)] = [r for r in done if (r["method"], r["cap"], r["sparsity"],
                                                         r["lr"]) == (m, cap, sp, lr)]
    return out


def markdown(done: list[dict[str, Any]], header: dict[str, Any]) -> str:
    dense = header["dense_accuracy"]

    def fmt(rs: list[dict[str, Any]]) -> str:
        if not rs:
            return "-"
        accs = [100 * r["accuracy"] for r in rs]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        reached = statistics.mean(100 * r["linear_sparsity"] for r in rs)
        return (f"{statistics.mean(accs):.2f} ± {std:.2f} (n={len(rs)}, lr "
                f"{rs[0]['lr']:g}, {reached:.1f}% reached)")

    lines = [f"# Fair baselines ({header['command']})", "",
             f"Dense teacher accuracy {100 * dense:.2f}; {header['machine']}; protocol: "
             f"{header['protocol']}.", "", "Learning-rate sweep (seed 0, 90%):", "",
             "| method | " + " | ".join(f"lr {lr:g}" for lr in header["lrs"]) + " | chosen |",
             "|---|" + "---|" * (len(header["lrs"]) + 1)]
    for m in METHODS:
        for cap in (False, True):
            row = [f"{m} + {'CAP' if cap else 'KD'}"]
            for lr in header["lrs"]:
                r = [x for x in done if x["phase"] == "sweep" and (x["method"], x["cap"],
                                                                   x["lr"]) == (m, cap, lr)]
                row.append(f"{100 * r[0]['accuracy']:.2f}" if r else "-")
            row.append(f"{best_lr(done, m, cap) or '-'}")
            lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Each cell at its own best rate, mean ± std over seeds:", "",
              "| method | sparsity | + KD | + CAP | CAP - KD (points) |", "|---|---|---|---|---|"]
    table = cells(done)
    for m in METHODS:
        for sp in SPARSITIES:
            kd, cap = table[(m, False, sp)], table[(m, True, sp)]
            gain = (f"{100 * (statistics.mean(r['accuracy'] for r in cap) - statistics.mean(r['accuracy'] for r in kd)):+.2f}"  # noqa: E501
                    if kd and cap else "-")
            lines.append(f"| {m} | {100 * sp:.0f}% | {fmt(kd)} | {fmt(cap)} | {gain} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", default="0/1", metavar="K/N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train-rows", type=int, default=1500)
    p.add_argument("--lrs", type=float, nargs="+", default=list(LRS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, default=len(SEEDS))
    p.add_argument("--sparsities", type=float, nargs="+", default=list(SPARSITIES))
    p.add_argument("--budget", default="cpu", help="fidelity budget (smoke for a check)")
    p.add_argument("--report", action="store_true", help="only write the table")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default=str(ROOT / "bench" / "cache"))
    p.add_argument("--poll-s", type=float, default=30.0)
    p.add_argument("--warm-start", type=float, default=0.1, metavar="SCALE",
                   help="pruning.score_warm_start: magnitude at this scale for every run "
                        "(0: off, the reference's zero scores)")
    args = p.parse_args(argv)
    k, n = (int(x) for x in args.worker.split("/"))
    METHODS[:] = args.methods  # the grid of this call (module-level: tables read it)
    SEEDS[:] = range(args.seeds)
    SPARSITIES[:] = args.sparsities
    fid = _fidelity()
    import torch

    from capscale.checks import run_config_from_dict
    from capscale.cli import setup_environment
    from capscale.config import merge_dicts
    from capscale.console import Console
    from capscale.data import load_task_data
    from capscale.distributed import init_distributed
    from capscale.models.loading import load_tokenizer
    from capscale.tasks import get_task
    from capscale.train.finetune import finetune_teacher

    setup_environment()
    torch.set_num_threads(args.threads)
    budget = {**fid.BUDGETS[args.budget]}
    if args.budget == "cpu":
        budget.update(max_steps=args.steps, max_train_samples=args.train_rows)
    work, out = Path(args.work) / args.budget, Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.budget == "cpu" else f"_{args.budget}"
    json_path = out / f"fair_baselines{suffix}.json"
    ctx = init_distributed()
    console = Console(enabled=True, progress=False)
    teacher_cfg = run_config_from_dict(merge_dicts(
        fid.base_config(fid.BUDGETS[args.budget], work / "teacher_run", 42),
        {"pruning": {"method": "none"}, "train": {"max_steps": 1},
         "cap": {"modules": {m: {"enabled": False} for m in ("prc", "fic", "snc")}}}))
    teacher_path, teacher_metrics = finetune_teacher(
        teacher_cfg, ctx, load_task_data(teacher_cfg.data), load_tokenizer("minilm"),
        get_task("classification"), console)
    header = {"command": "PYTHONPATH=. python bench/fair_baselines.py "
                         + " ".join(sys.argv[1:] if argv is None else argv),
              "machine": f"{os.cpu_count()} cores, {args.threads} thread(s) per worker, "
                         f"{n} worker(s); load average at the start {os.getloadavg()[0]:.2f}",
              "protocol": f"{budget['max_train_samples']} train rows, {budget['max_steps']} "
                          f"steps of batch {budget['batch_size']}, length "
                          f"{budget['max_length']}, student from the teacher, scores "
                          + (f"warm-started from |W| (scale {args.warm_start:g})"
                             if args.warm_start > 0 else "from 0"),
              "dense_accuracy": teacher_metrics["accuracy"], "lrs": args.lrs}

    def done() -> list[dict[str, Any]]:
        return json.loads(json_path.read_text())["runs"] if json_path.is_file() else []

    def execute(r: dict[str, Any]) -> None:
        cfg = merge_dicts(fid.base_config(budget, work / "fair" / (
            f"{r['method']}_{'cap' if r['cap'] else 'kd'}_{r['sparsity']}_s{r['seed']}"
            f"_lr{r['lr']:g}"), 42 + r["seed"]), {"model": {"teacher": teacher_path}})
        cfg = merge_dicts(cfg, fid.run_config(r["method"], r["sparsity"], r["cap"]))
        cfg = merge_dicts(cfg, {"train": {"lr": r["lr"]}})
        if args.warm_start > 0:
            cfg["pruning"].update(score_warm_start="magnitude",
                                  score_warm_start_scale=args.warm_start)
        if r["method"] == "soft_movement":  # one steered threshold over all matrices
            cfg["pruning"]["scope"] = "global"
        if r["method"] == "soft_movement":
            cfg["pruning"].pop("final_lambda", None)  # steered threshold: default lambda
        record = fid.run_record(r, run_config_from_dict(cfg), ctx, console, teacher_metrics)
        _save(json_path, header, record)
        console.log(f"{r['phase']} {r['method']} cap={r['cap']} {r['sparsity']} "
                    f"seed {r['seed']} lr {r['lr']:g}: {record['accuracy']:.4f}")

    if not args.report:
        sweep = sweep_runs(tuple(args.lrs))
        for i, r in enumerate(sweep):
            if i % n == k and not any(key(d) == key(r) for d in done()):
                execute(r)
        while sum(d["phase"] == "sweep" for d in done()) < len(sweep):
            time.sleep(args.poll_s)  # the other worker's sweep runs
        for i, r in enumerate(main_runs(done())):
            if i % n == k and not any(key(d) == key(r) for d in done()):
                execute(r)
    if args.report and json_path.is_file():  # the header of the runs, not of this call
        header = {k: v for k, v in json.loads(json_path.read_text()).items() if k != "runs"}
    _save(json_path, header, None)
    md = markdown(done(), header)
    (out / f"fair_baselines{suffix}.md").write_text(md)
    print(md)
    return 0


def _save(json_path: Path, header: dict[str, Any], record: dict[str, Any] | None) -> None:
    """Add ``record`` to the shared results file under a lock (None: rewrite the header)."""
    import fcntl
    with open(json_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
        if record is not None:
            runs = [r for r in runs if key(r) != key(record)] + [record]
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**header, "runs": runs}, indent=1))
        tmp.replace(json_path)


if __name__ == "__main__":
    sys.exit(main())
