"""Fidelity benchmark: does CAP beat plain pruning at high sparsity?

Task: the packaged all-MiniLM-L6-v2 on the packaged tweets sentiment corpus (3 classes),
a fixed split (10% of the corpus, 3816 rows, held out with seed 0 as the dev set; the
train subset drawn from the rest with seed 0), sequence length 64 (dynamic padding).
The dense teacher is fine-tuned once per budget and cached in
``bench/cache/<budget>/teacher_run``; every pruning run uses it for KD (and FiC).

Methods at each sparsity: magnitude, movement and soft movement, each with KD, with
and without CAP (PrC + SnC + FiC); ablation at 90% with movement: CAP without each
module. All runs of one budget take the same number of optimiser steps.

Budgets (``BUDGETS`` below): ``smoke`` (seconds, what CI runs); ``cpu`` (2000 train
rows, the whole dev set, 300 steps of batch 16, teacher fine-tuned for 2 epochs, student
started from the teacher: 10 to 16 minutes a run on one CPU core, about 2 hours for one
seed of the grid with two workers); ``full`` (all rows, 10 epochs of batch 32, student
started from the pre-trained model as in the reference: for a GPU). Soft movement
reaches its sparsity only through ``SOFT_LAMBDA``, which is tied to the schedule's length:
check the "achieved" column, and recalibrate with ``--set pruning.final_lambda=...``.

Usage::

    python bench/fidelity.py --budget smoke            # seconds; what CI runs
    python bench/fidelity.py --budget cpu --seeds 1     # the CPU protocol
    python bench/fidelity.py --budget full --seeds 3    # the full protocol, for a GPU
    python bench/fidelity.py --budget paper --list      # the paper's rows: commands
    python bench/fidelity.py --budget paper --seeds 3   # ... run here (hub + GPU)

    # the CPU protocol on 2 cores: two workers, one thread each, sharing the results
    python bench/fidelity.py --budget cpu --teacher-only
    python bench/fidelity.py --budget cpu --worker 0/2 --threads 1 &
    python bench/fidelity.py --budget cpu --worker 1/2 --threads 1

Writes ``bench/results/fidelity[_<budget>].json`` (resumable: finished runs are kept and
skipped), a markdown table next to it, and a plot of accuracy against sparsity when
matplotlib is installed.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capscale.checks import run_config_from_dict  # noqa: E402
from capscale.cli import setup_environment  # noqa: E402
from capscale.config import (  # noqa: E402
    ConfigError,
    merge_dicts,
    parse_overrides,
)
from capscale.console import Console  # noqa: E402
from capscale.distributed import init_distributed  # noqa: E402
from capscale.job import prune  # noqa: E402

# Budgets: data size, steps, contrastive negatives and the student's start. "cpu" fits
# a run in minutes on one core by starting the student from the fine-tuned teacher;
# "full" is the reference's protocol (10 epochs on all data, student from pre-trained).
BUDGETS: dict[str, dict[str, Any]] = {
    "smoke": {"max_train_samples": 96, "max_eval_samples": 64, "epochs": 1, "max_steps": 4,
              "batch_size": 16, "teacher_steps": 4, "num_negatives": 64, "max_length": 32,
              "student_init": "teacher", "lr": 1e-4},
    "cpu": {"max_train_samples": 2000, "max_eval_samples": None, "epochs": 3,
            "max_steps": 300, "batch_size": 16, "teacher_steps": 250, "num_negatives": 4096,
            "max_length": 64, "student_init": "teacher", "lr": 5e-5},
    "full": {"max_train_samples": None, "max_eval_samples": None, "epochs": 10,
             "max_steps": None, "batch_size": 32, "teacher_steps": None,
             "num_negatives": 4096, "max_length": 64, "student_init": "pretrained",
             "lr": 3e-5},
}
# Soft movement reaches its sparsity through the L1 weight (docs/algorithm.md section 6).
SOFT_LAMBDA = {0.9: 300.0, 0.97: 700.0}
METHODS = ("movement", "magnitude", "soft_movement")


def base_config(budget: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    return {
        "model": {"name_or_path": "minilm", "student_init": budget["student_init"]},
        "data": {"preset": "tweets", "max_length": budget["max_length"],
                 "max_train_samples": budget["max_train_samples"],
                 "max_eval_samples": budget["max_eval_samples"]},
        "loss": {"w_ce": 0.1, "w_kd": 0.9, "kd_temperature": 2.0},
        "cap": {"num_negatives": budget["num_negatives"], "snapshot_schedule": "milestones",
                "snapshot_milestones": [0.3, 0.6, 0.9]},
        "train": {"epochs": budget["epochs"], "max_steps": budget["max_steps"],
                  "batch_size": budget["batch_size"], "lr": budget["lr"], "seed": seed,
                  "num_threads": 0, "progress": False},
        "teacher_training": {"epochs": 2, "max_steps": budget["teacher_steps"]},
        "output_dir": str(out),
    }


def run_config(method: str, sparsity: float, cap: bool, drop: str | None = None
               ) -> dict[str, Any]:
    """The method-specific part of a run's config."""
    # The reference's zero-started scores, as every recorded run of this benchmark (the
    # schema's default is now magnitude; --set pruning.score_warm_start=magnitude for it).
    pruning: dict[str, Any] = {"method": method, "final_sparsity": sparsity,
                               "score_warm_start": "none"}
    if method == "soft_movement":
        pruning["final_lambda"] = SOFT_LAMBDA.get(sparsity, 300.0)
    modules = {m: {"enabled": cap and m != drop} for m in ("prc", "fic", "snc")}
    return {"pruning": pruning, "cap": {"modules": modules}}


