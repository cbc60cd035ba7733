"""Bad inputs, one case per report: each exits 2 with ONE line naming the culprit (file,
row, field) and what to change, before any weights load, and damages nothing already
written (the earlier run's results, export and checkpoints in the same output_dir are
byte-identical afterwards). Add a case here for every new report.

The property test at the end feeds random small CSVs and random config overrides to
``capscale prune`` and asserts a completed run or a one-line exit 2, never a traceback.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from _tiny_run import WORDS, make_model, overrides, sentence
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from capscale.cli import main

GOOD = [("the movie was good", "pos"), ("the film was bad", "neg")]
LONG = " ".join(["very"] * 70)  # 72 tokens with [CLS] and [SEP]; the tiny BERT takes 64


def _csv(path: Path, rows, header=("sentence", "label"), encoding="utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        if header:
            w.writerow(header)
        w.writerows(rows)
    return path


def _rows(n: int, seed: int, labels=("neg", "pos")) -> list[tuple[str, object]]:
    rng = random.Random(seed)
    return [(sentence(rng, i % 2), labels[i % 2]) for i in range(n)]


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (or ``root`` itself) -> sha256 of its bytes."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    return {str(p.relative_to(root.parent)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny BERT (64 positions), its data, a RoBERTa config beside its tokenizer (for
    the position offset; no weights: nothing may load them), and a finished run whose
    output_dir every bad case points at (so that damage would show)."""
    tmp = tmp_path_factory.mktemp("more")
    a = {"model": make_model(tmp / "bert"),
         "train": _csv(tmp / "train.csv", _rows(16, 1)),
         "dev": _csv(tmp / "dev.csv", _rows(8, 2)), "tmp": tmp}
    roberta = tmp / "roberta"
    shutil.copytree(a["model"], roberta, ignore=shutil.ignore_patterns("*.safetensors",
                                                                       "config.json"))
    from transformers import RobertaConfig
    RobertaConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=34, pad_token_id=1,
                  num_labels=2).save_pretrained(roberta)
    a["roberta"] = roberta
    out = tmp / "finished"
    assert main(["prune", *overrides(a, out, **{
        "train.epochs": 1, "checkpoint.every_steps": 1, "report.enabled": "false",
        "report.trackers": "[]", "cap.num_negatives": 8})]) == 0
    assert (out / "results.json").is_file() and (out / "pruned" / "model").is_dir()
    assert (out / "checkpoints").is_dir()
    a["finished"] = out
    return a


