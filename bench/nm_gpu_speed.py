"""GPU speed of a 2:4 export: PyTorch's semi-structured sparse kernels against dense,
one prepared script for a machine with an Ampere-or-newer NVIDIA GPU (about 2 minutes).

It builds a BERT-base-shaped classifier (hidden 768, 12 layers, FFN 3072; random
weights: speed does not depend on their values), prunes every prunable encoder matrix
to exactly 2:4 by magnitude (capscale's N:M mask, the layout a ``pruning.pattern:
"2:4"`` run exports, checked with ``capscale.pruning.nm.check_pattern``), and times in
fp16, at batch 1, 32 and 128, length 128:

* ``dense fp16``: the masked model with dense kernels;
* ``2:4 fp16``: the same model after ``capscale.pruning.nm.to_semi_structured`` (its
  linear weights as ``SparseSemiStructuredTensor``).

Each cell is the median of CUDA-synchronised forwards after warm-ups; the logits of both
are compared. Also one 10240 -> 3072 linear map at 3072 tokens, the shape PyTorch's
tutorial reports (A100 80GB: dense 0.870 ms, 2:4 0.630 ms, 1.38x; BERT-base on SQuAD
1.3x; "Accelerating BERT with semi-structured (2:4) sparsity", pytorch/tutorials).

    PYTHONPATH=. python bench/nm_gpu_speed.py      # on the GPU machine

Writes bench/results/nm_gpu_speed.{json,md}; without CUDA it writes nothing and exits 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"


def cuda_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32, 128])
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the 2:4 kernels need an NVIDIA GPU (Ampere or newer)")
        return 2
    from transformers import AutoModelForSequenceClassification, BertConfig

    from capscale.models.loading import adapter_for
    from capscale.pruning.binarizers import nm_mask
    from capscale.pruning.nm import check_pattern, to_semi_structured

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     intermediate_size=3072, num_labels=3)
    model = AutoModelForSequenceClassification.from_config(cfg).eval()
    adapter = adapter_for(model)
    names = list(adapter.qualified_names(model).values())
    masks = {}
    with torch.no_grad():
        for n in names:
            lin = model.get_submodule(n)
            mask = nm_mask(lin.weight.abs(), 2, 4).bool()
            lin.weight.mul_(mask)
            masks[n] = mask
    pattern = check_pattern(masks, 2, 4)
    dense = model.to("cuda", torch.float16)
    rows = []
    g = torch.Generator().manual_seed(0)
    inputs = {b: torch.randint(1000, 2000, (b, args.length), generator=g).cuda()
              for b in args.batches}
    with torch.inference_mode():
        dense_ms = {b: cuda_ms(lambda x=x: dense(input_ids=x), args.repeats)
                    for b, x in inputs.items()}
        ref = {b: dense(input_ids=x).logits.float() for b, x in inputs.items()}
        sparse = to_semi_structured(dense, names)
        for b, x in inputs.items():
            ms = cuda_ms(lambda x=x: sparse(input_ids=x), args.repeats)
            diff = float((sparse(input_ids=x).logits.float() - ref[b]).abs().max())
            rows.append({"batch": b, "length": args.length, "dense_ms": dense_ms[b],
                         "sparse_ms": ms, "speedup": dense_ms[b] / ms,
                         "max_abs_logit_diff": diff})
            print(f"batch {b}: dense {dense_ms[b]:.2f} ms, 2:4 {ms:.2f} ms "
                  f"({dense_ms[b] / ms:.2f}x)", flush=True)
        from torch.sparse import to_sparse_semi_structured
        lin = torch.nn.Linear(10240, 3072).half().cuda().eval()
        with torch.no_grad():
            lin.weight.mul_(nm_mask(lin.weight.abs().float(), 2, 4).half())
        xs = torch.rand(3072, 10240, device="cuda", dtype=torch.float16)
        lin_dense = cuda_ms(lambda: lin(xs), args.repeats)
        lin.weight = torch.nn.Parameter(to_sparse_semi_structured(lin.weight))
        lin_sparse = cuda_ms(lambda: lin(xs), args.repeats)
    meta = {"command": "PYTHONPATH=. python bench/nm_gpu_speed.py " + " ".join(
        sys.argv[1:] if argv is None else argv), "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__, "pattern_check": pattern, "dtype": "float16",
        "model": "BERT-base shape, random weights, magnitude 2:4 masks"}
    linear = {"shape": "10240 -> 3072, 3072 tokens", "dense_ms": lin_dense,
              "sparse_ms": lin_sparse, "speedup": lin_dense / lin_sparse}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nm_gpu_speed.json").write_text(json.dumps(
        {"meta": meta, "rows": rows, "linear": linear}, indent=1))
    lines = [f"# 2:4 on {meta['gpu']} ({meta['command']})", "",
             f"{meta['model']}, fp16, torch {meta['torch']}; pattern exact: "
             f"{pattern['exact']}.", "", "| batch | dense ms | 2:4 ms | speed-up | max abs "
             "logit diff |", "|---|---|---|---|---|"]
    lines += [f"| {r['batch']} | {r['dense_ms']:.2f} | {r['sparse_ms']:.2f} | "
              f"{r['speedup']:.2f}x | {r['max_abs_logit_diff']:.1e} |" for r in rows]
    lines += ["", f"One linear map {linear['shape']}: dense {lin_dense:.3f} ms, 2:4 "
                  f"{lin_sparse:.3f} ms ({linear['speedup']:.2f}x)."]
    (args.out / "nm_gpu_speed.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
