"""The accuracy / speed frontier: dense vs unstructured CAP-m vs structured CAP-f vs
hybrid CAP (vs N:M 2:4 for accuracy), each exported and timed.

Every point is one CAP run (PrC + FiC + SnC + KD) of the same task and budget, the
fidelity benchmark's CPU protocol: the packaged all-MiniLM-L6-v2 fine-tuned on the
packaged tweets corpus as teacher (cached by bench/fidelity.py in ``bench/cache/cpu``),
the student started from it, ``--train-rows`` training rows, ``--steps`` optimiser steps
of batch 16 at length 64, learning rate ``--lr`` for every method, scores warm-started
from magnitude (``pruning.score_warm_start``, scale 0.1), the whole 3816-row dev set.
Structured CAP-f uses the cubic schedule (masks from Taylor importance every
``--update-every`` steps on 10% of the training set) so that every method prunes along
the same schedule in the same number of steps. Each run exports with
``export.formats: [pytorch, onnx, int8]``: the dev accuracy of the ONNX Runtime INT8
model is measured on the whole dev set too.

Then, alone on the machine (``--time``), every export and the dense teacher are timed
at batch 1 and 32, length 128, in PyTorch fp32, ONNX Runtime fp32 and ONNX Runtime
INT8 (``--threads`` threads, median of a few forwards after a warm-up); the dense model
is timed in the same process, and every speed-up is over dense PyTorch fp32 at the same
batch. ``--report`` writes the table, the target check and the plot.

    PYTHONPATH=. python bench/fidelity.py --budget cpu --teacher-only    # once
    PYTHONPATH=. python bench/frontier.py --worker 0/2 --threads 1 &     # training,
    PYTHONPATH=. python bench/frontier.py --worker 1/2 --threads 1       # two workers
    PYTHONPATH=. python bench/frontier.py --time --threads 1             # timing, alone
    PYTHONPATH=. python bench/frontier.py --report

Writes ``bench/results/frontier.json`` (``runs``: one per training run; ``points``: one
record per point and runtime: method, runtime, sparsity reached, accuracy, dense
accuracy, latency at batch 1 and 32, speed-up over dense PyTorch fp32 in the same run),
``frontier.md`` and ``frontier.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

RESULTS = ROOT / "bench" / "results"
# Every point: (name, method, final sparsity, N:M pattern or None, extras). Extras:
# ``blocks`` (structured.remove_empty_blocks, no head floor), ``hidden``
# (structured.hidden_sparsity), ``w_layer`` (layer
# distillation, dynamic map on every other teacher layer), ``cap: False`` (PrC / FiC /
# SnC off), ``steps`` (another training length), ``speedup`` (pruning.target_latency_ms
# at dense's batch-32 time over this, timed by the worker before the run; the final
# sparsity is then the most it may prune). Hybrid with blocks ranks globally.
Point = tuple[str, str, float, str | None, dict[str, Any]]
POINTS: list[Point] = [
    ("CAP-m 50%", "movement", 0.5, None, {}),
    ("CAP-m 2:4", "movement", 0.5, "2:4", {}),
    ("CAP-m 90%", "movement", 0.9, None, {}),
    ("CAP-f 50%", "structured", 0.5, None, {}),
    ("CAP-f 75%", "structured", 0.75, None, {}),
    ("CAP-f 90%", "structured", 0.9, None, {}),
    ("hybrid 50%", "hybrid", 0.5, None, {}),
    ("hybrid 75%", "hybrid", 0.75, None, {}),
    ("hybrid 90%", "hybrid", 0.9, None, {}),
]
LAYER = {"w_layer": 0.5}
# --points coarse: whole blocks and layer distillation at the far end, and training
# length, each against CAP-f 90% retrained in the same call (frontier_coarse.*).
COARSE_POINTS: list[Point] = [
    ("CAP-f 90%", "structured", 0.9, None, {}),
    ("CAP-f 90% blocks +layer @600", "structured", 0.9, None,
     {"blocks": True, **LAYER, "steps": 600}),
    ("CAP-f 90% +layer", "structured", 0.9, None, LAYER),
    ("CAP-f 90% h25 blocks +layer", "structured", 0.9, None,
     {"blocks": True, **LAYER, "hidden": 0.25}),
    ("CAP-f 90% blocks +layer", "structured", 0.9, None, {"blocks": True, **LAYER}),
    ("CAP-f 80% h50 blocks +layer", "structured", 0.8, None,
     {"blocks": True, **LAYER, "hidden": 0.5}),
    ("CAP-f 90% @600", "structured", 0.9, None, {"steps": 600}),
    ("CAP-f 90% blocks", "structured", 0.9, None, {"blocks": True}),
    ("CAP-f 90% layer, no CAP", "structured", 0.9, None, {**LAYER, "cap": False}),
    ("CAP-f 95% blocks +layer", "structured", 0.95, None, {"blocks": True, **LAYER}),
    ("CAP-f 80% h50 blocks +layer @600", "structured", 0.8, None,
     {"blocks": True, **LAYER, "hidden": 0.5, "steps": 600}),
    ("CAP-f 90% h25 blocks +layer @600", "structured", 0.9, None,
     {"blocks": True, **LAYER, "hidden": 0.25, "steps": 600}),
    ("CAP-f 95% h25 blocks +layer @600", "structured", 0.95, None,
     {"blocks": True, **LAYER, "hidden": 0.25, "steps": 600}),
    ("hybrid 90% h25 blocks +layer @600", "hybrid", 0.9, None,
     {"blocks": True, **LAYER, "hidden": 0.25, "steps": 600}),
    ("CAP-f 8x target h25 blocks +layer @600", "structured", 0.95, None,
     {"blocks": True, **LAYER, "hidden": 0.25, "steps": 600, "speedup": 8.0}),
    ("hybrid 90% blocks +layer", "hybrid", 0.9, None, {"blocks": True, **LAYER}),
    ("hybrid 95% h25 blocks +layer @600", "hybrid", 0.95, None,
     {"blocks": True, **LAYER, "hidden": 0.25, "steps": 600}),
    ("CAP-f 90% blocks +layer @1500", "structured", 0.9, None,
     {"blocks": True, **LAYER, "steps": 1500}),
    ("hybrid 90% blocks", "hybrid", 0.9, None, {"blocks": True}),
]
RUNTIMES = ("torch fp32", "onnxruntime fp32", "onnxruntime int8")
TARGETS = [(0.95, 8.0), (0.98, 3.0)]  # (fraction of dense accuracy, speed-up at batch 32)
COARSE_TARGETS = [(0.95, 8.0), (0.90, 12.0)]


def run_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name.replace("%", "").replace(":", "of"))


def point_config(fid: Any, args: argparse.Namespace, budget: dict[str, Any], work: Path,
                 teacher: str, point: Point, dense_ms: float | None = None
                 ) -> dict[str, Any]:
    """The run config of ``point``; ``dense_ms``: dense's batch-32 forward (ms), which a
    point with ``speedup`` needs."""
    from capscale.config import merge_dicts

    name, method, sparsity, pattern, extra = point
    cfg = merge_dicts(fid.base_config(budget, work / run_name(name), 42),
                      {"model": {"teacher": teacher}})
    cfg = merge_dicts(cfg, fid.run_config(method, sparsity, extra.get("cap", True)))
    pruning = cfg["pruning"]
    pruning.update(score_warm_start="magnitude", score_warm_start_scale=args.warm_start_scale)
    if pattern:
        pruning["pattern"] = pattern
    if method == "structured":
        cfg["structured"] = {"schedule": "cubic", "update_every": args.update_every,
                             "importance_fraction": 0.1, "levels": [sparsity]}
    if extra.get("blocks"):
        cfg.setdefault("structured", {}).update(remove_empty_blocks=True)
        if method == "structured":
            cfg["structured"]["min_heads_per_layer"] = 0
        else:  # hybrid empties a block only when heads / neurons are ranked globally
            pruning["scope"] = "global"
    if extra.get("w_layer"):
        cfg["loss"].update(w_layer=extra["w_layer"], layer_map="dynamic",
                           layer_teacher_layers=[2, 4, 6])
    if extra.get("hidden"):
        cfg.setdefault("structured", {})["hidden_sparsity"] = extra["hidden"]
    if extra.get("speedup"):
        if dense_ms is None:
            raise ValueError(f"{name}: a latency-target point needs dense's time (dense_ms)")
        pruning.update(target_latency_ms=round(dense_ms / extra["speedup"], 1),
                       latency_batch_size=32, latency_seq_length=128)
    if extra.get("steps"):  # epochs large enough that max_steps is the length
        cfg["train"].update(max_steps=extra["steps"], epochs=100)
    cfg["train"]["lr"] = args.lr
    cfg["export"] = {"formats": ["pytorch", "onnx", "int8"]}
    return cfg


def dense_latency_ms(model_dir: str, threads: int, length: int = 128) -> float:
    """The dense model's batch-32 forward (ms) as the latency target measures it (the
    faster of two medians)."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from capscale.pruning.latency import time_forward
    torch.set_num_threads(threads)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    return min(time_forward(model, 32, length, 3, torch.device("cpu")) for _ in range(2))


