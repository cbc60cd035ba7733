"""Where a run's model sits on the accuracy / speed frontier (a section of the report).

The report times the export and the dense model it came from (the run's fine-tuned
teacher, else ``model.teacher``, else the student's starting model) in the same
process at the same shape, so the speed-up is measured on the machine the report runs
on; the accuracy is the pruned model's (its verified export's when exported) as a
fraction of the dense teacher's. Given a frontier file (``bench/results/frontier.json``,
written by bench/frontier.py), the section also plots this run among the frontier's
points.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def dense_reference(out: Path) -> Path | None:
    """The dense model a run started from (see the module docstring), or None."""
    import yaml

    from capscale.models.loading import resolve_model_path

    if (out / "teacher" / "config.json").is_file():
        return out / "teacher"
    path = out / "config.yaml"
    cfg = yaml.safe_load(path.read_text()) if path.is_file() else None
    model = (cfg or {}).get("model") or {}
    for name in (model.get("teacher"), model.get("name_or_path")):
        if name:
            try:
                found = Path(resolve_model_path(name))
            except Exception:  # a hub name not cached here: nothing to time
                continue
            if (found / "config.json").is_file():
                return found
    return None


def placement(out: Path, results: dict[str, Any], model_dir: Path, repeats: int,
              batch: int = 8, length: int = 64, frontier: Path | None = None,
              plot_path: Path | None = None, trust_remote_code: bool = False
              ) -> tuple[list[tuple[str, str]], str | None]:
    """Rows (speed-up over the dense model, accuracy as % of dense) and, with a
    ``frontier`` file, the plot of this run among its points (file name or None).
    ``trust_remote_code``: the run's models ship their own modeling code."""
    from capscale.export.formats import load_export
    from capscale.pruning.latency import time_forward

    rows: list[tuple[str, str]] = []
    key = results.get("task_metric", "accuracy")
    teacher = (results.get("teacher_metrics") or {}).get(key)
    exported = (results.get("export_verified") or {}).get("metrics") or {}
    pruned = exported.get(key, (results.get("pruned_metrics") or {}).get(key))
    rel = pruned / teacher if teacher and pruned is not None else None
    if rel is not None:
        rows.append((f"{key}, % of the dense teacher", f"{100 * rel:.1f}%"))
    dense_dir = dense_reference(out)
    speedup = None
    if dense_dir is not None and repeats > 0:
        from transformers import AutoModelForSequenceClassification
        try:
            dense = AutoModelForSequenceClassification.from_pretrained(
                dense_dir, trust_remote_code=trust_remote_code).float().eval()
        except (OSError, ValueError) as err:  # the report must not fail a finished run
            rows.append(("speed-up over the dense model", f"not measured: {dense_dir} did "
                         f"not load ({str(err).splitlines()[0][:160]})"))
            dense_dir = None
    if dense_dir is not None and repeats > 0:
        pruned_model = load_export(model_dir, trust_remote_code)
        # At most the model's positions (RoBERTa-style embeddings reserve two).
        length = min(length, getattr(dense.config, "max_position_embeddings", length + 2) - 2)
        d_ms = time_forward(dense, batch, length, repeats)
        p_ms = time_forward(pruned_model, batch, length, repeats)
        speedup = d_ms / p_ms
        rows.append((f"speed-up over the dense model (PyTorch fp32, batch {batch} x {length}, "
                     "this machine)", f"{speedup:.2f}x ({d_ms:.1f} ms -> {p_ms:.1f} ms)"))
    if frontier is None or not frontier.is_file() or plot_path is None:
        return rows, None
    return rows, plot_placement(json.loads(frontier.read_text()), rel, speedup,
                                results.get("method", "this run"), plot_path)


def plot_placement(data: dict[str, Any], rel: float | None, speedup: float | None,
                   method: str, path: Path) -> str | None:
    """The frontier's points (speed-up at batch 32 against % of dense accuracy) with
    this run marked; None when there is nothing to place."""
    import matplotlib.pyplot as plt

    points = [p for p in data.get("points", []) if p.get("relative_accuracy")]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for runtime in sorted({p["runtime"] for p in points}):
        pts = [p for p in points if p["runtime"] == runtime]
        ax.scatter([p["speedup_b32"] for p in pts],
                   [100 * p["relative_accuracy"] for p in pts], s=25, label=runtime)
    if rel is not None and speedup is not None:
        ax.scatter([speedup], [100 * rel], marker="*", s=220, color="crimson",
                   label=f"this run ({method}, PyTorch fp32)", zorder=5)
    ax.set(xscale="log", xlabel="speed-up over dense PyTorch fp32",
           ylabel="accuracy, % of dense", title="Where this model sits")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name
