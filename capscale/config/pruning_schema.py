"""The pruning sections of the configuration: ``pruning`` and ``structured``.

Part of the schema (capscale.config.schema re-exports both); each section checks its
own values, cross-section rules live in capscale.checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Check = tuple[bool, str, str]  # (ok, field, why)


@dataclass
class PruningConfig:
    """What is pruned and on which schedule (the method table: capscale.pruning.methods)."""

    # A name in the method table: ``movement``, ``soft_movement``, ``magnitude``
    # (weights), ``structured`` (CAP-f: heads and FFN neurons, see ``structured``),
    # ``none`` (no pruning: plain distillation).
    method: str = "movement"
    # ``unstructured`` or ``N:M`` (e.g. ``2:4``, movement or magnitude): at most N of every
    # M consecutive input weights of a row kept, the layout GPU sparse tensor cores run;
    # ``final_sparsity`` must then be 1 - N / M.
    pattern: str = "unstructured"
    # Fraction of prunable encoder weights removed at the end of the schedule (structured
    # cubic and hybrid: the fraction of heads and of FFN neurons).
    final_sparsity: float = 0.9
    initial_sparsity: float = 0.0
    # ``local``: top-k per matrix (reference); ``global``: one threshold over all matrices.
    scope: Literal["local", "global"] = "local"
    # Cubic schedule: dense for the first ``initial_warmup`` steps, final for the last
    # ``final_warmup``. A value in [0, 1) is a fraction of the run's steps, a whole number
    # >= 1 a step count (reference GLUE: 22000 and 33000, i.e. 2x and 3x its LR warm-up).
    initial_warmup: float = 0.1
    final_warmup: float = 0.2
    score_lr: float = 1e-2
    score_init: float = 0.0
    # Learned scores start at ``score_warm_start_scale * |W| / mean|W|`` per matrix
    # (``magnitude``, the default) or at ``score_init`` (``none``, the reference, pinned by
    # the paper recipes): from |W| the first masks are magnitude masks that movement
    # reorders; from 0 they rank a few steps of AdamW noise, which on short schedules can
    # remove weights the model needs and collapse the run (bench/short_schedule.py; see
    # capscale.pruning.unstructured.warm_start_from_magnitude, capscale.train.collapse).
    score_warm_start: Literal["none", "magnitude"] = "magnitude"
    score_warm_start_scale: float = 0.1
    # Soft movement: an L1 penalty on sigmoid(S) ramped to ``final_lambda``; the mask is
    # ``soft_threshold: target`` the top 1 - s_t of the scores (the scheduled sparsity
    # reached at every step; global with ``scope: global``), or ``schedule`` (the
    # reference) sigmoid(S) > tau_t with tau going 0 -> final_threshold, the sparsity
    # left to the penalty (see capscale.pruning.weight_rules).
    soft_threshold: Literal["target", "schedule"] = "target"
    final_threshold: float = 0.1
    final_lambda: float = 100.0
    min_keep: float = 0.005
    # Zero pruned weights (and their gradients) after every optimiser step, under every
    # strategy. Off (the reference): a pruned weight keeps its value and its score a
    # gradient (dL/dW' * W), so it can regrow; the forward output is the same either way.
    zero_pruned_weights: bool = False
    # Latency target (structured, hybrid): measure the model the run would export (hybrid:
    # every ``latency_every`` steps while pruning; structured: after each update), at
    # batch ``latency_batch_size`` x ``latency_seq_length`` tokens on the run's device,
    # and stop pruning at the first sparsity whose latency (ms, median of
    # ``latency_repeats`` forwards) is at most the target; ``final_sparsity`` is then the
    # most it may prune (see capscale.pruning.latency).
    target_latency_ms: float | None = None
    latency_batch_size: int = 32
    latency_seq_length: int = 128
    latency_repeats: int = 3
    latency_every: int = 50

    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, None when unstructured (ValueError if malformed)."""
        if self.pattern == "unstructured":
            return None
        n, m = (int(x) for x in self.pattern.split(":"))
        if not 0 < n < m:
            raise ValueError(self.pattern)
        return n, m

    def _pattern_problem(self) -> str | None:
        try:
            nm = self.nm()
        except ValueError:
            return "must be 'unstructured' or 'N:M' with 0 < N < M, e.g. '2:4'"
        if nm is None:
            return None
        if self.method not in ("movement", "magnitude"):
            return f"an N:M pattern needs method movement or magnitude (got {self.method})"
        if abs(self.final_sparsity - (1 - nm[0] / nm[1])) > 1e-9:
            return (f"{self.pattern} means final_sparsity {1 - nm[0] / nm[1]:g} "
                    f"(got {self.final_sparsity:g})")
        return None

    def check(self) -> list[Check]:
        problem = self._pattern_problem()
        return [
            (problem is None, "pruning.pattern", problem or ""),
            (0.0 <= self.final_sparsity < 1.0, "pruning.final_sparsity", "must be in [0, 1)"),
            (0.0 <= self.initial_sparsity <= self.final_sparsity, "pruning.initial_sparsity",
             "must be in [0, pruning.final_sparsity]"),
            (self.initial_warmup >= 0 and self.final_warmup >= 0, "pruning.initial_warmup",
             "warm-ups must be >= 0"),
            (all(w < 1 or float(w).is_integer() for w in (self.initial_warmup,
                                                         self.final_warmup)),
             "pruning.initial_warmup", "a warm-up is a fraction in [0, 1) or a whole number "
             "of steps (initial_warmup and final_warmup)"),
            (self.score_lr > 0, "pruning.score_lr", "must be > 0"),
            (self.score_warm_start_scale > 0, "pruning.score_warm_start_scale", "must be > 0"),
            (0 < self.final_threshold < 1, "pruning.final_threshold", "must be in (0, 1)"),
            (0 <= self.min_keep <= 1, "pruning.min_keep", "must be in [0, 1]"),
            (self.target_latency_ms is None or self.target_latency_ms > 0,
             "pruning.target_latency_ms", "must be > 0 or null"),
            (min(self.latency_batch_size, self.latency_seq_length, self.latency_repeats,
                 self.latency_every) >= 1, "pruning.latency_batch_size",
             "latency_batch_size, latency_seq_length, latency_repeats and latency_every "
             "must be >= 1"),
        ]