def _update(path: Path, key: str, items: list[dict[str, Any]], header: dict[str, Any],
            same: Any) -> dict[str, Any]:
    """Merge ``items`` into ``path``'s ``key`` list under a lock (workers share it)."""
    import fcntl
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(path.read_text()) if path.is_file() else {}
        data = {**data, **{k: v for k, v in header.items() if k not in data}}
        old = [r for r in data.get(key, []) if not any(same(r, x) for x in items)]
        data[key] = old + items
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(path)
    return data


def train(args: argparse.Namespace, fid: Any, json_path: Path) -> None:
    import torch

    from capscale.checks import run_config_from_dict
    from capscale.cli import setup_environment
    from capscale.console import Console
    from capscale.distributed import init_distributed
    from capscale.job import prune

    setup_environment()
    torch.set_num_threads(args.threads)
    k, n = (int(x) for x in args.worker.split("/"))
    budget = {**fid.BUDGETS[args.budget]}
    if args.budget == "cpu":
        budget.update(max_steps=args.steps, max_train_samples=args.train_rows)
    tag = "" if args.points == "main" else f"_{args.points}"
    work = Path(args.work) / f"frontier_{args.budget}{tag}"
    teacher, dense = teacher_of(fid, args)
    header = {"train_command": "PYTHONPATH=. python bench/frontier.py --worker K/N --threads "
                               f"{args.threads} --steps {args.steps} --train-rows "
                               f"{args.train_rows} --lr {args.lr:g}",
              "protocol": f"{args.train_rows} train rows, {args.steps} steps of batch 16, "
                          f"length 64, lr {args.lr:g}, CAP (PrC + FiC + SnC) + KD, student "
                          "from the teacher, scores warm-started from |W| (scale 0.1); "
                          f"CAP-f: cubic schedule, importance every {args.update_every} steps",
              "dense_accuracy": dense, "teacher": teacher}
    ctx = init_distributed()
    console = Console(enabled=True, progress=False)
    done = json.loads(json_path.read_text()).get("runs", []) if json_path.is_file() else []
    for i, point in enumerate(POINTS):
        if i % n != k or any(r["name"] == point[0] for r in done):
            continue
        dense_ms = (dense_latency_ms(teacher, args.threads)
                    if point[4].get("speedup") else None)
        cfg = run_config_from_dict(point_config(fid, args, budget, work, teacher, point,
                                                dense_ms))
        t0 = time.perf_counter()
        res = prune(cfg, ctx, console, export=True, teacher_metrics={"accuracy": dense})
        out = Path(cfg.output_dir) / "pruned"
        report = json.loads((out / "sparsity_report.json").read_text())
        dev = (report.get("formats") or {}).get("dev", {}).get("metrics", {})
        record = {"name": point[0], "method": point[1], "target_sparsity": point[2],
                  "pattern": point[3], "extra": point[4], "export": _rel(out),
                  "removed_blocks": report.get("removed_blocks"),
                  "accuracy": res["pruned_metrics"]["accuracy"],
                  "accuracy_by_runtime": {
                      "torch fp32": res["pruned_metrics"]["accuracy"],
                      "onnxruntime fp32": (dev.get("onnx") or {}).get("accuracy"),
                      "onnxruntime int8": (dev.get("int8") or {}).get("accuracy")},
                  "encoder_sparsity": res["sparsity"]["encoder_sparsity"],
                  "linear_sparsity": res["sparsity"]["linear_sparsity"],
                  "steps": res["steps"], "seconds": time.perf_counter() - t0,
                  **({"latency_target": {k: v for k, v in res["latency"].items()
                                         if k != "measured"},
                      "latency_last": res["latency"]["measured"][-1:]}
                     if res.get("latency") else {}),
                  "load_avg_end": os.getloadavg()[0]}
        _update(json_path, "runs", [record], header, lambda a, b: a["name"] == b["name"])
        console.log(f"{point[0]}: accuracy {record['accuracy']:.4f}, int8 "
                    f"{record['accuracy_by_runtime']['onnxruntime int8']}, encoder sparsity "
                    f"{record['encoder_sparsity']:.3f}")


