"""An export checks itself before a run says it is done.

The student's outputs on the first dev batches are recorded before the export is
written: the live student as it was trained and evaluated, with its masks and hooks
(a forward every rank takes part in when it is sharded), since the export bakes masks
into, or slices, the unsharded copy it writes. The written folder
is then loaded the way its model card says, with transformers alone (the task's Auto
class; ``trust_remote_code`` for a physically smaller export, whose loader is written
beside the weights), and run on the same batches. The export is verified when every
output is within ``export.verify_atol`` of the student's (fp32: baking or slicing
changes only the order of a few sums, about 1e-7). A crash while loading or running it
counts as a mismatch. :class:`ExportMismatch` says what differs, in one line.

A verified export is then scored on the whole dev set (``score``): the metric the run
reports as the pruned model's is the export's, not the masked student's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import Tensor, nn

from capscale.data import model_inputs
from capscale.export.huggingface import auto_class_name
from capscale.models.loading import output_logits
from capscale.tasks.embedding_model import SentenceEmbedder, is_sentence_folder


class ExportMismatch(RuntimeError):
    """The written export does not reproduce the student (or does not load / run)."""


@torch.no_grad()
def student_outputs(model: nn.Module, batches: Iterable[dict[str, Tensor]],
                    device: torch.device | str) -> list[Tensor]:
    """``model``'s logits (CPU, fp32) on each batch, in eval mode (mode restored); a
    wrapped, sharded student is run as it was trained (collective)."""
    was_training = model.training
    model.eval()
    try:
        return [output_logits(model(**model_inputs(b, device))).float().cpu() for b in batches]
    finally:
        model.train(was_training)


def reload_export(model_dir: str | Path, class_name: str, trust_remote_code: bool
                  ) -> nn.Module:
    """The export as its model card loads it: the Auto class of the task model
    ``class_name``, fp32, eval mode, CPU. A sentence-transformers folder is loaded as
    ``AutoModel`` with the pooling and normalisation its own files declare (what
    ``SentenceTransformer`` computes)."""
    if is_sentence_folder(model_dir):
        return SentenceEmbedder.from_pretrained(model_dir, trust_remote_code).float().eval()
    auto = getattr(transformers, auto_class_name(class_name))
    return auto.from_pretrained(model_dir, trust_remote_code=trust_remote_code).float().eval()


@torch.no_grad()
def verify_export(model_dir: str | Path, class_name: str, trust_remote_code: bool,
                  batches: list[dict[str, Tensor]], expected: list[Tensor], atol: float,
                  score: Callable[[nn.Module], dict[str, float]] | None = None
                  ) -> dict[str, Any]:
    """Reload the export in ``model_dir`` and compare its outputs with ``expected``.

    Returns:
        ``{"ok": True, "max_abs_diff", "tolerance", "batches", "examples"}``, and
        ``"metrics"``: ``score(reloaded export)`` when ``score`` is given.

    Raises:
        ExportMismatch: an output differs by more than ``atol``, or loading / running
            the export failed.
    """
    where = Path(model_dir)
    try:
        model = reload_export(where, class_name, trust_remote_code)
        got = [output_logits(model(**model_inputs(b, "cpu"))).float() for b in batches]
    except Exception as err:  # any failure of the reloaded model is the export's
        first = str(err).splitlines()[0] if str(err) else ""
        raise ExportMismatch(f"the export in {where} does not load or run with transformers "
                             f"alone ({type(err).__name__}: {first})") from err
    worst, at = 0.0, 0
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if g.shape != e.shape:
            raise ExportMismatch(f"the export in {where} gives outputs of shape "
                                 f"{tuple(g.shape)} on dev batch {i}, the student "
                                 f"{tuple(e.shape)}")
        diff = float((g - e).abs().max()) if g.numel() else 0.0
        if diff != diff:  # NaN: nothing to compare with
            worst, at = diff, i
            break
        if diff > worst:
            worst, at = diff, i
    if not worst <= atol:
        raise ExportMismatch(f"the export in {where} does not reproduce the student: max "
                             f"|Δoutput| {worst:.3g} on dev batch {at} (export.verify_atol "
                             f"{atol:g})")
    verdict: dict[str, Any] = {
        "ok": True, "max_abs_diff": worst, "tolerance": atol, "batches": len(batches),
        "examples": sum(int(b["input_ids"].shape[0]) for b in batches)}
    if score is not None:
        try:
            verdict["metrics"] = score(model)
        except Exception as err:
            first = str(err).splitlines()[0] if str(err) else ""
            raise ExportMismatch(f"the export in {where} fails on the dev set "
                                 f"({type(err).__name__}: {first})") from err
    return verdict