@dataclass
class StructuredConfig:
    """Structured CAP (CAP-f): heads and FFN neurons (see capscale.pruning.structured)."""

    # ``iterative``: prune to each of ``levels`` in turn, retraining in between
    # (reference); ``cubic``: one run, masks recomputed every ``update_every`` steps
    # following pruning.final_sparsity / initial_warmup / final_warmup.
    schedule: Literal["iterative", "cubic"] = "iterative"
    # Sparsity milestones (fraction of heads and of FFN neurons removed, the same for
    # both); the run evaluates and snapshots at each one.
    levels: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7,
                                                         0.8, 0.9])
    # Retraining after each iterative step, with a fresh optimiser and LR schedule:
    # ``retrain_steps`` when set, else ``retrain_epochs`` epochs.
    retrain_epochs: int = 2
    retrain_steps: int | None = None
    # Fraction of the training set whose |dL/dmask| is summed for the importance.
    importance_fraction: float = 1.0
    # Heads kept in every layer whatever their importance (reference: 1).
    min_heads_per_layer: int = 1
    # Cubic schedule: recompute importance and masks every K optimiser steps.
    update_every: int = 50
    # A layer's attention (FFN) block whose heads (neurons) are all pruned is skipped,
    # its output the block's input, and removed from the export (a layer with both
    # removed is gone); false: it keeps adding its output bias, as the reference does.
    # Emptying attention blocks needs min_heads_per_layer: 0 (structured) or
    # pruning.scope: global (hybrid, whose learned unit scores empty them).
    remove_empty_blocks: bool = False
    # Fraction of the hidden dimensions (the residual stream's width, shared by the
    # embeddings and every layer) pruned at the end, reached in proportion to the
    # head / neuron schedule, 8 dimensions at a time (post-LN encoders; 0: none).
    # structured ranks them by Taylor importance, hybrid by movement scores.
    hidden_sparsity: float = 0.0

    def check(self) -> list[Check]:
        return [
            (len(self.levels) > 0 and all(0 < v < 1 for v in self.levels)
             and self.levels == sorted(set(self.levels)), "structured.levels",
             "must be a non-empty increasing list of sparsities in (0, 1)"),
            (self.retrain_epochs >= 1, "structured.retrain_epochs", "must be >= 1"),
            (self.retrain_steps is None or self.retrain_steps >= 1,
             "structured.retrain_steps", "must be >= 1 or null"),
            (0 < self.importance_fraction <= 1, "structured.importance_fraction",
             "must be in (0, 1]"),
            (self.min_heads_per_layer >= 0, "structured.min_heads_per_layer", "must be >= 0"),
            (self.update_every >= 1, "structured.update_every", "must be >= 1"),
            (0 <= self.hidden_sparsity < 1, "structured.hidden_sparsity", "must be in [0, 1)"),
        ]
