"""The run's frozen references and student views, as the contrastive objectives see them.

:class:`RunReferences` implements :class:`~capscale.contrastive.objectives.ReferenceProvider`:
it resolves a module's source (the pre-trained model, the fine-tuned teacher, a custom
loader) to a frozen model prepared for the strategy, encodes the training set in the
bank loader's order (gathered over ranks), and makes frozen copies of the student for
online snapshots (gathered first when the student is sharded).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from capscale.contrastive.modules import CONTRASTIVE_MODULES, ContrastiveModule
from capscale.contrastive.objectives import gathered_pairs, snapshot_memory
from capscale.data import model_inputs
from capscale.distributed.strategy import full_state, load_full_state
from capscale.models.loading import (
    RepresentationTap,
    forward_with_representation,
    freeze,
    set_dropout,
    set_head_mode,
    snapshot_copy,
)

if TYPE_CHECKING:
    from capscale.config import CAPConfig
    from capscale.console import Console
    from capscale.distributed import DistContext, Strategy
    from capscale.models.adapters import EncoderAdapter
    from capscale.train.step import Student


class RunReferences:
    """Frozen models and encodings for one run.

    Args:
        ctx, strategy: ranks and how references are prepared (sharded or not).
        adapter: the encoder adapter (where the representation is read).
        representation: ``cap.representation``.
        load: ``path -> bare model with the task head`` (fresh heads seeded as the run).
        pretrained: the pre-trained encoder's path.
        student_is_pretrained: whether the student starts as the pre-trained model (then
            PrC encodes the student itself before any pruning, loading nothing).
        teacher: the prepared frozen teacher, or None.
        student: the prepared student (its model and tap).
        skeleton: builds a bare student of the same structure (sharded snapshots).
        bank_loader: the whole training set, sharded over ranks.
        console: progress bars.
        head_dropout: ``cap.snapshot_head_dropout``: whether train-mode snapshots are read
            after the task head's dropout (False, the reference: the encoder's dropout
            is on, the head is in eval mode).
    """

    def __init__(self, ctx: DistContext, strategy: Strategy, adapter: EncoderAdapter,
                 representation: str, load: Callable[[str], nn.Module], pretrained: str,
                 student_is_pretrained: bool, teacher: nn.Module | None,
                 bare_student: nn.Module, bank_loader: Any, console: Console,
                 head_dropout: bool = False) -> None:
        self.ctx, self.strategy, self.adapter = ctx, strategy, adapter
        self.kind, self.load = representation, load
        self.pretrained, self.student_is_pretrained = pretrained, student_is_pretrained
        self.teacher = teacher
        self.bare_student = bare_student  # until the strategy wraps it (see bind)
        self.live: Student | None = None
        self.skeleton: Callable[[], nn.Module] | None = None
        self.bank_loader, self.console = bank_loader, console
        self.taps: dict[int, RepresentationTap] = {}
        self.head_dropout = head_dropout

    def bind(self, student: Student, skeleton: Callable[[], nn.Module]) -> None:
        """The student as the strategy prepared it (snapshots are taken from it)."""
        self.live, self.skeleton = student, skeleton

    # -- fixed modules -------------------------------------------------------------
    def load_frozen(self, path: str) -> nn.Module:
        return self.strategy.prepare_reference(freeze(self.load(path)))

    def frozen(self, module: ContrastiveModule, persistent: bool) -> nn.Module:
        if callable(module.source):
            return module.source(self)
        if module.source == "teacher":
            if self.teacher is None:
                raise ValueError(f"cap.modules.{module.name} needs a teacher (model.teacher)")
            return self.teacher
        if self.student_is_pretrained:  # the student before any pruning
            if persistent:
                return self.strategy.prepare_reference(snapshot_copy(self.bare_student))
            self.bare_student.eval()
            return self.bare_student
        return self.load_frozen(self.pretrained)

    def release(self, model: nn.Module) -> None:
        tap = self.taps.pop(id(model), None)
        if tap is not None:
            tap.remove()
        if model is self.bare_student:
            model.train()

    # -- encodings -----------------------------------------------------------------
    def reader(self, model: nn.Module) -> Callable[[dict[str, Tensor]], Tensor]:
        if self.live is not None and model is self.live.model:
            tap = self.live.tap
            assert tap is not None, "the student is prepared with its representation tap"
        else:
            tap = self.taps.setdefault(id(model), RepresentationTap(model, self.adapter))
        kind, autocast = self.kind, self.strategy.autocast

        def read(inputs: dict[str, Tensor]) -> Tensor:
            with autocast():  # the representation comes back in fp32
                return forward_with_representation(model, inputs, tap, kind)[1]
        return read

    @torch.no_grad()
    def encode_training_set(self, model: nn.Module, what: str
                            ) -> Iterator[tuple[Tensor, Tensor]]:
        read = self.reader(model)
        device = self.ctx.device
        with self.console.progress(what, len(self.bank_loader)) as bar:
            for pair in gathered_pairs(lambda b: read(model_inputs(b, device)),
                                       self.bank_loader, self.ctx):
                yield pair
                bar.advance()
        if self.live is not None and model is self.live.model:
            model.train()
        else:
            self.release(model)

    # -- the student ---------------------------------------------------------------
    def student(self, train_mode: bool) -> nn.Module:
        assert self.live is not None
        self.live.model.train(train_mode)  # back to train mode once encoded
        if train_mode and not self.head_dropout:
            set_head_mode(self.live.model, False)
        return self.live.model

    def _snapshot_mode(self, copy_: nn.Module, train_mode: bool) -> nn.Module:
        if train_mode:  # the reference encodes unstructured snapshots with dropout on
            set_dropout(copy_, True)
            if not self.head_dropout:
                set_head_mode(copy_, False)
        return copy_

    def student_copy(self, train_mode: bool) -> nn.Module:
        assert self.live is not None and self.skeleton is not None
        if self.strategy.shards_parameters:
            target = self.skeleton()
            with self.strategy.gathered(self.live.model) as bare:
                load_full_state(target, bare)
            out = self.strategy.prepare_reference(freeze(target))
        else:
            out = self.strategy.prepare_reference(
                snapshot_copy(self.strategy.unwrap(self.live.model)))
        return self._snapshot_mode(out, train_mode)

    def model_state(self, model: nn.Module) -> dict[str, Tensor]:
        with self.strategy.gathered(model) as bare:
            return full_state(bare)

    def restore_copy(self, state: dict[str, Tensor], train_mode: bool) -> nn.Module:
        assert self.live is not None and self.skeleton is not None
        if self.strategy.shards_parameters:
            target = self.skeleton()
            _copy_state(target, state)
            out = self.strategy.prepare_reference(freeze(target))
        else:
            out = copy.deepcopy(self.strategy.unwrap(self.live.model))
            _copy_state(out, state)
            out = self.strategy.prepare_reference(freeze(out))
        return self._snapshot_mode(out, train_mode)


@torch.no_grad()
def _copy_state(model: nn.Module, state: dict[str, Tensor]) -> None:
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        t.copy_(state[name].to(t.device, t.dtype))


def plan_snapshots(cap: CAPConfig, views: int, num_examples: int, hidden: int,
                   world_size: int, student: nn.Module, adapter: EncoderAdapter,
                   learns_scores: bool, shard_copies: bool, schedule: str,
                   log: Callable[[str], None]) -> dict[str, Any] | None:
    """The memory the SnC snapshots will take per rank, logged before anything is
    encoded (None when no enabled module keeps snapshots).

    Args:
        cap: the ``cap`` section; views: R_max, the snapshots kept per example.
        num_examples, hidden: bank rows and width.
        student: the bare student (an online snapshot is a frozen copy of it, plus a
            score per prunable weight when ``learns_scores``).
        shard_copies: copies are sharded over the ranks (zero3 / fsdp2 with
            ``distributed.shard_references``).
        schedule: what decides when snapshots are taken (for the log).
        log: where the line goes.
    """
    if not any(CONTRASTIVE_MODULES[n].snapshots for n in cap.enabled_modules()):
        return None
    copy_bytes = sum(t.numel() * t.element_size()
                     for t in [*student.parameters(), *student.buffers()])
    if learns_scores:
        copy_bytes += sum(m.weight.numel() * 4
                          for m in adapter.prunable_linears(student).values())
    if shard_copies:
        copy_bytes = -(-copy_bytes // world_size)
    plan = snapshot_memory(cap, views, num_examples, hidden, world_size, copy_bytes)
    plan["schedule"] = schedule
    limit = "all" if cap.max_snapshots is None else "at most"
    log(f"SnC ({schedule} schedule): {limit} {views} snapshot(s) kept, one "
        f"{plan['per_view']} each: {plan['bytes_per_view'] / 2**30:.3f} GiB per "
        f"snapshot, {plan['bytes'] / 2**30:.3f} GiB in all, per rank")
    return plan
