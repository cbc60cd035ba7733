"""The one training loop: CAP pruning, structured retraining and teacher fine-tuning.

:class:`TrainLoop` walks epochs and batches to ``total_steps`` optimiser steps, and is
the only place that knows the data position: it re-creates an interrupted epoch's
permutation, skips the batches already consumed and only then restores the RNG states,
so a resumed run draws the same batches and dropout masks as an uninterrupted one.
Everything else joins through :class:`LoopHook` (pruning schedules, snapshots,
evaluation, trackers) and the step function.

A step function times its parts with :class:`~capscale.train.hooks.Phases`
(``forward``, ``teacher``, ``contrastive``, ``backward``, ``optimizer``,
``mask_update``); benchmarks and the report listen to the phases instead of copying
the step.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from capscale.console import Console, format_losses
from capscale.distributed.precision import GradientOverflow
from capscale.train.hooks import LoopHook, Record
from capscale.train.state import RunState, set_rng_state

# fp16 overflows in a row that end a run: halving the loss scale from 2**16 that often
# leaves it below 2**-48, where no finite gradient overflows.
MAX_OVERFLOWS_IN_A_ROW = 64


def set_epoch(loader: DataLoader, epoch: int) -> None:
    """Seed ``loader``'s order for ``epoch`` (sampler epoch, or its own generator)."""
    if isinstance(loader.sampler, DistributedSampler):
        loader.sampler.set_epoch(epoch)
    elif loader.generator is not None:
        loader.generator.manual_seed(hash((int(loader.generator.initial_seed()), epoch))
                                     % 2**62)


