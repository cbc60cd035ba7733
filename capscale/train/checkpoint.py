"""Resumable checkpoints of whatever registered itself, written atomically.

A checkpoint is a directory ``<checkpoint.dir>/step-XXXXXXXX``. The checkpointer knows
no run class: every stateful part of a run registers an entry, and the checkpointer
saves and restores entries by name, in registration order:

* ``register(name, obj, scope)`` with ``obj.state_dict()`` / ``obj.load_state_dict()``:
  ``scope="json"`` goes into ``trainer_state.json`` (main rank), ``"main"`` into
  ``<name>.pt`` written by the main rank and read by every rank, ``"rank"`` into
  ``<name>_rank{r}.pt``, one per rank. ``state_dict`` is called on every rank for
  every scope (it may be a collective);
* ``register_files(name, save, load, restored)``: parts that write their own files,
  e.g. the student and its optimiser through the strategy (``model.pt`` /
  ``optimizer.pt``, or each rank's ZeRO-3 / FSDP2 shards under ``deepspeed/`` or
  ``dcp/``); ``restored()`` gives what they load into, scanned after a resume.

Writes are atomic: everything goes into ``.tmp-step-XXXXXXXX``, is fsynced, and the
directory is renamed into place once every rank has written its part, so a kill during
a save leaves the previous checkpoint as the latest one. ``trainer_state.json`` is
written last and marks a checkpoint as complete.

Every checkpoint carries ``manifest.json``, the size and sha256 of each of its files,
written just before ``trainer_state.json``; a resume verifies it before anything loads
(capscale.train.integrity says how, and what it costs).

``resume=latest`` (or a folder of checkpoints) walks them newest first, skips a
damaged or incomplete one with a warning naming the file that failed, and resumes from
the newest intact one; when every checkpoint there is damaged it is a one-line error
(:class:`~capscale.errors.CheckpointError`, exit code 2), and so is an explicitly named
damaged checkpoint. A checkpoint written before checkpoints carried a manifest is
accepted with a warning (its files are not verified; a file that cannot be read is
then a one-line error). After loading, :meth:`Checkpointer.load` refuses non-finite
restored tensors with one line naming the entry and the tensor, on every rank.

Saving joins the training loop as one more hook (:class:`CheckpointHook`, added last by
the recipe, so every other hook has updated its state when the step is saved). The
checkpointer is given its root, cadence, retention and the run's fingerprint (the
resolved config as a dict, which a resume must match); it imports no config.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from capscale.errors import CheckpointError, ConfigError
from capscale.train.hooks import LoopHook, Record
from capscale.train.integrity import (
    MANIFEST_FILE,
    STATE_FILE,
    Verdict,
    file_digest,
    fsync,
    live_tensors,
    nested_tensors,
    nonfinite,
    on_main,
    one_line,
    verify_checkpoint,
    write_manifest,
)

PREFIX = "step-"
logger = logging.getLogger("capscale")
# Test hook: sleep this long in the middle of writing the checkpoint of step
# CAPSCALE_TEST_STALL_CHECKPOINT_STEP (a test SIGKILLs the process meanwhile).
STALL_STEP_ENV = "CAPSCALE_TEST_STALL_CHECKPOINT_STEP"
# Config fields that may change between a killed run and its resumption.
RESUMABLE_CHANGES = ("resume", "output_dir", "checkpoint.", "report.", "train.progress",
                     "train.num_threads", "train.on_nonfinite", "train.max_nonfinite_skips",
                     "train.collective_timeout_s", "train.debug_nan_batches",
                     "train.gradient_checkpointing", "train.tf32",
                     "train.dataloader_workers", "data.cache_tokenized")


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


def resolve_resume(resume: str | None, root: Path, fingerprint: dict[str, Any],
                   ctx: Any = None) -> Path | None:
    """The intact checkpoint ``resume`` names (None: start fresh).

    Args:
        resume: the config's ``resume``: None, ``latest`` (the newest intact checkpoint
            under ``root``) or a checkpoint directory (or a folder of them).
        root: the run's checkpoint folder (:func:`checkpoint_root`).
        fingerprint: the run's resolved config as a dict.
        ctx: the distributed context (None: one process). Collective: every rank
            calls it and gets the main rank's choice.

    ``latest`` with no checkpoint yet starts fresh, so one command line serves both the
    first launch and every relaunch of a preemptible job; damaged checkpoints are skipped
    (see :func:`find_checkpoint`). Raises CheckpointError for a damaged explicit
    checkpoint or when none is intact, ConfigError when the checkpoint was written by a
    run with a different config.
    """
    if resume is None:
        return None
    path = find_checkpoint(resume, root, ctx)
    if path is None:
        return None
    saved = json.loads((path / STATE_FILE).read_text())["config"]
    changed = _config_changes(saved, fingerprint)
    if changed:
        raise ConfigError(f"resume = {path}: the checkpoint was written with a different "
                          f"config ({'; '.join(changed[:5])}); resume with the same config")
    return path


def find_checkpoint(spec: str, root: Path, ctx: Any = None, option: str = "resume"
                    ) -> Path | None:
    """The intact checkpoint ``spec`` names: ``latest`` (the newest intact one under
    ``root``; None when there is no checkpoint at all), a checkpoint directory, or a
    folder of them (its newest intact one). Collective (see :func:`verify_checkpoint`).

    Skipped checkpoints are logged as warnings naming the file that failed. ``option``
    names the setting in messages (``resume``, ``--checkpoint``). Raises CheckpointError
    when a named checkpoint is damaged or every checkpoint there is, ConfigError when
    ``spec`` holds no checkpoint.
    """
    where = root if spec == "latest" else Path(spec)
    explicit, found = on_main(ctx, lambda: (_is_checkpoint(where), _candidates(where)))
    said = (lambda x: f"{option} = {x}") if option == "resume" else (lambda x: f"{option} {x}")
    if explicit:
        verdict = verify_checkpoint(where, ctx)
        if verdict.problem is not None:
            raise CheckpointError(
                f"{said(where)}: damaged checkpoint: {verdict.problem}; use another one "
                f"({said('latest')} takes the newest intact checkpoint)")
        _warn_unverified(verdict, ctx)
        return where
    if not found:
        if spec == "latest":
            return None
        raise ConfigError(f"{said(repr(spec))}: no checkpoint there")
    first = None
    for path in found:
        verdict = verify_checkpoint(path, ctx)
        if verdict.problem is None:
            _warn_unverified(verdict, ctx)
            return path
        first = first or f"{path.name}: {verdict.problem}"
        _warn(ctx, f"checkpoint {path} is damaged or incomplete, skipped: {verdict.problem}")
    raise CheckpointError(f"{said(spec)}: no intact checkpoint in {where} "
                          f"({len(found)} damaged; the newest, {first})")


def _warn(ctx: Any, msg: str) -> None:
    if ctx is None or ctx.is_main:
        logger.warning(msg)


def _warn_unverified(verdict: Verdict, ctx: Any) -> None:
    if verdict.unverified:
        _warn(ctx, f"checkpoint {verdict.path} has no {MANIFEST_FILE} (written before "
                   "checkpoints carried one): its files cannot be verified")


def _step_of(path: Path) -> int | None:
    tail = path.name[len(PREFIX):]
    return int(tail) if path.name.startswith(PREFIX) and tail.isdigit() else None


def _is_checkpoint(path: Path) -> bool:
    """A checkpoint directory (complete or not), not a folder of them."""
    return path.is_dir() and ((path / STATE_FILE).is_file() or (path / MANIFEST_FILE).is_file()
                              or _step_of(path) is not None)


def _candidates(root: Path) -> list[Path]:
    """Every ``step-*`` directory under ``root`` (complete or not), newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p) or 0, reverse=True)


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


