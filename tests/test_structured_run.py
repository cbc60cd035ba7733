"""Structured CAP through the real entry point on a tiny BERT, both schedules."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertModel

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.models.loading import resolve_model_path
from capscale.run import main


@pytest.fixture(scope="module")
def tiny_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured_run")
    tok = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, vocab_size=tok.vocab_size,
                         max_position_embeddings=64)).save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    rng = random.Random(0)
    words = {"good": "pos", "great": "pos", "bad": "neg", "awful": "neg"}
    with open(root / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "label"])
        for _ in range(48):
            word = rng.choice(list(words))
            w.writerow([f"the film was {word} and {rng.choice(['long', 'short'])}", words[word]])
    return root


def _args(root, out, *extra):
    return ["pruning.method=structured", f"model.name_or_path={root / 'tiny'}",
            f"data.train_file={root / 'train.csv'}", "data.max_length=16",
            "teacher_training.max_steps=2", "train.batch_size=8", "train.eval_batch_size=16",
            "cap.num_negatives=32", "train.progress=false", "structured.importance_fraction=0.5",
            f"output_dir={out}", *extra]


def test_structured_iterative_smoke(tiny_assets, tmp_path):
    out = tmp_path / "run"
    rc = main(_args(tiny_assets, out, "structured.levels=[0.5, 0.75]",
                    "structured.retrain_steps=2"))
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [p["level"] for p in results["curve"]] == [0.5, 0.75]
    evals = json.loads((out / "evals.json").read_text())
    assert evals[-1]["head_sparsity"] == pytest.approx(0.75)  # 2 of 8 heads kept
    assert evals[-1]["ffn_sparsity"] == pytest.approx(0.75)
    assert 0.5 < results["sparsity"]["encoder_sparsity"] < 0.8
    report = json.loads((out / "pruned" / "sparsity_report.json").read_text())
    assert all(h >= 1 for h in report["heads_per_layer"])
    model = AutoModelForSequenceClassification.from_pretrained(
        out / "pruned" / "model", trust_remote_code=True)
    assert sum(model.base_model.encoder.layer[i].intermediate.dense.out_features
               for i in range(2)) == 32  # 25% of 2 x 64 neurons


def test_structured_cubic_smoke(tiny_assets, tmp_path):
    out = tmp_path / "run"
    rc = main(_args(tiny_assets, out, "structured.schedule=cubic", "structured.levels=[0.5]",
                    "structured.update_every=2", "pruning.final_sparsity=0.5",
                    "pruning.initial_warmup=0.2", "pruning.final_warmup=0.2",
                    "train.max_steps=8"))
    assert rc == 0
    evals = json.loads((out / "evals.json").read_text())
    assert len(evals) == 1 and evals[0]["head_sparsity"] == pytest.approx(0.5)


def test_structured_config_errors():
    with pytest.raises(ConfigError, match=r"structured\.levels"):
        load_run_config(None, ["data.preset=tweets", "structured.levels=[0.5, 0.3]"])
    with pytest.raises(ConfigError, match=r"structured\.importance_fraction"):
        load_run_config(None, ["data.preset=tweets", "structured.importance_fraction=0"])


def test_structured_run_removes_emptied_blocks(tiny_assets, tmp_path):
    """At 90% with no head floor, one of the two layers loses every head: its attention
    block is skipped in training and removed from the export, which verifies; half the
    hidden dimensions go too, and layer distillation (dynamic map) rides along."""
    out = tmp_path / "run"
    rc = main(_args(tiny_assets, out, "structured.schedule=cubic", "structured.levels=[0.9]",
                    "structured.update_every=2", "pruning.final_sparsity=0.9",
                    "pruning.initial_warmup=0", "pruning.final_warmup=0.2",
                    "structured.min_heads_per_layer=0", "structured.remove_empty_blocks=true",
                    "structured.hidden_sparsity=0.5",
                    "loss.w_layer=0.5", "loss.layer_map=dynamic", "train.max_steps=6"))
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["export_verified"]["ok"]
    structure = json.loads((out / "pruned" / "structure.json").read_text())
    removed = structure["removed_blocks"]["attention"]
    assert len(removed) == 1 and structure["heads_per_layer"][removed[0]] == 0
    report = json.loads((out / "pruned" / "sparsity_report.json").read_text())
    assert report["removed_blocks"]["attention"] == removed
    assert report["hidden_size_kept"] == 16 and len(structure["hidden_kept"]) == 16
    card = (out / "pruned" / "model" / "README.md").read_text()
    assert "blocks removed (layer indices)" in card
    model = AutoModelForSequenceClassification.from_pretrained(
        out / "pruned" / "model", trust_remote_code=True)
    attention = model.base_model.encoder.layer[removed[0]].attention
    assert type(attention.output).__name__ == "SkippedResidual"
    assert sum(p.numel() for p in attention.parameters()) == 0
    history = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert all("layer" in h for h in history)
