"""The paper's global batch (32 x 128 tokens) at RoBERTa-large size on this CPU machine:
micro-batches, gradient accumulation, activation checkpointing, fp32 against bf16, and
the memory planner's estimate next to every measured peak.

What runs: ``capscale.recipe.CAPRecipe`` (movement pruning, PrC + FiC + SnC in bank
mode, KD) on a RoBERTa-large-shaped encoder with random weights (bench/scale_real.py
builds it: hidden 1024, 24 layers, 16 heads, FFN 4096, 50265-row embedding, 355.4 M
parameters with the classification head), the same saved encoder as the teacher,
``student_init: pretrained`` (PrC encodes the student itself), every text filling
``--length`` tokens. Each job is ``--steps`` optimiser steps of ``micro x accumulation x
world`` sequences driven through ``recipe.train_step`` (the loop's own step function,
k micro-batches per call), one process per rank with the machine's cores shared out
(cores // world torch threads each: world 1 gets both cores here), started here
with RANK / WORLD_SIZE / MASTER_* / CAPSCALE_CPU=1 / DS_ACCELERATOR=cpu and glibc's mmap
threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so freed tensors go back to the system.

Figures per job, max over ranks: ``peak_gib``, the peak resident set during the
optimiser steps (what ``capscale plan`` estimates); ``setup_peak_gib``, the peak of the
setup before them (models loaded whole before sharding, banks encoded);
``step_peak_gib``, what an optimiser step adds on top of the memory
held before it (``VmHWM`` reset through ``/proc/self/clear_refs`` before each step, less
``VmRSS`` just before it: activations kept for backward, gradients, the temporaries of
backward and of the optimiser step); ``step_s``, the mean over the steps after the
first. ``planned_gib`` is ``capscale plan``'s per-rank total for the job's config
(capscale.report.memory_plan), with this machine's measured process baseline added.
A job the planner says does not fit in ``--guard-gib`` is not started and is recorded
with the planner's refusal; a running job whose ranks' summed RSS passes the guard is
killed and recorded as such.

    python bench/scale_train.py    # -> bench/results/scale_train.{json,md}
    python bench/scale_train.py --quick --out /tmp/st   # smoke: 2 layers, hidden 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from scale_real import (  # noqa: E402  (bench/ is not a package)
    GIB,
    LARGE,
    LEAN_DS,
    QUICK,
    Shape,
    _available,
    _child_env,
    build_assets,
    cap_config,
    load_avg,
)
from scale_real import run_job as harness_job  # noqa: E402

# (strategy, world, precision, checkpointing, micro, accumulation): global 32 each
JOBS: list[tuple[str, int, str, bool, int, int]] = [
    ("fsdp2", 2, "fp32", True, 4, 4),
    ("fsdp2", 2, "fp32", False, 4, 4),  # 2 steps (MEMORY_ONLY): what checkpointing saves
    ("fsdp2", 2, "bf16", True, 4, 4),
    ("zero3", 1, "fp32", True, 4, 8),
    ("fsdp2", 2, "fp32", False, 16, 1),  # the same batch without micro-batches / recompute
    ("zero3", 1, "fp32", False, 32, 1),
    ("zero3", 1, "fp32", False, 4, 8),  # 2 steps (MEMORY_ONLY): against job 3
]
# Jobs run for their memory only: 2 steps (the second one's step peak is free of AdamW's
# first allocation of its moments), the step time then from 1 step after the first.
MEMORY_ONLY = {1, 6}
# --cuda (bench/gpu_check.sh): one GPU, the whole batch at once, fp32 / bf16 / bf16 +
# checkpointing
GPU_JOBS: list[tuple[str, int, str, bool, int, int]] = [
    ("single", 1, "fp32", False, 32, 1),
    ("single", 1, "bf16", False, 32, 1),
    ("single", 1, "bf16", True, 32, 1),
]


def long_texts(assets: dict[str, str], length: int) -> None:
    """Rewrite the task's CSVs so that every text fills ``length`` tokens (truncated)."""
    import random

    from capscale.models.loading import load_tokenizer
    tok = load_tokenizer("minilm")
    words = [w for w, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
             if w.isalpha() and len(w) > 3 and 2000 <= i < 12000]
    rng = random.Random(0)
    third = len(words) // 3
    for split in ("train", "validation"):
        n = len(Path(assets[split]).read_text().splitlines()) - 1
        rows = ["sentence,label"]
        for _ in range(n):
            label = rng.randrange(3)
            pool = words[label * third:(label + 1) * third]
            rows.append(f"{' '.join(rng.choice(pool) for _ in range(length + 8))},"
                        f"{'abc'[label]}")
        Path(assets[split]).write_text("\n".join(rows) + "\n")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(spec: dict[str, Any]) -> None:
    """One rank: set up, run the optimiser steps, write its figures after each."""
    import torch
    import torch.distributed as dist
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    from capscale.checks import run_config_from_dict
    from capscale.console import Console
    from capscale.data import Collator
    from capscale.distributed import init_distributed
    from capscale.recipe import CAPRecipe

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cuda = spec.get("cuda", False)
    t0 = time.perf_counter()
    ctx = init_distributed(spec["strategy"])
    cfg = run_config_from_dict(config(spec))
    recipe = CAPRecipe(cfg, ctx, Console(enabled=False))
    recipe.setup()
    recipe.snapshot(cfg.cap.snapshot_train_mode, "bench snapshot")  # SnC bank: one view
    setup_peak = (torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM"))
    setup_s = time.perf_counter() - t0
    ds = recipe.loaders.bank.dataset
    micro, k = spec["micro"], spec["accumulation"]
    out = Path(spec["out"]).with_suffix(f".rank{rank}.json")
    steps: list[dict[str, float]] = []

    def record(phase: str) -> None:
        out.write_text(json.dumps({
            "rank": rank, "phase": phase, "setup_s": setup_s, "setup_peak": setup_peak,
            "peak": max([setup_peak, *(s["hwm"] for s in steps)]), "steps": steps}))

    record("setup")
    for step in range(spec["steps"]):
        first = (step * world + rank) * micro * k
        group = [Collator(0)([ds[(first + i * micro + j) % len(ds)] for j in range(micro)])
                 for i in range(k)]
        ctx.barrier()
        if cuda:  # allocated bytes: the step's peak over what it starts with
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            before = _status_bytes("VmRSS")
        t = time.perf_counter()
        recipe.train_step(group)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t
        hwm = torch.cuda.max_memory_allocated() if cuda else _status_bytes("VmHWM")
        steps.append({"s": seconds, "before": before, "hwm": hwm})
        record(f"step {step + 1}")
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def config(spec: dict[str, Any]) -> dict[str, Any]:
    """The job's run config (a dict; the worker and the planner read the same one):
    bench/scale_real.py's CAP run with this job's batch, accumulation, checkpointing,
    precision and strategy, one SnC view."""
    cfg = cap_config(spec["assets"], spec["length"], spec["steps"], spec["micro"], 1,
                     spec["workdir"])
    cfg["train"].update(gradient_accumulation_steps=spec["accumulation"],
                        gradient_checkpointing=spec["checkpointing"],
                        precision=spec["precision"])
    return {**cfg, "strategy": spec["strategy"],
            "distributed": {"deepspeed_config": spec.get("ds_config")}}


def planned_gib(spec: dict[str, Any], baseline_gib: float, cuda: bool = False) -> float:
    """``capscale plan``'s per-rank peak for the job (GiB): device plus host bytes (one
    memory on a CPU), with the measured process baseline as its runtime term."""
    from capscale.checks import run_config_from_dict
    from capscale.report.memory_plan import plan_memory, read_inputs
    cfg = run_config_from_dict(config(spec))
    plan = plan_memory(cfg, spec["world"], strategy=spec["strategy"],
                       device="cuda" if cuda else "cpu",
                       baseline_bytes=int(baseline_gib * GIB),
                       inputs=read_inputs(cfg, spec["train_rows"]), after_evaluation=False)
    return (plan.device_bytes + (0 if cuda else plan.host_bytes)) / GIB


def run_job(spec: dict[str, Any], guard: float, timeout: float) -> dict[str, Any]:
    """Start the ranks (bench/scale_real.py's harness with this file's worker), poll
    their RSS, kill them past the guard; collect the records."""
    env = dict(_child_env(), MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    if spec.get("cuda"):  # the GPU, and the CPU threads a GPU job normally has
        for key in ("CAPSCALE_CPU", "DS_ACCELERATOR", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.pop(key, None)
    return harness_job(spec, spec["world"], guard, timeout, script=__file__, base_env=env)


def baseline() -> float:
    """This machine's resident set of a process that has imported what a rank imports
    (torch, transformers, DeepSpeed, capscale) and done nothing else, in GiB."""
    code = ("import torch, transformers, deepspeed, capscale.recipe, capscale.distributed.zero3;"
            "from pathlib import Path;"
            "print([l for l in Path('/proc/self/status').read_text().splitlines()"
            " if l.startswith('VmRSS')][0].split()[1])")
    out = subprocess.run([sys.executable, "-c", code], env=_child_env(), check=True,
                         capture_output=True, text=True).stdout.split()[-1]
    return int(out) / 2**20


def summarise(spec: dict[str, Any], job: dict[str, Any], shape: Shape) -> dict[str, Any]:
    ranks = job["ranks"]
    done = [r for r in ranks if r["steps"]]
    status = job["status"]
    if status.startswith("killed") and len(ranks) == spec["world"] and all(
            len(r["steps"]) == spec["steps"] for r in ranks):
        status = f"ok: every step recorded, then {status} (after the last record)"
    rec = {"model": shape.name, "params": shape.params(), "strategy": spec["strategy"],
           "world": spec["world"], "precision": spec["precision"],
           "gradient_checkpointing": spec["checkpointing"], "micro_batch": spec["micro"],
           "accumulation": spec["accumulation"],
           "global_batch": spec["micro"] * spec["accumulation"] * spec["world"],
           "seq_length": spec["length"], "status": status,
           "planned_gib": spec.get("planned_gib"), "peak_gib": None, "setup_peak_gib": None,
           "step_peak_gib": None,
           "step_s": None, "steps_timed": 0, "setup_s": None, "wall_s": job.get("wall_s")}
    if ranks:
        rec["setup_peak_gib"] = round(max(r["setup_peak"] for r in ranks) / GIB, 3)
        rec["setup_s"] = round(max(r["setup_s"] for r in ranks), 1)
    if done:  # the training peak: the highest resident set during a step
        rec["peak_gib"] = round(max(s["hwm"] for r in done for s in r["steps"]) / GIB, 3)
        # what a step adds, the first one left out when there are more (it also
        # allocates AdamW's moments, which the later steps hold already)
        rec["step_peak_gib"] = round(max(s["hwm"] - s["before"] for r in done
                                         for s in (r["steps"][1:] or r["steps"])) / GIB, 3)
        timed = [max(r["steps"][i]["s"] for r in done)
                 for i in range(1, min(len(r["steps"]) for r in done))]
        if timed:
            rec["step_s"] = round(sum(timed) / len(timed), 1)
            rec["steps_timed"] = len(timed)
        rec["tokens_per_s"] = (round(rec["global_batch"] * spec["length"] / rec["step_s"], 1)
                               if rec["step_s"] else None)
    if rec["planned_gib"] and rec["peak_gib"]:
        rec["plan_error"] = round(rec["planned_gib"] / rec["peak_gib"] - 1, 3)
    return rec


def markdown(res: dict[str, Any]) -> str:
    L = ["# The paper's global batch at RoBERTa-large size (CPU)", "",
         f"`{res['command']}`; {res['machine']}; load average {res['load_start']} -> "
         f"{res['load_end']}; process baseline {res['baseline_gib']:.2f} GiB "
         "(added to every planned figure)."
         + (f" Planned figures recomputed by `{res['replanned_by']}`." if res.get(
             "replanned_by") else ""), "",
         f"Model: {res['model']} ({res['params'] / 1e6:.1f} M parameters), sequences of "
         f"{res['seq_length']} tokens, global batch {res['global_batch']}.", "",
         "| strategy | world | precision | checkpointing | micro x accum | status | "
         "peak GiB / rank | planned GiB | plan error | step adds GiB | setup peak GiB | "
         "step s | tokens/s |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["records"]:
        def g(x: Any, fmt: str = "{:.2f}") -> str:
            return "" if x is None else fmt.format(x)
        L.append(f"| {r['strategy']} | {r['world']} | {r['precision']} | "
                 f"{'yes' if r['gradient_checkpointing'] else 'no'} | {r['micro_batch']} x "
                 f"{r['accumulation']} | {r['status'][:90]} | {g(r['peak_gib'])} | "
                 f"{g(r['planned_gib'])} | {g(r.get('plan_error'), '{:+.1%}')} | "
                 f"{g(r['step_peak_gib'])} | {g(r['setup_peak_gib'])} | "
                 f"{g(r['step_s'], '{:.1f}')} | "
                 f"{g(r.get('tokens_per_s'), '{:.0f}')} |")
    for key, text in res.get("derived", {}).items():
        L += ["", f"- {key}: {text}"]
    return "\n".join(L) + "\n"


def derived(records: list[dict[str, Any]]) -> dict[str, str]:
    """Ratios between jobs that differ in one setting."""
    def find(**kw: Any) -> dict[str, Any] | None:
        for r in records:
            if all(r[k] == v for k, v in kw.items()) and r["status"].startswith("ok"):
                return r
        return None
    out = {}
    on = find(strategy="fsdp2", world=2, precision="fp32", gradient_checkpointing=True,
              micro_batch=4)
    off = find(strategy="fsdp2", world=2, precision="fp32", gradient_checkpointing=False,
               micro_batch=4)
    if on and off and on["step_peak_gib"] and off["step_peak_gib"]:
        out["activation checkpointing (fsdp2, world 2, micro 4)"] = (
            f"a step adds {off['step_peak_gib']:.2f} GiB without, {on['step_peak_gib']:.2f} "
            f"GiB with: {off['step_peak_gib'] / on['step_peak_gib']:.1f}x less; step "
            f"{off['step_s']} s -> {on['step_s']} s")
    on3 = find(strategy="zero3", world=1, gradient_checkpointing=True, micro_batch=4)
    off3 = find(strategy="zero3", world=1, gradient_checkpointing=False, micro_batch=4)
    if on3 and off3 and on3["step_peak_gib"] and off3["step_peak_gib"]:
        out["activation checkpointing (zero3, world 1, micro 4)"] = (
            f"a step adds {off3['step_peak_gib']:.2f} GiB without, "
            f"{on3['step_peak_gib']:.2f} GiB with: "
            f"{off3['step_peak_gib'] / on3['step_peak_gib']:.1f}x less; step "
            f"{off3['step_s']} s -> {on3['step_s']} s")
    bf = find(strategy="fsdp2", world=2, precision="bf16", gradient_checkpointing=True)
    if on and bf:
        out["bf16 against fp32 (fsdp2, world 2, checkpointing)"] = (
            f"peak {on['peak_gib']:.2f} -> {bf['peak_gib']:.2f} GiB per rank; step "
            f"{on['step_s']} s -> {bf['step_s']} s")
    errors = [abs(r["plan_error"]) for r in records if r.get("plan_error") is not None]
    if errors:
        out["planner"] = (f"largest |planned / measured peak - 1| over {len(errors)} "
                          f"measured jobs: {max(errors):.1%}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="2 layers, hidden 64 (smoke)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--train-rows", type=int, default=64)
    p.add_argument("--guard-gib", type=float, default=21.0)
    p.add_argument("--timeout", type=float, default=2400)
    p.add_argument("--jobs", default="all", help="'all' or indices into JOBS, e.g. 0,3")
    p.add_argument("--work", default=None, help="assets folder (kept between calls)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--replan", action="store_true",
                   help="only summarise the existing results file's records again (from the "
                        "ranks' files in --work) and recompute planned_gib with the planner "
                        "as it is now; nothing runs")
    p.add_argument("--merge", action="store_true",
                   help="keep the existing results file's records of jobs not rerun")
    p.add_argument("--cuda", action="store_true",
                   help="one GPU: GPU_JOBS, peak = torch.cuda.max_memory_allocated")
    args = p.parse_args(argv)
    import platform

    import torch
    shape = QUICK if args.quick else LARGE
    work = Path(args.work or tempfile.mkdtemp(prefix="scale_train_"))
    assets = build_assets(work / shape.name.replace(" ", "_"), shape, args.train_rows)
    long_texts(assets, args.length)
    ds_path = work / "ds_lean.json"
    ds_path.write_text(json.dumps(LEAN_DS))
    base = 0.0 if args.cuda else baseline()
    table = GPU_JOBS if args.cuda else JOBS
    indices = range(len(table)) if args.jobs == "all" else [int(i) for i in
                                                            args.jobs.split(",")]
    res: dict[str, Any] = {
        "command": "python bench/scale_train.py " + " ".join(
            sys.argv[1:] if argv is None else argv),
        "machine": (torch.cuda.get_device_name(0) if args.cuda else
                    f"{os.cpu_count()} CPUs, {_available() / GIB:.1f} GiB available at start, "
                    f"{platform.machine()}, cores // world torch threads per rank")
                   + f", torch {torch.__version__}",
        "model": shape.name, "params": shape.params(), "seq_length": args.length,
        "global_batch": 32, "train_rows": args.train_rows, "baseline_gib": base,
        "load_start": load_avg(), "records": []}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("scale_train_gpu" if args.cuda else
            "scale_train_quick" if args.quick else "scale_train")
    if args.replan:
        old = json.loads((out / f"{stem}.json").read_text())
        for n, r in enumerate(old["records"]):  # summarised again from the ranks' files
            spec_file = work / f"job{r['job']}.spec.json"
            files = [work / f"job{r['job']}.rank{k}.json" for k in range(r["world"])]
            if spec_file.exists() and all(f.exists() for f in files):
                again = summarise(json.loads(spec_file.read_text()), {
                    "status": r["status"], "wall_s": r.get("wall_s"),
                    "ranks": [json.loads(f.read_text()) for f in files]}, shape)
                r = old["records"][n] = {"job": r["job"], **again}
            spec = {"assets": assets, "strategy": r["strategy"], "world": r["world"],
                    "precision": r["precision"], "checkpointing": r["gradient_checkpointing"],
                    "micro": r["micro_batch"], "accumulation": r["accumulation"],
                    "length": r["seq_length"], "steps": args.steps,
                    "train_rows": old["train_rows"], "workdir": str(work / "replan"),
                    "ds_config": str(ds_path) if r["strategy"] == "zero3" else None}
            r["planned_gib"] = round(planned_gib(spec, old["baseline_gib"], args.cuda), 3)
            r.pop("plan_error", None)
            if r["planned_gib"] and r["peak_gib"]:
                r["plan_error"] = round(r["planned_gib"] / r["peak_gib"] - 1, 3)
        old["replanned_by"] = res["command"]
        old["derived"] = derived(old["records"])
        (out / f"{stem}.json").write_text(json.dumps(old, indent=1) + "\n")
        (out / f"{stem}.md").write_text(markdown(old))
        return 0
    kept: dict[int, dict[str, Any]] = {}
    if args.merge and (out / f"{stem}.json").exists():
        old = json.loads((out / f"{stem}.json").read_text())
        for r in old["records"]:  # records written before jobs were numbered
            r.setdefault("job", next(
                (j for j, t in enumerate(table) if t == (
                    r["strategy"], r["world"], r["precision"], r["gradient_checkpointing"],
                    r["micro_batch"], r["accumulation"])), -1))
        kept = {r["job"]: r for r in old["records"] if r["job"] not in indices}
        res["merged_from"] = [old["command"], *old.get("merged_from", [])]
        res["load_start"] = [old["load_start"], res["load_start"]]
    res["records"] = list(kept.values())
    for i in indices:
        strategy, world, precision, ckpt, micro, k = table[i]
        steps = min(args.steps, 2) if i in MEMORY_ONLY and not args.cuda else args.steps
        spec = {"assets": assets, "strategy": strategy, "world": world,
                "precision": precision, "checkpointing": ckpt, "micro": micro,
                "accumulation": k, "length": args.length, "steps": steps,
                "train_rows": args.train_rows, "cuda": args.cuda,
                # the machine's cores shared out: world 1 gets them all
                "threads": max(1, (os.cpu_count() or 1) // world) if not args.cuda else 0,
                "ds_config": str(ds_path) if strategy == "zero3" else None,
                "out": str(work / f"job{i}.json"), "workdir": str(work / f"run{i}")}
        spec["planned_gib"] = round(planned_gib(spec, base, args.cuda), 3)
        if spec["planned_gib"] * world > args.guard_gib:
            job = {"status": f"not started: the planner puts it at {spec['planned_gib']:.1f} "
                             f"GiB per rank x {world} > the {args.guard_gib:g} GiB machine",
                   "ranks": []}
        else:
            job = run_job(spec, args.guard_gib * GIB, args.timeout)
        res["records"].append({"job": i, **summarise(spec, job, shape)})
        res["records"].sort(key=lambda r: r["job"])
        res["load_end"] = load_avg()
        res["derived"] = derived(res["records"])
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1) + "\n")
        (out / f"{stem}.md").write_text(markdown(res))
        print(json.dumps(next(r for r in res["records"] if r["job"] == i)), flush=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--_worker":
        worker(json.loads(Path(sys.argv[2]).read_text()))
    else:
        sys.exit(main())