def run_record(r: dict[str, Any], cfg: Any, ctx: Any, console: Console,
               teacher_metrics: dict[str, float]) -> dict[str, Any]:
    """Prune with ``cfg`` (no export); ``r`` plus the run's accuracy, sparsity and time."""
    t0 = time.perf_counter()
    res = prune(cfg, ctx, console, export=False, teacher_metrics=teacher_metrics)
    return {**r, "accuracy": res["pruned_metrics"]["accuracy"],
            "dense_accuracy": teacher_metrics["accuracy"],  # this run's teacher
            "encoder_sparsity": res["sparsity"]["encoder_sparsity"],
            "linear_sparsity": res["sparsity"]["linear_sparsity"],
            "steps": res["steps"], "seconds": time.perf_counter() - t0}


def plan(sparsities: list[float], seeds: list[int], ablation: bool) -> list[dict[str, Any]]:
    """Every run, most informative first: seed by seed, movement (with and without CAP)
    before the other methods, the highest sparsity first, the ablation after the
    first seed's main grid; runs that a partial protocol leaves out come last."""
    runs = []
    for seed in seeds:
        for method in METHODS:
            for sp in sorted(sparsities, reverse=True):
                for cap in (False, True):
                    runs.append({"method": method, "sparsity": sp, "cap": cap, "drop": None,
                                 "seed": seed})
        if ablation:
            for drop in ("prc", "snc", "fic"):
                runs.append({"method": "movement", "sparsity": 0.9, "cap": True,
                             "drop": drop, "seed": seed})
    return runs


def run_dir(r: dict[str, Any]) -> str:
    """A work folder name unique to the run."""
    name = (f"{r['method']}_{r['sparsity']}_{'cap' if r['cap'] else 'kd'}"
            f"_{r['drop'] or 'all'}_seed{r['seed']}_{r.get('variant') or 'default'}")
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return (all(a[k] == b[k] for k in ("method", "sparsity", "cap", "drop", "seed"))
            and a.get("variant", "") == b.get("variant", ""))


