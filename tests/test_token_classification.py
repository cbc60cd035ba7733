"""Token classification (data.task_type: token_classification): entity chunks and scores
against hand-worked cases, the CoNLL reader, tags aligned to first sub-tokens, bad data,
and a CAP run whose export AutoModelForTokenClassification loads. (2 ranks against one
process: tests/test_tasks_ranks.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from task_helpers import (
    TAGS,
    as_list,
    save_tagger,
    task_overrides,
    write_conll,
    write_ner,
)
from transformers import AutoModelForTokenClassification

from capscale.checks import load_run_config
from capscale.cli import main
from capscale.config import save_config
from capscale.console import Console
from capscale.data import IGNORE_INDEX, build_loaders, load_task_data, model_inputs
from capscale.distributed import DistContext
from capscale.errors import DataError
from capscale.models.loading import load_tokenizer, output_logits
from capscale.recipe import CAPRecipe
from capscale.tasks import get_task
from capscale.tasks.corpora import read_conll_file
from capscale.tasks.token_classification import TagReference, entity_scores, entity_spans

NER = get_task("token_classification")


@pytest.fixture(scope="module")
def ner_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ner")
    return save_tagger(root / "m0", 0), save_tagger(root / "m1", 1), write_ner(root / "d"), root


def test_entity_chunks_by_hand():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-LOC", "I-ORG", "O", "B-MISC"]
    # I- after O starts a chunk (conlleval); B- splits; a type change splits.
    assert entity_spans(tags) == {("PER", 0, 1), ("LOC", 3, 4), ("LOC", 5, 5),
                                  ("ORG", 6, 6), ("MISC", 8, 8)}
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "O", "O", "B-LOC"], ["B-ORG", "B-MISC"]]
    # gold 3 chunks, predicted 4, correct 2 (LOC, ORG): P 1/2, R 2/3
    got = entity_scores(gold, pred)
    assert got["precision"] == pytest.approx(0.5) and got["recall"] == pytest.approx(2 / 3)
    assert got["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))


def test_conll_reader_and_bad_lines(tmp_path):
    path = tmp_path / "a.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nJohn NNP B-NP B-PER\nruns VBZ B-VP O\n\n\n"
                    "-DOCSTART- -X- -X- O\nParis NNP B-NP B-LOC\n")
    ds = read_conll_file(path)
    assert ds["tokens"] == [["John", "runs"], ["Paris"]]
    assert ds["ner_tags"] == [["B-PER", "O"], ["B-LOC"]]
    path.write_text("John B-PER\nruns\n")
    with pytest.raises(DataError, match="line 2: 'runs' has no tag"):
        read_conll_file(path)


def _cfg(ner_assets, tmp_path, **extra):
    model, teacher, data, _ = ner_assets
    return load_run_config(None, as_list(task_overrides(
        "token_classification", model, teacher, data, tmp_path / "out", **extra)))


def test_tags_label_first_sub_tokens(ner_assets, tmp_path):
    cfg = _cfg(ner_assets, tmp_path)
    data = load_task_data(cfg.data)
    assert data.label_names == sorted(TAGS)
    tok = load_tokenizer(str(ner_assets[0]))
    loaders = build_loaders(data, tok, cfg.data, 4, 4, 0)
    row = loaders.train.dataset[0]
    words, tags = data.train[0]["words"], data.train[0]["tags"]
    enc = tok(words, is_split_into_words=True)
    first = [i for i, w in enumerate(enc.word_ids()) if w is not None and (
        i == 0 or enc.word_ids()[i - 1] != w)]
    labels = row["labels"].tolist()
    assert [labels[i] for i in first] == tags
    assert all(v == IGNORE_INDEX for i, v in enumerate(labels) if i not in first)
    batch = next(iter(loaders.eval))
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_metrics_score_every_word_of_the_reference():
    names = ["B-PER", "I-PER", "O"]
    ref = TagReference(names, [[0, 1, 2], [2, 0]])
    logits = np.zeros((2, 5, 3))
    labels = np.full((2, 5), IGNORE_INDEX)
    labels[0, 1:4] = [0, 1, 2]
    labels[1, 1:2] = [2]  # the second sentence's last word was cut by truncation
    logits[0, 1, 0] = logits[0, 2, 1] = logits[0, 3, 2] = 1.0
    logits[1, 1, 2] = 1.0
    got = NER.metrics(logits, labels, 3, reference=ref)
    # gold chunks: (PER 0-1) and (PER 1-1 of sentence 2): one found, one cut (predicted O)
    assert got["precision"] == 1.0 and got["recall"] == 0.5
    assert got["accuracy"] == pytest.approx(4 / 5)


def test_bad_ner_data(ner_assets, tmp_path):
    def broken(text):
        path = tmp_path / "bad.conll"
        path.write_text(text)
        return load_task_data(_cfg(ner_assets, tmp_path, **{"data.train_file": str(path)}
                                   ).data)
    with pytest.raises(DataError, match="line 3: 'runs' has no tag"):
        broken("-DOCSTART- -X- -X- O\nJohn NNP B-NP B-PER\nruns\n")
    valid = tmp_path / "v.conll"
    write_conll(valid, [[("John", "B-PER"), ("sings", "B-SONG")]])
    with pytest.raises(DataError, match=r"validation row 0: tag 'B-SONG' of word 1"):
        load_task_data(_cfg(ner_assets, tmp_path, **{"data.validation_file": str(valid)}).data)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in (
        {"tokens": ["John", "runs"], "ner_tags": ["B-PER", "O"]},
        {"tokens": ["Mary"], "ner_tags": ["B-PER", "O"]})))
    with pytest.raises(DataError, match=r"train row 1: 1 words but 2 tags"):
        load_task_data(_cfg(ner_assets, tmp_path, **{"data.train_file": str(rows),
                                                     "data.validation_file": str(rows)}).data)
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"tokens": ["Mary"], "ner_tags": ["B-PER"]}))
    rows.write_text(json.dumps({"tokens": [], "ner_tags": []}))
    with pytest.raises(DataError, match=r"train row 0: column 'tokens' holds no words"):
        load_task_data(_cfg(ner_assets, tmp_path, **{"data.train_file": str(rows),
                                                     "data.validation_file": str(good)}).data)


def test_ner_run_exports_a_token_classifier(ner_assets, capsys):
    model, teacher, data, root = ner_assets
    out = root / "run"
    over = task_overrides("token_classification", model, teacher, data, out,
                          **{"train.max_steps": 4})
    run = CAPRecipe(load_run_config(None, as_list(over)), DistContext(), Console(enabled=False))
    run.setup()
    run.train()
    batch = model_inputs(next(iter(run.loaders.eval)), "cpu")
    with torch.no_grad():
        masked = output_logits(run.student.model.eval()(**batch))
    results = run.finish(export=True)
    assert results["task_metric"] == "f1" and results["export_verified"]["ok"]
    assert set(results["pruned_metrics"]) == {"precision", "recall", "f1", "accuracy"}
    assert {"ce", "kd", "prc_unsup", "fic_unsup"} <= set(run.state.history[-1])
    loaded = AutoModelForTokenClassification.from_pretrained(out / "pruned" / "model").eval()
    assert loaded.config.id2label[0] == sorted(TAGS)[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, masked, atol=1e-5, rtol=1e-5)
    save_config(run.cfg, out / "config.yaml")
    capsys.readouterr()
    assert main(["evaluate", "--config", str(out / "config.yaml")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(
        results["pruned_metrics"], rel=1e-6)


def test_shipped_config_reads_conll_2003():
    cfg = load_run_config("ner_minilm_conll.yaml", ["data.max_train_samples=0",
                                                    "data.max_eval_samples=0"])
    data = load_task_data(cfg.data)
    assert (len(data.train), len(data.validation)) == (14041, 3250)
    assert data.label_names == ["B-LOC", "B-MISC", "B-ORG", "B-PER", "I-LOC", "I-MISC",
                                "I-ORG", "I-PER", "O"]
    test = load_task_data(load_run_config("ner_minilm_conll.yaml", [
        "data.validation_split=test", "data.max_eval_samples=0"]).data)
    assert len(test.validation) == 3453
