"""The run's arithmetic: ``train.precision`` and ``cap.reference_dtype`` resolved for a
device and a strategy.

What stays fp32 whatever the precision, and why:

* the student's master weights, the learned scores and their AdamW moments: a score
  update is ``score_lr`` times a small gradient (1e-2 x 1e-4 is typical), far below
  bf16's resolution near a score of 1 (2**-7), so in bf16 storage most updates would
  round away and movement pruning would stop learning;
* the masks (``{0, 1}``, exact in any dtype, but the top-k that picks them ranks the
  scores as the forward sees them, see below);
* the loss arithmetic: contrastive similarities, their log-sum-exp and the KD softmax
  run on fp32 copies of the representations and logits, outside autocast (a 4096-way
  log-sum-exp at temperature 0.1 in bf16 loses the small differences InfoNCE learns
  from).

How each strategy runs a low precision:

* ``single`` / ``ddp``: ``torch.autocast`` around the forward passes; parameters stay
  fp32, autocast casts them per matmul.
* ``fsdp2``: autocast plus FSDP2's ``MixedPrecisionPolicy``: each unit all-gathers its
  parameters in the low dtype (half the traffic and the gathered memory), gradients
  are reduced in fp32 into the fp32 shards the optimiser steps. The scores are
  gathered in the low dtype too, so the forward's top-k ranks rounded scores; the
  global threshold is therefore taken over the rounded local shards as well
  (:meth:`Precision.ranked`), or the two would disagree at the threshold.
* ``zero3``: DeepSpeed's own ``bf16`` / ``fp16`` section: 16-bit parameter partitions
  with fp32 master partitions in its optimiser (and, for fp16, DeepSpeed's dynamic loss
  scaler). No autocast: the module itself is in the low dtype.

fp16 outside DeepSpeed uses torch's ``GradScaler``: the loss is scaled before backward,
the gradients unscaled before clipping; a step whose gradients overflow on any rank is
skipped on every rank (no optimiser, LR or pruning-schedule step) and counted, and the
scale halves. The overflow is agreed over ranks because FSDP2's ranks each see only
their gradient shards: one rank stepping while another skips would split the model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

PrecisionName = Literal["fp32", "bf16", "fp16"]
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16,
                                  "fp16": torch.float16}


def cuda_bf16() -> bool:
    """Whether this process's CUDA device runs bf16 (Ampere and later)."""
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def resolve_precision(requested: str, device_type: str) -> PrecisionName:
    """``auto`` -> bf16 on a CUDA device that has it, else fp32 (bf16 on a CPU is slower
    than fp32 on most CPUs without AMX); any other name is returned as is."""
    if requested != "auto":
        return requested  # type: ignore[return-value]
    return "bf16" if device_type == "cuda" and cuda_bf16() else "fp32"


def precision_refusal(requested: str, reference_dtype: str, strategy: str,
                      cuda: bool) -> str | None:
    """One line when this machine cannot run the precision under ``strategy``, checked
    before any model loads; None when it can."""
    name = resolve_precision(requested, "cuda" if cuda else "cpu")
    low = {name, resolve_reference(reference_dtype, name)} - {"fp32"}
    if cuda and "bf16" in low and not cuda_bf16():
        return (f"train.precision={requested}: this GPU has no bf16 (compute capability "
                "< 8.0); use fp16 or fp32")
    if not cuda and "fp16" in low and strategy == "zero3" and not _cpu_fp16():
        return ("train.precision=fp16 with strategy=zero3: DeepSpeed's CPU accelerator on "
                "this machine has no fp16; use bf16 or fp32")
    return None


def _cpu_fp16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_reference(requested: str, precision: str) -> PrecisionName:
    """``cap.reference_dtype``: ``auto`` is the compute dtype of the training precision."""
    return precision if requested == "auto" else requested  # type: ignore[return-value]


@dataclass(frozen=True)
class Precision:
    """A resolved precision on a device.

    Args:
        name: ``fp32`` / ``bf16`` / ``fp16`` (``auto`` resolved).
        device_type: ``cpu`` or ``cuda`` (autocast's device type).
        reference: the frozen references' weight dtype name.
        autocast_forward: whether forward passes run under autocast (every strategy but
            ZeRO-3, whose module is in the low dtype itself).
    """

    name: PrecisionName = "fp32"
    device_type: str = "cpu"
    reference: PrecisionName = "fp32"
    autocast_forward: bool = True

    @property
    def low(self) -> bool:
        return self.name != "fp32"

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of the student's matmuls."""
        return DTYPES[self.name]

    @property
    def reference_dtype(self) -> torch.dtype:
        return DTYPES[self.reference]

    def autocast(self) -> contextlib.AbstractContextManager:
        """The student's and the references' forward passes run inside this."""
        if not self.low or not self.autocast_forward:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def exact(self) -> contextlib.AbstractContextManager:
        """Loss arithmetic runs inside this: autocast off (its inputs cast to fp32)."""
        if not self.low:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, enabled=False)

    def scaler(self) -> torch.amp.GradScaler | None:
        """fp16's dynamic loss scaler (None for bf16 / fp32, and under DeepSpeed, which
        scales with its own)."""
        if self.name != "fp16" or not self.autocast_forward:
            return None
        return torch.amp.GradScaler(self.device_type)

    def ranked(self, scores: torch.Tensor) -> torch.Tensor:
        """``scores`` as a forward that gathers parameters in the low dtype sees them."""
        return scores.to(self.dtype).float() if self.low else scores


def run_precision(requested: str, reference_dtype: str, device: torch.device,
                  strategy: str) -> Precision:
    """The :class:`Precision` of a run (its config values, device and strategy)."""
    name = resolve_precision(requested, device.type)
    return Precision(name, device.type, resolve_reference(reference_dtype, name),
                     autocast_forward=strategy != "zero3")


class GradientOverflow(ArithmeticError):
    """fp16's scaled gradients overflowed: the optimiser step was skipped (not an
    error: the loss scale was too large and has been lowered)."""
