"""Resumable checkpoints: everything a killed CAP run needs to continue exactly.

A checkpoint is a directory ``<checkpoint.dir>/step-XXXXXXXX`` holding

* ``model.pt`` / ``optimizer.pt``: the student (weights, mask scores, the masks'
  keep-fraction / threshold buffers), AdamW and LR-schedule state, written by the
  strategy (:meth:`capscale.distributed.Strategy.save_state`); sharded strategies have
  every rank write its own shards instead: ``deepspeed/`` (zero3, the engine's
  checkpoint) or ``dcp/`` + ``scheduler.pt`` (fsdp2, torch.distributed.checkpoint);
* ``banks.pt``: the SnC snapshot bank. PrC and FiC banks are not saved: they are encodings
  of frozen models in eval mode, re-encoded bit-exactly when the run is set up again;
* ``rng_rank{r}.pt``: torch / numpy / python RNG states of rank ``r`` and the train
  loader's generator state at the start of the current epoch;
* ``trainer_state.json``: step, data position (epoch, batches consumed in it), history,
  evaluations, pending snapshot milestones, skip counters and the run's config.

Writes are atomic: every file goes into ``.tmp-step-XXXXXXXX``, is fsynced, and the
directory is renamed into place, so a kill during a save leaves the previous checkpoint
as the latest one. Resuming restores the state, re-creates the epoch's permutation,
skips the batches already consumed and only then restores the RNG states, so the
remaining steps draw the same dropout masks as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from .config import Config, ConfigError, config_to_dict

if TYPE_CHECKING:
    from .train import CAPPruner

PREFIX = "step-"
STATE_FILE = "trainer_state.json"
# Test hook: sleep this long in the middle of writing the checkpoint of step
# CAPSCALE_TEST_STALL_CHECKPOINT_STEP (a test SIGKILLs the process meanwhile).
STALL_STEP_ENV = "CAPSCALE_TEST_STALL_CHECKPOINT_STEP"
# Config fields that may change between a killed run and its resumption.
RESUMABLE_CHANGES = ("resume", "output_dir", "checkpoint.", "report.", "train.progress",
                     "train.num_threads", "train.on_nonfinite", "train.max_nonfinite_skips",
                     "train.collective_timeout_s", "train.debug_nan_batches")


def checkpoint_root(cfg: Config) -> Path:
    return Path(cfg.checkpoint.dir or Path(cfg.output_dir) / "checkpoints")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp dirs are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(cfg: Config) -> Path | None:
    """The checkpoint ``cfg.resume`` names (None: start fresh).

    ``latest`` with no checkpoint yet starts fresh, so one command line serves both the
    first launch and every relaunch of a preemptible job. Raises ConfigError when the
    checkpoint was written by a run with a different config.
    """
    if cfg.resume is None:
        return None
    path = Path(cfg.resume) if cfg.resume != "latest" else checkpoint_root(cfg)
    if not (path / STATE_FILE).is_file():  # a checkpoints folder: its newest entry
        found = list_checkpoints(path)
        if not found:
            if cfg.resume == "latest":
                return None
            raise ConfigError(f"resume = {cfg.resume!r}: no checkpoint there")
        path = found[-1]
    saved = json.loads((path / STATE_FILE).read_text())["config"]
    changed = _config_changes(saved, config_to_dict(cfg))
    if changed:
        raise ConfigError(f"resume = {path}: the checkpoint was written with a different "
                          f"config ({'; '.join(changed[:5])}); resume with the same config")
    return path


def _config_changes(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if any(name == c or name.startswith(c) for c in RESUMABLE_CHANGES):
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def rng_state() -> dict[str, Any]:
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Saves the run every ``checkpoint.every_steps`` steps and keeps the newest K.

    Args:
        cfg: the run config.
        ctx: the distributed context (every rank calls :meth:`save`).
    """

    def __init__(self, cfg: Config, ctx: Any) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.root = checkpoint_root(cfg)
        self.every = cfg.checkpoint.every_steps
        self.keep_last = cfg.checkpoint.keep_last

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, run: CAPPruner) -> Path:
        """Write the whole run state atomically; returns the checkpoint directory."""
        ctx, name = self.ctx, f"{PREFIX}{run.step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ctx.barrier()
        files = run.strategy.save_state(tmp, run.student, run.optimizer, run.scheduler)
        rng = {**rng_state(), "loader_epoch_start": run.loader_state}
        torch.save(rng, tmp / f"rng_rank{ctx.rank}.pt")
        files.append(tmp / f"rng_rank{ctx.rank}.pt")
        if ctx.is_main:
            files += self._write_main(run, tmp)
        for f in files:
            _fsync(f)
        ctx.barrier()
        if ctx.is_main:
            self._commit(tmp, final)
        ctx.barrier()
        return final

    def _write_main(self, run: CAPPruner, tmp: Path) -> list[Path]:
        files = []
        if "snc" in run.objective.banks:
            torch.save(run.objective.banks["snc"].state_dict(), tmp / "banks.pt")
            files.append(tmp / "banks.pt")
        if os.environ.get(STALL_STEP_ENV) == str(run.step):
            time.sleep(120)
        state = {"step": run.step, "epoch": run.epoch, "batches_done": run.batches_done,
                 "batches_drawn": run.batches_drawn, "skipped_steps": run.skipped_steps,
                 "consecutive_skips": run.consecutive_skips, "sparsity": run.pruner.sparsity,
                 "milestones": run.milestones, "world_size": self.ctx.world_size,
                 "history": run.history, "evals": run.evals,
                 "config": config_to_dict(self.cfg)}
        (tmp / STATE_FILE).write_text(json.dumps(state))
        return [*files, tmp / STATE_FILE]

    def _commit(self, tmp: Path, final: Path) -> None:
        _fsync(tmp)
        if final.exists():  # re-saving a step after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync(self.root)
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for stale in self.root.glob(f".tmp-{PREFIX}*"):  # left by a kill mid-save
            shutil.rmtree(stale, ignore_errors=True)


