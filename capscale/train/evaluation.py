"""Task metrics of a model over a whole evaluation set, on one rank or many."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sized
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from capscale.data import model_inputs
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
