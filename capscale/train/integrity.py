"""Checkpoint integrity: the manifest of every file, its verification, and the scan of
restored tensors for non-finite values (used by capscale.train.checkpoint).

The manifest. Just before ``trainer_state.json`` (the completion marker) the main rank
writes ``manifest.json``: the size and sha256 of every file of the checkpoint,
``trainer_state.json`` included (its bytes are hashed before they are written). Every
rank hashes the files it wrote itself (rank files, ZeRO-3 / DCP shards) right after
writing them, while they are still in the page cache; the main rank gathers the
digests and hashes any file no rank reported (:func:`write_manifest`).

Verification (:func:`verify_checkpoint`) happens before anything loads: the state and
the manifest must parse, and every listed file must exist with its size and its
sha256. Sizes are checked first, so a missing or truncated file is found without
hashing; then the hashing is split over the ranks (largest files first, each to the
least loaded rank: :func:`verification_share`) and the main rank's view is the one
every rank acts on. Both are always checked: sizes alone miss the failure that matters
most, bytes overwritten in place (a 4 KiB block of ``model.pt`` gave 1,024 NaN movement
scores and a silently wrong run), and sha256 costs one read of each file (about
0.8 GB/s per core), small next to ``torch.save`` / ``torch.load`` of the same bytes and
shared among the ranks. A checkpoint without a manifest (written before checkpoints
carried one) is reported as unverified, not damaged.

Non-finite values (:func:`nonfinite`): a NaN in any restored floating tensor, or an
infinity in a parameter, an optimiser state or a ``.pt`` entry, is refused. Buffers may
hold infinities (a mask threshold is -inf while every weight is kept).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
MANIFEST_VERSION = 1
_CHUNK = 8 << 20  # bytes hashed per read


@dataclass
class Verdict:
    """What :func:`verify_checkpoint` found: ``problem`` (None: intact) names the file
    first found wrong; ``unverified``: no manifest (written before checkpoints had one)."""

    path: Path
    problem: str | None = None
    unverified: bool = False


def verify_checkpoint(path: str | Path, ctx: Any = None) -> Verdict:
    """Check ``path`` against its manifest (sizes, then sha256 of every listed file).

    Collective when ``ctx`` is distributed: the main rank reads the state and the
    manifest and shares them, every rank hashes its share of the files, and every rank
    gets the same verdict. Cheap checks first (a missing or truncated file is found
    without hashing anything).
    """
    path = Path(path)
    problem, files = on_main(ctx, lambda: read_manifest(path))
    if problem is not None or files is None:
        return Verdict(path, problem, unverified=problem is None)
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    mine = check_files(path, files, verification_share(files, rank, world))
    found = [p for p in (ctx.all_gather_objects(mine) if distributed(ctx) else [mine]) if p]
    return Verdict(path, min(found) if found else None)


def file_digest(path: Path) -> dict[str, Any]:
    """``{"size": bytes, "sha256": hex}`` of ``path``, read in chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def write_manifest(ckpt: str | Path, listed: dict[str, dict[str, Any]] | None = None,
                   state: bytes | None = None) -> None:
    """Write ``ckpt``'s ``manifest.json`` (fsynced): the digests in ``listed`` plus those
    of every other file there (hashed here); ``state``: the bytes ``trainer_state.json``
    is about to get (it is written after the manifest)."""
    ckpt, files = Path(ckpt), dict(listed or {})
    for f in sorted(ckpt.rglob("*")):
        rel = f.relative_to(ckpt).as_posix()
        if f.is_file() and rel not in files and rel != MANIFEST_FILE:
            files[rel] = file_digest(f)
    if state is not None:
        files[STATE_FILE] = {"size": len(state), "sha256": hashlib.sha256(state).hexdigest()}
    manifest = {"version": MANIFEST_VERSION, "algorithm": "sha256",
                "files": dict(sorted(files.items()))}
    (ckpt / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
    fsync(ckpt / MANIFEST_FILE)


def distributed(ctx: Any) -> bool:
    return ctx is not None and ctx.distributed


def on_main(ctx: Any, fn: Callable[[], Any]) -> Any:
    """``fn()`` computed by the main rank, on every rank."""
    if not distributed(ctx):
        return fn()
    return ctx.broadcast_object(fn() if ctx.is_main else None)


def read_manifest(path: Path) -> tuple[str | None, dict[str, dict[str, Any]] | None]:
    """(problem, the manifest's files); (None, None): no manifest (an older checkpoint)."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"{STATE_FILE} is missing (the save never finished)", None
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is not readable JSON ({one_line(err)})", None
    if not isinstance(state, dict) or not isinstance(state.get("config"), dict):
        return f"{STATE_FILE} holds no run state", None
    if not (path / MANIFEST_FILE).is_file():
        return (f"{MANIFEST_FILE} is missing", None) if "manifest" in state else (None, None)
    try:
        files = json.loads((path / MANIFEST_FILE).read_text())["files"]
        if not all(isinstance(d["size"], int) and isinstance(d["sha256"], str)
                   for d in files.values()):
            raise ValueError("an entry lacks its size or sha256")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return f"{MANIFEST_FILE} is not a readable manifest ({one_line(err)})", None
    return None, files


def verification_share(files: dict[str, dict[str, Any]], rank: int, world: int) -> list[str]:
    """The files ``rank`` verifies: largest first, each to the least loaded rank."""
    load, mine = [0] * world, []
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = load.index(min(load))
        load[r] += files[name]["size"] + 1
        if r == rank:
            mine.append(name)
    return mine


def check_files(path: Path, files: dict[str, dict[str, Any]], names: list[str]
                 ) -> str | None:
    """The first of ``names`` that is missing, of the wrong size or content, or None."""
    for name in names:  # sizes first: no hashing when a file is missing or truncated
        f, want = path / name, files[name]
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != want["size"]:
            return (f"{name} has {size} bytes where {want['size']} were written "
                    "(truncated or extended)")
    for name in names:
        if file_digest(path / name)["sha256"] != files[name]["sha256"]:
            return (f"{name} does not match its sha256 in {MANIFEST_FILE} (changed or "
                    "damaged since the save)")
    return None


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def nonfinite(tensors: Iterable[tuple[str, Tensor, bool]]) -> str | None:
    """``"<n> NaN in <name>"`` for the first floating tensor holding a NaN (or, unless
    its flag allows infinities, an Inf), or None."""
    for name, t, inf_ok in tensors:
        if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
            continue
        nan = int(torch.isnan(t).sum())
        inf = 0 if inf_ok else int(torch.isinf(t).sum())
        if nan or inf:
            what = " and ".join(f"{n} {k}" for n, k in ((nan, "NaN"), (inf, "Inf")) if n)
            return f"{what} in {name}"
    return None


def nested_tensors(obj: Any, name: str = "") -> Iterator[tuple[str, Tensor, bool]]:
    """The tensors inside a loaded state (dicts, lists, tuples), named by their keys."""
    if isinstance(obj, Tensor):
        yield name or "the tensor", obj, False
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from nested_tensors(v, f"{name}.{k}" if name else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from nested_tensors(v, f"{name}[{i}]")


def live_tensors(objs: Iterable[Any]) -> Iterator[tuple[str, Tensor, bool]]:
    """This rank's restored tensors of modules and optimisers: parameters (their local
    ZeRO-3 partition or FSDP2 shard), buffers (which may hold infinities) and the
    optimiser's parameters and states (DeepSpeed's wrapped optimiser: the inner one)."""
    seen: set[int] = set()
    for obj in objs:
        if isinstance(obj, nn.Module):
            for n, p in obj.named_parameters():
                seen.add(id(p))
                yield f"parameter {n}", _local(p), False
            for n, b in obj.named_buffers():
                yield f"buffer {n}", _local(b), True
            continue
        opt = obj
        while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
            opt = opt.optimizer
        if not isinstance(opt, torch.optim.Optimizer):
            continue
        for g, group in enumerate(opt.param_groups):
            for i, p in enumerate(group["params"]):
                if id(p) not in seen:
                    yield f"optimizer parameter {g}.{i}", _local(p), False
                for k, v in opt.state.get(p, {}).items():
                    if isinstance(v, Tensor):
                        yield f"optimizer state {k} of parameter {g}.{i}", _local(v), False


def _local(t: Tensor) -> Tensor:
    """The part of ``t`` this rank holds (ZeRO-3 ``ds_tensor``, DTensor ``to_local``)."""
    part = getattr(t, "ds_tensor", None)
    if isinstance(part, Tensor):
        return part.detach()
    to_local = getattr(t, "to_local", None)
    return (to_local() if callable(to_local) else t).detach()