def _rel(path: Path) -> str:
    """``path`` relative to the repository when inside it (results stay portable)."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def teacher_of(fid: Any, args: argparse.Namespace) -> tuple[str, float]:
    """The cached fine-tuned teacher (path, dev accuracy); fine-tuned when missing."""
    from capscale.checks import run_config_from_dict
    from capscale.config import merge_dicts
    from capscale.console import Console
    from capscale.data import load_task_data
    from capscale.distributed import init_distributed
    from capscale.models.loading import load_tokenizer
    from capscale.tasks import get_task
    from capscale.train.finetune import finetune_teacher

    cfg = run_config_from_dict(merge_dicts(
        fid.base_config(fid.BUDGETS[args.budget], Path(args.work) / args.budget / "teacher_run",
                        42),
        {"pruning": {"method": "none"}, "train": {"max_steps": 1},
         "cap": {"modules": {m: {"enabled": False} for m in ("prc", "fic", "snc")}}}))
    path, metrics = finetune_teacher(cfg, init_distributed(), load_task_data(cfg.data),
                                     load_tokenizer("minilm"), get_task("classification"),
                                     Console(enabled=False))
    return str(path), metrics["accuracy"]


def median_ms(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def time_model(model_dir: Path, onnx_dir: Path, batches: list[int], length: int,
               repeats: int, threads: int) -> dict[str, dict[int, float]]:
    """Latency (ms) per runtime and batch of an export (``model_dir`` + its ONNX files)."""
    import torch

    from capscale.export.formats import load_export
    from capscale.export.onnx_export import onnx_logits, onnx_session

    model = load_export(model_dir)
    sessions = {"onnxruntime fp32": onnx_session(onnx_dir / "model.onnx", threads),
                "onnxruntime int8": onnx_session(onnx_dir / "model_int8.onnx", threads)}
    out: dict[str, dict[int, float]] = {r: {} for r in RUNTIMES}
    g = torch.Generator().manual_seed(0)
    for batch in batches:
        ids = torch.randint(1000, 2000, (batch, length), generator=g)
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                  "token_type_ids": torch.zeros_like(ids)}
        reps = repeats * (4 if batch == 1 else 1)
        with torch.inference_mode():
            out["torch fp32"][batch] = median_ms(lambda x=inputs: model(**x), reps)
        for name, s in sessions.items():
            out[name][batch] = median_ms(lambda s=s, x=inputs: onnx_logits(s, x), reps)
    return out


def dense_export(fid: Any, budget: str, teacher: str, dest: Path) -> dict[str, Any]:
    """The dense teacher as an export folder with its ONNX / INT8 files and their dev
    accuracy (the dense point of every runtime)."""
    from capscale.checks import run_config_from_dict
    from capscale.config import merge_dicts
    from capscale.data import Collator, load_task_data, make_loader, tokenize
    from capscale.export.formats import DevSet, write_formats
    from capscale.models.loading import load_tokenizer
    from capscale.tasks import get_task

    report = dest / "sparsity_report.json"
    if report.is_file() and "formats" in json.loads(report.read_text()):
        return json.loads(report.read_text())["formats"]
    if (dest / "model").exists():
        shutil.rmtree(dest / "model")
    shutil.copytree(teacher, dest / "model")
    report.write_text("{}")
    cfg = run_config_from_dict(merge_dicts(fid.base_config(fid.BUDGETS[budget], dest, 42),
                                       {"pruning": {"method": "none"}}))
    data = load_task_data(cfg.data)
    tok = load_tokenizer("minilm")
    dev = make_loader(tokenize(data.validation, tok, cfg.data), 64,
                      Collator(tok.pad_token_id or 0))
    return write_formats(dest, ["onnx", "int8"], next(iter(dev)),
                         DevSet(dev, get_task("classification"), data.num_labels), log=print)


def time_all(args: argparse.Namespace, fid: Any, json_path: Path) -> None:
    import torch
    torch.set_num_threads(args.threads)
    data = json.loads(json_path.read_text())
    teacher, dense_acc = data["teacher"], data["dense_accuracy"]
    dense_dir = Path(args.work) / f"frontier_{args.budget}" / "dense"
    dense_formats = dense_export(fid, args.budget, teacher, dense_dir)
    load_start = os.getloadavg()
    t0 = time.perf_counter()
    batches = [1, 32]
    dense_ms = time_model(dense_dir / "model", dense_dir / "onnx", batches, args.length,
                          args.repeats, args.threads)
    dense_dev = dense_formats.get("dev", {}).get("metrics", {})
    entries = [{"name": "dense", "method": "dense", "encoder_sparsity": 0.0,
                "accuracy_by_runtime": {"torch fp32": dense_acc,
                                        "onnxruntime fp32": dense_dev["onnx"]["accuracy"],
                                        "onnxruntime int8": dense_dev["int8"]["accuracy"]},
                "ms": dense_ms}]
    for r in data["runs"]:
        export = ROOT / r["export"]  # absolute paths stay as they are
        print(f"timing {r['name']}", flush=True)
        entries.append({**r, "ms": time_model(export / "model", export / "onnx", batches,
                                               args.length, args.repeats, args.threads)})
    # Dense again, last: a CPU timed cold runs slower, which would inflate every
    # speed-up; each runtime's faster dense time is the reference.
    again = time_model(dense_dir / "model", dense_dir / "onnx", batches, args.length,
                       args.repeats, args.threads)
    dense_ms = {r: {b: min(dense_ms[r][b], again[r][b]) for b in batches} for r in RUNTIMES}
    entries[0]["ms"] = dense_ms
    points = []
    for e in entries:
        for runtime in RUNTIMES:
            acc = e["accuracy_by_runtime"].get(runtime)
            rec = {"name": e["name"], "method": e["method"], "runtime": runtime,
                   "sparsity_reached": e["encoder_sparsity"], "accuracy": acc,
                   "dense_accuracy": dense_acc,
                   "relative_accuracy": acc / dense_acc if acc is not None else None}
            for b in batches:
                ms = e["ms"][runtime][b]
                rec[f"latency_ms_b{b}"] = ms
                rec[f"speedup_b{b}"] = dense_ms["torch fp32"][b] / ms
            points.append(rec)
    timing = {"time_command": f"PYTHONPATH=. python bench/frontier.py --time --threads "
                              f"{args.threads}",
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                         f"cores, {args.threads} thread(s); load average "
                         f"{load_start[0]:.2f} at the start of timing, "
                         f"{os.getloadavg()[0]:.2f} at its end",
              "timing": f"batch 1 and 32, length {args.length}; median of "
                        f"{4 * args.repeats} (batch 1) / {args.repeats} (batch 32) forwards "
                        "after a warm-up; random token ids, all attended; dense timed first "
                        "and last, the faster taken",
              "timing_seconds": time.perf_counter() - t0}
    data.update(timing)
    data["points"] = points
    json_path.write_text(json.dumps(data, indent=1))


def markdown(data: dict[str, Any], targets: list[tuple[float, float]] = TARGETS,
             far: dict[str, Any] | None = None) -> str:
    pts = data.get("points", [])
    title = ("Accuracy / speed frontier (MiniLM on tweets)" if targets == TARGETS else
             "The far end: whole blocks, hidden dimension, layer distillation (MiniLM on "
             "tweets)")
    lines = [f"# {title}", "",
             f"Training: `{data['train_command']}`; {data['protocol']}.", "",
             f"Timing: `{data.get('time_command', '-')}`; {data.get('machine', '-')}; "
             f"{data.get('timing', '-')}.", "",
             f"Dense accuracy (the teacher, PyTorch fp32): {100 * data['dense_accuracy']:.2f}.",
             "", "| point | runtime | encoder sparsity | accuracy | % of dense | batch 1 ms "
             "| speed-up b1 | batch 32 ms | speed-up b32 |", "|---" * 9 + "|"]
    for p in pts:
        acc = "-" if p["accuracy"] is None else f"{100 * p['accuracy']:.2f}"
        rel = "-" if p["relative_accuracy"] is None else f"{100 * p['relative_accuracy']:.1f}"
        lines.append(f"| {p['name']} | {p['runtime']} | {100 * p['sparsity_reached']:.1f}% | "
                     f"{acc} | {rel} | {p['latency_ms_b1']:.1f} | {p['speedup_b1']:.2f}x | "
                     f"{p['latency_ms_b32']:.0f} | {p['speedup_b32']:.2f}x |")
    lines += ["", "Targets (batch 32, length 128, speed-up over dense PyTorch fp32):", ""]
    for rel, speed in targets:
        hits = [p for p in pts if p["relative_accuracy"] is not None
                and p["relative_accuracy"] >= rel and p["speedup_b32"] >= speed]
        best = max(hits, key=lambda p: p["speedup_b32"]) if hits else None
        lines.append(f"- >= {100 * rel:.0f}% of dense at >= {speed:g}x: " + (
            f"reached by {best['name']} ({best['runtime']}): "
            f"{100 * best['relative_accuracy']:.1f}% at {best['speedup_b32']:.2f}x"
            if best else "not reached; " + _closest(pts, rel, speed)))
    lines += _comparisons(pts) if any(p["name"] in ("hybrid 50%", "hybrid 75%", "hybrid 90%")
                                      for p in pts) else []
    lines += _coarse_comparisons(data)
    lines += far_end(far) if far else []
    return "\n".join(lines) + "\n"


def _coarse_comparisons(data: dict[str, Any]) -> list[str]:
    """Whole blocks, layer distillation with and without CAP, and accuracy against
    training steps, at CAP-f's far end (PyTorch fp32 and INT8)."""
    pts = {(p["name"], p["runtime"]): p for p in data.get("points", [])}
    runs = {r["name"]: r for r in data.get("runs", [])}
    out: list[str] = []

    def cell(name: str, runtime: str = "torch fp32") -> str:
        p = pts.get((name, runtime))
        if p is None or p["accuracy"] is None:
            return "-"
        return (f"{100 * p['accuracy']:.2f} ({100 * p['relative_accuracy']:.1f}%) at "
                f"{p['speedup_b32']:.2f}x")
    pairs = [("CAP-f 90% +layer", "CAP-f 90% layer, no CAP",
              "layer distillation with CAP vs without")]
    if any(a in runs and b in runs for a, b, _ in pairs):
        out += ["", "Layer distillation with and without CAP's contrastive terms (same "
                "steps, same point):", ""]
        for a, b, what in pairs:
            pa, pb = pts.get((a, "torch fp32")), pts.get((b, "torch fp32"))
            if pa and pb:
                out.append(f"- {what}: {cell(a)} vs {cell(b)} "
                           f"({100 * (pa['accuracy'] - pb['accuracy']):+.2f} points)")
    pairs = [("hybrid 90% blocks +layer", "CAP-f 90% blocks +layer"),
             ("hybrid 90% h25 blocks +layer @600", "CAP-f 90% h25 blocks +layer @600")]
    if any(a in runs and b in runs for a, b in pairs):
        out += ["", "Hybrid (movement scores) against CAP-f (Taylor importance) at the same "
                "granularities and steps:", ""]
        for a, b in pairs:
            if a in runs and b in runs:
                out.append(f"- {a}: hybrid {cell(a)}, CAP-f {cell(b)}; INT8 "
                           f"{cell(a, 'onnxruntime int8')} vs {cell(b, 'onnxruntime int8')}")
    for n, r in runs.items():
        lt = r.get("latency_target")
        if lt:
            last = (r.get("latency_last") or [{}])[-1]
            out += ["", f"Latency target ({n}): {lt['target_ms']:g} ms for batch "
                    f"{lt['batch_size']} x {lt['seq_length']} (dense / 8, timed by the "
                    f"worker); {'met' if lt['met'] else 'not met'} at sparsity "
                    f"{100 * (lt['met_at_sparsity'] or 0):.1f}% ({last.get('ms', 0):.0f} ms "
                    f"there, measured during training; kept {last.get('kept')}; time by "
                    f"part {last.get('parts_ms')} ms); timed alone: {cell(n)}."]
    blocks = [n for n in runs if "blocks" in n]
    if blocks:
        out += ["", "Blocks removed by the runs that allow it (layer indices):", ""]
        for n in blocks:
            rb = runs[n].get("removed_blocks") or {}
            out.append(f"- {n}: attention {rb.get('attention', [])}, FFN "
                       f"{rb.get('ffn', [])}")
    steps = sorted({(r["name"].split(" @")[0], r["steps"]) for r in runs.values()})
    bases = sorted({b for b, _ in steps if sum(x == b for x, _ in steps) > 1})
    if bases:
        out += ["", "Accuracy against training steps (PyTorch fp32 / ONNX Runtime INT8):", "",
                "| point | steps | fp32 | INT8 |", "|---|---|---|---|"]
        for base in bases:
            for name, r in sorted(((n, r) for n, r in runs.items()
                                   if n.split(" @")[0] == base), key=lambda x: x[1]["steps"]):
                out.append(f"| {base} | {r['steps']} | {cell(name)} | "
                           f"{cell(name, 'onnxruntime int8')} |")
    return out


