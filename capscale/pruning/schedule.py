"""The cubic sparsity schedule (Zhu & Gupta, 2017; used by movement pruning and CAP).

A pure function of the optimiser step, so resuming, sharding or evaluating it anywhere
gives the same value.
"""

from __future__ import annotations


def cubic_sparsity(step: int, total_steps: int, initial: float, final: float,
                   initial_warmup: int, final_warmup: int) -> float:
    """Target sparsity at ``step``.

    Dense-to-``initial`` for ``step <= initial_warmup``, ``final`` for
    ``step > total_steps - final_warmup``, and in between
    ``final + (initial - final) * (1 - (step - t_i) / (T - t_i - t_f)) ** 3``.

    Args:
        step: optimiser steps done so far (0-based).
        total_steps: T, the run's total optimiser steps.
        initial, final: sparsity at the start and at the end of the ramp, in [0, 1).
        initial_warmup: t_i, steps held at ``initial``.
        final_warmup: t_f, steps held at ``final`` at the end.
    """
    if step <= initial_warmup:
        return initial
    ramp = total_steps - initial_warmup - final_warmup
    if step > total_steps - final_warmup or ramp <= 0:
        return final
    progress = (step - initial_warmup) / ramp
    return final + (initial - final) * (1.0 - progress) ** 3


def warmup_steps(value: float, total_steps: int) -> int:
    """A warm-up given as a fraction (< 1) of the run or as a step count (>= 1)."""
    return round(value * total_steps) if value < 1 else int(value)
