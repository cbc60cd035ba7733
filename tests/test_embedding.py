"""Sentence embeddings (data.task_type: embedding): pooling, the model's shapes, CoSENT /
MultipleNegativesRanking and the metrics against hand computations, the STS-B reader,
bad data, config rules, and a structured run whose export sentence-transformers loads.
(2 ranks against one process: tests/test_tasks_ranks.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from task_helpers import as_list, save_embedder, sts_rows, task_overrides, write_sts

from capscale.checks import load_run_config
from capscale.cli import main
from capscale.config import ConfigError, save_config
from capscale.console import Console
from capscale.data import Collator, load_task_data
from capscale.distributed import DistContext
from capscale.errors import DataError
from capscale.models.loading import load_tokenizer
from capscale.recipe import CAPRecipe
from capscale.tasks import get_task
from capscale.tasks.corpora import read_sts_file
from capscale.tasks.embedding import cosent, multiple_negatives, retrieval_scores
from capscale.tasks.embedding_model import Pooling, SentenceEmbedder, pool, read_pooling

EMB = get_task("embedding")


@pytest.fixture(scope="module")
def emb_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("emb")
    return (save_embedder(root / "m0", 0), save_embedder(root / "m1", 1),
            write_sts(root / "sts"), root)


def test_pooling_is_read_from_the_sentence_transformers_files(emb_assets, tmp_path):
    model, _, _, _ = emb_assets
    assert read_pooling(model) == Pooling("mean", True)
    assert read_pooling(tmp_path) is None
    save_embedder(tmp_path / "cls", pooling="cls")
    assert read_pooling(tmp_path / "cls") == Pooling("cls", True)
    conf = tmp_path / "cls" / "1_Pooling" / "config.json"
    conf.write_text(json.dumps({**json.loads(conf.read_text()),
                                "pooling_mode_mean_sqrt_len_tokens": True}))
    with pytest.raises(ValueError, match="sqrt_len"):
        read_pooling(tmp_path / "cls")


def test_pool_modes_by_hand():
    h = torch.tensor([[[1.0, 2.0], [3.0, -4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(pool(h, mask, "mean"), torch.tensor([[2.0, -1.0]]))
    torch.testing.assert_close(pool(h, mask, "cls"), torch.tensor([[1.0, 2.0]]))
    torch.testing.assert_close(pool(h, mask, "max"), torch.tensor([[3.0, 2.0]]))


def test_pairs_embed_as_single_texts_and_as_sentence_transformers_does(emb_assets):
    from sentence_transformers import SentenceTransformer
    model_dir = emb_assets[0]
    model = EMB.load_model(str(model_dir), 1, None).eval()
    tok = load_tokenizer(str(model_dir))
    texts = ["a man plays the guitar", "the cat"]
    one = tok(texts, padding=True, return_tensors="pt")
    rows = [{k: [v[i][: int(one["attention_mask"][i].sum())], v[1 - i][
        : int(one["attention_mask"][1 - i].sum())]] for k, v in one.items()} for i in (0, 1)]
    batch = Collator(0)(rows)  # (2, 2, L): each text with the other as its pair
    assert batch["input_ids"].shape[:2] == (2, 2)
    with torch.no_grad():
        single = model(**one).logits  # (2, 1, H)
        paired = model(**batch).logits
    assert single.shape == (2, 1, 32) and paired.shape == (2, 2, 32)
    torch.testing.assert_close(paired[:, 0], single[:, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(paired[0, 1], single[1, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(single.norm(dim=-1), torch.ones(2, 1))
    st = SentenceTransformer(str(model_dir), device="cpu")
    got = st.encode(texts, convert_to_tensor=True)
    torch.testing.assert_close(got, single[:, 0], atol=1e-5, rtol=1e-5)


def test_cosent_multiple_negatives_and_metrics_by_hand():
    cos = torch.tensor([0.9, 0.1, 0.5])
    scores = torch.tensor([5.0, 0.0, 3.0])  # ordered pairs (0,1), (0,2), (2,1)
    terms = [20 * (cos[j] - cos[i]) for i, j in ((0, 1), (0, 2), (2, 1))]
    expected = torch.log(1 + sum(torch.exp(t) for t in terms))
    assert float(cosent(cos, scores)) == pytest.approx(float(expected), rel=1e-6)
    emb = torch.randn(4, 3, 8)
    a, p, n = (F.normalize(emb[:, i], dim=-1) for i in range(3))
    logits = 20 * a @ torch.cat([p, n]).T
    assert float(multiple_negatives(emb)) == pytest.approx(
        float(F.cross_entropy(logits, torch.arange(4))), rel=1e-6)
    q = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    c = np.array([[0.0, 1.0], [0.0, 1.0], [1.0, 0.9]])  # query 0's gold ranks 2nd
    got = retrieval_scores(q, c)
    assert got["recall@1"] == pytest.approx(2 / 3)
    assert got["mrr@10"] == pytest.approx((1 / 2 + 1 + 1) / 3)
    pairs = np.stack([np.eye(3), np.eye(3)[[0, 2, 1]]], axis=1)  # cos 1, 0, 0
    m = EMB.metrics(pairs, np.array([5.0, 1.0, 0.0]), 1)
    assert m["spearman"] == pytest.approx(0.8660254, rel=1e-6)  # ranks (3, 1.5, 1.5)


def test_sts_file_reader(tmp_path):
    path = tmp_path / "sts.csv"
    path.write_text("main-news\tfile\t2012\t0001\t4.2\tHe said \"yes\".\tHe agreed.\textra\n"
                    "main-news\tfile\t2012\t0002\t0.5\tA cat.\tA car.\n")
    ds = read_sts_file(path)
    assert ds["sentence1"] == ['He said "yes".', "A cat."] and ds["score"] == [4.2, 0.5]
    (tmp_path / "bad.csv").write_text("a\tb\t2012\t3\tfive\tx\ty\n")
    with pytest.raises(DataError, match="line 1: score 'five'"):
        read_sts_file(tmp_path / "bad.csv")


def _cfg(emb_assets, tmp_path, **extra):
    model, teacher, data, _ = emb_assets
    return load_run_config(None, as_list(task_overrides(
        "embedding", model, teacher, data, tmp_path / "out", **extra)))


def test_bad_embedding_data(emb_assets, tmp_path):
    train, dev = emb_assets[2]
    lines = train.read_text().splitlines()
    bad = tmp_path / "bad.csv"
    bad.write_text("\n".join([lines[0], lines[1], ',"the cat",3.0', *lines[3:]]))
    with pytest.raises(DataError, match=r"train row 1: column 'sentence1' is empty"):
        load_task_data(_cfg(emb_assets, tmp_path, **{"data.train_file": str(bad)}).data)
    bad.write_text("\n".join([lines[0], lines[1], '"a dog","the cat",high', *lines[3:]]))
    with pytest.raises(DataError, match=r"train row 1: similarity score 'high'"):
        load_task_data(_cfg(emb_assets, tmp_path, **{"data.train_file": str(bad)}).data)
    unscored = tmp_path / "unscored.csv"
    unscored.write_text("\n".join(ln.rpartition(",")[0] for ln in dev.read_text().splitlines())
                        .replace("sentence1,sentence2", "sentence1,sentence2"))
    with pytest.raises(DataError, match="validation split must hold scored pairs"):
        load_task_data(_cfg(emb_assets, tmp_path,
                            **{"data.validation_file": str(unscored)}).data)
    data = load_task_data(_cfg(emb_assets, tmp_path, **{"data.validation_file": str(dev),
                                                        "data.train_file": str(unscored)}).data)
    assert all(np.isnan(data.train["labels"]))  # unscored pairs train with MNRL


def test_embedding_config_rules(emb_assets, tmp_path):
    with pytest.raises(ConfigError, match=r"cap\.representation = 'cls'"):
        _cfg(emb_assets, tmp_path, **{"cap.representation": "cls"})
    with pytest.raises(ConfigError, match=r"export\.formats onnx"):
        _cfg(emb_assets, tmp_path, **{"export.formats": ["pytorch", "onnx"]})


def test_structured_embedding_export_loads_in_sentence_transformers(emb_assets, capsys):
    from sentence_transformers import SentenceTransformer
    model, teacher, data, root = emb_assets
    out = root / "structured"
    over = task_overrides("embedding", model, teacher, data, out, **{
        "pruning.method": "structured", "structured.levels": [0.5],
        "structured.retrain_steps": 2})
    run = CAPRecipe(load_run_config(None, as_list(over)), DistContext(), Console(enabled=False))
    run.setup()
    run.train()
    results = run.finish(export=True)
    assert results["export_verified"]["ok"] and results["task_metric"] == "spearman"
    assert set(results["pruned_metrics"]) >= {"spearman", "pearson", "recall@1", "mrr@10"}
    save_config(run.cfg, out / "config.yaml")  # ``capscale evaluate`` scores the student
    capsys.readouterr()
    assert main(["evaluate", "--config", str(out / "config.yaml")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(
        results["pruned_metrics"], rel=1e-4)
    export = out / "pruned" / "model"
    assert (export / "modules.json").is_file()
    cfg = json.loads((export / "config.json").read_text())
    assert cfg["auto_map"]["AutoModel"].endswith("CapscalePrunedModel")
    texts = ["a man plays the guitar", "the red car drives fast"]
    st = SentenceTransformer(str(export), device="cpu", trust_remote_code=True)
    ours = SentenceEmbedder.from_pretrained(export, trust_remote_code=True).eval()
    tok = load_tokenizer(str(export))
    with torch.no_grad():
        expected = ours(**tok(texts, padding=True, return_tensors="pt")).logits[:, 0]
    torch.testing.assert_close(st.encode(texts, convert_to_tensor=True), expected,
                               atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in st.parameters()) < sum(
        p.numel() for p in SentenceTransformer(str(model), device="cpu").parameters())


def test_shipped_config_reads_the_sts_benchmark():
    cfg = load_run_config("embed_minilm_stsb.yaml")
    assert cfg.data.task_type == "embedding" and cfg.model.teacher == "minilm"
    data = load_task_data(cfg.data)
    assert (len(data.train), len(data.validation)) == (5749, 1500)
    test = load_task_data(load_run_config("embed_minilm_stsb.yaml",
                                          ["data.validation_split=test"]).data)
    assert len(test.validation) == 1379
    assert min(test.validation["labels"]) >= 0.0 and max(test.validation["labels"]) <= 5.0


def test_unscored_triples_train_with_multiple_negatives(emb_assets, tmp_path):
    model, teacher, (_, dev), _ = emb_assets
    rows = ["sentence1,sentence2,negative"] + [
        f"{r['sentence1']},{r['sentence2']},{r['sentence1'][::-1]}" for r in
        sts_rows(24, 5)]
    triples = tmp_path / "triples.csv"
    triples.write_text("\n".join(rows))
    over = task_overrides("embedding", model, teacher, (triples, dev), tmp_path / "out", **{
        "data.text_negative_column": "negative", "train.max_steps": 2})
    run = CAPRecipe(load_run_config(None, as_list(over)), DistContext(), Console(enabled=False))
    run.setup()
    batch = next(iter(run.loaders.train))
    assert batch["input_ids"].shape[:2] == (8, 3) and bool(torch.isnan(batch["labels"]).all())
    run.train()
    first = run.state.history[0]
    assert first["ce"] > 0 and np.isfinite(first["ce"])  # MNRL over 8 positives + 8 negatives
    assert run.finish(export=True)["export_verified"]["ok"]


def test_a_corpus_of_single_texts_needs_a_given_teacher(emb_assets, tmp_path):
    """Fine-tuning a teacher on single texts has no signal: refused before any model
    loads, naming the fix; with model.teacher given the run is accepted."""
    model, teacher, (_, dev), _ = emb_assets
    corpus = tmp_path / "corpus.csv"
    corpus.write_text("\n".join(["sentence1"] + [r["sentence1"] for r in sts_rows(24, 6)]))
    over = task_overrides("embedding", model, teacher, (corpus, dev), tmp_path / "out")
    with pytest.raises(ConfigError, match="single texts gives a teacher's fine-tuning"):
        CAPRecipe(load_run_config(None, as_list({**over, "model.teacher": "null"})),
                  DistContext(), Console(enabled=False))
    CAPRecipe(load_run_config(None, as_list(over)), DistContext(), Console(enabled=False))
