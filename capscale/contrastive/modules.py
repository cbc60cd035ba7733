"""The contrastive module table: which frozen view of the data feeds each InfoNCE term.

CAP (Xu et al., AAAI 2022, section 3) pulls the student towards three references:

* ``prc`` (PrC): the pre-trained model, dense and not fine-tuned: task-agnostic
  knowledge. When the student starts from the pre-trained model it *is* that model
  before any pruning, so no second copy is loaded.
* ``fic`` (FiC): the fine-tuned dense teacher: task knowledge.
* ``snc`` (SnC): snapshots of the student itself at earlier sparsities, bridging the
  dense references and the sparse student; one view per snapshot, taken on the
  snapshot schedule (every epoch after the first, at sparsity milestones, or after each
  structured pruning level), at most ``cap.max_snapshots`` of them (null: all).

Each module contributes an unsupervised term (positives: the references' views of the
same example) and a supervised one (positives: every candidate with the same label),
weighted by ``cap.modules.<name>.w_unsup`` / ``w_sup``. A new module is one entry::

    register_contrastive_module(ContrastiveModule("fic2", source=load_second_teacher))

where ``source`` is ``"pretrained"``, ``"teacher"``, ``"snapshots"`` or a callable
``(ReferenceLoader) -> frozen model``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from torch import nn

from capscale.registry import add_entry


class ReferenceLoader(Protocol):
    """What a custom module's ``source`` may use to obtain its frozen model."""

    def load_frozen(self, path: str) -> nn.Module:
        """A frozen model with the task's head from ``path``, prepared for this run's
        strategy (sharded like the other references where they are)."""
        ...


Source = str | Callable[[ReferenceLoader], nn.Module]
BUILTIN_SOURCES = ("pretrained", "teacher", "snapshots")


@dataclass(frozen=True)
class ContrastiveModule:
    """One entry of the table.

    Attributes:
        name: its key under ``cap.modules``.
        source: where its views come from (see the module docstring).
    """

    name: str
    source: Source

    @property
    def snapshots(self) -> bool:
        """Whether its views are snapshots of the student (filled during training)."""
        return self.source == "snapshots"

    def max_views(self, max_snapshots: int | None) -> int:
        """R_max: views kept per example. ``max_snapshots`` must be resolved to a number
        first (``cap.max_snapshots: null`` means the schedule's count:
        capscale.train.schedules.snapshot_views)."""
        if not self.snapshots:
            return 1
        if max_snapshots is None:
            raise ValueError(f"module {self.name}: cap.max_snapshots is null; resolve it to "
                             "the number of snapshots the schedule takes before building "
                             "the objective")
        return max_snapshots


CONTRASTIVE_MODULES: dict[str, ContrastiveModule] = {}


def register_contrastive_module(module: ContrastiveModule, overwrite: bool = False
                                ) -> ContrastiveModule:
    """Add ``module`` to the table; configure it as ``cap.modules.<name>``."""
    if isinstance(module.source, str) and module.source not in BUILTIN_SOURCES:
        raise ValueError(f"module {module.name}: source must be one of {BUILTIN_SOURCES} "
                         "or a callable")
    return add_entry(CONTRASTIVE_MODULES, module.name, module, "contrastive module",
                     overwrite)


for _m in (ContrastiveModule("prc", "pretrained"), ContrastiveModule("fic", "teacher"),
           ContrastiveModule("snc", "snapshots")):
    register_contrastive_module(_m)


def module_index(name: str) -> int:
    """The module's position in the table (seeds its extra-negative draws)."""
    return list(CONTRASTIVE_MODULES).index(name)
