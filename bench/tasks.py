"""Sentence embeddings (STS-B) and NER (CoNLL-2003): dense vs pruned, with and without
CAP's contrastive terms, each export verified, scored on the test split and timed.

For each task the shipped config (capscale/configs/embed_minilm_stsb.yaml,
ner_minilm_conll.yaml: the packaged all-MiniLM-L6-v2) is the base. ``--teacher``
settles the dense teacher once per task: the config's own ``model.teacher`` when it
sets one (embeddings: the dense model itself), else one fine-tuned by a run of
``pruning.method: none`` whose teacher is kept. Every point is then one run from that
teacher, of ``--steps`` optimiser steps on ``--train-rows`` training examples
(``--dev-rows`` dev examples for the run's own evaluations): ``structured`` points use
CAP-f's cubic schedule (heads and FFN neurons from Taylor importance every
``--update-every`` steps) so that every sparsity is one run of the same length;
``movement`` / ``hybrid`` use their own schedules. A point with ``cap: false`` is the
same run with PrC / FiC / SnC disabled (CE / CoSENT and KD kept): the same method
without the contrastive terms, on the same budget (at 75% and 90%). Each export is
verified by the run, then scored on the test split with ``capscale evaluate
data.validation_split=test`` (STS-B test Spearman, CoNLL-2003 test entity F1); the
dense score is the teacher's, measured the same way.

``--time`` (alone on the machine) times every export and the dense teacher in one
process at batch 32, length 128, PyTorch fp32, ``--threads`` threads (median of
``--repeats`` forwards after a warm-up); ``--report`` writes the tables.

    PYTHONPATH=. python bench/tasks.py --teacher
    PYTHONPATH=. python bench/tasks.py --worker 0/2 --threads 1 &   # training, two
    PYTHONPATH=. python bench/tasks.py --worker 1/2 --threads 1     # one-thread workers
    PYTHONPATH=. python bench/tasks.py --skip embedding/structured-90-nocap  # optional
    PYTHONPATH=. python bench/tasks.py --time --threads 2           # alone
    PYTHONPATH=. python bench/tasks.py --report

Writes ``bench/results/tasks.json`` (``records``: task, name, method, cap, sparsity,
sparsity_reached, metric, score, dev_score, dense_score, retained, speedup,
export_verified, steps, train_seconds; ``runs``: each command) and ``tasks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
CONFIGS = {"embedding": "embed_minilm_stsb.yaml", "token_classification": "ner_minilm_conll.yaml"}
METRIC = {"embedding": "spearman", "token_classification": "f1"}
SPARSITIES = (0.5, 0.75, 0.9)
TARGETS = {"embedding": [(0.98, 2.0), (0.95, 4.0)], "token_classification": [(0.97, None)]}


def points(methods: list[str]) -> list[dict[str, Any]]:
    """Per task and method: CAP at every sparsity, without CAP at 75% and 90%."""
    out = []
    for task in CONFIGS:
        for method in methods:
            for sparsity in SPARSITIES:
                for cap in (True, False) if sparsity > 0.5 else (True,):
                    name = f"{method}-{round(sparsity * 100)}{'' if cap else '-nocap'}"
                    out.append({"task": task, "name": name, "method": method,
                                "sparsity": sparsity, "cap": cap})
    return out


def _overrides(point: dict[str, Any], teacher: str, args: argparse.Namespace,
               out: Path) -> list[str]:
    over = [f"model.teacher={teacher}", f"output_dir={out}", f"train.max_steps={args.steps}",
            "train.epochs=100", f"train.num_threads={args.threads}", "report.enabled=false",
            f"data.max_train_samples={args.train_rows}",
            f"data.max_eval_samples={args.dev_rows}",
            f"pruning.method={point['method']}",
            f"pruning.final_sparsity={point['sparsity']}", "checkpoint.every_steps=0"]
    if point["method"] == "structured":
        over += ["structured.schedule=cubic", f"structured.update_every={args.update_every}",
                 "structured.importance_fraction=0.1"]
    if not point["cap"]:
        over += [f"cap.modules.{m}.enabled=false" for m in ("prc", "fic", "snc")]
    return over


def _run(cmd: list[str], log: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return time.perf_counter() - t0


def _test_score(config: Path, model: Path, log: Path, split: str = "test"
                ) -> dict[str, float]:
    """The model's metrics on the task's test split (``capscale evaluate``)."""
    cmd = [sys.executable, "-m", "capscale.cli", "evaluate", "--config", str(config),
           "--model", str(model), f"data.validation_split={split}",
           "data.max_eval_samples=0"]
    _run(cmd, log)
    return json.loads(log.read_text().strip().splitlines()[-1])


def teacher_phase(args: argparse.Namespace) -> None:
    from capscale.checks import load_run_config
    for task, config in CONFIGS.items():
        if task not in args.tasks:
            continue
        given = load_run_config(config, []).model.teacher
        if given is not None:  # the config's own dense teacher (embeddings: the model)
            dev = _test_score(ROOT / "capscale" / "configs" / config, Path(given),
                              args.work / f"{task}_teacher_dev.log", split="validation")
            test = _test_score(ROOT / "capscale" / "configs" / config, Path(given),
                               args.work / f"{task}_teacher_test.log")
            (args.work / task).mkdir(parents=True, exist_ok=True)
            (args.work / task / "teacher.json").write_text(json.dumps(
                {"path": given, "test": test, "dev": dev, "seconds": 0.0,
                 "command": f"model.teacher: {given} (from {config})"}, indent=1))
            print(f"{task}: teacher {given} test {METRIC[task]} {test[METRIC[task]]:.4f}")
            continue
        out = args.work / task / "teacher_run"
        cmd = [sys.executable, "-m", "capscale.run", "--config", config,
               f"output_dir={out}", "pruning.method=none", "train.max_steps=1",
               "report.enabled=false", f"train.num_threads={args.threads}"]
        secs = _run(cmd, args.work / f"{task}_teacher.log")
        test = _test_score(out / "config.yaml", out / "teacher",
                           args.work / f"{task}_teacher_test.log")
        dev = json.loads((out / "results.json").read_text())["teacher_metrics"]
        (args.work / task / "teacher.json").write_text(json.dumps(
            {"path": str(out / "teacher"), "test": test, "dev": dev, "seconds": secs,
             "command": " ".join(cmd)}, indent=1))
        print(f"{task}: teacher test {METRIC[task]} {test[METRIC[task]]:.4f}", flush=True)


def worker_phase(args: argparse.Namespace) -> None:
    k, n = (int(x) for x in args.worker.split("/"))
    for i, point in enumerate(points(args.methods)):
        if i % n != k or point["task"] not in args.tasks:
            continue
        task, name = point["task"], point["name"]
        out = args.work / task / name
        record_file = out / "point.json"
        if record_file.is_file():
            continue
        teacher = json.loads((args.work / task / "teacher.json").read_text())
        cmd = [sys.executable, "-m", "capscale.run", "--config", CONFIGS[task],
               *_overrides(point, teacher["path"], args, out)]
        secs = _run(cmd, args.work / f"{task}_{name}.log")
        results = json.loads((out / "results.json").read_text())
        test = _test_score(out / "config.yaml", out / "pruned" / "model",
                           args.work / f"{task}_{name}_test.log")
        metric = METRIC[task]
        record = {**point, "metric": metric, "score": test[metric],
                  "dev_score": results["pruned_metrics"][metric],
                  "dense_score": teacher["test"][metric],
                  "sparsity_reached": results["sparsity"]["encoder_sparsity"],
                  "export_verified": bool((results.get("export_verified") or {}).get("ok")),
                  "steps": results["steps"], "train_seconds": round(secs, 1),
                  "test_metrics": test, "command": " ".join(cmd)}
        record_file.write_text(json.dumps(record, indent=1))
        print(f"{task} {name}: test {metric} {test[metric]:.4f} (dense "
              f"{teacher['test'][metric]:.4f}), {secs:.0f} s", flush=True)


def _latency(model: Any, threads: int, repeats: int) -> float:
    import torch
    torch.set_num_threads(threads)
    ids = torch.randint(1000, 20000, (32, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        model(**batch)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def time_phase(args: argparse.Namespace) -> None:
    from capscale.export.formats import load_export
    from capscale.models.loading import resolve_model_path
    for task in CONFIGS:
        teacher = json.loads((args.work / task / "teacher.json").read_text())
        dense = load_export(resolve_model_path(teacher["path"]), trust_remote_code=True)
        dense_ms = _latency(dense, args.threads, args.repeats)
        timing = {"dense_ms": dense_ms, "points": {}}
        for rec_file in sorted((args.work / task).glob("*/point.json")):
            rec = json.loads(rec_file.read_text())
            if rec.get("skip"):
                continue
            model = load_export(rec_file.parent / "pruned" / "model", trust_remote_code=True)
            ms = _latency(model, args.threads, args.repeats)
            timing["points"][rec["name"]] = {"ms": ms, "speedup": dense_ms / ms}
            print(f"{task} {rec['name']}: {ms:.0f} ms ({dense_ms / ms:.2f}x)", flush=True)
        (args.work / task / "timing.json").write_text(json.dumps(
            {**timing, "threads": args.threads, "repeats": args.repeats,
             "load": os.getloadavg()}, indent=1))


def report_phase(args: argparse.Namespace) -> None:
    records, timings = [], {}
    for task in CONFIGS:
        tfile = args.work / task / "timing.json"
        timings[task] = json.loads(tfile.read_text()) if tfile.is_file() else None
        teacher = json.loads((args.work / task / "teacher.json").read_text())
        records.append({"task": task, "name": "dense", "method": "dense", "cap": False,
                        "sparsity": 0.0, "metric": METRIC[task],
                        "score": teacher["test"][METRIC[task]],
                        "dense_score": teacher["test"][METRIC[task]], "retained": 1.0,
                        "speedup": 1.0, "export_verified": True})
        for rec_file in sorted((args.work / task).glob("*/point.json")):
            rec = json.loads(rec_file.read_text())
            if rec.get("skip"):
                continue
            speed = (timings[task] or {}).get("points", {}).get(rec["name"], {})
            rec["speedup"] = speed.get("speedup")
            rec["retained"] = rec["score"] / rec["dense_score"]
            records.append(rec)
    doc = {"command": "PYTHONPATH=. python bench/tasks.py --teacher / --worker k/2 / --time "
                      "/ --report", "machine": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "steps": args.steps, "timing": timings,
           "records": records}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "tasks.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Sentence embeddings and NER: dense vs pruned, with and without CAP", "",
             f"`bench/tasks.py`: {args.steps} optimiser steps per point on "
             f"{args.train_rows} training examples, started from and distilled from the "
             "dense teacher (embeddings: all-MiniLM-L6-v2 itself; NER: all-MiniLM-L6-v2 "
             "fine-tuned by the shipped config), structured points on the cubic schedule "
             f"(masks every {args.update_every} steps); test-split scores of the verified "
             "exports; speed-up over the dense model at batch 32, length 128, PyTorch fp32 "
             "on CPU, timed alone in one process. Points not listed were not run.", ""]
    for task in CONFIGS:
        metric = METRIC[task]
        lines += [f"## {task} (test {metric})", "",
                  "| point | CAP | target sparsity | reached | test score | dense | "
                  "retained | speed-up | export verified |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in records if r["task"] == task):
            sp = r.get("speedup")
            lines.append(
                f"| {r['name']} | {'yes' if r['cap'] else 'no'} | {r['sparsity']:.2f} | "
                f"{r.get('sparsity_reached', 0.0):.3f} | {r['score']:.4f} | "
                f"{r['dense_score']:.4f} | {100 * r['retained']:.1f}% | "
                f"{f'{sp:.2f}x' if sp else 'n/a'} | {'yes' if r['export_verified'] else 'NO'} |")
        lines.append("")
    (RESULTS / "tasks.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=ROOT / "bench" / "cache" / "tasks")
    p.add_argument("--teacher", action="store_true")
    p.add_argument("--worker", help="k/n: run every n-th point from the k-th")
    p.add_argument("--time", action="store_true")
    p.add_argument("--report", action="store_true")
    p.add_argument("--methods", nargs="+", default=["structured"])
    p.add_argument("--skip", nargs="+", default=[], metavar="TASK/NAME",
                   help="points the workers pass over (a marker in their folder)")
    p.add_argument("--tasks", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--update-every", type=int, default=20)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--dev-rows", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for name in args.skip:
        (args.work / name).mkdir(parents=True, exist_ok=True)
        (args.work / name / "point.json").write_text(json.dumps({"skip": True}))
    if args.teacher:
        teacher_phase(args)
    if args.worker:
        worker_phase(args)
    if args.time:
        time_phase(args)
    if args.report:
        report_phase(args)


if __name__ == "__main__":
    main()
