"""Inference speed of structured-pruned exports against the dense model, on this CPU.

For the packaged MiniLM and a BERT-base-shaped model (random weights: speed does not
depend on them), heads and FFN neurons are pruned at 50 / 75 / 90% with deterministic
random importance (speed does not depend on which units are kept), exported with
capscale.export.huggingface.export_structured, re-loaded with transformers alone
(trust_remote_code) and timed against the dense model in the same process: median
latency of repeated forwards at batch 1 and 32, sequence length 128.

    PYTHONPATH=. python bench/structured_speed.py            # both models
    PYTHONPATH=. python bench/structured_speed.py --models minilm --repeats 5

Writes bench/results/structured_speed.json and bench/results/structured_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
from transformers import AutoModelForSequenceClassification, BertConfig

from capscale.export.huggingface import export_structured
from capscale.models.loading import adapter_for, resolve_model_path
from capscale.pruning.structured import Importance, StructuredMasks, select_structure

RESULTS = Path(__file__).parent / "results"


def load_dense(name: str) -> torch.nn.Module:
    if name == "minilm":
        return AutoModelForSequenceClassification.from_pretrained(
            resolve_model_path("minilm"), num_labels=3)
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(BertConfig(num_labels=3))  # base


def encoder_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in adapter_for(model).layer_modules(model).parameters())


@torch.inference_mode()
def time_forward(model: torch.nn.Module, batch: int, length: int, repeats: int) -> float:
    """Median seconds of one forward (after one warm-up)."""
    ids = torch.randint(1000, 2000, (batch, length), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model(**inputs)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(**inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pruned_copy(dense: torch.nn.Module, sparsity: float, out: Path) -> torch.nn.Module:
    adapter = adapter_for(dense)
    masks = StructuredMasks(dense, adapter)
    g = torch.Generator().manual_seed(int(sparsity * 100))
    imp = Importance([torch.rand(masks.num_heads, generator=g, dtype=torch.float64)
                      for _ in range(masks.num_layers)],
                     [torch.rand(n, generator=g, dtype=torch.float64)
                      for n in masks.intermediate])
    heads, ffn = select_structure(imp, sparsity, min_heads_per_layer=1)
    masks.remove()
    export_structured(dense, adapter, heads, ffn, out)
    return AutoModelForSequenceClassification.from_pretrained(
        out / "model", trust_remote_code=True).eval()


def bench_model(name: str, sparsities: list[float], batches: list[int], length: int,
                repeats: dict[int, int]) -> list[dict]:
    dense = load_dense(name).eval()
    rows = []
    base = {b: time_forward(dense, b, length, repeats[b]) for b in batches}
    dense_params = encoder_params(dense)
    for b in batches:
        rows.append({"model": name, "sparsity": 0.0, "batch": b, "length": length,
                     "latency_s": base[b], "throughput_seq_s": b / base[b], "speedup": 1.0,
                     "encoder_params": dense_params, "param_reduction": 1.0})
    with tempfile.TemporaryDirectory() as tmp:
        for s in sparsities:
            pruned = pruned_copy(dense, s, Path(tmp) / f"{name}_{s}")
            params = encoder_params(pruned)
            for b in batches:
                # Dense re-timed next to each pruned model: the CPU is shared, so a
                # ratio of neighbouring measurements is the fairer figure.
                d = time_forward(dense, b, length, repeats[b])
                p = time_forward(pruned, b, length, repeats[b])
                rows.append({"model": name, "sparsity": s, "batch": b, "length": length,
                             "latency_s": p, "dense_latency_s": d,
                             "throughput_seq_s": b / p, "speedup": d / p,
                             "encoder_params": params, "param_reduction": dense_params / params})
                print(f"{name} {s:.0%} batch {b}: {p * 1e3:.1f} ms vs dense {d * 1e3:.1f} ms "
                      f"-> {d / p:.2f}x, encoder params /{dense_params / params:.1f}", flush=True)
    return rows


def write_markdown(rows: list[dict], runs: dict[str, dict], path: Path) -> None:
    lines = ["# Structured pruning: inference speed of the exported models", ""]
    for name, meta in runs.items():
        lines.append(f"- {name}: CPU {meta['cpu']}, torch {meta['torch']}, {meta['threads']} "
                     f"threads, median of {meta['repeats']} forwards (batch: count) after a "
                     f"warm-up; load average at start {meta['loadavg']}.")
    lines += ["", "Dense and pruned are timed side by side in one process (the dense model "
              "again next to each pruned one), so each speed-up compares neighbouring "
              "measurements; the load average above says how busy the machine was.", "",
             "| model | sparsity | batch | latency (ms) | dense (ms) | throughput (seq/s) "
             "| speed-up | encoder params | fewer params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['sparsity']:.0%} | {r['batch']} | "
                     f"{r['latency_s'] * 1e3:.1f} | "
                     f"{r.get('dense_latency_s', r['latency_s']) * 1e3:.1f} | "
                     f"{r['throughput_seq_s']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['encoder_params'] / 1e6:.2f} M | {r['param_reduction']:.1f}x |")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.75, 0.9])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5, help="forwards per cell at batch 32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    repeats = {b: args.repeats if b > 1 else 4 * args.repeats for b in args.batches}
    meta = {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
            "threads": args.threads, "repeats": repeats,
            "loadavg": " / ".join(f"{x:.1f}" for x in os.getloadavg())}
    # Models not benchmarked in this invocation keep their earlier rows.
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "structured_speed.json"
    old = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    rows = [r for r in old["rows"] if r["model"] not in args.models]
    runs = {**old.get("runs", {})}
    for name in args.models:
        rows += bench_model(name, args.sparsities, args.batches, args.length, repeats)
        runs[name] = meta
        path.write_text(json.dumps({"runs": runs, "rows": rows}, indent=1))
        write_markdown(rows, runs, RESULTS / "structured_speed.md")


if __name__ == "__main__":
    main()
