"""RunState: the run's progress as one value that checkpoints and restores itself."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor


def rng_state() -> dict[str, Any]:
    """torch / numpy / python (and CUDA) generator states of this process."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class RunState:
    """Where a run is: optimiser step, data position, fault counters, logs, RNG.

    ``state_dict`` is the JSON-able part (written once, by the main rank);
    ``rank_state`` the per-rank tensors (RNG states and the train loader's generator at
    the start of the current epoch). After a restore, :attr:`pending_rng` holds the RNG
    states the loop re-applies once it has skipped the batches already consumed.
    """

    step: int = 0
    epoch: int = 0
    batches_done: int = 0  # batches consumed in the current epoch (skipped ones too)
    batches_drawn: int = 0  # batches drawn over the whole run
    skipped_steps: list[int] = field(default_factory=list)
    consecutive_skips: int = 0
    overflow_skips: int = 0  # fp16 steps skipped on a gradient overflow
    history: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    loader_state: Tensor | None = None
    pending_rng: dict[str, Any] | None = None
    resumed: bool = False

    _SAVED = ("step", "epoch", "batches_done", "batches_drawn", "skipped_steps",
              "consecutive_skips", "overflow_skips", "history", "evals")

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self._SAVED}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self._SAVED:
            setattr(self, k, state[k])
        self.resumed = True

    def rank_state(self) -> dict[str, Any]:
        return {**rng_state(), "loader_epoch_start": self.loader_state}

    def load_rank_state(self, state: dict[str, Any]) -> None:
        self.loader_state = state["loader_epoch_start"]
        self.pending_rng = state


class RankPart:
    """The per-rank half of a RunState, as a checkpoint entry of its own."""

    def __init__(self, state: RunState) -> None:
        self.run_state = state

    def state_dict(self) -> dict[str, Any]:
        return self.run_state.rank_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run_state.load_rank_state(state)
