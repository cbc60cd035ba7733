"""Bad configs and bad data files, end to end through the ``capscale`` command.

Each case must exit with code 2 and print one line that names what to change, before
any model is loaded (the run never gets as far as writing ``config.yaml``).
"""

from __future__ import annotations

import csv
import json

import pytest
from _tiny_run import make_model, overrides, setup

from capscale.checks import load_run_config
from capscale.cli import main
from capscale.data import check_lengths, load_task_data
from capscale.models.loading import load_tokenizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    a = setup(tmp)
    a["teacher3"] = make_model(tmp / "bert3", num_labels=3)
    gpt = tmp / "gpt2"  # a decoder capscale has no adapter for (config only is enough)
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    a["gpt2"] = gpt
    return a


def _csv(path, rows, header=("sentence", "label")):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def _files(tmp, assets):
    good = [("the movie was good", "pos"), ("the film was bad", "neg")] * 4
    return {
        "empty_text": _csv(tmp / "empty.csv", [*good, ("   ", "pos")]),
        "bad_label": _csv(tmp / "label.csv", [*good, ("the plot", "meh")]),
        "one_class": _csv(tmp / "one.csv", [("the movie was good", "pos")] * 6),
        "long_text": _csv(tmp / "long.csv", [*good, (" ".join(["very"] * 40), "pos")]),
        "other_columns": _csv(tmp / "cols.csv", good, header=("text", "label")),
        "missing": tmp / "missing.csv",
    }


CASES = [
    # (overrides, expected text in the one-line message)
    ({"train.lrr": 1}, "unknown config key train.lrr; did you mean train.lr?"),
    ({"train.batch_size": "many"}, "train.batch_size = 'many': expected int"),
    ({"pruning.final_sparsity": 1.5}, "pruning.final_sparsity = 1.5: must be in [0, 1)"),
    ({"pruning.method": "random"}, "pruning.method = 'random': expected one of"),
    ({"checkpoint.keep_last": 0}, "checkpoint.keep_last = 0: must be >= 1"),
    ({"train.on_nonfinite": "ignore"}, "train.on_nonfinite = 'ignore': expected one of"),
    ({"resume": "/no/such/checkpoint"}, "resume = '/no/such/checkpoint': not a checkpoint"),
    ({"data.train_file": "@missing"}, "does not exist"),
    ({"data.train_file": "@other_columns"}, "train data has no column 'sentence'"),
    ({"data.train_file": "@empty_text"}, "column 'sentence' is empty or not text"),
    ({"data.train_file": "@bad_label", "data.label_names": "[neg, pos]"},
     "label 'meh' is not in the label set ['neg', 'pos']"),
    ({"data.train_file": "@one_class", "data.validation_file": "@one_class"},
     "classification needs at least 2 labels"),
    ({"data.train_file": "@long_text", "data.truncation": "error"},
     "longer than data.max_length = 16 tokens"),
    ({"model.name_or_path": "/no/such/model"},
     "model.name_or_path '/no/such/model' could not be read"),
    ({"model.name_or_path": "@gpt2"}, "no encoder adapter for model_type 'gpt2'"),
    ({"model.teacher": "@teacher3"}, "has 3 output labels but the task has 2"),
]


@pytest.mark.parametrize(("extra", "message"), CASES, ids=[c[1][:40] for c in CASES])
def test_bad_input_exits_2_with_one_line(assets, tmp_path, capsys, extra, message):
    files = _files(tmp_path, assets)
    values = {k: (files.get(v[1:]) or assets[v[1:]]) if isinstance(v, str) and v[:1] == "@"
              else v for k, v in extra.items()}
    if "data.train_file" in values and "data.validation_file" not in values:
        values["data.validation_file"] = values["data.train_file"]
    out = tmp_path / "run"
    assert main(["prune", *overrides(assets, out, **values)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("capscale: "), err
    assert message in err, err
    assert not (out / "config.yaml").exists()  # stopped before the run started


def test_overlong_text_is_truncated_with_a_count(assets, tmp_path):
    files = _files(tmp_path, assets)
    cfg = load_run_config(None, [f"data.train_file={files['long_text']}",
                             f"data.validation_file={assets['dev']}", "data.max_length=16"])
    note = check_lengths(load_task_data(cfg.data), load_tokenizer(str(assets["model"])),
                         cfg.data)
    assert note.startswith("1 train and 0 validation texts are longer")
    assert note.endswith("truncated")


NO_ROWS = [
    # (file name, content, which file it is; the other is a good file of the same format)
    ("header_only.csv", "sentence,label\n", "train"),
    ("header_only_dev.csv", "sentence,label\n\n", "validation"),
    ("empty.jsonl", "", "train"),
    ("blank.jsonl", "\n  \n", "validation"),
]


@pytest.mark.parametrize(("name", "content", "which"), NO_ROWS, ids=[c[0] for c in NO_ROWS])
def test_data_file_without_rows_exits_2_naming_the_file(assets, tmp_path, capsys, name,
                                                        content, which):
    bad = tmp_path / name
    bad.write_text(content)
    good = assets["train"]
    if bad.suffix == ".jsonl":
        good = tmp_path / "good.jsonl"
        good.write_text("".join(json.dumps({"sentence": s, "label": lab}) + "\n"
                                for s, lab in [("the movie was good", "pos"),
                                               ("the film was bad", "neg")] * 4))
    files = {"data.train_file": bad, "data.validation_file": good}
    if which == "validation":
        files = {"data.train_file": good, "data.validation_file": bad}
    out = tmp_path / "run"
    assert main(["prune", *overrides(assets, out, **files)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("capscale: "), err
    assert f"data file {bad} has no rows" in err, err
    assert not (out / "config.yaml").exists()


def test_json_empty_list_and_parquet_without_rows_are_data_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from capscale.config import DataConfig
    from capscale.data import DataError

    (tmp_path / "empty.json").write_text(" [\n ] \n")
    pq.write_table(pa.table({"sentence": pa.array([], pa.string()),
                             "label": pa.array([], pa.string())}), tmp_path / "empty.parquet")
    for name in ("empty.json", "empty.parquet"):
        f = str(tmp_path / name)
        with pytest.raises(DataError, match=f"data file {f} has no rows"):
            load_task_data(DataConfig(train_file=f, validation_file=f))
