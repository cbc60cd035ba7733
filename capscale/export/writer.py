"""One way to write a run's export, used by the recipe at the end of a run and by
``capscale export`` on a checkpoint.

* :func:`masked_skeleton`: a bare model with the method's masks attached and set to the
  run's mask mode, the structure a checkpoint's ``model.pt`` (or a sharded student's
  gathered state) loads into;
* :func:`write_export`: an :class:`~capscale.pruning.controller.ExportPlan` written as a
  Hugging Face model directory (masks baked in, or physically smaller);
* :func:`write_verified_export`: the same at the end of a run, then reloaded with
  transformers alone and checked against the student (capscale.export.verify);
* :func:`export_checkpoint`: a saved checkpoint of an unstructured run, exported;
* :func:`write_run_formats`: the extra ``export.formats`` of an export, each checked
  against it on the config's dev set.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from capscale.data import Collator, make_loader, tokenize
from capscale.errors import ConfigError
from capscale.export.card import write_model_card
from capscale.export.formats import DevSet, write_formats
from capscale.export.huggingface import export_pruned, export_structured, saved_class_name
from capscale.export.verify import ExportMismatch, student_outputs, verify_export
from capscale.pruning.controller import ExportPlan, PruningMethod
from capscale.pruning.masked import MaskedLinear, configure_masks

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capscale.config import DataConfig, ExportConfig, PruningConfig
    from capscale.data import TaskData
    from capscale.distributed import DistContext
    from capscale.models.adapters import EncoderAdapter
    from capscale.tasks import Task


def masked_skeleton(model: nn.Module, adapter: EncoderAdapter, method: PruningMethod,
                    pruning: PruningConfig) -> nn.Module:
    """``model`` with ``method``'s masks attached, in the run's mask mode (top-k or
    schedule threshold, global scope, N:M); its values are what a state dict loads."""
    method.attach(model, adapter, pruning)
    configure_masks([m for m in model.modules() if isinstance(m, MaskedLinear)], pruning)
    return model


def write_export(model: nn.Module, plan: ExportPlan, adapter: EncoderAdapter,
                 out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write ``model`` as ``plan`` says (``model`` itself is baked or sliced); returns the
    export's sparsity report."""
    if plan.heads is not None and plan.ffn is not None:
        return export_structured(model, adapter, plan.heads, plan.ffn, out_dir, tokenizer,
                                 inplace=True, extra=extra, hidden=plan.hidden)
    return export_pruned(model, adapter, out_dir, tokenizer, inplace=True, extra=extra)


def write_verified_export(student: nn.Module, full_student: Callable[[], nn.Module | None],
                          plan: Callable[[nn.Module], ExportPlan], adapter: EncoderAdapter,
                          out_dir: Path, tokenizer: PreTrainedTokenizerBase | None,
                          extra: dict[str, Any] | None, dev: Iterable[dict[str, Tensor]],
                          batches: int, atol: float, trust_remote_code: bool,
                          ctx: DistContext,
                          score: Callable[[nn.Module], dict[str, float]] | None = None
                          ) -> dict[str, Any] | None:
    """Run the live ``student`` (as the strategy prepared it) on the first ``batches``
    of ``dev``, write ``full_student()`` (the unsharded copy with masks attached on the
    main rank, None on the others) as ``plan(copy)`` says, then reload the export and
    check it against the student's outputs (capscale.export.verify) and, when ``score``
    is given, score it on the whole dev set (main rank only). Collective: every
    rank learns the verdict and raises :class:`ExportMismatch` when it failed. Returns
    the export's report (with ``verified``) on the main rank, None on the others."""
    checked = list(islice(dev, batches))
    expected = student_outputs(student, checked, ctx.device)  # collective when sharded
    model = full_student()  # collective
    report, failure = None, ""
    if model is not None:
        class_name = saved_class_name(model)
        export_plan = plan(model)
        report = write_export(model, export_plan, adapter, out_dir, tokenizer, extra)
        try:
            report["verified"] = verify_export(out_dir / "model", class_name,
                                               export_plan.physical or trust_remote_code,
                                               checked, expected, atol, score)
        except ExportMismatch as err:
            failure = str(err)
        else:
            (out_dir / "sparsity_report.json").write_text(json.dumps(report, indent=1))
            write_model_card(out_dir, report)
    failed = bool(failure)
    if ctx.distributed:
        failed = bool(ctx.all_reduce_sum(torch.tensor([float(failed)])).item() > 0)
    if failed:
        raise ExportMismatch(failure or "the export written by the main rank failed its "
                             "check (its log says why)")
    return report


def export_checkpoint(checkpoint: Path, method: PruningMethod, pruning: PruningConfig,
                      load: Callable[[], tuple[nn.Module, EncoderAdapter]], out_dir: Path,
                      tokenizer: PreTrainedTokenizerBase, extra: dict[str, Any]
                      ) -> dict[str, Any]:
    """Export the student saved in ``checkpoint`` (``model.pt``: single / ddp runs) into
    ``out_dir``; ``load`` gives a bare model of the run's student and its adapter (called
    once the checkpoint is known to be exportable)."""
    if not (checkpoint / "model.pt").is_file():  # zero3 / fsdp2 keep rank shards
        raise ConfigError(f"--checkpoint {checkpoint}: a sharded (zero3 / fsdp2) checkpoint "
                          "has no model.pt to export; resume the run to its end, which "
                          "exports")
    if method.physical_export:
        raise ConfigError(f"--checkpoint {checkpoint}: pruning.method={method.name} exports "
                          "a physically smaller model at the end of the run; resume the run "
                          "to its end, which exports (then --add-to DIR writes more formats "
                          "of it)")
    model, adapter = load()
    masked_skeleton(model, adapter, method, pruning)
    # The keep-fraction / threshold buffers in the state fix each mask as it was saved.
    model.load_state_dict(torch.load(checkpoint / "model.pt", weights_only=True))
    return write_export(model, ExportPlan(), adapter, out_dir, tokenizer, extra)


def write_run_formats(dest: Path, export: ExportConfig, data: TaskData,
                      tokenizer: PreTrainedTokenizerBase, data_cfg: DataConfig,
                      batch_size: int, task: Task, trust_remote_code: bool,
                      log: Callable[[str], None]) -> dict[str, Any]:
    """The extra ``export.formats`` of the export in ``dest``, checked on the first dev
    batch and scored on the dev set (capscale.export.formats); ``ok`` says whether every
    check passed."""
    dev = make_loader(tokenize(data.validation, tokenizer, data_cfg), batch_size,
                      Collator(tokenizer.pad_token_id or 0))
    found = write_formats(dest, export.formats, next(iter(dev)),
                          DevSet(dev, task, data.num_labels, export.dev_examples),
                          trust_remote_code, export.onnx_atol, export.int8_rtol, log)
    if not found["ok"]:
        log(f"WARNING: an export format failed its check; see "
            f"{dest / 'sparsity_report.json'} (formats)")
    return found
