"""Resumable checkpoints of whatever registered itself, written atomically.

A checkpoint is a directory ``<checkpoint.dir>/step-XXXXXXXX``. The checkpointer knows
no run class: every stateful part of a run registers an entry, and the checkpointer
saves and restores entries by name, in registration order:

* ``register(name, obj, scope)`` with ``obj.state_dict()`` / ``obj.load_state_dict()``:
  ``scope="json"`` goes into ``trainer_state.json`` (main rank), ``"main"`` into
  ``<name>.pt`` written by the main rank and read by every rank, ``"rank"`` into
  ``<name>_rank{r}.pt``, one per rank. ``state_dict`` is called on every rank for
  every scope (it may be a collective);
* ``register_files(name, save, load)``: parts that write their own files, e.g. the
  student and its optimiser through the strategy (``model.pt`` / ``optimizer.pt``, or
  each rank's ZeRO-3 / FSDP2 shards under ``deepspeed/`` or ``dcp/``).

Writes are atomic: everything goes into ``.tmp-step-XXXXXXXX``, is fsynced, and the
directory is renamed into place once every rank has written its part, so a kill during
a save leaves the previous checkpoint as the latest one. ``trainer_state.json`` is
written last and marks a checkpoint as complete.

Saving joins the training loop as one more hook (:class:`CheckpointHook`, added last by
the recipe, so every other hook has updated its state when the step is saved). The
checkpointer is given its root, cadence, retention and the run's fingerprint (the
resolved config as a dict, which a resume must match); it imports no config.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capscale.errors import ConfigError
from capscale.train.hooks import LoopHook, Record

PREFIX = "step-"
STATE_FILE = "trainer_state.json"
# Test hook: sleep this long in the middle of writing the checkpoint of step
# CAPSCALE_TEST_STALL_CHECKPOINT_STEP (a test SIGKILLs the process meanwhile).
STALL_STEP_ENV = "CAPSCALE_TEST_STALL_CHECKPOINT_STEP"
# Config fields that may change between a killed run and its resumption.
RESUMABLE_CHANGES = ("resume", "output_dir", "checkpoint.", "report.", "train.progress",
                     "train.num_threads", "train.on_nonfinite", "train.max_nonfinite_skips",
                     "train.collective_timeout_s", "train.debug_nan_batches")


def checkpoint_root(checkpoint_dir: str | None, output_dir: str | Path) -> Path:
    """``checkpoint.dir``, or ``<output_dir>/checkpoints`` when it is not set."""
    return Path(checkpoint_dir or Path(output_dir) / "checkpoints")


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (temp dirs are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def saved_step(path: str | Path) -> int:
    """The optimiser step a complete checkpoint was written at."""
    return int(json.loads((Path(path) / STATE_FILE).read_text())["step"])


def resolve_resume(resume: str | None, root: Path, fingerprint: dict[str, Any]
                   ) -> Path | None:
    """The checkpoint ``resume`` names (None: start fresh).

    Args:
        resume: the config's ``resume``: None, ``latest`` (the newest checkpoint under
            ``root``) or a checkpoint directory (or a folder of them).
        root: the run's checkpoint folder (:func:`checkpoint_root`).
        fingerprint: the run's resolved config as a dict.

    ``latest`` with no checkpoint yet starts fresh, so one command line serves both the
    first launch and every relaunch of a preemptible job. Raises ConfigError when the
    checkpoint was written by a run with a different config.
    """
    if resume is None:
        return None
    path = Path(resume) if resume != "latest" else root
    if not (path / STATE_FILE).is_file():  # a checkpoints folder: its newest entry
        found = list_checkpoints(path)
        if not found:
            if resume == "latest":
                return None
            raise ConfigError(f"resume = {resume!r}: no checkpoint there")
        path = found[-1]
    saved = json.loads((path / STATE_FILE).read_text())["config"]
    changed = _config_changes(saved, fingerprint)
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


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass
class _Entry:
    name: str
    obj: Any = None
    scope: str = "main"  # json / main / rank / files
    save: Callable[[Path], list[Path]] | None = None
    load: Callable[[Path], None] | None = None


class Checkpointer:
    """Saves registered entries every ``every`` steps, keeps the newest ``keep_last``.

    Args:
        root: the folder of the ``step-*`` checkpoints.
        every: steps between checkpoints (0: never; :meth:`save` still works).
        keep_last: how many complete checkpoints to keep.
        fingerprint: the run's resolved config as a dict, saved with the state (a
            resume must match it).
        ctx: the distributed context (every rank calls :meth:`save` and :meth:`load`).
    """

    def __init__(self, root: str | Path, every: int, keep_last: int,
                 fingerprint: dict[str, Any], ctx: Any) -> None:
        self.root, self.every, self.keep_last = Path(root), every, keep_last
        self.fingerprint, self.ctx = fingerprint, ctx
        self.entries: dict[str, _Entry] = {}

    def register(self, name: str, obj: Any, scope: str = "main") -> None:
        """Save ``obj.state_dict()`` as ``name``; ``scope``: json, main or rank."""
        if scope not in ("json", "main", "rank"):
            raise ValueError(f"scope must be json, main or rank, got {scope!r}")
        self._add(_Entry(name, obj, scope))

    def register_files(self, name: str, save: Callable[[Path], list[Path]],
                       load: Callable[[Path], None]) -> None:
        """A part that writes its own files: ``save(dir)`` returns the files this rank
        wrote (fsynced before the commit), ``load(dir)`` restores them."""
        self._add(_Entry(name, scope="files", save=save, load=load))

    def _add(self, entry: _Entry) -> None:
        if entry.name in self.entries:
            raise ValueError(f"checkpoint entry {entry.name!r} is already registered")
        self.entries[entry.name] = entry

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, step: int) -> Path:
        """Write every entry atomically; returns the checkpoint directory. Collective."""
        ctx, name = self.ctx, f"{PREFIX}{step:08d}"
        final, tmp = self.root / name, self.root / f".tmp-{name}"
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        ctx.barrier()
        files: list[Path] = []
        state: dict[str, Any] = {}
        for e in self.entries.values():
            if e.scope == "files":
                assert e.save is not None
                files += e.save(tmp)
                continue
            value = e.obj.state_dict()
            if e.scope == "json":
                state[e.name] = value
            elif e.scope == "rank" or ctx.is_main:
                path = tmp / (f"{e.name}_rank{ctx.rank}.pt" if e.scope == "rank"
                              else f"{e.name}.pt")
                torch.save(value, path)
                files.append(path)
        if ctx.is_main:
            if os.environ.get(STALL_STEP_ENV) == str(step):
                time.sleep(120)
            state.update(step=step, world_size=ctx.world_size, config=self.fingerprint)
            (tmp / STATE_FILE).write_text(json.dumps(state))
            files.append(tmp / STATE_FILE)
        for f in files:
            _fsync(f)
        ctx.barrier()
        if ctx.is_main:
            self._commit(tmp, final)
        ctx.barrier()
        return final

    def ensure_saved(self, step: int) -> Path:
        """The checkpoint of ``step``: the newest one when it is that step, else a new
        save. Collective (the main rank decides, every rank follows)."""
        found = list_checkpoints(self.root) if self.ctx.is_main else []
        have = torch.tensor([float(bool(found) and int(found[-1].name[len(PREFIX):]) == step)])
        if self.ctx.distributed:
            have = self.ctx.all_reduce_sum(have)
        if have.item() > 0:
            return self.root / f"{PREFIX}{step:08d}"
        return self.save(step)

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore every registered entry from ``path``; returns the JSON state."""
        path, ctx = Path(path), self.ctx
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != ctx.world_size:
            raise ConfigError(f"resume = {path}: saved with {state['world_size']} processes, "
                              f"resumed with {ctx.world_size}; relaunch with the same number")
        for e in self.entries.values():
            if e.scope == "files":
                assert e.load is not None
                e.load(path)
            elif e.scope == "json":
                e.obj.load_state_dict(state[e.name])
            else:
                f = path / (f"{e.name}_rank{ctx.rank}.pt" if e.scope == "rank"
                            else f"{e.name}.pt")
                e.obj.load_state_dict(torch.load(f, map_location="cpu", weights_only=False))
        return state

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


class CheckpointHook(LoopHook):
    """Saves ``checkpointer`` after every step it is due (the loop's last hook)."""

    def __init__(self, checkpointer: Checkpointer) -> None:
        self.checkpointer = checkpointer

    def after_step(self, record: Record) -> None:
        step = record["step"]
        if self.checkpointer.due(step):
            self.checkpointer.save(step)
