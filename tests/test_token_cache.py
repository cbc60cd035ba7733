"""The tokenised-data cache (capscale.token_cache, ``data.cache_tokenized``).

A second process (new objects, as a requeued job has) reads what the first tokenised
without calling the tokenizer, a real MiniLM tokenizer whose calls are counted; a
change to the rows, ``max_length`` or the tokenizer makes a new entry; a damaged
entry is rebuilt with a log line; only the writer writes; QA windows and their
decoding reference come back equal; the run's own path (check_run_inputs) keeps the
entries under ``<output_dir>/cache``.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pytest
from qa_helpers import SQUAD, as_list, qa_overrides, save_qa_model
from tiny import sentiment_rows, write_csv
from transformers import AutoTokenizer

from capscale.checks import check_run_inputs, load_run_config
from capscale.config import DataConfig
from capscale.data import (
    TaskData,
    build_loaders,
    check_lengths,
    load_task_data,
    tokenized_splits,
)
from capscale.errors import DataError
from capscale.models.loading import resolve_model_path
from capscale.tasks import get_task
from capscale.token_cache import HASH_WINDOW, TokenCache, rows_digest, tokenizer_digest

PAIR = DataConfig(text_column="premise", text_pair_column="hypothesis", max_length=16)
WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while",
         "seven", "wizards", "quietly", "judge", "boxing", "matches", "near", "the", "old",
         "river", "bank"]


@pytest.fixture
def tok():
    """The packaged MiniLM tokenizer, as a subclass that counts its calls."""
    base = type(AutoTokenizer.from_pretrained(resolve_model_path("minilm")))

    class Counting(base):
        calls = 0

        def __call__(self, *args, **kwargs):
            type(self).calls += 1
            return super().__call__(*args, **kwargs)
    return Counting.from_pretrained(resolve_model_path("minilm"))


@pytest.fixture
def logged():
    """Messages of the ``capscale`` logger (the console may stop it propagating)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda r: records.append(f"{r.levelname} {r.getMessage()}")
    logger = logging.getLogger("capscale")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def _pairs(n: int, seed: int, edit: int | None = None) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    premise = [" ".join(rng.choice(WORDS, size=rng.integers(4, 20))) for _ in range(n)]
    if edit is not None:
        premise[edit] = premise[edit] + " again"
    hyp = [" ".join(rng.choice(WORDS, size=rng.integers(2, 8))) for _ in range(n)]
    return datasets.Dataset.from_dict({"premise": premise, "hypothesis": hyp,
                                       "labels": list(rng.integers(0, 3, size=n))})


def _data(cache: TokenCache | None, edit: int | None = None) -> TaskData:
    """A fresh pair-classification TaskData (in memory: datasets' own cache of ``map``
    results never answers for the tokenizer here)."""
    train = _pairs(40, 0, edit)
    train = train.add_column("example_id", list(range(len(train))))
    return TaskData(train, _pairs(12, 1), ["a", "b", "c"], [], cache)


def _same(a: datasets.Dataset, b: datasets.Dataset) -> None:
    assert a.features == b.features and a.format["type"] == b.format["type"]
    assert a.with_format(None)[:] == b.with_format(None)[:]


def _entries(root: Path, kind: str = "") -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(kind))


def test_a_second_process_reads_the_cache_without_tokenising(tmp_path, tok):
    data = _data(TokenCache(tmp_path))
    note = check_lengths(data, tok, PAIR)
    first = tokenized_splits(data, tok, PAIR)
    assert tok.calls == 4  # the counts of both splits, then both splits tokenised
    assert note is not None and "longer than data.max_length = 16" in note
    assert [e.split("-")[0] for e in _entries(tmp_path)] == ["features", "lengths", "lengths"]

    type(tok).calls = 0
    again = _data(TokenCache(tmp_path))  # a requeued job: new objects, the same rows
    assert check_lengths(again, tok, PAIR) == note
    second = tokenized_splits(again, tok, PAIR)
    assert tok.calls == 0
    assert second[1] is second[0] and second[3] is None  # the bank rows are the train rows
    for made, read in zip(first[:3], second[:3]):
        _same(made, read)
    assert second[0].cache_files and all(Path(f["filename"]).is_relative_to(tmp_path)
                                         for f in second[0].cache_files)
    # Without the cache the same call tokenises: the zero above is the cache's doing.
    tokenized_splits(_data(None), tok, PAIR)
    assert tok.calls == 2


def test_rows_max_length_and_tokenizer_make_new_entries(tmp_path, tok):
    def features() -> list[str]:
        return _entries(tmp_path, "features")
    tokenized_splits(_data(TokenCache(tmp_path)), tok, PAIR)  # 2 calls: train, validation
    assert len(features()) == 1 and tok.calls == 2
    longer = DataConfig(**{**PAIR.__dict__, "max_length": 24})
    tokenized_splits(_data(TokenCache(tmp_path)), tok, longer)
    assert len(features()) == 2 and tok.calls == 4
    tokenized_splits(_data(TokenCache(tmp_path), edit=5), tok, PAIR)  # one text changed
    assert len(features()) == 3 and tok.calls == 6
    tok.truncation_side = "left"  # cuts other tokens of a long text
    tokenized_splits(_data(TokenCache(tmp_path)), tok, PAIR)
    assert len(features()) == 4 and tok.calls == 8
    tok.truncation_side = "right"
    tokenized_splits(_data(TokenCache(tmp_path)), tok, PAIR)  # the first entry again
    assert len(features()) == 4 and tok.calls == 8


