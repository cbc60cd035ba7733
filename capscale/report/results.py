"""A finished run's results: the results dict, its files, and the summary table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from capscale.console import Console
    from capscale.distributed import DistContext
    from capscale.train.state import RunState

SPARSITY_KEYS = ("linear_sparsity", "encoder_sparsity", "total_sparsity")


def build_results(main_metric: str, teacher_metrics: dict[str, float] | None,
                  state: RunState, sparsity: dict[str, Any], train_examples: int,
                  eval_examples: int, notes: list[str], seconds: dict[str, float],
                  ctx: DistContext, method: str, phase_ms: dict[str, float],
                  snapshots: dict[str, Any] | None, curve: list[dict[str, Any]] | None,
                  latency: dict[str, Any] | None) -> dict[str, Any]:
    """What ``results.json`` holds (the total time is added by the caller).

    Args:
        main_metric: the task's main metric; teacher_metrics: the teacher's dev metrics.
        state: the run's progress (its last evaluation gives the pruned metrics).
        sparsity: the controller's report (``SPARSITY_KEYS`` are kept).
        train_examples, eval_examples, notes: what the data loading said.
        seconds: time per part of the run; phase_ms: mean milliseconds per step of each
            phase (capscale.train.hooks.Phases), this rank.
        ctx: ranks (world size, strategy); method: ``pruning.method``.
        snapshots: SnC views kept and their memory per rank, as logged before training.
        curve: the accuracy-vs-sparsity curve (structured), or None.
        latency: the latency target's measurements, or None.
    """
    results: dict[str, Any] = {
        "task_metric": main_metric,
        "teacher_metrics": teacher_metrics,
        "pruned_metrics": state.evals[-1]["metrics"],
        "sparsity": {k: sparsity[k] for k in SPARSITY_KEYS},
        "steps": state.step,
        "train_examples": train_examples,
        "eval_examples": eval_examples,
        "notes": notes,
        "seconds": dict(seconds),
        "world_size": ctx.world_size,
        "strategy": ctx.strategy,
        "method": method,
        "phase_ms": phase_ms,
        "snapshots": snapshots,
    }
    if curve is not None:
        results["curve"] = curve
    if latency is not None:  # pruning.target_latency_ms
        results["latency"] = latency
    return results


def save_history(out_dir: str | Path, state: RunState) -> None:
    """``history.jsonl`` (one record per step) and ``evals.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "history.jsonl", "w") as f:
        for rec in state.history:
            f.write(json.dumps(rec) + "\n")
    (out / "evals.json").write_text(json.dumps(state.evals, indent=1))


def write_results(output_dir: str | Path, results: dict[str, Any]) -> Path:
    path = Path(output_dir) / "results.json"
    path.write_text(json.dumps(results, indent=1))
    return path


def pruned_rows(r: dict[str, Any]) -> list[tuple[str, float]]:
    """The pruned model's main metric as the summary and the report show it: the verified
    export's dev score (``export_verified["metrics"]``) when the run exported, the masked student's
    last evaluation beside it only where the two differ; the student's otherwise."""
    key = r["task_metric"]
    student = r["pruned_metrics"][key]
    export = ((r.get("export_verified") or {}).get("metrics") or {}).get(key)
    if export is None:
        return [(f"pruned student {key}", student)]
    rows = [(f"pruned model {key} (verified export)", export)]
    if abs(export - student) > 1e-6:
        rows.append((f"masked student {key} (before export)", student))
    return rows


def _verified(v: dict[str, Any] | None) -> str:
    """The summary's line on the export check (capscale.export.verify)."""
    if not v:
        return "not exported"
    return (f"yes: max |Δoutput| {v['max_abs_diff']:.1e} on {v['examples']} dev examples "
            f"(tolerance {v['tolerance']:g})")


def print_summary(console: Console, r: dict[str, Any], method: str, output_dir: Path) -> None:
    """The table a user reads at the end of a run (``method``: how it is named there)."""
    key = r["task_metric"]
    t = r["teacher_metrics"][key] if r["teacher_metrics"] else float("nan")
    pruned = pruned_rows(r)
    p = pruned[0][1]
    rows = [
        (f"dense teacher {key}", f"{t:.4f}"),
        *((name, f"{value:.4f}") for name, value in pruned),
        ("retained", f"{100 * p / t:.1f}%" if t == t and t else "n/a"),
        ("export verified", _verified(r.get("export_verified"))),
        ("encoder sparsity (paper convention)", f"{100 * r['sparsity']['encoder_sparsity']:.2f}%"),
        ("prunable-matrix sparsity", f"{100 * r['sparsity']['linear_sparsity']:.2f}%"),
        ("sparsity over all parameters", f"{100 * r['sparsity']['total_sparsity']:.2f}%"),
        ("method", method),
        ("train / eval examples", f"{r['train_examples']} / {r['eval_examples']}"),
        ("pruning steps", str(r["steps"])),
        ("time: teacher / pruning / total",
         f"{r['seconds']['teacher']:.0f} s / {r['seconds']['pruning']:.0f} s / "
         f"{r['seconds']['total']:.0f} s"),
        ("output", str(Path(output_dir) / "pruned" / "model")),
    ]
    collapse = r.get("collapse") or {}
    if collapse:
        rows.insert(3 + len(pruned), ("collapse detected", collapse_summary(collapse)))
    console.table("capscale result", rows)
    for note in r["notes"]:
        console.log(f"note: {note}")
    for event in collapse.get("events", []):  # repeated here: the first may have scrolled
        console.warn(event["message"])


def collapse_summary(collapse: dict[str, Any]) -> str:
    """One cell for the summary and the report: ``no``, or each finding in short
    (capscale.train.collapse)."""
    events = collapse.get("events") or []
    if not events:
        return "no"
    parts = []
    for e in events:
        if e["kind"] == "loss_jump":
            parts.append(f"{e['loss']} loss {e['ratio']:.0f}x at step {e['step']}")
        else:
            parts.append(f"dev accuracy at the majority-class rate at step {e['step']}")
    return "YES: " + "; ".join(parts) + " (see the warning)"
