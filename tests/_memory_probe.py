"""Measure a real CAP run's memory on CPU, for tests/test_memory_plan.py.

    MALLOC_MMAP_THRESHOLD_=65536 python tests/_memory_probe.py ROOT [--hidden ...]

In this process (one torch thread): a random BERT of the given shape as student and
teacher (bench/grad_checkpointing.make_assets: every text fills ``--length`` tokens), a
CAPRecipe set up on it (movement pruning, KD, PrC / FiC / SnC banks), one warm-up step
(AdamW's moments appear), then ``--steps`` steps with the encoder layers checkpointed
and ``--steps`` without. Each step's peak is the peak resident size during it
(``VmHWM``, reset through ``/proc/self/clear_refs``) less the resident size just before
it; with glibc's mmap threshold pinned, every freed tensor goes back to the system, so
each step starts from the same floor. Also written: the bytes the run's state holds by
part (parameters, scores, AdamW state, teacher, banks), counted off the live tensors,
and the config, so the test can plan the very same run: assets, config and results
(``ROOT/probe.json``) stay under ``ROOT``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent


def _kib(key: str) -> int:
    found = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    return int(found.group(1)) if found else 0


def _nbytes(tensors: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def state_bytes(run: Any) -> dict[str, int]:
    """What the run holds between steps, by the plan's part names."""
    bare = run.strategy.unwrap(run.student.model)
    named = dict(bare.named_parameters())
    scores = [p for n, p in named.items() if n.endswith("mask_scores")]
    opt = [t for s in run.student.optimizer.state.values() for t in s.values()]
    teacher = run.teacher.parameters() if run.teacher is not None else []
    return {"student weights": _nbytes(p for n, p in named.items()
                                       if not n.endswith("mask_scores")),
            "scores": _nbytes(scores), "optimiser state": _nbytes(opt),
            "references": _nbytes(teacher), "banks": _nbytes(run.objective.buffers())}


def measure(run: Any, steps: int, first: int, batch: int) -> list[int]:
    from distributed_helpers import batch_rows

    peaks = []
    for step in range(first, first + steps):
        rows = batch_rows(run, step * batch, (step + 1) * batch)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        before = _kib("VmRSS")
        run.train_step(rows)
        peaks.append((_kib("VmHWM") - before) * 1024)
    return peaks


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("root")
    for name, default in (("hidden", 192), ("layers", 4), ("heads", 4), ("batch", 8),
                          ("length", 64), ("steps", 2)):
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--set", nargs="*", default=[], help="more config overrides key=value")
    args = p.parse_args()
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "bench")]
    from distributed_helpers import run_config
    from grad_checkpointing import make_assets

    from capscale.checks import run_config_from_dict
    from capscale.console import Console
    from capscale.distributed import DistContext
    from capscale.models.recompute import uncheckpoint_layers
    from capscale.recipe import CAPRecipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = Path(args.root)
    assets = make_assets(root, args.hidden, args.layers, args.heads, args.length,
                         args.batch * (2 * args.steps + 1))
    config = run_config(assets, str(root / "out"), **{
        "data.max_length": args.length, "train.batch_size": args.batch,
        "train.eval_batch_size": args.batch, "train.max_steps": 2 * args.steps + 1,
        "train.gradient_checkpointing": True, "pruning.final_sparsity": 0.5,
        **{k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.set)}})
    run = CAPRecipe(run_config_from_dict(config), DistContext(), Console(enabled=False))
    run.setup()
    run.student.model.train()  # as CAPRecipe.train does before its loop
    measure(run, 1, 0, args.batch)  # warm-up: AdamW's moments
    state = state_bytes(run)
    on = measure(run, args.steps, 1, args.batch)
    uncheckpoint_layers(run.strategy.unwrap(run.student.model), run.adapter)
    off = measure(run, args.steps, 1 + args.steps, args.batch)
    result = {"config": config, "train_examples": len(run.data.train),
              "num_labels": run.data.num_labels, "state": state,
              "step_peak": {"on": statistics.median(on), "off": statistics.median(off)},
              "steps": {"on": on, "off": off}}
    (root / "probe.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