def _expect_one_line(capsys, code: int, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("capscale: "), err
    for fragment in fragments:
        assert fragment in err, err
    return err


def _bad_run(assets, capsys, extra: dict, *fragments: str, argv: list[str] | None = None,
             out: Path | None = None) -> str:
    """Run ``capscale prune`` into the finished run's output_dir; exit 2, one line with
    every fragment, and the output_dir byte-identical afterwards."""
    out = out or assets["finished"]
    before = _snapshot(out)
    capsys.readouterr()
    code = main(argv if argv is not None else ["prune", *overrides(assets, out, **extra)])
    line = _expect_one_line(capsys, code, *fragments)
    assert _snapshot(out) == before, f"{out} changed"
    return line


# -- data -------------------------------------------------------------------------------
TRAIN = _rows(12, 3)
TARGETS = [(text, round(0.1 * i, 1)) for i, (text, _) in enumerate(TRAIN)]
REGRESSION = {"data.task_type": "regression", "cap.modules.prc.w_sup": 0,
              "cap.modules.fic.w_sup": 0, "cap.modules.snc.w_sup": 0}


def _with(rows: list, i: int, cell: tuple) -> list:
    return [*rows[:i], cell, *rows[i + 1:]]


def _data_case(tmp: Path, name: str) -> dict:
    """Overrides pointing at the data files of case ``name`` (dev None: held out)."""
    cases = {  # name -> (train rows, dev rows, overrides)
        "empty label": (_with(TRAIN, 9, (TRAIN[9][0], "")), TRAIN[:6], {}),
        "NA label, no teacher": (_with(TRAIN, 4, (TRAIN[4][0], "NA")), TRAIN[:6],
                                 {"model.teacher": "null"}),
        "empty label in dev": (TRAIN, _with(TRAIN[:6], 2, (TRAIN[2][0], "  ")), {}),
        "NaN target": (_with(TARGETS, 7, (TARGETS[7][0], "nan")), TARGETS[:6], REGRESSION),
        "inf target": (_with(TARGETS, 5, (TARGETS[5][0], "inf")), TARGETS[:6], REGRESSION),
        "text target": (_with(TARGETS, 6, (TARGETS[6][0], "high")), TARGETS[:6],
                        REGRESSION),
        "empty text, held-out dev": ([*TRAIN, ("", "pos")], None, {}),
        "long text over the positions": ([*TRAIN, (LONG, "pos")], TRAIN[:6],
                                         {"data.max_length": 100}),
        "long text at the limit, truncation error": (
            [*TRAIN, (LONG, "pos")], TRAIN[:6],
            {"data.max_length": 64, "data.truncation": "error"}),
    }
    train, dev, extra = cases[name]
    return {**extra, "data.train_file": _csv(tmp / "train.csv", train),
            "data.validation_file": "null" if dev is None else _csv(tmp / "dev.csv", dev)}


DATA_CASES = [
    # (case, fragments of the one line; {train} / {dev}: the file paths)
    ("empty label", ["train row 9 of {train}, column 'label': missing label",
                     "fix the row or drop it"]),
    ("NA label, no teacher", ["train row 4 of {train}, column 'label': missing label",
                              "NA"]),
    ("empty label in dev", ["validation row 2 of {dev}, column 'label': missing label ('  ')"]),
    ("NaN target", ["train row 7 of {train}, column 'label': missing regression label"]),
    ("inf target", ["train row 5 of {train}", "regression label inf is not a finite number"]),
    ("text target", ["train row 6 of {train}", "regression label 'high' is not a number"]),
    ("empty text, held-out dev", ["train row 12 of {train}: column 'sentence' is empty"]),
    ("long text over the positions", [
        "config error: data.max_length = 100: the model's position embeddings take at most "
        "64 tokens", "has 72", "lower data.max_length to 64 or less"]),
    ("long text at the limit, truncation error", [
        "longer than data.max_length = 64 tokens",
        "shorten them (64 tokens is the most the model takes)"]),
]


@pytest.mark.parametrize(("case", "fragments"), DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_data_exits_2_naming_the_row(assets, tmp_path, capsys, case, fragments):
    extra = _data_case(tmp_path, case)
    names = {"train": extra["data.train_file"], "dev": extra["data.validation_file"]}
    line = _bad_run(assets, capsys, extra, *(f.format(**names) for f in fragments))
    assert "raise data.max_length" not in line  # the model cannot take longer texts


def test_roberta_positions_leave_out_the_padding_offset(assets, tmp_path, capsys):
    """34 positions, 2 reserved: 32 tokens at most (a 35-token text, max_length 40)."""
    train = _csv(tmp_path / "train.csv", [*_rows(8, 4), (" ".join(["good"] * 33), "pos")])
    _bad_run(assets, capsys, {"model.name_or_path": assets["roberta"],
                              "model.teacher": "null", "data.train_file": train,
                              "data.validation_file": assets["dev"], "data.max_length": 40},
             "data.max_length = 40", "at most 32 tokens", "has 35",
             "lower data.max_length to 32 or less")


def test_max_length_above_the_positions_with_short_texts_still_runs(assets):
    """No text longer than the model takes: nothing would crash, nothing refused."""
    from capscale.checks import check_run_inputs, load_run_config
    from capscale.tasks import get_task

    cfg = load_run_config(None, overrides(assets, assets["tmp"] / "unused",
                                          **{"data.max_length": 512}))
    data, _ = check_run_inputs(cfg, get_task("classification"))
    assert len(data.train) == 16


def test_undecodable_csv_suggests_file_encoding(assets, tmp_path, capsys):
    latin = _csv(tmp_path / "latin.csv", [*GOOD * 4, ("café was good", "pos")],
                 encoding="latin-1")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logging.getLogger("datasets").addHandler(handler)
    try:
        _bad_run(assets, capsys, {"data.train_file": latin, "data.validation_file": latin},
                 f"data file {latin} is not utf-8 text (byte 0xe9 on line 10)",
                 "set data.file_encoding")
    finally:
        logging.getLogger("datasets").removeHandler(handler)
    # datasets' own "Failed to read file ..." log line would be a second line
    assert not [r for r in records if "Failed to read" in r.getMessage()], records
    from capscale.config import DataConfig
    from capscale.data import load_task_data
    data = load_task_data(DataConfig(train_file=str(latin), validation_file=str(latin),
                                     file_encoding="latin-1"))
    assert "café was good" in data.train["sentence"]


def test_unknown_encoding_and_ragged_csv(assets, tmp_path, capsys):
    _bad_run(assets, capsys, {"data.file_encoding": "klingon"},
             "data.file_encoding = 'klingon': unknown encoding")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("sentence,label\nthe movie was good,pos\nthe film,was,bad,neg\n" * 3)
    _bad_run(assets, capsys, {"data.train_file": ragged, "data.validation_file": ragged},
             f"data file {ragged} could not be read as csv")


# -- config and command line ------------------------------------------------------------
def test_yaml_syntax_error_gives_file_line_column(assets, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"output_dir: {assets['finished']}\ntrain:\n  lr: 1e-4\n"
                   "  epochs: [1\nmodel: x\n")
    _bad_run(assets, capsys, {}, f"{bad}:5:6: YAML syntax error",
             argv=["prune", "--config", str(bad)])
    _bad_run(assets, capsys, {"train.lr": "[1"}, "override 'train.lr=[1', value:1:3: YAML "
             "syntax error")
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  lr: 1e-4 # caf\xe9\n".encode("latin-1"))
    _bad_run(assets, capsys, {}, f"config file {latin}: not UTF-8 text",
             argv=["prune", "--config", str(latin)])


def test_missing_config_is_one_line(assets, capsys):
    for argv in ([], ["prune"]):
        _bad_run(assets, capsys, {}, "config error: no --config given: capscale prune "
                 "--config X.yaml", argv=argv)
    before = _snapshot(assets["finished"])
    for argv in (["--config"], ["prune", "--bogus"]):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        _expect_one_line(capsys, stop.value.code, "capscale: usage error: ")
    assert _snapshot(assets["finished"]) == before


def test_output_dir_that_is_a_file(assets, capsys):
    results = assets["finished"] / "results.json"
    _bad_run(assets, capsys, {"output_dir": results},
             f"output_dir = '{results}': is a file, not a folder", out=results)
    _bad_run(assets, capsys, {"output_dir": results / "run"},
             f"output_dir = '{results / 'run'}': is under {results}, a file")
    _bad_run(assets, capsys, {"checkpoint.dir": results},
             f"checkpoint.dir = '{results}': is a file")


def test_soft_movement_under_a_sharding_strategy_is_refused(assets, capsys):
    """Its L1 term reads every score outside the forward: under zero3 it was NaN at the
    first step, under fsdp2 a crash in backward; now one line before any model loads."""
    for strategy in ("zero3", "fsdp2"):
        _bad_run(assets, capsys, {"pruning.method": "soft_movement", "strategy": strategy},
                 f"pruning.method=soft_movement with strategy={strategy}: its L1 penalty on "
                 "the sigmoid scores reads every score outside the forward")


def test_unwritable_output_dir(assets, tmp_path, capsys, monkeypatch):
    locked = tmp_path / "locked"
    (locked / "earlier").mkdir(parents=True)
    (locked / "earlier" / "results.json").write_text("{}")
    locked.chmod(0o555)
    try:
        if os.access(locked, os.W_OK):  # root: permissions do not apply; deny it here
            real = os.access
            monkeypatch.setattr(os, "access", lambda p, mode, **kw: (
                Path(p) != locked and real(p, mode, **kw)))
        _bad_run(assets, capsys, {"output_dir": locked / "run"},
                 f"output_dir = '{locked / 'run'}': not writable ({locked}, where it would "
                 "be made)", out=locked)
    finally:
        locked.chmod(0o755)


# -- warnings ---------------------------------------------------------------------------
def test_one_step_run_and_too_many_negatives_warn(assets, tmp_path, capsys):
    """A completed run of one step (0% -> 50% at once) with num_negatives above the 16
    training examples: both warnings in the log and in results.json."""
    out = tmp_path / "short"
    assert main(["prune", *overrides(assets, out, **{
        "train.max_steps": 1, "report.enabled": "false", "report.trackers": "[]",
        "cap.num_negatives": 4096})]) == 0
    notes = json.loads((out / "results.json").read_text())["notes"]
    short = [n for n in notes if "is too short for its sparsity schedule" in n]
    assert short and "from 0% to 50% sparsity at once" in short[0], notes
    assert any("cap.num_negatives = 4096 is more than the 16 training examples" in n
               for n in notes), notes
    logged = capsys.readouterr()
    assert "is too short for its sparsity schedule" in logged.out + logged.err


def test_schedule_warning_only_for_short_cubic_schedules():
    from capscale.checks import load_run_config, schedule_warning

    def warn(steps: int, **extra: object) -> str | None:
        over = ["data.preset=tweets", *(f"{k}={v}" for k, v in extra.items())]
        return schedule_warning(load_run_config(None, over), steps)

    assert warn(1, **{"pruning.final_sparsity": 0.5}) is not None
    assert warn(24, **{"pruning.final_sparsity": 0.5}) is None  # the tiny test runs
    assert warn(2000) is None
    assert warn(30) is not None  # 90% in 21 ramp steps: 12 points at the first update
    assert warn(1, **{"pruning.method": "none"}) is None
    assert warn(1, **{"pruning.method": "structured"}) is None  # iterative levels
    cubic = {"pruning.method": "structured", "structured.schedule": "cubic"}
    assert warn(40, **cubic, **{"structured.update_every": 50}) is not None
    assert warn(2000, **cubic, **{"structured.update_every": 50}) is None


# -- property: random CSVs and overrides ------------------------------------------------

SENTENCES = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)
TEXTS = st.one_of(SENTENCES, st.text(max_size=12), st.sampled_from([
    "", "   ", "caf\u00e9 \u2603 good", 'a, quoted "film"', "two\nlines", "123", LONG]))
LABELS = st.one_of(st.sampled_from(["pos", "neg", "", "NA", "0", "1", "2.5", "nan", "inf",
                                    "-3"]), st.none(), st.integers(-2, 3),
                   st.floats(allow_nan=True, allow_infinity=True))
OVERRIDES = {  # key -> (values that fit the tiny task, values that do not)
    "data.max_length": ([16, 32, 64], [100, 4, "x"]),
    "data.task_type": (["classification"], ["regression", "qa", "bogus"]),
    "data.truncation": (["truncate"], ["error", "maybe"]),
    "data.label_names": (["[neg, pos]"], ["[pos]", "[0, 1]"]),
    "data.text_column": (["sentence"], ["text"]),
    "data.file_encoding": (["utf-8"], ["latin-1", "klingon"]),
    "data.validation_file": (["@dev", "null"], ["/no/such.csv"]),
    "pruning.method": (["movement", "magnitude", "soft_movement", "none"], ["nope"]),
    "pruning.final_sparsity": ([0.3, 0.9], [1.5, "a"]),
    "train.batch_size": ([4, 16], [0]),
    "train.max_steps": ([1, 2], [0]),
    "train.epochs": ([1], [0]),
    "train.lr": ([1e-3], ["[1", "fast"]),
    "train.lrr": ([], [1]),
    "cap.num_negatives": ([4, 1000], [-1]),
    "cap.mode": (["bank", "online"], ["other"]),
    "cap.modules.prc.w_sup": ([0, 10], [-1]),
    "model.teacher": (["@model"], ["/no/such/teacher"]),
    "data.max_train_samples": ([8, 0], [-1]),
    "data.validation_fraction": ([0.25], [0, 1.5]),
    "output_dir": ([], ["@dev"]),  # a regular file
}


@st.composite
def _inputs(draw):
    """Training rows, their header, file format and encoding, and up to 4 overrides:
    clean (words of the tiny vocabulary, both labels, values that fit: most complete a
    run) or messy (any cell, header, format, encoding or value)."""
    keys = draw(st.lists(st.sampled_from(sorted(OVERRIDES)), max_size=4, unique=True))
    if draw(st.sampled_from([True, False, False])):
        texts = draw(st.lists(SENTENCES, min_size=8, max_size=16))
        rows = [(t, ("neg", "pos")[i % 2]) for i, t in enumerate(texts)]
        chosen = {k: draw(st.sampled_from(OVERRIDES[k][0])) for k in keys if OVERRIDES[k][0]}
        return rows, ("sentence", "label"), draw(st.sampled_from(FORMATS)), "utf-8", chosen
    rows = draw(st.lists(st.tuples(TEXTS, LABELS), max_size=16))
    header = draw(st.sampled_from([("sentence", "label"), ("text", "label"),
                                   ("sentence", "score")]))
    chosen = {k: draw(st.sampled_from([*OVERRIDES[k][0], *OVERRIDES[k][1]])) for k in keys}
    return (rows, header, draw(st.sampled_from(FORMATS)),
            draw(st.sampled_from(["utf-8", "latin-1"])), chosen)


FORMATS = [".csv", ".tsv", ".jsonl"]


def _write(path: Path, header, rows, encoding: str = "utf-8") -> Path:
    """``rows`` as a csv / tsv (cells as text) or jsonl (values as they are) file."""
    with open(path, "w", newline="", encoding=encoding, errors="replace") as f:
        if path.suffix == ".jsonl":
            f.writelines(json.dumps(dict(zip(header, r))) + "\n" for r in rows)
            return path
        w = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        w.writerow(header)
        w.writerows([["" if c is None else c for c in r] for r in rows])
    return path


OUTCOMES: dict[str, int] = {"completed": 0, "refused": 0}


@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(_inputs())
def test_random_inputs_complete_or_exit_2_with_one_line(assets, capsys, inputs):
    rows, header, fmt, encoding, chosen = inputs
    work = Path(tempfile.mkdtemp(dir=assets["tmp"]))
    files = {"model": assets["model"],
             "dev": _write(work / f"dev{fmt}", ("sentence", "label"), _rows(8, 2))}
    extra = {"data.train_file": _write(work / f"train{fmt}", header, rows, encoding),
             "data.validation_file": files["dev"], "train.epochs": 1, "train.max_steps": 2,
             "teacher_training.max_steps": 1, "report.enabled": "false",
             "report.trackers": "[]", "cap.num_negatives": 8, "checkpoint.final": "false"}
    extra.update({k: files[v[1:]] if isinstance(v, str) and v[:1] == "@" else v
                  for k, v in chosen.items()})
    dev_before = files["dev"].read_bytes()
    capsys.readouterr()
    code = main(["prune", *overrides(assets, work / "out", **extra)])
    err = capsys.readouterr().err.strip()
    if code == 0:
        assert (work / "out" / "results.json").is_file()
        OUTCOMES["completed"] += 1
    else:
        assert code == 2, err
        assert err.count("\n") == 0 and err.startswith("capscale: "), err
        assert not (work / "out" / "results.json").exists()
        OUTCOMES["refused"] += 1
    assert files["dev"].read_bytes() == dev_before
    shutil.rmtree(work)


def test_the_property_test_ran_both_outcomes():
    """Not vacuous: some generated inputs completed a run, some were refused (the
    number of examples is printed with ``-s``)."""
    if not sum(OUTCOMES.values()):
        pytest.skip("the property test did not run in this session")
    print(f"property test: {OUTCOMES['completed']} completed runs, "
          f"{OUTCOMES['refused']} one-line refusals")
    assert OUTCOMES["completed"] >= 1 and OUTCOMES["refused"] >= 1, OUTCOMES


def test_a_config_error_is_said_by_the_first_rank_only(assets, capsys, monkeypatch):
    """Every rank of a launch parses the config: rank 0 prints the line, the others exit
    2 without repeating it."""
    for key, rank, said in (("RANK", "1", False), ("SLURM_PROCID", "3", False),
                            ("RANK", "0", True)):
        monkeypatch.delenv("RANK", raising=False)
        monkeypatch.delenv("SLURM_PROCID", raising=False)
        monkeypatch.setenv(key, rank)
        assert main(["prune"]) == 2
        assert bool(capsys.readouterr().err.strip()) == said
