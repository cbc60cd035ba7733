"""The one place that touches torch.distributed, DeepSpeed and FSDP2.

``DistContext`` / ``init_distributed``: process group and collectives (context.py).
``Strategy`` and ``make_strategy``: how the student is wrapped and stepped and how frozen
references are sharded: ``single``, ``ddp`` (strategy.py), ``zero3`` (DeepSpeed ZeRO-3,
zero3.py) and ``fsdp2`` (torch ``fully_shard``, fsdp2.py). DeepSpeed is imported only
when ``zero3`` is chosen.
"""

from __future__ import annotations

from typing import Any

from capscale.distributed.context import (
    DistContext,
    init_distributed,
    launcher_strategy,
    resolve_strategy,
    shutdown_distributed,
)
from capscale.distributed.precision import run_precision
from capscale.distributed.strategy import Strategy, local_param_bytes, unwrap

STRATEGY_NAMES = ("single", "ddp", "zero3", "fsdp2")


def make_strategy(ctx: DistContext, options: Any = None, precision: str = "fp32",
                  reference_dtype: str = "auto") -> Strategy:
    """The strategy ``ctx.strategy`` names; ``options``: the config's ``distributed``;
    ``precision`` / ``reference_dtype``: ``train.precision`` and ``cap.reference_dtype``
    (capscale.distributed.precision)."""
    p = run_precision(precision, reference_dtype, ctx.device, ctx.strategy)
    if ctx.strategy in ("single", "ddp"):
        return Strategy(ctx, options, p)
    if ctx.strategy == "zero3":
        from capscale.distributed.zero3 import ZeRO3Strategy
        return ZeRO3Strategy(ctx, options, p)
    if ctx.strategy == "fsdp2":
        from capscale.distributed.fsdp2 import FSDP2Strategy
        return FSDP2Strategy(ctx, options, p)
    raise ValueError(f"unknown strategy {ctx.strategy!r}; known: {', '.join(STRATEGY_NAMES)}")


__all__ = [
    "STRATEGY_NAMES",
    "DistContext",
    "Strategy",
    "init_distributed",
    "launcher_strategy",
    "local_param_bytes",
    "make_strategy",
    "resolve_strategy",
    "shutdown_distributed",
    "unwrap",
]