def save_run(json_path: Path, header: dict[str, Any], record: dict[str, Any] | None
             ) -> list[dict[str, Any]]:
    """Adds one finished run to the results file under a lock (workers share it);
    with ``record`` None, rewrites the header and returns the runs."""
    import fcntl
    with open(json_path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
        if record is not None:
            runs = [r for r in runs if not _same(r, record)] + [record]
        tmp = json_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({**header, "runs": runs}, indent=1))
        tmp.replace(json_path)
    return runs


def label(r: dict[str, Any]) -> str:
    name = r["method"] + (" + CAP" if r["cap"] else " + KD")
    name += f" - {r['drop'].upper()}" if r["drop"] else ""
    return name + (f" [{r['variant']}]" if r.get("variant") else "")


def table(results: list[dict[str, Any]], dense: float) -> str:
    cells: dict[tuple[str, float], list[float]] = {}
    achieved: dict[tuple[str, float], list[float]] = {}
    denses: dict[tuple[str, float], list[float]] = {}
    for r in results:
        key = (label(r), r["sparsity"])
        cells.setdefault(key, []).append(r["accuracy"])
        achieved.setdefault(key, []).append(r["encoder_sparsity"])
        denses.setdefault(key, []).append(r.get("dense_accuracy", dense))
    teachers = sorted({round(100 * d, 2) for ds in denses.values() for d in ds})
    note = ("" if len(teachers) < 2 else
            f" (runs were made against fine-tunes of the teacher scoring "
            f"{', '.join(f'{t:.2f}' for t in teachers)}: the cache was rebuilt between them; "
            "each row's % of dense divides by its own runs' teacher)")
    lines = [f"Dense teacher accuracy: {100 * dense:.2f}{note}", "",
             "| method | target sparsity | achieved (encoder) | accuracy mean ± std | "
             "% of dense | runs |", "|---|---|---|---|---|---|"]
    for (name, sp), accs in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        mean = statistics.mean(accs)
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        ach = statistics.mean(achieved[(name, sp)])
        missed = " (target missed)" if ach < sp - 0.05 else ""
        lines.append(f"| {name} | {100 * sp:.0f}% | {100 * ach:.1f}%{missed} | "
                     f"{100 * mean:.2f} ± "
                     f"{100 * std:.2f} | "
                     f"{100 * mean / statistics.mean(denses[(name, sp)]):.1f}% | {len(accs)} |")
    return "\n".join(lines) + "\n"


def _mean(results: list[dict[str, Any]], field: str = "accuracy", dense: float = 0.0,
          **match: Any) -> float | None:
    """Mean ``field`` of the matching runs (``dense_accuracy`` defaults to ``dense``)."""
    vals = [r.get(field, dense) for r in results
            if all(r.get(k, "") == v for k, v in match.items())]
    return statistics.mean(vals) if vals else None