@dataclass
class ResumePoint:
    """Where a resumed run continues: the epoch, batches consumed in it, RNG states."""

    path: Path
    epoch: int
    batches_done: int
    rng: dict[str, Any]

    def batches(self, loader: DataLoader, set_epoch: Any) -> Iterator[Any]:
        """The rest of the interrupted epoch: same permutation, consumed batches skipped.

        RNG states are restored only after the skip, because creating the loader's
        iterator draws from the global generator when the loader has none of its own.
        """
        if loader.generator is not None and self.rng["loader_epoch_start"] is not None:
            loader.generator.set_state(self.rng["loader_epoch_start"])
        else:
            set_epoch(loader, self.epoch)
        it = iter(loader)
        for _ in range(self.batches_done):
            next(it)
        set_rng_state(self.rng)
        return it


def load_checkpoint(run: CAPPruner, path: str | Path) -> ResumePoint:
    """Restore a set-up run from ``path``; returns where its loop continues."""
    path, ctx = Path(path), run.ctx
    state = json.loads((path / STATE_FILE).read_text())
    if state["world_size"] != ctx.world_size:
        raise ConfigError(f"resume = {path}: saved with {state['world_size']} processes, "
                          f"resumed with {ctx.world_size}; relaunch with the same number")
    run.strategy.load_state(path, run.student, run.optimizer, run.scheduler)
    if "snc" in run.objective.banks:
        run.objective.banks["snc"].load_state_dict(torch.load(path / "banks.pt",
                                                              weights_only=True))
    run.step, run.batches_drawn = state["step"], state["batches_drawn"]
    run.skipped_steps, run.consecutive_skips = state["skipped_steps"], state["consecutive_skips"]
    run.pruner.sparsity, run.milestones = state["sparsity"], state["milestones"]
    run.history, run.evals = state["history"], state["evals"]
    rng = torch.load(path / f"rng_rank{ctx.rank}.pt", weights_only=False)
    run.loader_state = rng["loader_epoch_start"]
    return ResumePoint(path, state["epoch"], state["batches_done"], rng)
