"""TF32 for the fp32 matmuls of a CUDA run (``train.tf32``).

On Ampere and later GPUs, TensorFloat-32 runs an fp32 matmul or convolution on the
tensor cores, its inputs rounded to a 10-bit mantissa (about 1e-3 relative) and the
sums kept in fp32: several times the throughput of full fp32. torch leaves
it off for matmuls by default, so an fp32 run (``train.precision: fp32``, or ``auto``
where it does not resolve to bf16) would leave the tensor cores idle. bf16 / fp16 runs
already compute in half precision under autocast and are left as torch has them. The
switch is process-wide, so it is set once, when the run starts.
"""

from __future__ import annotations

import torch

from capscale.distributed.precision import resolve_precision


def runs_fp32(device: torch.device, precision: str) -> bool:
    """Whether a run on ``device`` computes in fp32 under ``train.precision``: ``fp32``,
    or ``auto`` where it does not resolve to bf16 (a CPU, a CUDA device without bf16),
    as ``train.precision`` resolves ``auto``."""
    return resolve_precision(precision, device.type) == "fp32"


def set_tf32(device: torch.device, enabled: bool, precision: str) -> bool:
    """Set TF32 for CUDA fp32 matmuls and cuDNN convolutions to ``enabled`` when the
    run is an fp32 run on CUDA; returns whether TF32 is now on for the run.

    CPU runs and half-precision runs change nothing. torch 2.9 and later take the
    setting through ``fp32_precision`` (``tf32`` / ``ieee``) and refuse a mix with the
    older ``allow_tf32`` flags, so the older flags are set only on an older torch.
    """
    if device.type != "cuda" or not runs_fp32(device, precision):
        return False
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(matmul, "fp32_precision"):
        mode = "tf32" if enabled else "ieee"
        matmul.fp32_precision = mode
        conv.conv.fp32_precision = mode  # type: ignore[attr-defined]
    else:
        matmul.allow_tf32 = enabled
        conv.allow_tf32 = enabled
    return enabled
