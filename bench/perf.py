"""Performance benchmark: what CAP costs on top of movement pruning + KD.

1. Step time of a CAP step (movement + KD + PrC/FiC/SnC, bank mode) against a movement
   + KD step on the same model and batches, measured interleaved in the same run
   (ratio of medians): both are the recipe's real step, timed through the training
   loop's phases (mask update, student forward, teacher KD forward, contrastive terms
   with the bank lookups, backward, optimiser step).
2. Bank build time at N and 4N examples (ratio; linear means ~4), next to the
   reference's build by repeated ``torch.cat`` (quadratic).
3. Bank memory per rank: fp32, bf16, and sharded over 2 ranks.

Usage::

    python bench/perf.py                  # MiniLM, tweets subset, CPU: a few minutes
    python bench/perf.py --steps 4 --quick  # smoke (CI)

Writes ``bench/results/perf.json`` and ``bench/results/perf.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from capscale.checks import run_config_from_dict  # noqa: E402
from capscale.cli import setup_environment  # noqa: E402
from capscale.console import Console  # noqa: E402
from capscale.contrastive.banks import RepresentationBank  # noqa: E402
from capscale.distributed import init_distributed  # noqa: E402
from capscale.models.loading import load_classifier, load_tokenizer  # noqa: E402
from capscale.recipe import CAPRecipe  # noqa: E402


def timed_step(run: CAPRecipe, batch: dict[str, torch.Tensor], cap: bool) -> dict[str, float]:
    """One real optimiser step (``CAPRecipe.train_step``), each phase timed through the
    loop's phase hooks; ``cap=False`` drops the contrastive objective for this step
    (movement + KD)."""
    phases: dict[str, float] = {}

    def listen(name: str, seconds: float) -> None:
        phases[name] = phases.get(name, 0.0) + seconds

    objective = run.loss.objective
    run.loss.objective = objective if cap else None
    run.phases.listeners.append(listen)
    try:
        t0 = time.perf_counter()
        run.train_step(batch)
        phases["total"] = time.perf_counter() - t0
    finally:
        run.phases.listeners.remove(listen)
        run.loss.objective = objective
    return phases


def step_benchmark(steps: int, quick: bool, work: Path) -> dict[str, Any]:
    n_train = 96 if quick else 2000
    teacher_dir = work / "teacher"
    if not teacher_dir.is_dir():  # any 3-label classifier: speed does not depend on weights
        load_classifier("minilm", 3).save_pretrained(teacher_dir)
        load_tokenizer("minilm").save_pretrained(teacher_dir)
    cfg = run_config_from_dict({
        "model": {"name_or_path": "minilm", "teacher": str(teacher_dir)},
        "data": {"preset": "tweets", "max_length": 64, "max_train_samples": n_train,
                 "max_eval_samples": 32},
        "pruning": {"method": "movement", "final_sparsity": 0.9, "initial_warmup": 0.0,
                    "final_warmup": 0.0},
        "cap": {"num_negatives": 64 if quick else 4096},
        "train": {"batch_size": 32, "max_steps": 2 * steps + 2, "progress": False},
        "output_dir": str(work / "run"),
    })
    ctx = init_distributed()
    run = CAPRecipe(cfg, ctx, Console(enabled=False))
    run.setup()
    run.snapshot(True, "perf snapshot")
    batches = iter(run.loaders.train)
    rows: dict[str, list[dict[str, float]]] = {"cap": [], "movement_kd": []}
    timed_step(run, next(batches), cap=True)  # warm-up
    for i in range(2 * steps):
        try:
            batch = next(batches)
        except StopIteration:
            batches = iter(run.loaders.train)
            batch = next(batches)
        cap = i % 2 == 0
        rows["cap" if cap else "movement_kd"].append(timed_step(run, batch, cap))
    med = {k: {p: statistics.median(r.get(p, 0.0) for r in v) for p in v[0]}
           for k, v in rows.items()}
    return {"model": "all-MiniLM-L6-v2", "batch_size": 32, "max_length": 64,
            "num_negatives": cfg.cap.num_negatives, "steps_each": steps,
            "views": {k: b.num_views for k, b in run.objective.banks.items()},
            "median_seconds": med,
            "cap_over_movement_kd": med["cap"]["total"] / med["movement_kd"]["total"]}


def bank_build(n: int, hidden: int, batch: int = 256, reps: int = 5) -> dict[str, float]:
    """Seconds to build an [n, 1, hidden] bank: by id (capscale, median of ``reps``
    builds) and by repeated ``torch.cat`` (the reference's way, built once)."""
    vecs = torch.randn(batch, hidden)
    by_id = []
    for _ in range(reps):
        bank = RepresentationBank(n, hidden, 1)
        slot = bank.begin_view()
        perm = torch.randperm(n)
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            ids = perm[i : i + batch]
            bank.write(ids, vecs[: len(ids)], slot)
        by_id.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    acc = torch.empty(0, hidden)
    for i in range(0, n, batch):
        acc = torch.cat([acc, vecs[: min(batch, n - i)]])
    by_cat = time.perf_counter() - t0
    return {"by_id": statistics.median(by_id), "by_repeated_cat": by_cat}


def bank_memory(n: int, hidden: int, views: int) -> dict[str, float]:
    mib = 2**20
    fp32 = n * views * hidden * 4 / mib
    return {"examples": n, "views": views, "hidden": hidden, "fp32_MiB": fp32,
            "bf16_MiB": fp32 / 2, "bf16_sharded_world2_MiB_per_rank": fp32 / 4}


def markdown(res: dict[str, Any]) -> str:
    s = res["step"]
    lines = ["## CAP step vs movement + KD step", "",
             f"{s['model']}, batch {s['batch_size']}, length {s['max_length']}, "
             f"{s['num_negatives']} extra negatives per module, bank views {s['views']}, "
             f"{s['steps_each']} interleaved steps each (median seconds)", "",
             "| phase | movement + KD | CAP |", "|---|---|---|"]
    for phase in s["median_seconds"]["cap"]:
        base = s["median_seconds"]["movement_kd"].get(phase, 0.0)
        lines.append(f"| {phase} | {base:.4f} | {s['median_seconds']['cap'][phase]:.4f} |")
    lines += ["", f"**CAP / movement+KD step time: {s['cap_over_movement_kd']:.3f}x**", "",
              "## Bank build time (seconds)", "",
              "| examples | by example id | repeated torch.cat |", "|---|---|---|"]
    for n, row in res["bank_build"]["times"].items():
        lines.append(f"| {n} | {row['by_id']:.3f} | {row['by_repeated_cat']:.3f} |")
    b = res["bank_build"]
    lines += ["", f"4N / N ratio: by id {b['ratio_by_id']:.2f}, repeated cat "
              f"{b['ratio_by_cat']:.2f}", "", "## Bank memory per rank (MiB)", "",
              "| bank | fp32 | bf16 | bf16 sharded over 2 ranks |", "|---|---|---|---|"]
    for name, m in res["bank_memory"].items():
        lines.append(f"| {name} | {m['fp32_MiB']:.0f} | {m['bf16_MiB']:.0f} | "
                     f"{m['bf16_sharded_world2_MiB_per_rank']:.0f} |")
    return "\n".join(lines) + "\n"


def scaleout_markdown(sc: dict[str, Any]) -> str:
    """The per-rank memory / gather table from ``bench/scaleout_memory.py``'s json."""
    rows = sc["results"]
    shapes = list(dict.fromkeys(x for r in rows for x in r.get("gather_negatives_median_s", {})))
    lines = ["## Scale-out: per-rank memory and the gather of negatives", "",
             f"{sc['model']}, global batch {sc['global_batch']}, {sc['device']}; from "
             "`python bench/scaleout_memory.py` (bytes of parameters resident per rank; "
             "gathers: the collectives of one CAP step, median ms, for local anchors "
             "rows x hidden)", "",
             "| " + " | ".join(["world", "strategy", "frozen teacher bytes/rank",
                                 "fraction of full", "student bytes/rank", "median step s",
                                 *(f"gather {x} ms" for x in shapes)]) + " |",
             "|---" * (6 + len(shapes)) + "|"]
    for r in rows:
        g = r.get("gather_negatives_median_s", {})
        lines.append(
            f"| {r['world']} | {r['strategy']} | {r['teacher_param_bytes_per_rank']:,} | "
            f"{r['teacher_fraction_of_full']:.3f} | {r['student_param_bytes_per_rank']:,} | "
            f"{r['median_step_s']:.2f} |"
            + "".join(f" {1000 * g[x]:.2f} |" if x in g else " - |" for x in shapes))
    return "\n".join(lines) + "\n"


def measure(steps: int, quick: bool) -> dict[str, Any]:
    """Every figure of the report (minutes on a CPU; seconds with ``quick``)."""
    load_start = list(os.getloadavg())
    with tempfile.TemporaryDirectory() as tmp:
        step = step_benchmark(steps, quick, Path(tmp))
    n = 2_000 if quick else 20_000
    times = {str(n): bank_build(n, 768), str(4 * n): bank_build(4 * n, 768)}
    return {
        "step": step,
        "bank_build": {"hidden": 768, "times": times,
                       "ratio_by_id": times[str(4 * n)]["by_id"] / times[str(n)]["by_id"],
                       "ratio_by_cat": times[str(4 * n)]["by_repeated_cat"]
                       / times[str(n)]["by_repeated_cat"]},
        "bank_memory": {
            "MNLI, BERT-base, 11 SnC views": bank_memory(392_702, 768, 11),
            "MNLI, BERT-base, PrC or FiC": bank_memory(392_702, 768, 1),
            "tweets, MiniLM, 8 SnC views": bank_memory(34_342, 384, 8)},
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "command": "python " + " ".join(sys.argv),
        "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--render", action="store_true",
                   help="measure nothing: rewrite the markdown from the existing perf.json "
                        "(and the scale-out json)")
    p.add_argument("--scaleout", default=str(ROOT / "bench" / "results" / "scaleout.json"),
                   help="bench/scaleout_memory.py's results, folded into the report")
    args = p.parse_args(argv)
    setup_environment()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = "perf_quick" if args.quick else "perf"
    if args.render:
        res = json.loads((out / f"{name}.json").read_text())
    else:
        res = measure(args.steps, args.quick)
    md = markdown(res)
    sc_path = Path(args.scaleout)
    if sc_path.is_file():
        res["scale_out"] = json.loads(sc_path.read_text())
        md += "\n" + scaleout_markdown(res["scale_out"])
    (out / f"{name}.json").write_text(json.dumps(res, indent=1))
    (out / f"{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
