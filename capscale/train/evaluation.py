"""Task metrics of a model over a whole evaluation set, on one rank or many."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from capscale.data import IGNORE_INDEX, model_inputs
from capscale.distributed import DistContext
from capscale.models.loading import output_logits

if TYPE_CHECKING:
    from capscale.tasks import Task


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, ctx: DistContext, task: Task,
             num_labels: int, reference: Any = None,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
             ) -> dict[str, float]:
    """``task``'s metrics over every example of ``loader``'s dataset, each counted once.

    Under several ranks the logits are gathered, and the rows a DistributedSampler adds
    to even out the shards (repeats of the first examples) are dropped, so the result
    equals one process on the whole set. ``reference``: what the task's metrics need
    beside the logits (QA: the windows' offsets and the examples' answers), passed on
    as ``task.metrics(..., reference=reference)`` when given. ``autocast``: the
    context of the forward passes (the run's precision); the logits are scored in fp32.
    """
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for batch in loader:
        with autocast():
            out = output_logits(model(**model_inputs(batch, ctx.device)))
        logits.append(out.float())
        labels.append(batch["labels"].to(ctx.device))
    model.train(was_training)
    logits, labels = _same_width(logits, labels, ctx)
    all_logits = ctx.gather(torch.cat(logits)).cpu().numpy()
    all_labels = ctx.gather(torch.cat(labels)).cpu().numpy()
    if ctx.distributed:  # rank r holds examples r, r + world, ... (then the padding)
        n = len(cast(Sized, loader.dataset))
        per_rank = len(all_labels) // ctx.world_size
        order = np.concatenate([np.arange(r, per_rank * ctx.world_size, ctx.world_size)
                                for r in range(ctx.world_size)])
        keep = np.argsort(order, kind="stable")[:n]
        all_logits, all_labels = all_logits[keep], all_labels[keep]
    if reference is not None:
        return task.metrics(all_logits, all_labels, num_labels, reference=reference)
    return task.metrics(all_logits, all_labels, num_labels)


def _same_width(logits: list[torch.Tensor], labels: list[torch.Tensor], ctx: DistContext
                ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-token outputs of batches padded to different lengths (token classification),
    padded to the longest over every batch and rank (labels with ``IGNORE_INDEX``), so
    that they concatenate and gather; anything else is returned unchanged."""
    # Fixed-width outputs (QA windows, embeddings) are not per token: no collective.
    if not logits or logits[0].dim() != 3 or not all(
            y.dim() == 2 and y.shape[1] == t.shape[1] for t, y in zip(logits, labels)):
        return logits, labels
    width = max(t.shape[1] for t in logits)
    if ctx.distributed:
        width = max(ctx.all_gather_objects(width))
    pad = torch.nn.functional.pad
    return ([pad(t, (0, 0, 0, width - t.shape[1])) for t in logits],
            [pad(y, (0, width - y.shape[1]), value=IGNORE_INDEX) for y in labels])


def whole_set_scorer(loader: DataLoader, device: torch.device, task: Task, num_labels: int,
                     reference: Any = None) -> Callable[[nn.Module], dict[str, float]]:
    """``score(model)``: ``task``'s metrics of ``model`` (moved to ``device``) over the
    whole dataset of ``loader`` on this process alone, whatever sampler shards ``loader``
    (the export's dev pass on the main rank)."""
    whole = DataLoader(loader.dataset, batch_size=loader.batch_size,
                       collate_fn=loader.collate_fn)

    def score(model: nn.Module) -> dict[str, float]:
        return evaluate(model.to(device), whole, DistContext(device=device), task, num_labels,
                        reference)
    return score
