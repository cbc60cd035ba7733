"""Objective terms beyond CE, KD and the contrastive modules, in a table by name.

A term sees the batch, the student's and the frozen teacher's outputs, and returns one
weighted loss that :class:`capscale.train.step.CAPLoss` adds to the objective under the
term's name (logged like every other component). An entry of :data:`OBJECTIVE_TERMS`
builds the term from the run config, or returns None when the config leaves it off; a
plug-in adds its own with :func:`register_term`.

The built-in entry is layer-wise distillation (``loss.w_layer``): the output of each
matched teacher layer ``i`` is pulled towards the output of its student layer ``m(i)``,

    L_layer = w_layer * sum_{i in T} MSE_tokens(h_s^{m(i)}, h_t^i)

where ``MSE_tokens`` is the squared distance averaged over the hidden width and over
the non-padding tokens of every rank's batch (so W ranks give one process's loss), and
``T`` is ``loss.layer_teacher_layers`` (every teacher layer when empty). The map ``m``
(``loss.layer_map``):

* ``fixed``: ``m(i) = max(1, round(i * L_s / L_t))``, the same layer when the student
  has the teacher's depth (a student pruned from its teacher);
* ``dynamic`` (CoFi, Xia et al., ACL 2022): at every step, from the last teacher layer
  down, ``m(i)`` is the student layer with the smallest distance to ``h_t^i`` among the
  layers below the one the next teacher layer took (the first pick: any layer). The
  distances that choose are summed over ranks, so every rank picks the same map. When no
  layer is left below, the pick of the next teacher layer is reused.

Layer outputs are read by forward hooks on the adapter's layers (a layer applied
several times, as ALBERT's, gives one output per application), so any encoder the
adapters describe works without its ``output_hidden_states``. Hidden sizes must match:
there is no learned projection between a narrower student and its teacher.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
import torch.distributed as dist
from torch import Tensor, nn

from capscale.config import ConfigError
from capscale.models.loading import unwrapped
from capscale.models.recompute import recomputing
from capscale.registry import add_entry
from capscale.tasks.collective import global_mean, world

if TYPE_CHECKING:
    from capscale.config import Config
    from capscale.models.adapters import EncoderAdapter


@dataclass
class TermBatch:
    """What a term sees of one batch.

    Attributes:
        inputs: the model inputs (``attention_mask`` of shape ``(..., L)``).
        student_layers: the student's layer outputs ``(N, L, H)``, in call order, with
            gradient.
        teacher_layers: the teacher's, without gradient (empty without a teacher).
    """

    inputs: dict[str, Tensor]
    student_layers: list[Tensor]
    teacher_layers: list[Tensor]


class ObjectiveTerm(Protocol):
    """One term: ``term(batch)`` is its weighted loss."""

    name: str
    needs_layers: bool  # whether the term reads layer outputs (hooks are set when so)

    def __call__(self, batch: TermBatch) -> Tensor: ...


# name -> builder(config) -> the term, or None when the config leaves it off
OBJECTIVE_TERMS: dict[str, Callable[[Config], ObjectiveTerm | None]] = {}


def register_term(name: str, builder: Callable[[Config], ObjectiveTerm | None],
                  overwrite: bool = False) -> Callable[[Config], ObjectiveTerm | None]:
    """Add a term builder under ``name`` (refused if taken, unless ``overwrite``)."""
    return add_entry(OBJECTIVE_TERMS, name, builder, "objective term", overwrite)


def build_terms(cfg: Config) -> list[ObjectiveTerm]:
    """The terms the run config turns on, in table order."""
    return [t for build in OBJECTIVE_TERMS.values() if (t := build(cfg)) is not None]


class LayerTap:
    """Records the output of every encoder layer of ``model`` on each forward, in call
    order (not a checkpointed layer's recomputation in backward). ``take()`` returns
    what was recorded and forgets it."""

    def __init__(self, model: nn.Module, adapter: EncoderAdapter) -> None:
        self.outputs: list[Tensor] = []
        self.handles = [layer.register_forward_hook(self._hook)
                        for layer in adapter.layer_modules(unwrapped(model))]

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if recomputing():
            return
        self.outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def __deepcopy__(self, memo: dict) -> LayerTap:
        # A snapshot (deep copy of the tapped student) copies the hooks and so the tap:
        # the copy gets an empty one (recorded outputs may carry autograd history).
        new = LayerTap.__new__(LayerTap)
        new.outputs, new.handles = [], []
        memo[id(self)] = new
        return new


def token_sq_distance(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Sum over this rank's non-padding tokens (``mask``: ``(N, L)``) of the squared
    distance between two layer outputs ``(N, L, H)``, averaged over the width."""
    d = ((student.float() - teacher.float()) ** 2).mean(-1)
    return (d * mask.to(d.dtype)).sum()


@torch.no_grad()
def distance_table(student: list[Tensor], teacher: list[Tensor], mask: Tensor) -> Tensor:
    """:func:`token_sq_distance` of every (teacher, student) pair, ``(T, Ls)``, without
    gradient and without materialising the pairs' differences."""
    m = mask.to(torch.float32)
    s = torch.stack([h.float() for h in student])  # (Ls, N, L, H)
    t = torch.stack([h.float() for h in teacher])  # (T, N, L, H)
    width = s.shape[-1]
    cross = torch.einsum("tnlh,snlh->tsnl", t, s)
    sq = (t * t).sum(-1)[:, None] + (s * s).sum(-1)[None] - 2 * cross  # (T, Ls, N, L)
    return (sq.clamp(min=0) * m).sum((-1, -2)) / width


def fixed_map(teacher_layers: list[int], n_teacher: int, n_student: int) -> list[int]:
    """1-based student layer of each 1-based teacher layer, by relative depth."""
    return [max(1, round(i * n_student / n_teacher)) for i in teacher_layers]


def dynamic_map(distances: Tensor) -> list[int]:
    """0-based student layer (column) of each teacher layer (row of ``distances``):
    from the last row up, the closest column strictly left of the next row's pick; the
    next row's pick again when none is left."""
    picks: list[int] = []
    limit = distances.shape[1]
    for row in reversed(range(distances.shape[0])):
        pick = int(torch.argmin(distances[row, :limit])) if limit > 0 else picks[-1]
        picks.append(pick)
        limit = pick
    return picks[::-1]


class LayerDistillation:
    """``loss.w_layer`` (module docstring)."""

    name = "layer"
    needs_layers = True

    def __init__(self, weight: float, layer_map: str, teacher_layers: list[int]) -> None:
        self.weight, self.layer_map, self.teacher_layers = weight, layer_map, teacher_layers
        self.last_map: list[tuple[int, int]] = []  # (teacher, student) layers, 1-based

    def __call__(self, batch: TermBatch) -> Tensor:
        s, t = batch.student_layers, batch.teacher_layers
        if not s or not t:
            raise RuntimeError("layer distillation saw no layer outputs (student "
                               f"{len(s)}, teacher {len(t)}); are the adapter's layers "
                               "the ones the model runs?")
        chosen = self.teacher_layers or list(range(1, len(t) + 1))
        if max(chosen) > len(t):
            raise ConfigError(f"loss.layer_teacher_layers: the teacher has {len(t)} "
                              f"layer outputs, {max(chosen)} was asked for")
        if s[0].shape[-1] != t[0].shape[-1]:
            raise ConfigError(f"loss.w_layer: the student's layers are {s[0].shape[-1]} "
                              f"wide, the teacher's {t[0].shape[-1]}; layer distillation "
                              "needs equal hidden sizes")
        mask = batch.inputs["attention_mask"]
        mask = mask.reshape(-1, mask.shape[-1])
        count = int(mask.sum())
        targets = [t[i - 1] for i in chosen]
        if self.layer_map == "fixed":
            cols = [j - 1 for j in fixed_map(chosen, len(t), len(s))]
        else:
            agreed = distance_table(s, targets, mask)
            if world() > 1:
                dist.all_reduce(agreed)
            cols = dynamic_map(agreed)
        self.last_map = [(i, j + 1) for i, j in zip(chosen, cols)]
        total = sum(token_sq_distance(s[j], h, mask) for j, h in zip(cols, targets))
        return self.weight * global_mean(cast(Tensor, total), count)


def _layer_distillation(cfg: Config) -> ObjectiveTerm | None:
    loss = cfg.loss
    if loss.w_layer <= 0:
        return None
    return LayerDistillation(loss.w_layer, loss.layer_map, list(loss.layer_teacher_layers))


register_term("layer", _layer_distillation)
