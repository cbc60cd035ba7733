"""Peak memory and step time of CAP pruning steps with and without
``train.gradient_checkpointing``.

Each setting runs in a fresh process of its own, one after the other (one torch thread):
a real CAPRecipe (movement pruning, KD from a frozen teacher, PrC / FiC / SnC banks) on a
BERT shape given on the command line (default: hidden 256, 12 layers, 4 heads, FFN
1024), every input ``--length`` tokens long, then ``--steps`` training steps after one
warm-up step (which allocates AdamW's moments). Peak memory of a step, on CPU: the
process's peak resident set size during the step (``VmHWM``, reset through
``/proc/self/clear_refs`` before each step) less its resident size just before it,
with glibc's mmap threshold pinned (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors
go back to the system and each step starts from the same floor; on CUDA,
``torch.cuda.max_memory_allocated`` less the memory allocated before the step. Either
way the peak is what a step adds: activations kept for backward, gradients, and the
temporaries of backward and the optimiser step. On CPU the pinned threshold makes
every large tensor a fresh mapping (page faults on each allocation), so step times are
taken from a second pair of processes with glibc's default allocator: four processes,
memory (off, on) then time (off, on).

    python bench/grad_checkpointing.py   # -> bench/results/grad_checkpointing.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORDS = [f"w{i}" for i in range(500)]


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
    return int(found.group(1)) if found else 0


def make_assets(root: Path, hidden: int, layers: int, heads: int, length: int,
                n_train: int) -> dict[str, str]:
    """A word-level tokenizer, a random BERT of the given shape (student and teacher) and
    a 3-class CSV task whose texts all fill ``length`` tokens."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

    vocab = root / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]))
    tok = BertTokenizer(str(vocab), do_lower_case=True)
    cfg = BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=4 * hidden, vocab_size=len(WORDS) + 5,
                     max_position_embeddings=length, num_labels=3)
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    rng = random.Random(0)
    paths = {"student": str(root / "model"), "teacher": str(root / "model")}
    for split, n in (("train", n_train), ("validation", 8)):
        rows = ["sentence,label"]
        for i in range(n):
            rows.append(" ".join(rng.choice(WORDS) for _ in range(length)) + f",{'abc'[i % 3]}")
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")
        paths[split] = str(root / f"{split}.csv")
    return paths


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One setting in this process: set up the recipe, then measure ``args.steps`` steps."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    from distributed_helpers import batch_rows, run_config

    from capscale.checks import run_config_from_dict
    from capscale.console import Console
    from capscale.distributed import DistContext, init_distributed
    from capscale.recipe import CAPRecipe

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        assets = make_assets(Path(tmp), args.hidden, args.layers, args.heads, args.length,
                             args.batch * (args.steps + 1))
        cfg = run_config_from_dict(run_config(assets, str(Path(tmp) / "out"), **{
            "data.max_length": args.length, "train.batch_size": args.batch,
            "train.eval_batch_size": args.batch, "train.max_steps": args.steps + 1,
            "train.gradient_checkpointing": args.setting == "on",
            "pruning.final_sparsity": 0.5}))
        ctx = init_distributed("single") if cuda else DistContext()
        run = CAPRecipe(cfg, ctx, Console(enabled=False))
        run.setup()
        peaks, times = [], []
        for step in range(args.steps + 1):
            batch = batch_rows(run, step * args.batch, (step + 1) * args.batch)
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            else:
                Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
                before = _status_kib("VmRSS") * 1024
            t0 = time.perf_counter()
            run.train_step(batch)
            if cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            peak = (torch.cuda.max_memory_allocated() if cuda
                    else _status_kib("VmHWM") * 1024)
            if step > 0:  # step 0 also allocates AdamW's moments
                peaks.append(peak - before)
                times.append(dt)
        params = sum(p.numel() for p in run.strategy.unwrap(run.student.model).parameters())
    return {"setting": args.setting, "device": "cuda" if cuda else "cpu",
            "student_parameters": params, "step_peak_bytes": peaks, "step_seconds": times,
            "median_step_peak_mib": statistics.median(peaks) / 2**20,
            "median_step_s": statistics.median(times)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", default=str(RESULTS / "grad_checkpointing"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--setting", choices=("off", "on"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}
    shape = ["--hidden", str(args.hidden), "--layers", str(args.layers), "--heads",
             str(args.heads), "--batch", str(args.batch), "--length", str(args.length),
             "--steps", str(args.steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    cpu = not _has_cuda()
    load_before = os.getloadavg()
    runs: dict[str, dict[str, Any]] = {}
    # one fresh process each, one at a time: memory (pinned allocator), then time
    for pinned in ((True, False) if cpu else (False,)):
        for setting in ("off", "on"):
            extra = {"MALLOC_MMAP_THRESHOLD_": "65536"} if pinned else {}
            done = subprocess.run(
                [sys.executable, __file__, "--child", "--setting", setting, *shape],
                env={**env, **extra}, capture_output=True, text=True, check=True)
            rec = json.loads(done.stdout.strip().splitlines()[-1])
            if not cpu:
                runs[setting] = rec
            elif pinned:
                runs[setting] = {k: v for k, v in rec.items()
                                 if k not in ("step_seconds", "median_step_s")}
            else:
                runs[setting].update(step_seconds=rec["step_seconds"],
                                     median_step_s=rec["median_step_s"])
    off, on = runs["off"], runs["on"]
    result = {
        "command": " ".join(["python bench/grad_checkpointing.py",
                             *(argv if argv is not None else sys.argv[1:])]),
        "shape": {"hidden": args.hidden, "layers": args.layers, "heads": args.heads,
                  "ffn": 4 * args.hidden, "batch": args.batch, "length": args.length},
        "measured_steps": args.steps, "machine": platform.machine(),
        "cpus": os.cpu_count(), "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(), "runs": runs,
        "peak_saving": 1 - on["median_step_peak_mib"] / off["median_step_peak_mib"],
        "step_time_ratio": on["median_step_s"] / off["median_step_s"]}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def _has_cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def markdown(r: dict[str, Any]) -> str:
    s, off, on = r["shape"], r["runs"]["off"], r["runs"]["on"]
    what = ("peak RSS added by a step" if off["device"] == "cpu"
            else "peak CUDA memory allocated by a step")
    return "\n".join([
        "# Activation checkpointing: peak memory and step time of CAP steps", "",
        f"`{r['command']}`", "",
        f"BERT hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads, FFN "
        f"{s['ffn']} ({off['student_parameters']:,} parameters); batch {s['batch']} x "
        f"{s['length']} tokens; movement pruning with KD and PrC / FiC / SnC; "
        f"{off['device']}, one thread, each setting in a fresh process (on CPU, one "
        f"pair for memory with the mmap threshold pinned, one for time); median of "
        f"{r['measured_steps']} steps after a warm-up step. Machine: {r['cpus']} CPUs "
        f"({r['machine']}), load average {r['loadavg_before'][0]:.2f} before and "
        f"{r['loadavg_after'][0]:.2f} after (a shared machine: step times are indicative).",
        "",
        f"| train.gradient_checkpointing | {what} (MiB) | step (s) |",
        "|---|---|---|",
        f"| false | {off['median_step_peak_mib']:.0f} | {off['median_step_s']:.2f} |",
        f"| true | {on['median_step_peak_mib']:.0f} | {on['median_step_s']:.2f} |", "",
        f"Peak saving: {r['peak_saving']:.0%}; step time x{r['step_time_ratio']:.2f}.", ""])


if __name__ == "__main__":
    main()
