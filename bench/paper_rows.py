"""The ``paper`` budget of bench/fidelity.py: the paper's rows, from the packaged recipes.

Each row is a YAML of ``capscale/configs/paper/`` (BERT-base, the reference scripts'
hyper-parameters, hub datasets: MNLI and QQP from ``nyu-mll/glue``, SQuAD where its
recipes exist), run as it stands (``train.seed`` set per seed). The dense teacher of a
task is fine-tuned once, by the task's first row, into ``<work>/paper/<task>/teacher``
and given to the task's other rows, as the README's paper table advises. Records go
to ``fidelity_paper.json`` in the format of the other budgets (``accuracy`` holds the
task's main metric: MNLI-m accuracy, QQP accuracy, SQuAD F1), and a table per task to
``fidelity_paper.md``. Needs the hub and a GPU: ``--list`` prints the exact commands
instead, one ``accelerate launch`` per row.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "capscale" / "configs" / "paper"
# fidelity's method names -> recipe prefixes (with KD only, with CAP)
PREFIXES = {"movement": ("movement_kd", "cap_m"), "soft_movement": ("soft_movement_kd", "cap_soft"),
            "magnitude": ("magnitude_kd", None)}
TASKS = ("mnli", "qqp", "squad")


def rows(methods: list[str], sparsities: list[float], seeds: list[int]
         ) -> list[dict[str, Any]]:
    """Every (recipe, seed) the arguments select, teacher-defining rows first per task."""
    found = []
    for task in TASKS:
        for method in methods:
            for cap, prefix in zip((False, True), PREFIXES[method]):
                for sp in sorted(sparsities, reverse=True):
                    name = f"{prefix}_{task}_{round(100 * sp)}"
                    if prefix and (PAPER / f"{name}.yaml").is_file():
                        found += [{"recipe": name, "task": task, "method": method, "cap": cap,
                                   "sparsity": sp, "drop": None, "seed": s} for s in seeds]
    return found


def command(row: dict[str, Any], out_root: str, teacher: str | None) -> str:
    parts = ["accelerate launch capscale/run.py", f"--config paper/{row['recipe']}.yaml",
             f"output_dir={out_root}/{row['recipe']}_seed{row['seed']}",
             f"train.seed={42 + row['seed']}"]
    if teacher:
        parts.append(f"model.teacher={teacher}")
    return " ".join(parts)


def listing(selected: list[dict[str, Any]], out_root: str = "outputs/paper") -> str:
    """The commands, in order: each task's first row fine-tunes and caches the teacher."""
    lines, first = [], {}
    for row in selected:
        teacher = first.get(row["task"])
        lines.append(command(row, out_root, teacher))
        first.setdefault(row["task"],
                         f"{out_root}/{row['recipe']}_seed{row['seed']}/teacher")
    return "\n".join(lines)


def run(selected: list[dict[str, Any]], work: Path, out: Path, header: dict[str, Any],
        save_run: Any, table: Any, same: Any) -> int:
    """Run every selected row here (resumable through the results file)."""
    from capscale.checks import load_run_config
    from capscale.console import Console
    from capscale.distributed import init_distributed
    from capscale.job import prune

    ctx = init_distributed()
    console = Console(enabled=ctx.is_main, progress=False)
    json_path = out / "fidelity_paper.json"
    first: dict[str, Path] = {}
    for row in selected:  # the teacher of a task: in its first row's output folder
        first.setdefault(row["task"], work / f"{row['recipe']}_seed{row['seed']}" / "teacher")
    for row in selected:
        done = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
        if any(same(d, row) for d in done):
            continue
        out_dir = work / f"{row['recipe']}_seed{row['seed']}"
        overrides = [f"output_dir={out_dir}", f"train.seed={42 + row['seed']}"]
        teacher, marker = first[row["task"]], first[row["task"]] / "capscale_teacher.json"
        teacher_metrics = None
        if teacher.parent != out_dir and marker.is_file():
            overrides.append(f"model.teacher={teacher}")
            teacher_metrics = json.loads(marker.read_text()).get("metrics")
        cfg = load_run_config(str(PAPER / f"{row['recipe']}.yaml"), overrides)
        t0 = time.perf_counter()
        res = prune(cfg, ctx, console, export=False, teacher_metrics=teacher_metrics)
        metric = "f1" if row["task"] == "squad" else "accuracy"
        dense = res.get("teacher_metrics") or {}
        record = {**row, "metric": metric, "accuracy": res["pruned_metrics"][metric],
                  "dense": dense.get(metric), "all_metrics": res["pruned_metrics"],
                  "encoder_sparsity": res["sparsity"]["encoder_sparsity"],
                  "linear_sparsity": res["sparsity"]["linear_sparsity"],
                  "steps": res["steps"], "seconds": time.perf_counter() - t0}
        save_run(json_path, header, record)
    results = save_run(json_path, header, None)
    md = []
    for task in TASKS:
        task_runs = [r for r in results if r.get("task") == task]
        if task_runs:
            dense = next((r["dense"] for r in task_runs if r.get("dense")), None) or 1.0
            md += [f"## {task} ({task_runs[0]['metric']})", "", table(task_runs, dense)]
    (out / "fidelity_paper.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


def recipe_names() -> list[str]:
    return sorted(re.sub(r"\.yaml$", "", p.name) for p in PAPER.glob("*.yaml"))