def test_tokenizer_fingerprint_ignores_what_a_call_leaves_behind(tok):
    before = tokenizer_digest(tok)
    tok(["a short text"], padding="max_length", max_length=12, truncation=True)
    tok(["a question"], ["a context"], truncation="only_second", max_length=12, stride=4,
        return_overflowing_tokens=True)
    assert tokenizer_digest(tok) == before
    assert tokenizer_digest(AutoTokenizer.from_pretrained(
        resolve_model_path("minilm"), do_lower_case=False)) != tokenizer_digest(
        AutoTokenizer.from_pretrained(resolve_model_path("minilm")))


def test_rows_fingerprint_is_the_values_not_the_layout(tmp_path):
    """Chunked, sliced, saved and loaded, written by ``map`` (datasets' fingerprint in
    the schema): the same rows give the same hash; another value or another order does
    not (windows of HASH_WINDOW rows cross the chunks)."""
    n = HASH_WINDOW + 777
    ds = datasets.Dataset.from_dict({"text": [f"t{i}" * (i % 5) for i in range(n)],
                                     "spans": [[[i, i + 1]] * (i % 3) for i in range(n)]})
    table = ds.data.table
    rechunked = datasets.Dataset(pa.concat_tables([table.slice(0, 777), table.slice(777)]))
    ds.save_to_disk(str(tmp_path / "saved"))
    saved = datasets.load_from_disk(str(tmp_path / "saved"))
    mapped = ds.map(lambda r: r, cache_file_name=str(tmp_path / "mapped.arrow"))
    assert mapped.data.table.schema.metadata != ds.data.table.schema.metadata  # fingerprint
    assert rows_digest(ds) == rows_digest(rechunked) == rows_digest(saved) == \
        rows_digest(mapped)
    assert rows_digest(ds.select(range(1, n))) == rows_digest(rechunked.select(range(1, n)))
    assert rows_digest(ds.select([1, 0])) != rows_digest(ds.select([0, 1]))
    changed = ds.map(lambda r, i: {"text": r["text"] + ("!" if i == n - 1 else "")},
                     with_indices=True)
    assert rows_digest(changed) != rows_digest(ds)


