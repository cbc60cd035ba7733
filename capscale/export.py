"""Export: a plain Hugging Face model directory, the masks, and a sparsity report.

The exported model has the masks multiplied into its weights and no capscale module
left in it, so ``AutoModelForSequenceClassification.from_pretrained(dir)`` loads it with
transformers alone and gives the masked model's logits.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .adapters import EncoderAdapter
from .pruning import MaskedLinear, bake_masks, sparsity_report


def export_pruned(model: PreTrainedModel, adapter: EncoderAdapter, out_dir: str | Path,
                  tokenizer: PreTrainedTokenizerBase | None = None, inplace: bool = False,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bake the masks and write ``out_dir/{model/, masks.safetensors, sparsity_report.json}``.

    Args:
        model: the (unwrapped) masked student.
        adapter: its encoder adapter.
        out_dir: destination folder.
        tokenizer: saved next to the model when given.
        inplace: bake into ``model`` itself (saves memory at the end of a run) instead of
            a copy.
        extra: more fields for the report (metrics, timings...).

    Returns:
        the sparsity report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = model if inplace else copy.deepcopy(model)
    keys = {v: k for k, v in adapter.qualified_names(target).items()}
    masks = bake_masks(target)
    by_role = {keys[name]: m for name, m in masks.items() if name in keys}
    report = sparsity_report(target, adapter, by_role)
    if any(isinstance(m, MaskedLinear) for m in target.modules()):
        raise RuntimeError("masked layers left after baking")
    target.save_pretrained(out / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "model")
    save_file({name: m.to("cpu", torch.uint8).contiguous()
               for name, m in masks.items()}, str(out / "masks.safetensors"))
    report = {**report, **(extra or {})}
    (out / "sparsity_report.json").write_text(json.dumps(report, indent=1))
    return report

