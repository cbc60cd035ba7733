"""The real entry point end to end on a tiny model: teacher, CAP pruning, export."""

from __future__ import annotations

import json

import pytest
import yaml
from tiny import sentiment_rows, write_csv

from capscale.run import main


def _common(model, train, val, out) -> list[str]:
    return [f"model.name_or_path={model}", f"data.train_file={train}",
            f"data.validation_file={val}", f"output_dir={out}", "data.max_length=32",
            "pruning.final_sparsity=0.9", "pruning.initial_warmup=0",
            "pruning.final_warmup=2", "cap.num_negatives=16",
            "cap.snapshot_schedule=milestones", "cap.snapshot_milestones=[0.3, 0.8]",
            "train.batch_size=16", "train.max_steps=6", "train.lr=1e-3",
            "teacher_training.max_steps=3", "teacher_training.batch_size=16",
            "train.num_threads=1", "train.progress=false"]


def test_main_prunes_exports_and_reports(tiny_bert, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_common(tiny_bert, *tiny_csv, out))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "capscale result" in captured.out

    results = json.loads((out / "results.json").read_text())
    assert results["task_metric"] == "accuracy"
    assert set(results["pruned_metrics"]) == {"accuracy", "f1", "matthews"}
    assert 0.0 <= results["pruned_metrics"]["accuracy"] <= 1.0
    assert results["teacher_metrics"]["accuracy"] >= 0.0  # fine-tuned here (no teacher given)
    assert abs(results["sparsity"]["linear_sparsity"] - 0.9) < 0.005
    assert results["steps"] == 6 and results["train_examples"] == 64
    assert results["eval_examples"] == 16 and results["world_size"] == 1

    for f in ("config.yaml", "history.jsonl", "evals.json", "teacher/capscale_teacher.json",
              "teacher/model.safetensors", "pruned/model/config.json",
              "pruned/model/model.safetensors", "pruned/model/tokenizer.json",
              "pruned/masks.safetensors", "pruned/sparsity_report.json"):
        assert (out / f).is_file(), f
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert {"ce", "kd", "prc_unsup", "fic_sup", "snc_unsup", "loss", "sparsity"} <= set(
        history[-1])
    assert "snc_unsup" not in history[0]  # no snapshot before the first milestone
    assert history[-1]["sparsity"] == pytest.approx(0.9)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["lr"] == 1e-3 and saved["cap"]["snapshot_milestones"] == [0.3, 0.8]
    report = json.loads((out / "pruned" / "sparsity_report.json").read_text())
    assert report["results"]["steps"] == 6

    # a second run with the same config reuses the cached teacher
    code = main(_common(tiny_bert, *tiny_csv, out))
    assert code == 0
    assert "reusing the fine-tuned teacher" in capsys.readouterr().out


def test_main_regression_task(tiny_model_factory, tmp_path, capsys):
    model = tiny_model_factory("bert", 1)
    rows = [{"sentence": r["sentence"], "label": float(i % 5) / 2}
            for i, r in enumerate(sentiment_rows(48, 3))]
    train, val = write_csv(tmp_path / "t.csv", rows[:40]), write_csv(tmp_path / "v.csv", rows[40:])
    out = tmp_path / "run"
    code = main([*_common(model, train, val, out), f"model.teacher={model}",
                 "data.task_type=regression", "cap.modules.prc.w_sup=0", "cap.modules.fic.w_sup=0",
                 "cap.modules.snc.w_sup=0", "pruning.method=magnitude"])
    assert code == 0, capsys.readouterr().err[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["task_metric"] == "pearson"
    assert set(results["pruned_metrics"]) == {"pearson", "spearman"}
    assert abs(results["sparsity"]["linear_sparsity"] - 0.9) < 0.005
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert "prc_unsup" in history[-1] and "prc_sup" not in history[-1]