def pareto(pts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points no other point beats in both accuracy and batch-32 speed-up (dense
    excluded), fastest first."""
    pts = [p for p in pts if p["relative_accuracy"] is not None and p["method"] != "dense"]
    return sorted((p for p in pts if not any(
        q["relative_accuracy"] >= p["relative_accuracy"] and q["speedup_b32"] > p["speedup_b32"]
        for q in pts)), key=lambda p: -p["speedup_b32"])


def far_end(far: dict[str, Any]) -> list[str]:
    """The main report's section on frontier_coarse: its Pareto points."""
    out = ["", "## The far end (frontier_coarse.md)", "",
           "Whole blocks, the hidden dimension and layer distillation (CAP-f and hybrid), "
           "trained and timed in their own run (dense re-timed there: "
           f"{far.get('machine', '-')}). Its Pareto points (batch 32):", ""]
    for p in pareto(far.get("points", [])):
        out.append(f"- {p['name']} ({p['runtime']}): {100 * p['relative_accuracy']:.1f}% of "
                   f"dense at {p['speedup_b32']:.2f}x")
    return out


def _closest(pts: list[dict[str, Any]], rel: float, speed: float) -> str:
    fast = [p for p in pts if p["speedup_b32"] >= speed and p["relative_accuracy"]]
    acc = [p for p in pts if p["relative_accuracy"] and p["relative_accuracy"] >= rel]
    parts = []
    if fast:
        b = max(fast, key=lambda p: p["relative_accuracy"])
        parts.append(f"at >= {speed:g}x the best is {b['name']} ({b['runtime']}) with "
                     f"{100 * b['relative_accuracy']:.1f}%")
    else:
        b = max(pts, key=lambda p: p["speedup_b32"])
        parts.append(f"no point reaches {speed:g}x; the fastest is {b['name']} "
                     f"({b['runtime']}) at {b['speedup_b32']:.2f}x with "
                     f"{100 * b['relative_accuracy']:.1f}%")
    if acc:
        b = max(acc, key=lambda p: p["speedup_b32"])
        parts.append(f"at >= {100 * rel:.0f}% the fastest is {b['name']} ({b['runtime']}) at "
                     f"{b['speedup_b32']:.2f}x")
    return "; ".join(parts) or "no point close"


def interpolate(curve: list[dict[str, Any]], speed: float) -> float | None:
    """Accuracy of a method's (speed-up, accuracy) curve at ``speed``, linear between its
    two nearest points; None outside the curve."""
    pts = sorted((p["speedup_b32"], p["accuracy"]) for p in curve)
    for (s0, a0), (s1, a1) in itertools.pairwise(pts):
        if s0 <= speed <= s1 and s1 > s0:
            return a0 + (a1 - a0) * (speed - s0) / (s1 - s0)
    return None


def _comparisons(pts: list[dict[str, Any]]) -> list[str]:
    fp32 = {p["name"]: p for p in pts if p["runtime"] == "torch fp32"}
    out = ["", "Hybrid CAP against structured CAP-f at the same level (PyTorch fp32):", ""]
    for level in ("50%", "75%", "90%"):
        h, f = fp32.get(f"hybrid {level}"), fp32.get(f"CAP-f {level}")
        if h and f:
            out.append(f"- {level}: hybrid {100 * h['accuracy']:.2f} at {h['speedup_b32']:.2f}x, "
                       f"CAP-f {100 * f['accuracy']:.2f} at {f['speedup_b32']:.2f}x "
                       f"({100 * (h['accuracy'] - f['accuracy']):+.2f} points)")
    capf = [p for n, p in fp32.items() if n.startswith("CAP-f ")]
    out += ["", "At equal measured speed-up (CAP-f's curve interpolated at each hybrid point):",
            ""]
    for name in ("hybrid 50%", "hybrid 75%", "hybrid 90%"):
        h = fp32.get(name)
        ref = interpolate(capf, h["speedup_b32"]) if h else None
        if h and ref is not None:
            out.append(f"- {h['speedup_b32']:.2f}x: hybrid {100 * h['accuracy']:.2f}, CAP-f "
                       f"{100 * ref:.2f} ({100 * (h['accuracy'] - ref):+.2f} points)")
    nm, m50 = fp32.get("CAP-m 2:4"), fp32.get("CAP-m 50%")
    if nm and m50:
        out += ["", f"N:M 2:4 under CAP: {100 * nm['accuracy']:.2f} against unstructured "
                    f"CAP-m at 50% {100 * m50['accuracy']:.2f} "
                    f"({100 * (nm['accuracy'] - m50['accuracy']):+.2f} points); its CPU "
                    "speed is dense speed (the 2:4 kernels are GPU only)."]
    return out


def plot(data: dict[str, Any], path: Path, targets: list[tuple[float, float]] = TARGETS,
         far: dict[str, Any] | None = None) -> None:
    """The frontier's points by runtime and method; ``far``: the far end's run
    (frontier_coarse.json, its own dense timing), its points hollow."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"dense": "*", "movement": "o", "structured": "s", "hybrid": "^"}
    colors = dict(zip(RUNTIMES, ("tab:blue", "tab:orange", "tab:green")))
    pts = data.get("points", [])
    # A crowded plot names its Pareto points only (the table names every point).
    named = ({(p["name"], p["runtime"]) for p in pareto(pts)} if len(pts) > 30 else None)
    for p in pts:
        if p["relative_accuracy"] is None:
            continue
        ax.scatter(p["speedup_b32"], 100 * p["relative_accuracy"],
                   marker=markers.get(p["method"], "o"), color=colors[p["runtime"]], s=45)
        if named is None or (p["name"], p["runtime"]) in named:
            ax.annotate(p["name"], (p["speedup_b32"], 100 * p["relative_accuracy"]),
                        fontsize=6, xytext=(3, 2), textcoords="offset points")
    for p in pareto((far or {}).get("points", [])):
        ax.scatter(p["speedup_b32"], 100 * p["relative_accuracy"],
                   marker=markers.get(p["method"], "o"), facecolors="none",
                   edgecolors=colors[p["runtime"]], s=45)
        ax.annotate(p["name"], (p["speedup_b32"], 100 * p["relative_accuracy"]),
                    fontsize=5, xytext=(3, -6), textcoords="offset points", color="dimgrey")
    for rel, speed in targets + (COARSE_TARGETS if far else []):
        ax.axhline(100 * rel, color="grey", lw=0.6, ls=":")
        ax.axvline(speed, color="grey", lw=0.6, ls=":")
    handles = [plt.Line2D([], [], color=c, marker="o", ls="", label=r) for r, c in colors.items()]
    handles += [plt.Line2D([], [], color="k", marker=m, ls="", label=k)
                for k, m in markers.items()]
    if far:
        handles.append(plt.Line2D([], [], color="k", marker="o", markerfacecolor="none", ls="",
                                  label="far end (frontier_coarse)"))
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    ax.set(xscale="log", xlabel="speed-up over dense PyTorch fp32 (batch 32, length 128, CPU)",
           ylabel="accuracy, % of dense", title="Accuracy / speed frontier (MiniLM, tweets)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", default="0/1", metavar="K/N")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--train-rows", type=int, default=1500)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--update-every", type=int, default=10)
    p.add_argument("--warm-start-scale", type=float, default=0.1,
                   help="pruning.score_warm_start_scale; other than 0.1 the points are a "
                        "variant, named '<point> [warm start X]'")
    p.add_argument("--time", action="store_true", help="time the exports (run alone)")
    p.add_argument("--report", action="store_true", help="write frontier.md and the plot")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="+", help="points to train (names), default all")
    p.add_argument("--points", choices=("main", "coarse"), default="main",
                   help="the frontier's points, or the coarse-grained far end "
                        "(frontier_coarse.*)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--budget", default="cpu", help="fidelity budget (smoke for a check)")
    p.add_argument("--work", default=str(ROOT / "bench" / "cache"))
    args = p.parse_args(argv)
    if args.points == "coarse":
        POINTS[:] = COARSE_POINTS
    if args.only:
        POINTS[:] = [pt for pt in POINTS if pt[0] in args.only]
    if args.warm_start_scale != 0.1:
        POINTS[:] = [(f"{name} [warm start {args.warm_start_scale:g}]", *rest)
                     for name, *rest in POINTS]
    import fidelity as fid

    args.out.mkdir(parents=True, exist_ok=True)
    suffix = ("" if args.budget == "cpu" else f"_{args.budget}") + (
        "" if args.points == "main" else f"_{args.points}")
    json_path = args.out / f"frontier{suffix}.json"
    if args.time:
        time_all(args, fid, json_path)
    elif not args.report:
        train(args, fid, json_path)
    if args.time or args.report:
        data = json.loads(json_path.read_text())
        targets = COARSE_TARGETS if args.points == "coarse" else TARGETS
        far_path = args.out / f"frontier{suffix}_coarse.json"
        far = (json.loads(far_path.read_text()) if args.points == "main"
               and far_path.is_file() else None)
        far = far if far and far.get("points") else None
        (args.out / f"frontier{suffix}.md").write_text(markdown(data, targets, far))
        plot(data, args.out / f"frontier{suffix}.png", targets, far)
        print((args.out / f"frontier{suffix}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
