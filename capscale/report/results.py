"""A finished run's results: the results dict, its files, and the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capscale.config import Config
    from capscale.console import Console
    from capscale.recipe import CAPRecipe
    from capscale.train.state import RunState

SPARSITY_KEYS = ("linear_sparsity", "encoder_sparsity", "total_sparsity")


def build_results(recipe: CAPRecipe, sparsity: dict[str, Any]) -> dict[str, Any]:
    """What ``results.json`` holds (the total time is added by the caller)."""
    cfg, state = recipe.cfg, recipe.state
    key = recipe.task.main_metric
    results: dict[str, Any] = {
        "task_metric": key,
        "teacher_metrics": recipe.teacher_metrics,
        "pruned_metrics": state.evals[-1]["metrics"],
        "sparsity": {k: sparsity[k] for k in SPARSITY_KEYS},
        "steps": state.step,
        "train_examples": len(recipe.data.train),
        "eval_examples": len(recipe.data.validation),
        "notes": recipe.data.notes,
        "seconds": dict(recipe.seconds),
        "world_size": recipe.ctx.world_size,
        "strategy": recipe.ctx.strategy,
        "method": cfg.pruning.method,
        # mean milliseconds per step of each phase (capscale.train.loop.Phases), this rank
        "phase_ms": recipe.phase_totals.mean_ms(),
        # SnC views kept and their memory per rank, as logged before training
        "snapshots": recipe.snapshot_plan,
    }
    curve = getattr(recipe.controller, "curve", None)
    if curve is not None:  # the accuracy-vs-sparsity curve, one point per milestone
        results["curve"] = curve()
    latency = getattr(recipe.controller, "latency", None)
    if latency is not None and latency.enabled:  # pruning.target_latency_ms
        results["latency"] = latency.summary()
    return results


def save_history(out_dir: str | Path, state: RunState) -> None:
    """``history.jsonl`` (one record per step) and ``evals.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "history.jsonl", "w") as f:
        for rec in state.history:
            f.write(json.dumps(rec) + "\n")
    (out / "evals.json").write_text(json.dumps(state.evals, indent=1))


def write_results(cfg: Config, results: dict[str, Any]) -> Path:
    path = Path(cfg.output_dir) / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def print_summary(console: Console, cfg: Config, r: dict[str, Any]) -> None:
    """The table a user reads at the end of a run."""
    key = r["task_metric"]
    t = r["teacher_metrics"][key] if r["teacher_metrics"] else float("nan")
    p = r["pruned_metrics"][key]
    cap = cfg.cap.enabled_modules()
    rows = [
        (f"dense teacher {key}", f"{t:.4f}"),
        (f"pruned student {key}", f"{p:.4f}"),
        ("retained", f"{100 * p / t:.1f}%" if t == t and t else "n/a"),
        ("encoder sparsity (paper convention)", f"{100 * r['sparsity']['encoder_sparsity']:.2f}%"),
        ("prunable-matrix sparsity", f"{100 * r['sparsity']['linear_sparsity']:.2f}%"),
        ("sparsity over all parameters", f"{100 * r['sparsity']['total_sparsity']:.2f}%"),
        ("method", f"{cfg.pruning.method} + CAP ({', '.join(cap)})" if cap
         else cfg.pruning.method),
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
