"""Movement pruning on short schedules: how much of the early damage is the method, and
what a magnitude warm start of the scores changes.

Protocol: the fidelity benchmark's CPU budget (packaged all-MiniLM-L6-v2 fine-tuned on
the packaged tweets corpus, its cached teacher, 2000 train rows, the whole 3816-row dev
set, length 64, batch 16, KD with w_ce 0.1 / w_kd 0.9 / T 2, student started from the
teacher; see bench/fidelity.py), no contrastive term unless stated. Each run records the
KD loss of every step and the dev accuracy at the end.

* ``short``: 40 steps, dense for 20 (``initial_warmup: 20``), then the cubic schedule to
  2% sparsity, final for the last 5. Variants: movement (scores start at 0, the
  reference), movement with ``pruning.score_warm_start: magnitude`` (scale 0.1, and 1.0),
  magnitude.
* ``long`` (``--long``): 97% in 200 steps (warm-ups 20 / 40 steps), movement + KD with
  and without the warm start, and movement + CAP without it.

Also measured from the same runs: how many of the scores still tie at the first pruning
step (``ties_at_first_prune``: the share of each matrix's scores equal to its k-th
largest, averaged), read from a separate 21-step run of each movement variant.

    PYTHONPATH=. python bench/short_schedule.py                # short part
    PYTHONPATH=. python bench/short_schedule.py --long         # both parts

Writes ``bench/results/short_schedule.json`` (resumable: finished runs are kept) and
``short_schedule.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _fidelity() -> Any:
    """bench/fidelity.py (its budgets, teacher and run helpers)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import fidelity
    return fidelity


KD_ONLY = {"cap": {"modules": {m: {"enabled": False} for m in ("prc", "fic", "snc")}}}
WITH_CAP = {"cap": {"modules": {m: {"enabled": True} for m in ("prc", "fic", "snc")}}}
SHORT = {"train": {"max_steps": 40},
         "pruning": {"final_sparsity": 0.02, "initial_warmup": 20, "final_warmup": 5}}
LONG = {"train": {"max_steps": 200},
        "pruning": {"final_sparsity": 0.97, "initial_warmup": 20, "final_warmup": 40}}
WARM = {"pruning": {"score_warm_start": "magnitude", "score_warm_start_scale": 0.1}}
WARM1 = {"pruning": {"score_warm_start": "magnitude", "score_warm_start_scale": 1.0}}