def summary(results: list[dict[str, Any]], dense: float) -> str:
    """What CAP adds over KD per method and sparsity, what each module adds, and the
    targets of the benchmark (mean over seeds)."""
    variants = sorted({r.get("variant", "") for r in results})
    lines = ["", "| method | sparsity | variant | + KD | + CAP | CAP - KD (points) |",
             "|---|---|---|---|---|---|"]
    for v in variants:
        for method in METHODS:
            for sp in sorted({r["sparsity"] for r in results}):
                kd = _mean(results, method=method, sparsity=sp, cap=False, drop=None,
                           variant=v)
                cap = _mean(results, method=method, sparsity=sp, cap=True, drop=None,
                            variant=v)
                if kd is not None and cap is not None:
                    lines.append(f"| {method} | {100 * sp:.0f}% | {v or 'default'} | "
                                 f"{100 * kd:.2f} | {100 * cap:.2f} | "
                                 f"{100 * (cap - kd):+.2f} |")
    # The ablation against full CAP on the same seeds.
    abl_seeds = {r["seed"] for r in results if r["drop"] and not r.get("variant")}
    full_runs = [r for r in results if r["seed"] in abl_seeds]
    full = _mean(full_runs, method="movement", sparsity=0.9, cap=True, drop=None, variant="")
    ablations = [(d, _mean(results, method="movement", sparsity=0.9, cap=True, drop=d,
                           variant="")) for d in ("prc", "snc", "fic")]
    if full is not None and any(a is not None for _, a in ablations):
        lines += ["", f"| movement + CAP at 90%, seeds {sorted(abl_seeds)} | accuracy | "
                  "change from full CAP (points) |", "|---|---|---|",
                  f"| full CAP | {100 * full:.2f} | |"]
        lines += [f"| without {d.upper()} | {100 * a:.2f} | {100 * (a - full):+.2f} |"
                  for d, a in ablations if a is not None]
    checks = []
    for v in variants:
        tag = f" [{v}]" if v else ""
        for m in METHODS:
            acc = _mean(results, method=m, sparsity=0.9, cap=True, drop=None, variant=v)
            if acc is not None:
                ref = _mean(results, "dense_accuracy", dense, method=m, sparsity=0.9,
                            cap=True, drop=None, variant=v)
                checks.append((f"{m} + CAP retains >= 95% of dense at 90%{tag}",
                               f"{100 * acc / ref:.1f}%", acc / ref >= 0.95))
        for sp, need in ((0.9, 1.0), (0.97, 2.0)):
            kd = _mean(results, method="movement", sparsity=sp, cap=False, drop=None,
                       variant=v)
            cap = _mean(results, method="movement", sparsity=sp, cap=True, drop=None,
                        variant=v)
            if kd is not None and cap is not None:
                gain = 100 * (cap - kd)
                checks.append((f"movement + CAP beats movement + KD by >= {need:.0f} "
                               f"point(s) at {100 * sp:.0f}%{tag}", f"{gain:+.2f}",
                               gain >= need))
    if checks:
        lines += ["", "| target | measured | reached |", "|---|---|---|"]
        lines += [f"| {t} | {v} | {'yes' if ok else 'no'} |" for t, v, ok in checks]
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], dense: float, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in sorted({label(r) for r in results if not r["drop"]}):
        pts: dict[float, list[dict[str, Any]]] = {}
        for r in results:
            if label(r) == name:
                pts.setdefault(r["sparsity"], []).append(r)
        cells = [pts[x] for x in sorted(pts)]  # x: the sparsity reached, not the target
        ax.plot([100 * statistics.mean(r["encoder_sparsity"] for r in c) for c in cells],
                [100 * statistics.mean(r["accuracy"] for r in c) for c in cells],
                "o-" if "CAP" in name else "s--", label=name)
    ax.axhline(100 * dense, color="k", ls="--", label="dense teacher")
    ax.set_xlabel("encoder sparsity reached (%)")
    ax.set_ylabel("dev accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _paper(args: argparse.Namespace, k: int, n: int) -> int:
    """The ``paper`` budget (bench/paper_rows.py): list or run the paper's rows."""
    sys.path.insert(0, str(ROOT / "bench"))
    import paper_rows

    selected = paper_rows.rows(args.methods, args.sparsities, list(range(args.seeds)))
    if args.list:
        print(paper_rows.listing(selected))
        return 0
    header = {"budget": "paper", "recipes": "capscale/configs/paper",
              "teacher": "fine-tuned by each task's first row, reused by the others"}
    mine = [r for i, r in enumerate(selected) if i % n == k]
    return paper_rows.run(mine, Path(args.work) / "paper", Path(args.out), header,
                          save_run, table, lambda a, b: a.get("recipe") == b["recipe"]
                          and a["seed"] == b["seed"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--budget", choices=[*sorted(BUDGETS), "paper"], default="smoke",
                   help="paper: the paper's rows from capscale/configs/paper (hub + GPU)")
    p.add_argument("--list", action="store_true",
                   help="print the exact command of every selected run, then stop")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.97])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-ablation", action="store_true")
    p.add_argument("--worker", default="0/1", metavar="K/N",
                   help="run only the runs with index %% N == K (workers share the json)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run of this call (e.g. train.lr=2e-4); "
                        "its runs are a variant, kept and reported apart")
    p.add_argument("--teacher-only", action="store_true",
                   help="fine-tune and cache the dense teacher, then stop")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default=str(ROOT / "bench" / "cache"))
    args = p.parse_args(argv)
    try:
        k, n = (int(x) for x in args.worker.split("/"))
        assert 0 <= k < n
    except (ValueError, AssertionError):
        p.error(f"--worker wants K/N with 0 <= K < N, got {args.worker!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_environment()
    if args.budget == "paper":
        return _paper(args, k, n)
    budget = BUDGETS[args.budget]
    work, out = Path(args.work) / args.budget, Path(args.out)
    try:  # the same parser as the command line's overrides; checked before any training
        sets = parse_overrides(args.set)
        run_config_from_dict(merge_dicts(base_config(budget, work / "check", 0), sets))
    except ConfigError as err:
        p.error(f"--set: {err}")
    out.mkdir(parents=True, exist_ok=True)
    ctx = init_distributed()
    console = Console(enabled=ctx.is_main, progress=False)
    suffix = "" if args.budget == "cpu" else f"_{args.budget}"
    json_path = out / f"fidelity{suffix}.json"
    # The dense teacher, trained once and reused by every run (and every invocation).
    teacher_cfg = run_config_from_dict(merge_dicts(
        base_config(budget, work / "teacher_run", 42),
        {"pruning": {"method": "none"}, "train": {"max_steps": 1},
         "cap": {"modules": {m: {"enabled": False} for m in ("prc", "fic", "snc")}}}))
    from capscale.data import load_task_data
    from capscale.models.loading import load_tokenizer
    from capscale.tasks import get_task
    from capscale.train.finetune import finetune_teacher
    data = load_task_data(teacher_cfg.data)
    teacher_path, teacher_metrics = finetune_teacher(
        teacher_cfg, ctx, data, load_tokenizer("minilm"),
        get_task(teacher_cfg.data.task_type), console)
    dense = teacher_metrics["accuracy"]
    if args.teacher_only:
        console.log(f"dense teacher: accuracy {dense:.4f} ({teacher_path})")
        return 0
    header = {"budget": args.budget, "budget_settings": budget, "dense_accuracy": dense,
              "split": {"train_rows": len(data.train), "dev_rows": len(data.validation),
                        "max_length": budget["max_length"], "notes": data.notes},
              "teacher": "fine-tuned once per budget: teacher_training.epochs 2, capped at "
                         "teacher_steps"}
    variant = ",".join(args.set)
    runs = [{**r, "variant": variant}
            for r in plan(args.sparsities, list(range(args.seeds)), not args.no_ablation)
            if r["method"] in args.methods]
    for i, r in enumerate(runs):
        done = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
        if i % n != k or any(_same(d, r) for d in done):
            continue  # another worker's, or finished (the json is the resume point)
        name = f"{label(r)} @ {r['sparsity']:.2f} seed {r['seed']}"
        console.log(f"run {i + 1}/{len(runs)}: {name}")
        cfg = run_config_from_dict(merge_dicts(
            merge_dicts(base_config(budget, work / run_dir(r), 42 + r["seed"]),
                  {"model": {"teacher": teacher_path}}),
            merge_dicts(run_config(r["method"], r["sparsity"], r["cap"], r["drop"]), sets)))
        record = run_record(r, cfg, ctx, console, teacher_metrics)
        save_run(json_path, header, record)
        console.log(f"{name}: accuracy {record['accuracy']:.4f}, encoder sparsity "
                    f"{record['encoder_sparsity']:.4f}, {record['seconds']:.0f} s")
    results = save_run(json_path, header, None)  # every run so far, of every call
    md = table(results, dense) + summary(results, dense)
    (out / f"fidelity{suffix}.md").write_text(md)
    plot(results, dense, out / f"fidelity{suffix}.png")
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