def _truncate_arrow(entry: Path) -> None:
    f = next(entry.glob("train/*.arrow"))
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_a_byte(entry: Path) -> None:
    f = next(entry.glob("train/*.arrow"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _garbage_meta(entry: Path) -> None:
    (entry / "meta.json").write_text("{")


def _lose_a_split(entry: Path) -> None:
    shutil.rmtree(entry / "eval")


@pytest.mark.parametrize("damage", [_truncate_arrow, _flip_a_byte, _garbage_meta,
                                    _lose_a_split])
def test_a_damaged_entry_is_ignored_and_rebuilt(tmp_path, tok, logged, damage):
    first = tokenized_splits(_data(TokenCache(tmp_path)), tok, PAIR)
    (entry,) = _entries(tmp_path)
    damage(tmp_path / entry)
    logged.clear()
    again = tokenized_splits(_data(TokenCache(tmp_path)), tok, PAIR)
    assert tok.calls == 4  # tokenised again
    assert any(m.startswith(f"WARNING ignoring the cache entry {tmp_path / entry}")
               for m in logged), logged
    for made, remade in zip(first[:3], again[:3]):
        _same(made, remade)
    tokenized_splits(_data(TokenCache(tmp_path)), tok, PAIR)
    assert tok.calls == 4 and _entries(tmp_path) == [entry]  # rebuilt in place


def test_damaged_token_counts_are_counted_again(tmp_path, tok, logged):
    check_lengths(_data(TokenCache(tmp_path)), tok, PAIR)
    for entry in _entries(tmp_path, "lengths"):
        (tmp_path / entry / "lengths.npy").write_bytes(b"\x93NUMPY garbage")
    type(tok).calls = 0
    check_lengths(_data(TokenCache(tmp_path)), tok, PAIR)
    assert tok.calls == 2 and sum("ignoring the cache entry" in m for m in logged) == 2
    type(tok).calls = 0
    check_lengths(_data(TokenCache(tmp_path)), tok, PAIR)
    assert tok.calls == 0


def test_only_the_writer_writes_and_a_killed_write_is_ignored(tmp_path, tok, logged):
    root = tmp_path / "c"
    tokenized_splits(_data(TokenCache(root, writer=False)), tok, PAIR)
    assert not root.exists() and tok.calls == 2
    tokenized_splits(_data(TokenCache(root)), tok, PAIR)
    (entry,) = _entries(root)
    tokenized_splits(_data(TokenCache(root, writer=False)), tok, PAIR)
    assert tok.calls == 4  # the reader read the writer's entry
    # A writer killed mid-write left its temporary folder and no entry: a reader does
    # not take it for one; the next write clears it away.
    shutil.rmtree(root / entry)
    leftover = root / f".{entry}.123-abcd.tmp"
    (leftover / "train").mkdir(parents=True)
    (leftover / "train" / "data-00000-of-00001.arrow").write_bytes(b"\0" * 10)
    tokenized_splits(_data(TokenCache(root, writer=False)), tok, PAIR)
    assert tok.calls == 6 and not any(m.startswith("WARNING") for m in logged)
    tokenized_splits(_data(TokenCache(root)), tok, PAIR)
    assert tok.calls == 8 and sorted(p.name for p in root.iterdir()) == [entry]
    # Not a folder that can be written: the run goes on without the cache.
    (tmp_path / "file").write_text("")
    made = tokenized_splits(_data(TokenCache(tmp_path / "file")), tok, PAIR)
    assert len(made[0]) == 40
    assert any(m.startswith("WARNING could not write the cache entry") for m in logged)


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory):
    return save_qa_model(tmp_path_factory.mktemp("qa") / "bert")


def test_qa_windows_and_reference_come_back_equal(qa_model, tmp_path, tok):
    cfg = load_run_config(None, as_list(qa_overrides(qa_model, tmp_path / "out", SQUAD)))

    def splits() -> tuple:
        data = load_task_data(cfg.data)
        data.cache = TokenCache(tmp_path / "cache")
        check_lengths(data, tok, cfg.data)  # drops long questions, numbers examples again
        return tokenized_splits(data, tok, cfg.data)
    made = splits()
    calls = tok.calls
    read = splits()
    assert tok.calls - calls == 2  # drop_long_questions' passes over the questions only
    assert read[1] is not read[0] and len(read[1]) == len(made[1]) < len(read[0])
    for a, b in zip(made[:3], read[:3]):
        _same(a, b)
    ref_a, ref_b = made[3], read[3]
    assert ref_b.settings == ref_a.settings == cfg.data.qa
    for name in ("ids", "contexts", "answers"):
        assert getattr(ref_b, name) == getattr(ref_a, name)
    for name in ("feature_example", "offsets", "cls_index"):
        np.testing.assert_array_equal(getattr(ref_b, name), getattr(ref_a, name))


def test_the_run_keeps_its_entries_under_the_output_dir(tiny_bert, tmp_path):
    rows = sentiment_rows(64, 0)
    rows[0]["sentence"] = " ".join(WORDS)  # 23 tokens
    train = write_csv(tmp_path / "train.csv", rows)
    val = write_csv(tmp_path / "val.csv", sentiment_rows(16, 1))
    out = tmp_path / "out"
    base = [f"model.name_or_path={tiny_bert}", f"data.train_file={train}",
            f"data.validation_file={val}", "data.max_length=32", f"output_dir={out}"]

    def run(*extra: str):
        cfg = load_run_config(None, [*base, *extra])
        data, tok = check_run_inputs(cfg, get_task("classification"))
        return data, build_loaders(data, tok, cfg.data, 8, 8, seed=0)
    with pytest.raises(DataError, match="train row 0 has 23 tokens"):
        run("data.max_length=16", "data.truncation=error")
    assert not out.exists()  # a refused run writes nothing, its counts neither
    data, _ = run()
    assert data.cache is not None and data.cache.root == out / "cache"
    assert [e.split("-")[0] for e in _entries(out / "cache")] == ["features", "lengths",
                                                                   "lengths"]
    _, loaders = run()
    for loader in (loaders.train, loaders.eval):
        files = [Path(f["filename"]) for f in loader.dataset.cache_files]
        assert files and all(f.is_relative_to(out / "cache") for f in files)
    rows[3]["sentence"] += " indeed"  # the data file changed: new train entries
    write_csv(train, rows)
    _, loaders = run()
    assert len(_entries(out / "cache", "features")) == 2
    assert len(_entries(out / "cache", "lengths")) == 3  # the validation counts kept
    data, loaders = run("data.cache_tokenized=false")
    assert data.cache is None and len(_entries(out / "cache")) == 5
    assert not any(Path(f["filename"]).is_relative_to(out / "cache")
                   for f in loaders.train.dataset.cache_files)


def test_the_switch_changes_neither_a_resume_nor_the_cached_teacher(tmp_path):
    """Turning the cache off or on changes no result: a checkpoint resumes, and a
    teacher fine-tuned before is reused."""
    from test_throughput_options import _resumes

    from capscale.train.finetune import _fingerprint
    assert _resumes(tmp_path / "a", {}, "data.cache_tokenized=false")
    assert _resumes(tmp_path / "b", {"data": {"cache_tokenized": None}})  # older capscale
    on, off = (load_run_config(None, ["data.preset=tweets", f"data.cache_tokenized={v}"])
               for v in ("true", "false"))
    assert _fingerprint(on) == _fingerprint(off)