class TrainLoop:
    """``total_steps`` optimiser steps over as many epochs as they take.

    Args:
        state: the run's progress (a restored one continues where it stopped).
        loader: the training batches (re-seeded per epoch by :func:`set_epoch`).
        total_steps: optimiser steps of the whole run.
        step_fn: the micro-batches of one optimiser step -> its record (loss components,
            sparsity, ...); raises FloatingPointError for a non-finite loss (nothing was
            updated then).
        console: progress and log lines.
        description: the progress bar's title.
        hooks: called in order at each point (see :class:`LoopHook`); saving
            checkpoints is one of them (capscale.train.checkpoint.CheckpointHook).
        lr_fn: the current learning rate, for the records.
        on_nonfinite, max_nonfinite_skips: ``stop`` re-raises a non-finite step;
            ``skip`` drops the batch, up to that many in a row. An fp16 step whose
            gradients overflowed (GradientOverflow) is always dropped and counted in
            ``state.overflow_skips``: loss scaling expects it, and the lowered scale
            makes the next try finite. A dropped batch is not replaced: the epochs
            (``ceil(total_steps / steps per epoch)``) end as planned, one step short
            per dropped batch, so the SnC snapshots and banks keep their planned views.
        world_size: ranks sharing each step (examples per second count all of them).
        accumulation: micro-batches per optimiser step (``train.
            gradient_accumulation_steps``); an epoch has ``len(loader) // accumulation``
            steps, its last ``len(loader) % accumulation`` batches are not trained on.
    """

    def __init__(self, state: RunState, loader: DataLoader, total_steps: int,
                 step_fn: Callable[[list[dict[str, Tensor]]], Record], console: Console,
                 description: str, hooks: list[LoopHook] | None = None,
                 lr_fn: Callable[[], float] | None = None, on_nonfinite: str = "stop",
                 max_nonfinite_skips: int = 0, world_size: int = 1,
                 accumulation: int = 1) -> None:
        self.state, self.loader, self.total_steps = state, loader, total_steps
        self.step_fn, self.console, self.description = step_fn, console, description
        self.hooks = hooks or []
        self.lr_fn = lr_fn
        self.on_nonfinite, self.max_skips = on_nonfinite, max_nonfinite_skips
        self.world_size, self.accumulation = world_size, accumulation
        self.overflows_in_a_row = 0

    def run(self) -> None:
        st = self.state
        k = self.accumulation
        epochs = math.ceil(self.total_steps / max(len(self.loader) // k, 1))
        resuming = st.resumed
        with self.console.progress(self.description, self.total_steps) as bar:
            bar.advance(st.step)
            for epoch in range(st.epoch, epochs):
                if not resuming:
                    self._call("on_epoch_start", epoch)
                batches = self._epoch_batches(epoch, resuming)
                resuming = False
                t0, seen = time.perf_counter(), 0
                while st.step < self.total_steps:
                    group = list(itertools.islice(batches, k))
                    if len(group) < k:  # the epoch's end (or a remainder of < k batches)
                        break
                    rec = self._guarded_step(group)
                    st.batches_done += k
                    if rec is None:
                        continue
                    seen += sum(int(b["input_ids"].shape[0]) for b in group) * self.world_size
                    rec.update(step=st.step, epoch=epoch,
                               examples_per_s=seen / max(time.perf_counter() - t0, 1e-9))
                    if self.lr_fn is not None:
                        rec["lr"] = self.lr_fn()
                    st.history.append(rec)
                    self._call("after_step", rec)
                    bar.advance(1, _status(rec))
                self._call("on_epoch_end", epoch)
        self._call("on_end")

    def _call(self, point: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, point)(*args)

    def _epoch_batches(self, epoch: int, resuming: bool) -> Iterator[dict[str, Tensor]]:
        """This epoch's batches: a fresh permutation, or the rest of a resumed one.

        RNG states are restored only after the skip, because creating the loader's
        iterator draws from the global generator when the loader has none of its own.
        """
        st, loader = self.state, self.loader
        st.epoch = epoch
        if resuming:
            if loader.generator is not None and st.loader_state is not None:
                loader.generator.set_state(st.loader_state)
            else:
                set_epoch(loader, epoch)
            it = iter(loader)
            for _ in range(st.batches_done):
                next(it)
            if st.pending_rng is not None:
                set_rng_state(st.pending_rng)
                st.pending_rng = None
            return it
        set_epoch(loader, epoch)
        st.batches_done = 0
        st.loader_state = loader.generator.get_state() if loader.generator is not None \
            else None
        return iter(loader)

    def _guarded_step(self, group: list[dict[str, Tensor]]) -> Record | None:
        """One optimiser step on the micro-batches ``group``, or None when a non-finite
        loss is skipped (train.on_nonfinite)."""
        st = self.state
        self._call("before_step", st.step)
        try:
            rec = self.step_fn(group)
        except GradientOverflow as err:
            st.overflow_skips += 1
            self.overflows_in_a_row += 1
            if self.overflows_in_a_row > MAX_OVERFLOWS_IN_A_ROW:
                raise FloatingPointError(
                    f"{err}; {self.overflows_in_a_row} steps in a row overflowed: the "
                    "gradients are not finite at any loss scale (try bf16 or fp32)") from err
            self.console.log(f"skipped step {st.step}: {err}")
            return None
        except FloatingPointError as err:
            if self.on_nonfinite == "stop":
                raise
            if st.consecutive_skips >= self.max_skips:
                raise FloatingPointError(f"{err}; {self.max_skips + 1} batches in a row were "
                                         "non-finite (train.max_nonfinite_skips)") from err
            st.consecutive_skips += 1
            st.skipped_steps.append(st.step)
            self.console.log(f"skipped a {'step' if len(group) > 1 else 'batch'}: {err}")
            return None
        finally:
            st.batches_drawn += len(group)
        st.consecutive_skips = 0
        self.overflows_in_a_row = 0
        st.step += 1
        return rec


def _status(rec: Record) -> str:
    shown = {k: v for k, v in rec.items() if k not in (
        "step", "epoch", "lr", "examples_per_s", "sparsity")}
    sp = f"sp={rec['sparsity']:.2f} " if "sparsity" in rec else ""
    return f"{sp}{format_losses(shown)} {rec['examples_per_s']:.0f} ex/s"


def finite_or_raise(losses: dict[str, Tensor], total: Tensor, step: int,
                    all_reduce: Callable[[Tensor], Tensor]) -> None:
    """Raise FloatingPointError when the loss is non-finite on any rank; every rank
    agrees, or one would skip the all-reduce the others wait in."""
    bad_ranks = all_reduce(torch.tensor([float(not torch.isfinite(total))]))
    if bad_ranks.item() > 0:
        bad = [k for k, v in losses.items() if not torch.isfinite(v)] or ["on another rank"]
        raise FloatingPointError(f"non-finite loss at step {step}: {', '.join(bad)}")
