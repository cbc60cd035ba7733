"""Tokenised data kept under ``<output_dir>/cache`` (``data.cache_tokenized``).

Tokenising a large training set takes minutes on one core (a 400k-pair MNLI-sized
set: bench/results/tokenize_cache.md), and a run does it twice: the length check
counts every text's tokens, then the loaders tokenise the texts truncated. A job that
the scheduler requeues, or that resumes, would do both again. :class:`TokenCache`
keeps both results as files named by a fingerprint of everything that decides them:

* the rows: every column of the split in order (their Arrow serialisation, hashed), so
  a changed data file, hold-out split, subsample or dropped question is a new entry;
* the tokenizer: its serialised state (vocabulary, normaliser, pre-tokeniser,
  post-processor, special tokens) without the truncation / padding settings a call
  leaves behind, its class, padding / truncation sides and settings;
* the ``data`` section (``max_length``, columns, QA windows ...) and the task;
* the code that tokenises (capscale/data.py, capscale/tasks/, this module, the task's
  own module) and the versions of transformers, tokenizers, datasets and pyarrow.

Only the writer (the main rank) writes; every rank reads. An entry is written into a
temporary folder, with a checksum of each file, then renamed into place, so a reader
finds all of it or nothing. An entry that does not match its checksums or does not
load is ignored with a log line and made again, never a crash; a failed write only
costs the cache. The folder may be deleted at any time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
import os
import pickle
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import datasets
import numpy as np
import pyarrow as pa
import tokenizers
import transformers

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from capscale.config import DataConfig

logger = logging.getLogger("capscale")
FORMAT = 1  # of the entries this module writes
META = "meta.json"
HASH_WINDOW = 1 << 16  # rows hashed per contiguous batch (rows_digest)
PACKAGE = Path(__file__).resolve().parent
Features = tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset, Any]


class _Digest:
    """A write-only file that hashes what is written to it (Arrow's IPC writer)."""

    def __init__(self) -> None:
        self.hash = hashlib.blake2b(digest_size=20)
        self.closed = False

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return len(data)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def rows_digest(ds: datasets.Dataset) -> str:
    """A hash of every column of ``ds``'s rows, in order (a selection or shuffle applied).

    The features, then the rows through Arrow's IPC writer in windows of a fixed number
    of rows, each column of a window copied into fresh, exactly sized buffers (a slice
    would carry its parent's), so the hash depends on the values alone, not on how the
    table is chunked or sliced (a file read, a ``map``, a selection, a dataset saved and
    loaded) nor on the transform fingerprint datasets writes into the schema."""
    table = ds.with_format("arrow")[:]
    schema = table.schema.remove_metadata()  # datasets keeps its own fingerprint there
    sink = _Digest()
    sink.write(json.dumps(ds.features.to_dict(), sort_keys=True).encode())
    with pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, table.num_rows, HASH_WINDOW):
            window = table.slice(start, HASH_WINDOW)
            writer.write_table(pa.Table.from_arrays(
                [pa.concat_arrays([*c.chunks, pa.array([], type=c.type)])
                 for c in window.columns], schema=schema))
    return sink.hash.hexdigest()


def tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides ``tokenizer``'s tokens.

    A fast tokenizer serialises its whole pipeline; the truncation and padding it holds
    are left out, since every call sets them again (after a padded call they differ
    from a fresh load). Settings held in Python (sides, lengths, special-token options)
    join as given, file paths left out (the same tokenizer moved is the same)."""
    state: dict[str, Any] = {
        "class": f"{type(tokenizer).__module__}.{type(tokenizer).__qualname__}",
        "sides": [tokenizer.padding_side, tokenizer.truncation_side],
        "model_max_length": tokenizer.model_max_length,
        "init": {k: v for k, v in sorted(tokenizer.init_kwargs.items())
                 if isinstance(v, str | int | float | bool) and not k.endswith("_file")
                 and k != "name_or_path"}}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        pipeline = json.loads(backend.to_str())
        pipeline.pop("truncation", None)
        pipeline.pop("padding", None)
        state["pipeline"] = pipeline
    else:
        state["vocab"] = sorted(tokenizer.get_vocab().items())
        state["special"] = sorted(map(str, tokenizer.all_special_tokens))
    return _digest(state)


def code_digest(task: Any = None) -> str:
    """A hash of the code that tokenises: capscale/data.py, capscale/tasks/, this
    module, and the module of ``task``'s class (a task registered from outside)."""
    files = {PACKAGE / "data.py", Path(__file__).resolve(), *(PACKAGE / "tasks").glob("*.py")}
    own = inspect.getsourcefile(type(task)) if task is not None else None
    if own:
        files.add(Path(own).resolve())
    h = hashlib.blake2b(digest_size=20)
    for f in sorted(files):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()


def _file_digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=20)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    return {m.__name__: getattr(m, "__version__", "?")
            for m in (transformers, tokenizers, datasets, pa)}


def _data_settings(cfg: DataConfig) -> dict[str, Any]:
    """The ``data`` section, but the cache switch itself."""
    settings = dataclasses.asdict(cfg)
    settings.pop("cache_tokenized", None)
    return settings


