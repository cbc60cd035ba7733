"""INT8 on this CPU: ONNX Runtime's dynamic quantisation against torch's, at batch 1 and 32.

The model is MiniLM-shaped (hidden 384, 6 layers, 12 heads, FFN 1536; the packaged
all-MiniLM-L6-v2 weights with a random 3-class head, or a random BertConfig of that
shape when the package is missing). Four runtimes are timed in one process, one
thread each, on the same random batch (token ids 1000-1999, all attended):

* ``torch fp32``: the PyTorch model;
* ``torch int8``: ``torch.ao.quantization.quantize_dynamic`` (nn.Linear, qint8, one
  scale per weight matrix), and ``torch int8 per-channel`` (one scale per row);
* ``onnxruntime fp32``: capscale.export.onnx_export.export_onnx of the same model;
* ``onnxruntime int8``: capscale.export.onnx_export.quantize_int8 of that file (what
  ``export.formats: [int8]`` writes: one scale per output channel).

Each cell is the median of a few forwards after one warm-up; each INT8 model's logits
are compared with the fp32 ones on the batch (max abs difference, argmax agreement).
One run takes about a minute on one core:

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/quantized_speed.py

Writes bench/results/quantized_speed.json and bench/results/quantized_speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import numpy as np
import torch
import transformers
from transformers import AutoModelForSequenceClassification, BertConfig

from capscale.export.onnx_export import export_onnx, onnx_session, quantize_int8

RESULTS = Path(__file__).parent / "results"


def load_model(tiny: bool) -> tuple[torch.nn.Module, str]:
    """The benchmarked model and how it was made."""
    if tiny:  # the smoke test's size
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=3000, num_labels=3)
        return AutoModelForSequenceClassification.from_config(cfg).eval(), "tiny random BERT"
    try:
        from capscale.models.loading import resolve_model_path

        path = resolve_model_path("minilm")
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=3)
        return model.eval(), "all-MiniLM-L6-v2 weights (packaged), random 3-class head"
    except Exception:  # the package is missing: the same shape, random weights
        torch.manual_seed(0)
        cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                         intermediate_size=1536, num_labels=3)
        return AutoModelForSequenceClassification.from_config(cfg).eval(), \
            "random BertConfig, MiniLM shape"


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def file_bytes(path: Path) -> int:
    data = Path(f"{path}.data")
    return path.stat().st_size + (data.stat().st_size if data.is_file() else 0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3, help="forwards per cell at batch > 1 "
                    "(batch 1: 4x as many)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 32-wide model (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    started = time.perf_counter()
    load_start = os.getloadavg()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    model, origin = load_model(args.tiny)
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's quantised tensors are deprecated
        tq = quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        tqc = quantize_dynamic(model, {torch.nn.Linear: per_channel_dynamic_qconfig})
    rows, errors, sizes = [], {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(model, Path(tmp) / "model.onnx")
        int8 = quantize_int8(fp32, Path(tmp) / "model_int8.onnx")
        for name, m in (("torch fp32", model), ("torch int8", tq),
                        ("torch int8 per-channel", tqc)):
            torch.save(m.state_dict(), Path(tmp) / f"{name}.pt")
        sizes = {name: file_bytes(Path(tmp) / f"{name}.pt")
                 for name in ("torch fp32", "torch int8", "torch int8 per-channel")}
        sizes |= {
                 "onnxruntime fp32": file_bytes(fp32), "onnxruntime int8": file_bytes(int8)}
        sessions = {"onnxruntime fp32": onnx_session(fp32, args.threads),
                    "onnxruntime int8": onnx_session(int8, args.threads)}
        g = torch.Generator().manual_seed(0)
        for batch in args.batches:
            ids = torch.randint(1000, 2000, (batch, args.length), generator=g)
            inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                      "token_type_ids": torch.zeros_like(ids)}
            feed = {k: v.numpy() for k, v in inputs.items()}
            runners: dict[str, Callable[[], np.ndarray]] = {
                "torch fp32": lambda m=model, x=inputs: m(**x).logits.numpy(),
                "torch int8": lambda m=tq, x=inputs: m(**x).logits.numpy(),
                "torch int8 per-channel": lambda m=tqc, x=inputs: m(**x).logits.numpy()}
            for name, s in sessions.items():
                wanted = {i.name for i in s.get_inputs()}
                only = {k: v for k, v in feed.items() if k in wanted}
                runners[name] = lambda s=s, f=only: s.run(["logits"], f)[0]
            repeats = args.repeats * (4 if batch == 1 else 1)
            with torch.inference_mode():
                ref = runners["torch fp32"]()
                for name, run in runners.items():
                    seconds = median_seconds(run, repeats)
                    rows.append({"runtime": name, "batch": batch, "length": args.length,
                                 "latency_ms": 1e3 * seconds, "throughput_seq_s": batch / seconds,
                                 "repeats": repeats})
                    got = run()
                    errors.setdefault(name, []).append(
                        (float(np.abs(got - ref).max()), float(np.abs(ref).max()),
                         float((got.argmax(-1) == ref.argmax(-1)).mean())))
                    print(f"batch {batch}: {name:23s} {1e3 * seconds:8.1f} ms", flush=True)
    for r in rows:  # speed-up against torch fp32 at the same batch
        base = next(x for x in rows if x["batch"] == r["batch"] and x["runtime"] == "torch fp32")
        r["speedup_vs_torch_fp32"] = base["latency_ms"] / r["latency_ms"]
    accuracy = {name: {"max_abs_logit_diff": max(e[0] for e in errs),
                       "max_abs_logit": max(e[1] for e in errs),
                       "argmax_agreement": min(e[2] for e in errs)}
                for name, errs in errors.items() if name != "torch fp32"}
    given = sys.argv[1:] if argv is None else argv
    meta = {"command": " ".join(["PYTHONPATH=. OMP_NUM_THREADS=1 python bench/quantized_speed.py",
                                 *([shlex.join(given)] if given else [])]),
            "model": origin, "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
            "onnxruntime": __import__("onnxruntime").__version__,
            "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
            "seconds": time.perf_counter() - started}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quantized_speed.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "accuracy": accuracy, "bytes": sizes}, indent=1))
    write_markdown(meta, rows, accuracy, sizes, args.out / "quantized_speed.md")
    return 0


def write_markdown(meta: dict, rows: list[dict], accuracy: dict, sizes: dict,
                   path: Path) -> None:
    load = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    lines = ["# INT8 dynamic quantisation: ONNX Runtime against torch, on this CPU", "",
             f"- command: `{meta['command']}`",
             f"- model: {meta['model']}; sequence length {rows[0]['length']}, all tokens "
             "attended",
             f"- machine: {meta['cpu']}, {meta['cpu_count']} cores (shared), "
             f"{meta['threads']} thread(s) per runtime; torch {meta['torch']}, "
             f"onnxruntime {meta['onnxruntime']}",
             f"- load average (1 / 5 / 15 min) at start {load(meta['loadavg_start'])}, at end "
             f"{load(meta['loadavg_end'])}; the whole run took {meta['seconds']:.0f} s",
             "- each cell: median of the forwards shown after one warm-up, one process",
             "", "| runtime | batch | latency (ms) | throughput (seq/s) | vs torch fp32 | "
             "forwards |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['runtime']} | {r['batch']} | {r['latency_ms']:.1f} | "
              f"{r['throughput_seq_s']:.1f} | {r['speedup_vs_torch_fp32']:.2f}x | "
              f"{r['repeats']} |" for r in rows]
    lines += ["", "| runtime | max abs logit diff vs torch fp32 | largest abs logit | "
              "argmax agreement | bytes on disk |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {a['max_abs_logit_diff']:.2e} | {a['max_abs_logit']:.3f} | "
              f"{100 * a['argmax_agreement']:.1f}% | {sizes[name]:,} |"
              for name, a in accuracy.items()]
    lines.append(f"| torch fp32 | - | - | - | {sizes['torch fp32']:,} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
