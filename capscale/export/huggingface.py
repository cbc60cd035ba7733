"""Export: a plain Hugging Face model directory, the masks, a sparsity report and a
model card (``model/README.md``, capscale.export.card).

The exported model has the masks multiplied into its weights and no capscale module
left in it, so the task's Auto class (``AutoModelForSequenceClassification``,
``AutoModelForQuestionAnswering``, ...) loads it with transformers alone and gives the
masked model's logits. capscale.export.formats writes the same model as ONNX, INT8 ONNX or a
sparse checkpoint, each checked against this one.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from capscale.export.auto import auto_class_name, saved_class_name
from capscale.export.card import write_model_card
from capscale.export.physical import prune_structure
from capscale.models.adapters import EncoderAdapter
from capscale.models.deep_check import unpruned_linears
from capscale.pruning import MaskedLinear, bake_masks, sparsity_report
from capscale.pruning.nm import check_pattern
from capscale.pruning.structured import strip_mask_hooks, structured_param_counts

REMOTE_CODE = "capscale_pruned"  # module name of the loader written next to the model
def export_pruned(model: nn.Module, adapter: EncoderAdapter, out_dir: str | Path,
                  tokenizer: PreTrainedTokenizerBase | None = None, inplace: bool = False,
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Bake the masks and write ``out_dir/{model/, masks.safetensors, sparsity_report.json}``
    and the model card ``model/README.md``.

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
    target = cast(PreTrainedModel, model if inplace else copy.deepcopy(model))
    keys = {v: k for k, v in adapter.qualified_names(target).items()}
    nm = next((m.nm for m in target.modules() if isinstance(m, MaskedLinear) and m.nm), None)
    masks = bake_masks(target)
    by_role = {keys[name]: m for name, m in masks.items() if name in keys}
    report = sparsity_report(target, adapter, by_role)
    if nm is not None:  # N:M: every group of every matrix holds exactly N weights
        report["pattern_check"] = check_pattern(masks, *nm)
    if any(isinstance(m, MaskedLinear) for m in target.modules()):
        raise RuntimeError("masked layers left after baking")
    target.save_pretrained(out / "model", safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "model")
    save_file({name: m.to("cpu", torch.uint8).contiguous()
               for name, m in masks.items()}, str(out / "masks.safetensors"))
    report = {**report, **(extra or {})}
    (out / "sparsity_report.json").write_text(json.dumps(report, indent=1))
    write_model_card(out, report)
    return report


def export_structured(model: nn.Module, adapter: EncoderAdapter, heads: list[torch.Tensor],
                      ffn: list[torch.Tensor], out_dir: str | Path,
                      tokenizer: PreTrainedTokenizerBase | None = None, inplace: bool = False,
                      extra: dict[str, Any] | None = None, hidden: torch.Tensor | None = None
                      ) -> dict[str, Any]:
    """Write a physically smaller model: pruned heads, FFN neurons (and hidden
    dimensions, ``hidden``: an (H,) keep mask) sliced away.

    Writes ``out_dir/{model/, structure.json, sparsity_report.json}`` and the card. Per-layer head
    counts and FFN widths go to ``config.capscale_structure``; a ~200-line loader
    (capscale/export/hf_pruned_model.py, torch + transformers only) is saved beside the
    weights and registered in ``config.auto_map`` under the Auto class of the model's
    task (:func:`auto_class_name`), so::

        AutoModelForSequenceClassification.from_pretrained(dir, trust_remote_code=True)
        AutoModelForQuestionAnswering.from_pretrained(dir, trust_remote_code=True)  # QA

    loads it without capscale (transformers 5 cannot express per-layer head counts
    through stock config fields; see that file).

    Args:
        model: the (unwrapped) student; structured mask hooks on it are ignored.
        adapter: its encoder adapter.
        heads, ffn: per layer, bool keep masks (H,) and (I_l,).
        out_dir: destination folder.
        tokenizer: saved next to the model when given.
        inplace: slice ``model`` itself instead of a copy.
        extra: more fields for the report.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    counts = {**structured_param_counts(model, adapter, heads, ffn, hidden),
              "unpruned_linears": unpruned_linears(adapter, model)}
    target = cast(PreTrainedModel, model if inplace else copy.deepcopy(model))
    strip_mask_hooks(target)
    structure = prune_structure(target, adapter, heads, ffn, hidden)
    target.config.capscale_structure = structure
    target.config.auto_map = {auto_class_name(saved_class_name(target)):
                              f"{REMOTE_CODE}.CapscalePrunedModel"}
    target.save_pretrained(out / "model", safe_serialization=True)
    template = (Path(__file__).parent / "hf_pruned_model.py").read_text()
    base = saved_class_name(target)
    (out / "model" / f"{REMOTE_CODE}.py").write_text(template.replace(
        'BASE_CLASS = "BertForSequenceClassification"', f'BASE_CLASS = "{base}"'))
    if tokenizer is not None:
        tokenizer.save_pretrained(out / "model")
    kept = {"heads": [torch.nonzero(h).flatten().tolist() for h in heads],
            "ffn": [torch.nonzero(f).flatten().tolist() for f in ffn]}
    (out / "structure.json").write_text(json.dumps({**structure, "kept": kept}))
    total_h = sum(h.numel() for h in heads)
    total_f = sum(f.numel() for f in ffn)
    report = {**counts,
              "head_sparsity": 1 - sum(int(h.sum()) for h in heads) / total_h,
              "ffn_sparsity": 1 - sum(int(f.sum()) for f in ffn) / total_f,
              "exported_encoder_parameters": sum(
                  p.numel() for p in adapter.layer_modules(target).parameters()),
              "heads_per_layer": structure["heads_per_layer"],
              "intermediate_per_layer": structure["intermediate_per_layer"],
              "removed_blocks": structure["removed_blocks"],
              "hidden_size_kept": len(structure.get("hidden_kept") or []) or None,
              "removed_layers": sorted(set(structure["removed_blocks"]["attention"])
                                       & set(structure["removed_blocks"]["ffn"])),
              **(extra or {})}
    (out / "sparsity_report.json").write_text(json.dumps(report, indent=1))
    write_model_card(out, report)
    return report
