"""Per-rank reference memory and step time of each strategy at world 1 and 2 (CPU, gloo).

For every (world, strategy) a job of ``world`` spawned ranks builds a real CAPRecipe
(student + frozen teacher, PrC / FiC / SnC banks) on a small BERT (hidden 256, 4 layers;
the tests' offline assets), then times ``--steps`` training steps on fixed global
batches. Reported per rank: parameter bytes resident of the frozen teacher and of the
student (ZeRO-3 partitions / FSDP2 local shards), median step seconds, and the cost of
gathering the contrastive negatives: the collectives the CAP objective issues each step
(anchors, ids, labels, row offsets) timed alone, for the bench model's local batch and
for BERT-base / RoBERTa-large sized anchors (local batch 32, hidden 768 / 1024).

    python bench/scaleout_memory.py   # -> bench/results/scaleout.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import distributed_helpers as h  # noqa: E402  (the tests' offline assets and batches)

GATHER_SHAPES = [(32, 768), (32, 1024)]
JOBS = [(1, "single"), (1, "zero3"), (1, "fsdp2"), (2, "ddp"), (2, "zero3"), (2, "fsdp2")]


def gather_cost(ctx, rows: int, hidden: int, reps: int = 30) -> float:
    """Median seconds of the CAP objective's per-step gathers (objectives.gather_batch; no
    collectives at world 1)."""
    from capscale.contrastive.objectives import gather_batch

    anchors = torch.randn(rows, hidden)
    ids, labels = torch.arange(rows), torch.zeros(rows, dtype=torch.long)
    times = []
    for _ in range(reps):
        ctx.barrier()
        t0 = time.perf_counter()
        gather_batch(anchors, ids, labels, ctx)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def job(rank, world, port, strategy, assets, steps, out, hidden):
    import os
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CAPSCALE_CPU="1",
                      DS_ACCELERATOR="cpu", TOKENIZERS_PARALLELISM="false")
    torch.set_num_threads(1)  # one core per rank: comparable across world sizes
    from capscale.distributed import init_distributed, local_param_bytes
    ctx = init_distributed(strategy)
    run = h.build_run(assets, ctx, h.GLOBAL_BATCH // world)
    times = []
    for step in range(steps):
        batch = h.batch_rows(run, *h.local_rows(step % 4, rank, world))
        if ctx.distributed:
            dist.barrier()
        t0 = time.perf_counter()
        run.train_step(batch)
        times.append(time.perf_counter() - t0)
    local = h.GLOBAL_BATCH // world
    gathers = {f"{rows}x{hidden}": gather_cost(ctx, rows, hidden)
               for rows, hidden in [(local, hidden), *GATHER_SHAPES]}
    rec = {"world": world, "strategy": ctx.strategy,
           "teacher_param_bytes_per_rank": local_param_bytes(run.teacher),
           "student_param_bytes_per_rank": local_param_bytes(run.student.model),
           "median_step_s": statistics.median(times[1:] or times),
           "first_step_s": times[0], "gather_negatives_median_s": gathers}
    if rank == 0:
        Path(out).write_text(json.dumps(rec))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "scaleout.json"))
    args = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="scaleout_"))
    assets = h.make_assets(tmp / "assets", hidden=args.hidden, layers=args.layers,
                           n_train=64)
    results = []
    for world, strategy in JOBS:
        out = tmp / f"{world}_{strategy}.json"
        mp.spawn(job, args=(world, h.free_port(), strategy, assets, args.steps, str(out),
                              args.hidden),
                 nprocs=world)
        results.append(json.loads(out.read_text()))
        print(json.dumps(results[-1]), flush=True)
    full = next(r for r in results if r["strategy"] == "single")
    for r in results:
        r["teacher_fraction_of_full"] = (r["teacher_param_bytes_per_rank"]
                                         / full["teacher_param_bytes_per_rank"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "model": f"BERT hidden {args.hidden}, {args.layers} layers (tests' assets)",
        "global_batch": h.GLOBAL_BATCH, "steps": args.steps, "device": "cpu, gloo",
        "torch": torch.__version__, "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