def runs(long: bool) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(part, name, config patches) of every run."""
    mv = {"pruning": {"method": "movement"}}
    out = [("short", "movement", [SHORT, KD_ONLY, mv]),
           ("short", "movement + warm start 0.1", [SHORT, KD_ONLY, mv, WARM]),
           ("short", "movement + warm start 1.0", [SHORT, KD_ONLY, mv, WARM1]),
           ("short", "magnitude", [SHORT, KD_ONLY, {"pruning": {"method": "magnitude"}}])]
    if long:
        out += [("long", "movement + KD", [LONG, KD_ONLY, mv]),
                ("long", "movement + KD + warm start 0.1", [LONG, KD_ONLY, mv, WARM]),
                ("long", "movement + CAP", [LONG, WITH_CAP, mv])]
    return out


def ties(recipe: Any) -> float:
    """Mean share, over matrices, of the scores equal to the matrix's k-th largest."""
    pruner = recipe.controller.pruner
    shares = []
    for m in pruner.modules.values():
        s = m.mask_scores.detach().flatten()
        k = max(1, round(float(m.keep_frac) * s.numel()))
        kth = s.topk(k).values.min()
        shares.append(float((s == kth).float().mean()))
    return sum(shares) / len(shares)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--long", action="store_true", help="also the 97%%-in-200-steps part")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--work", default=str(ROOT / "bench" / "cache" / "cpu"))
    p.add_argument("--budget", default="cpu", help="fidelity budget (smoke for a check)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report", action="store_true", help="only write the table of what is done")
    args = p.parse_args(argv)
    fid = _fidelity()
    import torch

    from capscale.checks import run_config_from_dict
    from capscale.cli import setup_environment
    from capscale.config import merge_dicts
    from capscale.console import Console
    from capscale.data import load_task_data
    from capscale.distributed import init_distributed
    from capscale.job import prune
    from capscale.models.loading import load_tokenizer
    from capscale.recipe import CAPRecipe
    from capscale.tasks import get_task
    from capscale.train.finetune import finetune_teacher

    setup_environment()
    torch.set_num_threads(args.threads)
    budget, work, out = fid.BUDGETS[args.budget], Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = init_distributed()
    console = Console(enabled=True, progress=False)
    teacher_cfg = run_config_from_dict(merge_dicts(
        fid.base_config(budget, work / "teacher_run", 42),
        {"pruning": {"method": "none"}, "train": {"max_steps": 1}, **KD_ONLY}))
    data = load_task_data(teacher_cfg.data)
    teacher_path, teacher_metrics = finetune_teacher(
        teacher_cfg, ctx, data, load_tokenizer("minilm"), get_task("classification"), console)
    suffix = "" if args.budget == "cpu" else f"_{args.budget}"
    json_path = out / f"short_schedule{suffix}.json"
    done = json.loads(json_path.read_text())["runs"] if json_path.is_file() else []
    load_before = os.getloadavg()
    for part, name, patches in [] if args.report else runs(args.long):
        if any(r["part"] == part and r["name"] == name for r in done):
            continue
        cfg_dict = merge_dicts(fid.base_config(budget, work / "short" / part / name.replace(
            " ", "_"), 42), {"model": {"teacher": teacher_path}})
        for patch in patches:
            cfg_dict = merge_dicts(cfg_dict, patch)
        if args.budget == "smoke":
            cfg_dict = merge_dicts(cfg_dict, {"train": {"max_steps": 8}, "pruning": {
                "initial_warmup": 4, "final_warmup": 1}})
        record: dict[str, Any] = {"part": part, "name": name}
        if cfg_dict["pruning"].get("method") == "movement":
            # the scores at the first pruning step: a run stopped there
            probe = merge_dicts(cfg_dict, {"train": {"max_steps": cfg_dict["pruning"][
                "initial_warmup"] + 1}, "output_dir": str(work / "probe" / name)})
            recipe = CAPRecipe(run_config_from_dict(probe), ctx, console, teacher_metrics)
            recipe.setup()
            recipe.train()
            record["ties_at_first_prune"] = ties(recipe)
            del recipe
        t0 = time.perf_counter()
        res = prune(run_config_from_dict(cfg_dict), ctx, console, export=False,
                    teacher_metrics=teacher_metrics)
        hist = [json.loads(line) for line in
                (Path(cfg_dict["output_dir"]) / "history.jsonl").read_text().splitlines()]
        record.update(accuracy=res["pruned_metrics"]["accuracy"],
                      linear_sparsity=res["sparsity"]["linear_sparsity"],
                      kd=[h.get("kd") for h in hist], seconds=time.perf_counter() - t0)
        done.append(record)
        header = {"command": "PYTHONPATH=. python bench/short_schedule.py "
                             + " ".join(sys.argv[1:] if argv is None else argv),
                  "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                             f"{args.threads} thread(s)",
                  "load_before_last_run": [round(x, 2) for x in load_before],
                  "dense_accuracy": teacher_metrics["accuracy"], "budget": args.budget}
        json_path.write_text(json.dumps({**header, "runs": done}, indent=1))
        console.log(f"{part} / {name}: accuracy {record['accuracy']:.4f}")
        load_before = os.getloadavg()
    dense = teacher_metrics["accuracy"]
    meta = json.loads(json_path.read_text()) if json_path.is_file() else {}
    lines = [f"# Short schedules ({meta.get('command', '')})", "",
             f"{meta.get('machine', '')}; dense teacher accuracy {100 * dense:.2f}."
             + ("" if any(r["part"] == "long" for r in done) else
                " The long part has no finished run in this file."), "",
             "| part | run | KD loss: last dense step -> max of the next 5 | accuracy | "
             "sparsity | scores tied at the first prune |", "|---|---|---|---|---|---|"]
    for r in done:
        warm = 20 if args.budget != "smoke" else 4
        kd = [x for x in r["kd"] if x is not None]
        before = kd[warm - 1] if len(kd) >= warm else float("nan")
        after = max(kd[warm:warm + 5]) if len(kd) > warm else float("nan")
        tie = r.get("ties_at_first_prune")
        lines.append(f"| {r['part']} | {r['name']} | {before:.4f} -> {after:.4f} | "
                     f"{100 * r['accuracy']:.2f} | {100 * r['linear_sparsity']:.1f}% | "
                     f"{'' if tie is None else f'{100 * tie:.1f}%'} |")
    (out / f"short_schedule{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