class TokenCache:
    """Tokenised splits and token counts of one run, as entries under ``root``.

    Args:
        root: the folder (``<output_dir>/cache``); made on the first write.
        writer: whether this process writes entries (the main rank); the others only
            read, tokenising themselves when an entry is not there (yet).
    """

    def __init__(self, root: str | Path, writer: bool = True) -> None:
        self.root = Path(root)
        self.writer = writer
        self._rows: dict[str, str] = {}  # datasets fingerprint -> rows digest
        self._held: list[tuple[str, str, Callable[[Path], object]]] | None = None

    @contextmanager
    def held(self) -> Iterator[None]:
        """Entries made in the block are written at its end, and only when it ends
        without an exception: a run the checks refuse leaves its output_dir as it was."""
        self._held = []
        try:
            yield
        except BaseException:
            self._held = None
            raise
        pending, self._held = self._held, None
        for entry in pending:
            self._write(*entry)

    # -- the two kinds of entry ----------------------------------------------------------
    def lengths(self, ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
                cfg: DataConfig, count: Callable[[], list[int]]) -> list[int]:
        """Token counts of ``ds``'s texts (``data.text_column`` / ``text_pair_column``,
        untruncated) as ``count()`` makes them, from the cache when it has them."""
        name = "lengths-" + _digest({
            "rows": self._rows_of(ds), "tokenizer": tokenizer_digest(tokenizer),
            "columns": [cfg.text_column, cfg.text_pair_column], "code": code_digest(),
            "versions": _versions(), "format": FORMAT})
        found = self._open(name, "token counts")
        if found is not None:
            try:
                counts = np.load(found / "lengths.npy", allow_pickle=False)
                if counts.shape != (len(ds),) or counts.dtype.kind not in "iu":
                    raise ValueError(f"{counts.shape} {counts.dtype} counts for {len(ds)} rows")
                return [int(n) for n in counts]
            except (OSError, ValueError) as err:
                self._unusable(found, err)
        made = count()
        self._write(name, "token counts",
                    lambda d: np.save(d / "lengths.npy", np.asarray(made, dtype=np.int64)))
        return made

    def features(self, train: datasets.Dataset, validation: datasets.Dataset,
                 tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, task: Any,
                 make: Callable[[], Features]) -> Features:
        """(train rows, bank rows, eval rows, eval reference) of the splits ``train`` /
        ``validation`` as ``make()`` builds them (capscale.data.tokenized_splits), from
        the cache when it has them. The datasets come back memory-mapped, with the
        format they were saved in; bank rows that were the train rows stay so."""
        name = "features-" + _digest({
            "train": self._rows_of(train), "validation": self._rows_of(validation),
            "tokenizer": tokenizer_digest(tokenizer), "data": _data_settings(cfg),
            "task": f"{type(task).__module__}.{type(task).__qualname__}",
            "code": code_digest(task), "versions": _versions(), "format": FORMAT})
        found = self._open(name, "tokenised splits")
        if found is not None:
            try:
                return _load_features(found)
            except Exception as err:  # whatever a damaged Arrow file or pickle raises
                self._unusable(found, err)
        made = make()
        self._write(name, "tokenised splits", lambda d: _save_features(made, d))
        return made

    # -- entries -------------------------------------------------------------------------
    def _rows_of(self, ds: datasets.Dataset) -> str:
        key = getattr(ds, "_fingerprint", None)
        if key is None:
            return rows_digest(ds)
        if key not in self._rows:
            self._rows[key] = rows_digest(ds)
        return self._rows[key]

    def _open(self, name: str, what: str) -> Path | None:
        """The entry ``name`` when it is whole (every file matches its checksum)."""
        path = self.root / name
        if not path.exists():
            return None
        try:
            meta = json.loads((path / META).read_text())
            if meta.get("format") != FORMAT or meta.get("name") != name:
                raise ValueError(f"{META} is not this entry's")
            for rel, digest in meta["files"].items():
                if _file_digest(path / rel) != digest:
                    raise ValueError(f"{rel} does not match its checksum")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            self._unusable(path, err)
            return None
        logger.info("%s read from %s (data.cache_tokenized)", what, path)
        return path

    def _unusable(self, path: Path, err: BaseException) -> None:
        why = " ".join(str(err).split())[:200] or type(err).__name__
        (logger.warning if self.writer else logger.info)(
            "ignoring the cache entry %s (%s); tokenising again", path, why)

    def _write(self, name: str, what: str, fill: Callable[[Path], object]) -> None:
        """Write an entry through ``fill(folder)``: into a temporary folder, checksums
        in its meta file, then renamed into place (replacing an unusable one)."""
        if not self.writer:
            return
        if self._held is not None:
            self._held.append((name, what, fill))
            return
        final = self.root / name
        tmp = self.root / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        for stale in self.root.glob(f".{name}.*.tmp"):  # a killed writer's
            shutil.rmtree(stale, ignore_errors=True)
        try:
            tmp.mkdir(parents=True)
            fill(tmp)
            files = {p.relative_to(tmp).as_posix(): _file_digest(p)
                     for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / META).write_text(json.dumps({"format": FORMAT, "name": name,
                                                "files": files}))
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
        except Exception as err:  # a full disk, an unpicklable reference: no cache
            shutil.rmtree(tmp, ignore_errors=True)
            if not (final / META).is_file():  # not another writer's entry, just made
                logger.warning("could not write the cache entry %s (%s); the run goes on "
                               "without it", final, " ".join(str(err).split())[:200])
            return
        logger.info("%s cached in %s", what, final)


def _save_features(made: Features, folder: Path) -> None:
    train, bank, evaluation, reference = made
    train.save_to_disk(str(folder / "train"))
    evaluation.save_to_disk(str(folder / "eval"))
    if bank is not train:
        bank.save_to_disk(str(folder / "bank"))
    if reference is not None:
        (folder / "reference.pkl").write_bytes(pickle.dumps(reference))


def _load_features(folder: Path) -> Features:
    train = datasets.load_from_disk(str(folder / "train"))
    evaluation = datasets.load_from_disk(str(folder / "eval"))
    bank = (datasets.load_from_disk(str(folder / "bank")) if (folder / "bank").is_dir()
            else train)
    ref = folder / "reference.pkl"
    # Written by this run's main rank into its own output_dir, as its checkpoints are.
    reference = pickle.loads(ref.read_bytes()) if ref.is_file() else None
    if not all(isinstance(d, datasets.Dataset) for d in (train, evaluation, bank)):
        raise ValueError("an entry folder holds a DatasetDict, not a split")
    return train, bank, evaluation, reference
