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
* ``collapse`` (``--collapse``): the fair-baselines budget at which movement + KD from
  zero scores collapsed (bench/fair_baselines.py: 1500 train rows, ``--collapse-steps``
  steps, warm-ups 10% / 20%), movement + KD to 90%, scores from 0 against capscale's
  default (``score_warm_start: magnitude``, scale 0.1), the dev set subsampled to
  ``--collapse-dev`` rows to fit the CPU. Each run records what the collapse detector
  (capscale.train.collapse) reported: ``results.json``'s ``collapse``.

The zero-score runs set ``pruning.score_warm_start: none`` explicitly (the schema's
default is ``magnitude``).

Also measured from the same runs: how many of the scores still tie at the first pruning
step (``ties_at_first_prune``: the share of each matrix's scores equal to its k-th
largest, averaged), read from a separate 21-step run of each movement variant.

    PYTHONPATH=. python bench/short_schedule.py                # short part
    PYTHONPATH=. python bench/short_schedule.py --long         # both parts
    PYTHONPATH=. python bench/short_schedule.py --collapse     # short and collapse parts

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
ZERO = {"pruning": {"score_warm_start": "none"}}  # the reference's zero scores


def collapse_budget(steps: int, dev_rows: int, train_rows: int = 1500) -> dict[str, Any]:
    return {"train": {"max_steps": steps},
            "data": {"max_train_samples": train_rows, "max_eval_samples": dev_rows},
            "pruning": {"final_sparsity": 0.9, "initial_warmup": 0.1, "final_warmup": 0.2}}


def runs(long: bool, collapse: dict[str, Any] | None = None
         ) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """(part, name, config patches) of every run (``collapse``: that part's budget)."""
    mv = {"pruning": {"method": "movement"}}
    out = [("short", "movement", [SHORT, KD_ONLY, mv, ZERO]),
           ("short", "movement + warm start 0.1", [SHORT, KD_ONLY, mv, WARM]),
           ("short", "movement + warm start 1.0", [SHORT, KD_ONLY, mv, WARM1]),
           ("short", "magnitude", [SHORT, KD_ONLY, {"pruning": {"method": "magnitude"}}])]
    if long:
        out += [("long", "movement + KD", [LONG, KD_ONLY, mv, ZERO]),
                ("long", "movement + KD + warm start 0.1", [LONG, KD_ONLY, mv, WARM]),
                ("long", "movement + CAP", [LONG, WITH_CAP, mv, ZERO])]
    if collapse is not None:  # the default run carries no warm-start patch: the schema's
        out += [("collapse", "movement + KD, scores from 0", [collapse, KD_ONLY, mv, ZERO]),
                ("collapse", "movement + KD, default (scores from magnitude)",
                 [collapse, KD_ONLY, mv])]
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
    p.add_argument("--collapse", action="store_true",
                   help="also the collapse part: zero scores against the default, detector")
    p.add_argument("--collapse-steps", type=int, default=100)
    p.add_argument("--collapse-dev", type=int, default=1000, help="dev rows of that part")
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
    small = {} if args.budget == "cpu" else {"train_rows": budget["max_train_samples"]}
    plan = runs(args.long, collapse_budget(args.collapse_steps, args.collapse_dev, **small)
                if args.collapse else None)
    for part, name, patches in [] if args.report else plan:
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
        if cfg_dict["pruning"].get("method") == "movement" and part != "collapse":
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
        if part == "collapse":
            evals = json.loads((Path(cfg_dict["output_dir"]) / "evals.json").read_text())
            record.update(steps=res["steps"], train_rows=res["train_examples"],
                          dev_rows=res["eval_examples"],
                          ce=[h.get("ce") for h in hist],
                          sparsity=[h["sparsity"] for h in hist],
                          evals=[(e["step"], e["metrics"]["accuracy"]) for e in evals],
                          collapse=res["collapse"])
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
    for r in (r for r in done if r["part"] != "collapse"):
        warm = 20 if args.budget != "smoke" else 4
        kd = [x for x in r["kd"] if x is not None]
        before = kd[warm - 1] if len(kd) >= warm else float("nan")
        after = max(kd[warm:warm + 5]) if len(kd) > warm else float("nan")
        tie = r.get("ties_at_first_prune")
        lines.append(f"| {r['part']} | {r['name']} | {before:.4f} -> {after:.4f} | "
                     f"{100 * r['accuracy']:.2f} | {100 * r['linear_sparsity']:.1f}% | "
                     f"{'' if tie is None else f'{100 * tie:.1f}%'} |")
    lines += collapse_table([r for r in done if r["part"] == "collapse"])
    (out / f"short_schedule{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def collapse_table(rows: list[dict[str, Any]]) -> list[str]:
    """The collapse part: the KD loss around the first mask update, the evaluations, the
    majority-class rate, and what the detector said."""
    if not rows:
        return []
    import statistics
    c, first = rows[0]["collapse"]["checks"], rows[0]
    out = ["", f"Collapse part: movement + KD to 90% in {first['steps']} steps, "
           f"{first['train_rows']} train rows, {first['dev_rows']} dev rows (majority-class "
           f"rate {100 * (c['majority_rate'] or 0):.2f}%). Detector: a loss median "
           f"{c['loss_factor']:g}x up over the {c['after_steps']} steps from a mask update "
           f"against the {c['before_steps']} before, not back within {c['patience_steps']} "
           "steps; or an evaluation at the majority-class rate.", "",
           "| run | KD median: 10 steps before the first update -> 5 from it | dev accuracy "
           "(step: %) | sparsity | collapse detected |", "|---|---|---|---|---|"]
    for r in rows:
        start = next((i for i, s in enumerate(r["sparsity"]) if s > 0), None)
        kd = r["kd"]
        if start is not None and start >= 10 and None not in kd[start - 10:start + 5]:
            before = statistics.median(kd[start - 10:start])
            after = statistics.median(kd[start:start + 5])
            jump = f"{before:.4f} -> {after:.4f} ({after / before:.1f}x)"
        else:
            jump = "-"
        evals = ", ".join(f"{s}: {100 * a:.2f}" for s, a in r["evals"])
        events = r["collapse"]["events"]
        said = "; ".join(
            f"{e['loss']} loss {e['ratio']:.0f}x at step {e['step']}" if e["kind"] == "loss_jump"
            else f"accuracy at the majority-class rate at step {e['step']}"
            for e in events) or "no"
        out.append(f"| {r['name']} | {jump} | {evals} | {100 * r['linear_sparsity']:.1f}% "
                   f"| {said} |")
    return out


if __name__ == "__main__":
    sys.exit(main())