@dataclass
class _Entry:
    name: str
    obj: Any = None
    scope: str = "main"  # json / main / rank / files
    save: Callable[[Path], list[Path]] | None = None
    load: Callable[[Path], None] | None = None
    restored: Callable[[], Iterable[Any]] | None = None


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
                       load: Callable[[Path], None],
                       restored: Callable[[], Iterable[Any]] | None = None) -> None:
        """A part that writes its own files: ``save(dir)`` returns the files this rank
        wrote (hashed for the manifest, fsynced before the commit), ``load(dir)``
        restores them; ``restored()``: the modules / optimisers they were loaded into
        (scanned for non-finite values after loading)."""
        self._add(_Entry(name, scope="files", save=save, load=load, restored=restored))

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
        digests = {f.relative_to(tmp).as_posix(): file_digest(f) for f in files if f.is_file()}
        for f in files:
            fsync(f)
        reported = ctx.all_gather_objects(digests)  # after every rank has written its part
        if ctx.is_main:
            if os.environ.get(STALL_STEP_ENV) == str(step):
                time.sleep(120)
            state.update(step=step, world_size=ctx.world_size, config=self.fingerprint,
                         manifest=MANIFEST_FILE)
            text = json.dumps(state).encode()
            write_manifest(tmp, {k: v for part in reported for k, v in part.items()}, text)
            (tmp / STATE_FILE).write_bytes(text)
            fsync(tmp / STATE_FILE)
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
        """Restore every registered entry from ``path``; returns the JSON state.

        Collective. The checkpoint is expected verified (:func:`resolve_resume`); a file
        of an older, unverified one that cannot be read is a CheckpointError. Restored
        floating tensors are scanned (see the module doc): a non-finite value on any rank
        is a CheckpointError on every rank, naming the entry and the tensor.
        """
        path, ctx = Path(path), self.ctx
        state = json.loads((path / STATE_FILE).read_text())
        if state["world_size"] != ctx.world_size:
            raise ConfigError(f"resume = {path}: saved with {state['world_size']} processes, "
                              f"resumed with {ctx.world_size}; relaunch with the same number")
        verified = (path / MANIFEST_FILE).is_file()
        bad = None
        for e in self.entries.values():
            try:
                found = self._load_entry(e, path, state)
            except (OSError, EOFError, RuntimeError, KeyError, pickle.UnpicklingError) as err:
                if verified:  # intact files that do not load: a program error
                    raise
                raise CheckpointError(f"resume = {path}: {e.name} could not be restored from "
                                      f"this unverified checkpoint ({one_line(err)})") from err
            bad = bad or found
        everyone = ctx.all_gather_objects(bad) if ctx.distributed else [bad]
        for rank, problem in enumerate(everyone):
            if problem is not None:
                on = f" (rank {rank})" if ctx.distributed else ""
                why = ("its files match the manifest: the run saved them" if verified else
                       "it has no manifest: damaged, or saved so")
                older = [c for c in list_checkpoints(path.parent)
                         if (_step_of(c) or 0) < (_step_of(path) or 0)]
                raise CheckpointError(
                    f"resume = {path}: non-finite values restored{on}: {problem} ({why}); "
                    f"resume from an earlier checkpoint (resume="
                    f"{older[-1] if older else '<its directory>'})")
        return state

    def _load_entry(self, e: _Entry, path: Path, state: dict[str, Any]) -> str | None:
        """Restore one entry; returns what its non-finite scan found (None: clean)."""
        if e.scope == "files":
            assert e.load is not None
            e.load(path)
            found = nonfinite(live_tensors(e.restored())) if e.restored else None
            return f"{e.name}: {found}" if found else None
        if e.scope == "json":
            e.obj.load_state_dict(state[e.name])
            return None
        f = path / (f"{e.name}_rank{self.ctx.rank}.pt" if e.scope == "rank" else f"{e.name}.pt")
        value = torch.load(f, map_location="cpu", weights_only=False)
        found = nonfinite(nested_tensors(value))
        e.obj.load_state_dict(value)
        return f"{f.name}: {found}" if found else None

    def _commit(self, tmp: Path, final: Path) -> None:
        fsync(tmp)
        if final.exists():  # re-saving a step after resuming from an older checkpoint
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync(self.root)
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
