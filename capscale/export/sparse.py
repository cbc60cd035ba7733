"""The unstructured export in a sparse checkpoint: one bit per weight plus the kept
values, loaded by transformers through a small loader file (trust_remote_code).

Why not compressed-tensors' ``sparse-bitmask`` format: the compressed-tensors releases
that transformers 5 accepts (>= 0.15) no longer ship sparse compressors, and
transformers' compressed-tensors integration reads no ``sparsity_config``, so such a
checkpoint loads with its pruned matrices missing (randomly initialised); see README
"Export formats". The layout here is the same idea (bitmask + values, row-major),
documented in capscale/export/hf_sparse_model.py, the loader copied beside it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SPARSE_CODE = "capscale_sparse"  # module name of the loader written next to the weights
TEMPLATE = Path(__file__).with_name("hf_sparse_model.py")
BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """(rows, columns) bool -> (rows, ceil(columns / 8)) uint8, most significant bit
    first, each row padded with zeros to whole bytes."""
    rows, cols = mask.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8)
    padded[:, :cols] = mask.to(torch.uint8)
    return (padded.reshape(rows, -1, 8) * BITS).sum(-1, dtype=torch.uint8)


def encode(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
    """``tensor`` as ``{name.__bitmask, name.__values}`` when that is smaller than the
    dense tensor (a matrix with more than ~3% zeros in float32), else ``{name: tensor}``."""
    if tensor.ndim != 2 or not tensor.is_floating_point():
        return {name: tensor}
    kept = tensor.ne(0)
    rows, cols = tensor.shape
    coded = rows * -(-cols // 8) + int(kept.sum()) * tensor.element_size()
    if coded >= tensor.numel() * tensor.element_size():
        return {name: tensor}
    return {f"{name}.__bitmask": pack_bits(kept), f"{name}.__values": tensor[kept]}


def _read_all(model_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                tensors[key] = f.get_tensor(key)
    return tensors


def write_sparse(model_dir: str | Path, dest: str | Path) -> dict[str, Any]:
    """Write the model in ``model_dir`` (a dense export) to ``dest`` as a sparse
    checkpoint: config (``auto_map`` -> the loader), loader, tokenizer files and one
    ``model.safetensors`` with the pruned matrices bitmask-coded.

    Returns:
        ``{"bytes", "dense_bytes", "ratio", "coded_matrices", "matrices"}``: the size of
        the sparse and dense weight files and how many matrices were coded.
    """
    src, dest = Path(model_dir), Path(dest)
    config = json.loads((src / "config.json").read_text())
    if config.get("auto_map"):
        raise ValueError(f"{src} already needs its own loader (auto_map); the sparse format "
                         "is for the dense unstructured export")
    base = (config.get("architectures") or [""])[0]
    import transformers

    if not hasattr(transformers, base):
        raise ValueError(f"{src}: architecture {base!r} is not a transformers class")
    dest.mkdir(parents=True, exist_ok=True)
    tensors = _read_all(src)
    out: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for name, tensor in tensors.items():
        coded = encode(name, tensor)
        if name not in coded:
            shapes[name] = list(tensor.shape)
        out.update({k: v.contiguous() for k, v in coded.items()})
    save_file(out, str(dest / "model.safetensors"),
              metadata={"format": "pt", "capscale_sparse": json.dumps(shapes)})
    config["auto_map"] = {"AutoModelForSequenceClassification":
                          f"{SPARSE_CODE}.CapscaleSparseModel"}
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    (dest / f"{SPARSE_CODE}.py").write_text(TEMPLATE.read_text().replace(
        'BASE_CLASS = "BertForSequenceClassification"', f'BASE_CLASS = "{base}"'))
    for file in src.iterdir():  # tokenizer and generation files travel as they are
        if file.is_file() and file.suffix != ".safetensors" and file.name not in (
                "config.json", "README.md", "model.safetensors.index.json"):
            shutil.copy2(file, dest / file.name)
    dense = sum(f.stat().st_size for f in src.glob("*.safetensors"))
    size = (dest / "model.safetensors").stat().st_size
    return {"bytes": size, "dense_bytes": dense, "ratio": dense / size,
            "coded_matrices": len(shapes),
            "matrices": sum(t.ndim == 2 and t.is_floating_point() for t in tensors.values())}
