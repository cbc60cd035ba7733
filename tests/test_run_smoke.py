"""The real entry point end to end on a tiny model: teacher, CAP pruning, export."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch
import yaml
from tiny import sentiment_rows, write_csv
from transformers import AutoModelForSequenceClassification, AutoTokenizer

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


def _predict(model_dir, tokenizer_dir, csv_path) -> tuple[list[dict], torch.Tensor]:
    """The csv's rows and a saved model's logits on them (plain transformers)."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    enc = tok([r["sentence"] for r in rows], truncation=True, max_length=32, padding=True,
              return_tensors="pt")
    with torch.no_grad():
        return rows, model(**enc).logits


def _metrics(model_dir, tokenizer_dir, csv_path) -> dict[str, float]:
    """Accuracy, F1 of ``pos`` and binary MCC of a saved model, written out by hand."""
    rows, logits = _predict(model_dir, tokenizer_dir, csv_path)
    pred = logits.argmax(-1).tolist()
    gold = [["neg", "pos"].index(r["label"]) for r in rows]
    pairs = list(zip(pred, gold))
    tp, tn = pairs.count((1, 1)), pairs.count((0, 0))
    fp, fn = pairs.count((1, 0)), pairs.count((0, 1))
    den = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {"accuracy": (tp + tn) / len(rows),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0,
            "matthews": (tp * tn - fp * fn) / den if den else 0.0}


def _pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return cov / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def _avg_ranks(x: list[float]) -> list[float]:
    return [sum(1 for b in x if b < a) + (sum(1 for b in x if b == a) - 1) / 2 for a in x]


def test_main_prunes_exports_and_reports(tiny_bert, tiny_csv, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(_common(tiny_bert, *tiny_csv, out))
    captured = capsys.readouterr()
    assert code == 0, captured.err[-3000:]
    assert "capscale result" in captured.out

    results = json.loads((out / "results.json").read_text())
    assert results["task_metric"] == "accuracy"
    assert set(results["pruned_metrics"]) == {"accuracy", "f1", "matthews"}
    # Recomputed independently: the saved models, plain transformers, the csv's rows
    # (labels in sorted order: neg = 0, pos = 1). The teacher was fine-tuned here.
    assert results["pruned_metrics"] == pytest.approx(
        _metrics(out / "pruned" / "model", tiny_bert, tiny_csv[1]), abs=1e-9)
    assert results["teacher_metrics"] == pytest.approx(
        _metrics(out / "teacher", tiny_bert, tiny_csv[1]), abs=1e-9)
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
    # Recomputed independently from the exported model (ties in gold: average ranks)
    rows, logits = _predict(out / "pruned" / "model", model, val)
    pred, gold = logits[:, 0].double().tolist(), [float(r["label"]) for r in rows]
    assert results["pruned_metrics"] == pytest.approx(
        {"pearson": _pearson(pred, gold),
         "spearman": _pearson(_avg_ranks(pred), _avg_ranks(gold))}, rel=1e-5, abs=1e-7)
    assert abs(results["sparsity"]["linear_sparsity"] - 0.9) < 0.005
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert "prc_unsup" in history[-1] and "prc_sup" not in history[-1]
