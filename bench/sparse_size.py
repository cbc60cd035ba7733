"""Size on disk of an unstructured export: dense, capscale's sparse checkpoint, and the
layouts it was chosen against; and whether transformers loads compressed-tensors'
``sparse-bitmask`` checkpoints.

The model is the packaged all-MiniLM-L6-v2 (3-class head) with each prunable matrix
magnitude-pruned to 90% and 97% (the paper's two levels), masks baked in and exported
with capscale.export.huggingface.export_pruned. For each level:

* ``dense``: the export's model.safetensors (measured);
* ``capscale sparse``: capscale.export.sparse.write_sparse (measured), reloaded with
  transformers (trust_remote_code) and compared with the dense export's logits;
* ``CSR int32`` / ``CSR uint16``: values + column indices (4 or 2 bytes) + int32 row
  pointers for the coded matrices, the rest dense (computed from the tensors);
* ``compressed-tensors bitmask``: the layout of compressed-tensors' ``sparse-bitmask``
  (values + packed bitmask + int64 row offsets + shape, every 2-D Linear weight in
  the encoder and pooler), written by hand here and loaded with transformers' own
  ``from_pretrained``: the check records whether the weights came back.

    PYTHONPATH=. OMP_NUM_THREADS=1 python bench/sparse_size.py

Writes bench/results/sparse_size.json and bench/results/sparse_size.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, BertConfig

from capscale.export.huggingface import export_pruned
from capscale.export.sparse import pack_bits, write_sparse
from capscale.models.loading import adapter_for, resolve_model_path

RESULTS = Path(__file__).parent / "results"


def load_model(tiny: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if tiny:
        return AutoModelForSequenceClassification.from_config(BertConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=300, num_labels=3)).eval()
    return AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path("minilm"), num_labels=3).eval()


def prune(model: torch.nn.Module, sparsity: float) -> None:
    """Magnitude-prune every prunable matrix to ``sparsity`` (weights set to zero)."""
    with torch.no_grad():
        for lin in adapter_for(model).prunable_linears(model).values():
            w = lin.weight
            k = int(sparsity * w.numel())
            cut = w.abs().flatten().kthvalue(k).values
            w.mul_(w.abs() > cut)


def csr_bytes(dense: dict[str, torch.Tensor], coded: set[str], index_bytes: int) -> int:
    total = 0
    for name, t in dense.items():
        if name in coded:
            nnz = int(t.ne(0).sum())
            total += nnz * (t.element_size() + index_bytes) + 4 * (t.shape[0] + 1)
        else:
            total += t.numel() * t.element_size()
    return total


def compressed_tensors_probe(model_dir: Path, dest: Path, model: torch.nn.Module,
                             inputs: dict[str, torch.Tensor]) -> dict:
    """Write ``model_dir`` in compressed-tensors' sparse-bitmask layout (as its <= 0.14
    releases wrote it) and load it with transformers."""
    dense = load_file(str(model_dir / "model.safetensors"))
    linears = {f"{n}.weight" for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and "classifier" not in n}
    out = {}
    for name, t in dense.items():
        if name not in linears:
            out[name] = t
            continue
        prefix, kept = name[: -len(".weight")], t.ne(0)
        counts = kept.sum(-1)
        out |= {f"{prefix}.shape": torch.tensor(list(t.shape)),
                f"{prefix}.compressed": t[kept], f"{prefix}.bitmask": pack_bits(kept),
                f"{prefix}.row_offsets": torch.cumsum(counts, 0) - counts}
    dest.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(dest / "model.safetensors"),
              metadata={"format": "pt"})
    config = json.loads((model_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "dense",
        "sparsity_config": {"format": "sparse-bitmask", "targets": ["Linear"],
                            "ignore": ["classifier"], "sparsity_structure": "unstructured"}}
    (dest / "config.json").write_text(json.dumps(config))
    probe = {"bytes": (dest / "model.safetensors").stat().st_size}
    try:
        import compressed_tensors
        from compressed_tensors.compressors import BaseCompressor

        probe["compressed_tensors"] = compressed_tensors.__version__
        probe["sparse_bitmask_compressor"] = "sparse-bitmask" in (
            BaseCompressor.registered_names())
    except ImportError:
        probe["compressed_tensors"] = None
    try:
        loaded = AutoModelForSequenceClassification.from_pretrained(dest).eval()
    except Exception as err:  # transformers refuses it: that is the finding
        probe.update(loads=False, error=f"{type(err).__name__}: {str(err)[:200]}")
        return probe
    want = model.state_dict()
    got = loaded.state_dict()
    with torch.no_grad():
        diff = (loaded(**inputs).logits - model(**inputs).logits).abs().max().item()
    probe.update(loads=True, weights_equal=all(torch.equal(got[k], want[k]) for k in want),
                 max_abs_logit_diff=diff)
    return probe


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.9, 0.97])
    ap.add_argument("--tiny", action="store_true", help="a 2-layer 32-wide model (smoke test)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    rows = []
    g = torch.Generator().manual_seed(0)
    for sparsity in args.sparsities:
        model = load_model(args.tiny)
        prune(model, sparsity)
        vocab = model.config.vocab_size
        inputs = {"input_ids": torch.randint(5, vocab, (4, 32), generator=g)}
        with tempfile.TemporaryDirectory() as tmp:
            export_pruned(model, adapter_for(model), Path(tmp) / "export")
            model_dir = Path(tmp) / "export" / "model"
            info = write_sparse(model_dir, Path(tmp) / "sparse")
            back = AutoModelForSequenceClassification.from_pretrained(
                Path(tmp) / "sparse", trust_remote_code=True).eval()
            with torch.no_grad():
                diff = (back(**inputs).logits - model(**inputs).logits).abs().max().item()
            dense = load_file(str(model_dir / "model.safetensors"))
            coded = {k[: -len(".__bitmask")] for k in load_file(
                str(Path(tmp) / "sparse" / "model.safetensors")) if k.endswith(".__bitmask")}
            probe = compressed_tensors_probe(model_dir, Path(tmp) / "ct", model, inputs)
        row = {"sparsity": sparsity, "dense_bytes": info["dense_bytes"],
               "capscale_sparse_bytes": info["bytes"], "capscale_max_abs_logit_diff": diff,
               "coded_matrices": info["coded_matrices"],
               "csr_int32_bytes": csr_bytes(dense, coded, 4),
               "csr_uint16_bytes": csr_bytes(dense, coded, 2),
               "compressed_tensors_bitmask": probe}
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"command": " ".join(["PYTHONPATH=. OMP_NUM_THREADS=1 python bench/sparse_size.py",
                                 *(sys.argv[1:] if argv is None else argv)]),
            "model": "tiny random BERT" if args.tiny else
            "all-MiniLM-L6-v2 (packaged), prunable matrices magnitude-pruned",
            "transformers": transformers.__version__, "torch": torch.__version__}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sparse_size.json").write_text(json.dumps({"meta": meta, "rows": rows},
                                                          indent=1))
    write_markdown(meta, rows, args.out / "sparse_size.md")
    return 0


def write_markdown(meta: dict, rows: list[dict], path: Path) -> None:
    mib = lambda b: f"{b / 2**20:.2f} MiB ({b:,} B)"  # noqa: E731
    lines = ["# Unstructured export: size on disk by layout", "",
             f"- command: `{meta['command']}`", f"- model: {meta['model']}",
             f"- transformers {meta['transformers']}, torch {meta['torch']}", "",
             "| layout | " + " | ".join(f"{r['sparsity']:.0%} sparsity" for r in rows) + " |",
             "|---|" + "---|" * len(rows)]
    for label, key in (("dense safetensors (the export)", "dense_bytes"),
                       ("capscale sparse (bitmask + values, measured)", "capscale_sparse_bytes"),
                       ("CSR, int32 column indices (computed)", "csr_int32_bytes"),
                       ("CSR, uint16 column indices (computed)", "csr_uint16_bytes")):
        lines.append(f"| {label} | " + " | ".join(mib(r[key]) for r in rows) + " |")
    lines.append("| compressed-tensors sparse-bitmask layout (measured) | " + " | ".join(
        mib(r["compressed_tensors_bitmask"]["bytes"]) for r in rows) + " |")
    lines += ["", "| check | " + " | ".join(f"{r['sparsity']:.0%}" for r in rows) + " |",
              "|---|" + "---|" * len(rows),
              "| capscale sparse: max abs logit diff after loading with transformers | "
              + " | ".join(f"{r['capscale_max_abs_logit_diff']:.1e}" for r in rows) + " |"]
    probe = rows[0]["compressed_tensors_bitmask"]
    for label, key in (("compressed-tensors installed", "compressed_tensors"),
                       ("its sparse-bitmask compressor registered", "sparse_bitmask_compressor"),
                       ("transformers from_pretrained returns a model", "loads"),
                       ("... with the checkpoint's weights", "weights_equal"),
                       ("... max abs logit diff", "max_abs_logit_diff"),
                       ("... error", "error")):
        if key in probe:
            values = [r["compressed_tensors_bitmask"].get(key) for r in rows]
            lines.append(f"| compressed-tensors layout: {label} | " + " | ".join(
                f"{v:.2e}" if isinstance(v, float) else str(v) for v in values) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
