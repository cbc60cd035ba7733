"""Extractive QA (data.task_type: qa) on tests/data/squad_tiny*.json, end to end.

Windows, offsets and per-example ids; the official SQuAD normalisation, EM / F1 and
span decoding against hand-computed cases; bad data; a CAP-m run with a fine-tuned
teacher whose export reloads with transformers alone; structured CAP-f with export
parity; and 2 ranks under zero3 and fsdp2 against one process.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import rank_pool
import torch
from qa_helpers import (
    GLOBAL_BATCH,
    NO_SUP,
    SQUAD,
    SQUAD_V2,
    as_list,
    bank_record,
    build_qa_run,
    first_losses,
    qa_overrides,
    qa_worker,
    save_qa_model,
)
from transformers import AutoModelForQuestionAnswering

from capscale.checks import load_run_config
from capscale.cli import main
from capscale.config import ConfigError, save_config
from capscale.console import Console
from capscale.data import build_loaders, check_lengths, load_task_data, model_inputs
from capscale.distributed import DistContext
from capscale.errors import DataError, ModelError
from capscale.models.loading import (
    RepresentationTap,
    adapter_for,
    check_teacher,
    forward_with_representation,
    load_classifier,
    load_tokenizer,
    output_logits,
)
from capscale.recipe import CAPRecipe
from capscale.tasks import get_task
from capscale.tasks.qa_metrics import (
    best_answers,
    exact_match,
    f1_score,
    normalize_answer,
    squad_scores,
)
from capscale.train.evaluation import evaluate

QA = get_task("qa")


@pytest.fixture(scope="module")
def qa_model(tmp_path_factory):
    return save_qa_model(tmp_path_factory.mktemp("qa") / "bert")


def _col(ds, name):
    """A column as plain Python lists."""
    return ds.with_format(None)[name]


def _data(qa_model, tmp_path, data=SQUAD, **extra):
    cfg = load_run_config(None, as_list(qa_overrides(qa_model, tmp_path / "out", data, **extra)))
    data = load_task_data(cfg.data)
    tok = load_tokenizer(str(qa_model))
    note = check_lengths(data, tok, cfg.data)
    return cfg, data, tok, note


# -- windows, offsets, ids --------------------------------------------------------------
def test_windows_offsets_and_example_ids(qa_model, tmp_path):
    cfg, data, tok, note = _data(qa_model, tmp_path)
    assert note is None and len(data.train) == 56 and data.num_labels == 2
    loaders = build_loaders(data, tok, cfg.data, 8, 16, 0)
    train, bank, ref = loaders.train.dataset, loaders.bank.dataset, loaders.eval_reference
    ids = _col(train, "example_id")
    assert ids == sorted(ids) and set(ids) == set(range(56))  # every example, in order
    counts = np.bincount(ids)
    amazon = [i for i, q in enumerate(_col(data.train, "id")) if q.startswith("amazon")]
    assert all(counts[i] >= 3 for i in amazon) and counts.max() >= 3  # overflowing
    assert len(train) == len(ref.feature_example) and (ref.feature_example == ids).all()
    # Same file for train and validation: the same windows, the same labels.
    labels = _col(train, "labels")
    assert _col(loaders.eval.dataset, "labels") == labels
    seen_answer = set()
    for f, (start, end) in enumerate(labels):
        ex, offs = ids[f], ref.offsets[f]
        assert (offs[ref.cls_index[f]] == -1).all() and offs[1, 0] == -1  # CLS, question
        if start != ref.cls_index[f]:  # the answer lies in this window
            text = data.train[ex]["context"][offs[start, 0]:offs[end, 1]]
            assert text == data.train[ex]["answers"]["text"][0]
            seen_answer.add(ex)
        if f + 1 < len(ids) and ids[f + 1] == ex:  # consecutive windows overlap by 16
            a = offs[offs[:, 0] >= 0]
            b = ref.offsets[f + 1][ref.offsets[f + 1][:, 0] >= 0]
            assert (a[-16:] == b[:16]).all() and b[16, 0] > a[-1, 0]
    assert len(seen_answer) == 56  # no answer was cut by every window
    # The bank set: one window per example, the first that contains its answer.
    assert sorted(_col(bank, "example_id")) == list(range(56)) and len(bank) == 56
    for row in range(len(bank)):
        ex = int(bank[row]["example_id"])
        first = next(f for f in range(len(ids)) if ids[f] == ex and labels[f][0] != 0)
        assert torch.equal(bank[row]["input_ids"], train[first]["input_ids"])


def test_gold_windows_decode_to_the_gold_answers_v2(qa_model, tmp_path):
    """Logits that point at each window's label decode, over the real overflowing
    windows, to every gold answer, and to "" for the unanswerable questions."""
    cfg, data, tok, _ = _data(qa_model, tmp_path, SQUAD_V2)
    loaders = build_loaders(data, tok, cfg.data, 8, 16, 0)
    labels = np.array(_col(loaders.eval.dataset, "labels"))
    logits = np.zeros((len(labels), cfg.data.max_length, 2), np.float32)
    logits[np.arange(len(labels)), labels[:, 0], 0] = 10.0
    logits[np.arange(len(labels)), labels[:, 1], 1] = 10.0
    got = QA.metrics(logits, labels, 2, reference=loaders.eval_reference)
    assert got["exact_match"] == got["f1"] == 100.0
    assert (got["has_answer_total"], got["no_answer_total"]) == (56.0, 7.0)
    logits[:, 0, :] = 11.0  # the null answer now beats every span
    got = QA.metrics(logits, labels, 2, reference=loaders.eval_reference)
    assert got["no_answer_exact_match"] == 100.0 and got["has_answer_exact_match"] == 0.0


def test_flat_jsonl_reads_like_the_squad_file(qa_model, tmp_path):
    _, ref_data, _, _ = _data(qa_model, tmp_path)
    flat = tmp_path / "flat.jsonl"
    with open(flat, "w") as f:
        for i, row in enumerate(ref_data.train):
            answers = row["answers"]
            if i % 2:  # the other shape of answers: a list of {text, answer_start}
                answers = [{"text": t, "answer_start": s}
                           for t, s in zip(answers["text"], answers["answer_start"])]
            f.write(json.dumps({"uid": row["id"], "q": row["question"],
                                "context": row["context"], "answers": answers}) + "\n")
    _, data, _, _ = _data(qa_model, tmp_path, flat, **{"data.qa.id_column": "uid",
                                                       "data.qa.question_column": "q"})
    assert data.train.to_list() == ref_data.train.to_list()


# -- SQuAD scoring ----------------------------------------------------------------------
def test_official_normalisation_em_f1():
    assert normalize_answer("  The Quick, brown FOX.  ") == "quick brown fox"
    assert normalize_answer("an apple a day") == "apple day"
    assert normalize_answer("Theory of everything") == "theory of everything"
    assert normalize_answer("Eiffel-Tower (Paris)") == "eiffeltower paris"
    assert exact_match("Paris!", "paris") == 1.0 and exact_match("Paris", "Rome") == 0.0
    assert f1_score("the cat sat", "a cat sat down") == pytest.approx(0.8)  # P 1, R 2/3
    assert f1_score("red red blue", "red blue blue") == pytest.approx(2 / 3)  # multiplicity
    assert f1_score("", "") == 1.0 and f1_score("x", "") == 0.0 and f1_score("", "x") == 0.0
    golds = {"q1": ["Denver Broncos", "The Denver Broncos"], "q2": ["Nile river"]}
    got = squad_scores({"q1": "the denver broncos!", "q2": "the Nile"}, golds)
    assert got["exact_match"] == 50.0  # q1 exact, q2 not
    assert got["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)  # q2: P 1, R 1/2
    v2 = squad_scores({"q1": "Denver", "q3": ""}, {"q1": ["Denver Broncos"], "q3": []})
    assert v2["exact_match"] == 50.0 and v2["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert v2["no_answer_exact_match"] == 100.0 and v2["has_answer_f1"] == pytest.approx(
        200 / 3) and v2["no_answer_total"] == 1.0
    assert squad_scores({"q3": "something"}, {"q3": []})["f1"] == 0.0


CONTEXT = "Paris is the capital of France."
OFFSETS = np.array([[-1, -1]] * 3 + [[0, 5], [6, 8], [9, 12], [13, 20], [21, 23], [24, 30]])


def _decode(start, end, **kw):
    start, end = np.array([start], float), np.array([end], float)
    return best_answers(start, end, OFFSETS[None], np.array([0]), [CONTEXT], np.array([0]),
                        **kw)[0]


def test_span_decoding_by_hand():
    # Tokens: CLS, a question token, SEP, then Paris is the capital of France.
    start = [0, 0, 0, 5, 0, 0, 2, 0, 1]
    end = [0, 9, 0, 0, 3, 0, 0, 0, 5]  # the question token's 9 never makes an answer
    assert _decode(start, end) == "Paris is the capital of France"  # (3, 8): 10
    assert _decode(start, end, max_answer_length=3) == "Paris is"  # (3, 4): 8 > (6, 8): 7
    assert _decode(start, end, max_answer_length=1) == "France"  # (8, 8): 6 > (3, 3): 5
    assert _decode(start, end, n_best=1) == ""  # top end is the question token
    assert _decode(start, end, n_best=2) == "Paris is the capital of France"
    # (8, 3) would score 8 but ends before it starts: (3, 3) 5 beats (8, 8) 4.5.
    assert _decode([0, 0, 0, 1, 0, 0, 0, 0, 4], [0, 0, 0, 4, 0, 0, 0, 0, 0.5]) == "Paris"
    # SQuAD v2: the null score (CLS start + end) against the best span.
    null_start, null_end = [6, *start[1:]], [6, *end[1:]]  # null 12 vs span 10
    assert _decode(null_start, null_end) == "Paris is the capital of France"  # v1
    assert _decode(null_start, null_end, with_negative=True) == ""  # 12 - 10 > 0
    assert _decode(null_start, null_end, with_negative=True, null_threshold=3) \
        == "Paris is the capital of France"  # 2 <= 3
    # Over windows: the best span of any window; the null score is the lowest one.
    second = np.array([[0.5, 0, 0, -5, -5, -5, -5, -5, -5]], float)
    starts = np.concatenate([np.array([null_start], float), second])
    ends = np.concatenate([np.array([null_end], float), second])
    got = best_answers(starts, ends, np.stack([OFFSETS, OFFSETS]), np.array([0, 0]),
                       [CONTEXT], np.array([0, 0]), with_negative=True)
    assert got == ["Paris is the capital of France"]  # null min(12, 1) = 1 < 10


# -- loss, distillation, representation ------------------------------------------------
def test_loss_distillation_and_config_rules(qa_model, tiny_bert):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(3, 7, 2, generator=g), torch.randn(3, 7, 2, generator=g)
    labels = torch.tensor([[1, 2], [0, 0], [4, 6]])
    logp = torch.log_softmax(s, dim=1)
    ce = [-logp[torch.arange(3), labels[:, i], i].mean() for i in (0, 1)]
    assert QA.loss(s, labels) == pytest.approx(float(ce[0] + ce[1]) / 2, rel=1e-6)
    T = 2.0
    pt, ps = torch.softmax(t / T, 1), torch.log_softmax(s / T, 1)
    kl = (pt * (pt.log() - ps)).sum(1).mean(0)  # per start / end, batch mean
    assert QA.distill(s, t, T) == pytest.approx(float(kl.mean()) * T * T, rel=1e-5)
    assert QA.contrastive_labels(labels).tolist() == [-1, -1, -1]
    with pytest.raises(ConfigError, match="supervised contrastive terms need class labels"):
        load_run_config(None, ["data.task_type=qa", f"data.train_file={SQUAD}",
                           "data.max_length=384"])
    with pytest.raises(ConfigError, match="doc_stride"):
        load_run_config(None, ["data.task_type=qa", f"data.train_file={SQUAD}",
                           "data.qa.doc_stride=128", *as_list(NO_SUP)])
    with pytest.raises(ModelError, match="not a \\*ForQuestionAnswering"):
        check_teacher(str(tiny_bert), 2, task=QA)  # a sequence classifier
    model = load_classifier(str(qa_model), 2, None, task=QA).eval()
    adapter = adapter_for(model, None, QA)
    assert adapter.head_linear == "qa_outputs"
    tap = RepresentationTap(model, adapter)
    inputs = {"input_ids": torch.tensor([[101, 2054, 102, 3000, 2003, 102]]),
              "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    with torch.no_grad():
        logits, head = forward_with_representation(model, inputs, tap, "head")
        _, cls = forward_with_representation(model, inputs, tap, "cls")
    assert logits.shape == (1, 6, 2) and torch.equal(head, cls)  # BERT QA: raw CLS state


# -- bad data ---------------------------------------------------------------------------
def _squad_variant(tmp_path, change, name="bad.json", source=SQUAD):
    doc = json.loads(source.read_text())
    change(doc["data"])
    path = tmp_path / name
    path.write_text(json.dumps(doc))
    return path


def _first_qa(data):
    return data[0]["paragraphs"][0]["qas"][0]


def test_bad_qa_data(qa_model, tmp_path):
    def shift(data):
        _first_qa(data)["answers"][0]["answer_start"] += 1
    bad = _squad_variant(tmp_path, shift)
    cfg = load_run_config(None, as_list(qa_overrides(qa_model, tmp_path, **{
        "data.train_file": str(bad), "data.validation_file": str(bad)})))
    data = load_task_data(cfg.data)
    assert len(data.train) == 55 and len(data.validation) == 56  # validation: kept
    assert any("1 train examples have an answer text that is not at its answer_start, "
               "skipped; first: train example 'mount_everest-0'" in n for n in data.notes)
    assert _col(data.train, "example_id") == list(range(55))

    def shift_all(data):
        for a in data:
            for qa in a["paragraphs"][0]["qas"]:
                qa["answers"][0]["answer_start"] += 1
    with pytest.raises(DataError, match="every train example has an answer that is not"):
        _data(qa_model, tmp_path, _squad_variant(tmp_path, shift_all))

    def empty(data):
        data[1]["paragraphs"][0]["context"] = "  "
    path = _squad_variant(tmp_path, empty)
    cfg = load_run_config(None, as_list(qa_overrides(qa_model, tmp_path / "o", path)))
    with pytest.raises(DataError, match="example 'nile-0' \\(row 7\\): empty context"):
        CAPRecipe(cfg, DistContext(), Console(enabled=False))  # before any model loads

    def long_question(data):
        _first_qa(data)["question"] = "which " * 60 + "mountain?"
    _, data, _, note = _data(qa_model, tmp_path, _squad_variant(tmp_path, long_question))
    assert note.startswith("1 train questions are too long for data.max_length = 64 with "
                           "data.qa.doc_stride = 16 (example 'mount_everest-0': 65 tokens")
    assert "1 validation questions" in note and note.endswith("skipped")
    assert len(data.train) == 55 and _col(data.train, "example_id") == list(range(55))
    assert "mount_everest-0" not in _col(data.train, "id")
    with pytest.raises(DataError, match=r"needs data\.qa\.version_2_with_negative: true"):
        load_task_data(load_run_config(None, as_list(qa_overrides(
            qa_model, tmp_path, SQUAD_V2, **{"data.qa.version_2_with_negative": False}))
                                   ).data)


# -- end to end -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def e2e(qa_model, tmp_path_factory):
    """CAP-m with every contrastive module, KD from a teacher fine-tuned by capscale."""
    out = tmp_path_factory.mktemp("e2e")
    over = qa_overrides(qa_model, out, **{
        "teacher_training.max_steps": 150, "teacher_training.epochs": 100,
        "teacher_training.lr": 3e-3, "teacher_training.batch_size": 16,
        "teacher_training.warmup_ratio": 0.0, "model.student_init": "teacher",
        "train.max_steps": 12, "train.epochs": 3, "train.eval_every": 6,
        # snapshots inside the short run (the epoch schedule's first one is at epoch 1)
        "cap.snapshot_schedule": "milestones"})
    torch.manual_seed(0)
    run = CAPRecipe(load_run_config(None, as_list(over)), DistContext(), Console(enabled=False))
    run.setup()
    run.train()
    batch = model_inputs(next(iter(run.loaders.eval)), "cpu")
    with torch.no_grad():
        masked = output_logits(run.student.model.eval()(**batch))
    results = run.finish(export=True)
    return {"run": run, "results": results, "batch": batch, "masked": masked, "out": out}


def test_qa_end_to_end_with_export(e2e, capsys):
    run, results = e2e["run"], e2e["results"]
    teacher, student = results["teacher_metrics"], results["pruned_metrics"]
    assert results["task_metric"] == "f1" and teacher["f1"] > 30.0 and student["f1"] > 5.0
    assert results["sparsity"]["linear_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert json.loads((e2e["out"] / "teacher" / "capscale_teacher.json").read_text())[
        "metrics"] == teacher
    comps = set(run.state.history[-1])
    assert {"ce", "kd", "prc_unsup", "fic_unsup", "snc_unsup"} <= comps
    assert not any(c.endswith("_sup") for c in comps)
    assert all(b.complete(s) for b in run.objective.banks.values() for s in b.active_slots())
    assert run.objective.banks["fic"].vectors.shape[0] == 56  # one row per example
    # The export: transformers alone, the masked student's start / end logits.
    loaded = AutoModelForQuestionAnswering.from_pretrained(
        e2e["out"] / "pruned" / "model").eval()
    with torch.no_grad():
        got = output_logits(loaded(**e2e["batch"]))
    diff = float((got - e2e["masked"]).abs().max())
    torch.testing.assert_close(got, e2e["masked"], atol=1e-5, rtol=1e-5)
    again = evaluate(loaded, run.loaders.eval, DistContext(), QA, 2,
                     run.loaders.eval_reference)
    assert again == pytest.approx(student)
    save_config(run.cfg, e2e["out"] / "config.yaml")  # ``capscale evaluate`` agrees
    capsys.readouterr()
    assert main(["evaluate", "--config", str(e2e["out"] / "config.yaml")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == pytest.approx(
        student)
    print(f"\nteacher EM/F1 {teacher['exact_match']:.2f} / {teacher['f1']:.2f}; pruned "
          f"student EM/F1 {student['exact_match']:.2f} / {student['f1']:.2f} at "
          f"{results['sparsity']['linear_sparsity']:.2f} sparsity; export parity: max "
          f"|start/end logit difference| {diff:.2e}")


def test_packaged_squad_config_has_the_reference_settings():
    cfg = load_run_config("squad_bert_base.yaml")
    assert (cfg.data.task_type, cfg.data.dataset_name, cfg.data.max_length) == (
        "qa", "squad", 384)
    assert (cfg.loss.w_ce, cfg.loss.w_kd, cfg.loss.kd_temperature) == (0.1, 0.9, 2.0)
    assert (cfg.cap.temperature, cfg.cap.num_negatives, cfg.cap.representation) == (
        0.1, 4096, "cls")
    assert {(w.w_unsup, w.w_sup) for w in cfg.cap.modules.values()} == {(0.5, 0.0)}
    assert (cfg.pruning.initial_warmup, cfg.pruning.final_warmup) == (5400, 10800)


def test_structured_cap_f_on_qa(qa_model, tmp_path):
    teacher = save_qa_model(tmp_path / "teacher", seed=1)
    over = qa_overrides(qa_model, tmp_path / "out", **{
        "model.teacher": str(teacher), "pruning.method": "structured",
        "structured.levels": [0.25, 0.5], "structured.retrain_steps": 2,
        "structured.importance_fraction": 0.3, "loss.kd_temperature": 1.0,
        "cap.temperature": 0.3, "cap.snapshot_train_mode": False,
        **{f"cap.modules.{m}.w_unsup": 0.3 for m in ("prc", "fic", "snc")}})
    run = CAPRecipe(load_run_config(None, as_list(over)), DistContext(), Console(enabled=False))
    run.setup()
    run.train()
    assert [e["level"] for e in run.state.evals] == [0.25, 0.5]
    assert run.controller.masks.sparsity()["head_sparsity"] == pytest.approx(0.5)
    batch = model_inputs(next(iter(run.loaders.eval)), "cpu")
    with torch.no_grad():
        masked = output_logits(run.student.model.eval()(**batch))
    run.finish(export=True)
    model_dir = tmp_path / "out" / "pruned" / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoModelForQuestionAnswering"}
    loaded = AutoModelForQuestionAnswering.from_pretrained(
        model_dir, trust_remote_code=True).eval()
    assert sum(p.numel() for p in loaded.parameters()) < sum(
        p.numel() for p in AutoModelForQuestionAnswering.from_pretrained(qa_model).parameters())
    with torch.no_grad():
        got = output_logits(loaded(**batch))
    print(f"\nstructured export parity: max |diff| {float((got - masked).abs().max()):.2e}")
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)


# -- several ranks ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def rank_assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranks")
    student = save_qa_model(root / "student", seed=0, dropout=0.0)
    teacher = save_qa_model(root / "teacher", seed=1, dropout=0.0)
    over = qa_overrides(student, root / "single", **{
        "model.teacher": str(teacher), "train.max_steps": 3, "pruning.scope": "global",
        "pruning.zero_pruned_weights": True})
    run = build_qa_run(over, DistContext())
    single = {"losses": first_losses(run, run.ctx), "banks": bank_record(run),
              "teacher_metrics": run.evaluate(run.teacher)}
    return over, single, root


@pytest.mark.multiprocess
@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_two_ranks_match_one_process(strategy, rank_assets):
    over, single, root = rank_assets
    out = root / f"job_{strategy}"
    out.mkdir()
    over = copy.deepcopy({**over, "output_dir": str(out / "run")})
    rank_pool.run(qa_worker, strategy, over, str(out))
    rec = torch.load(out / "record.pt", weights_only=False)
    assert rec["strategy"] == strategy and rec["steps"] == 3
    assert set(rec["losses"]) == set(single["losses"]) >= {
        "ce", "kd", "prc_unsup", "fic_unsup", "snc_unsup"}
    for name, value in single["losses"].items():
        assert rec["losses"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    for name, bank in single["banks"].items():  # per-example rows, gathered over ranks
        torch.testing.assert_close(rec["banks"][name], bank, atol=1e-6, rtol=1e-5)
    assert rec["teacher_metrics"] == pytest.approx(single["teacher_metrics"])
    assert set(rec["pruned_metrics"]) >= {"exact_match", "f1"}
    loaded = AutoModelForQuestionAnswering.from_pretrained(out / "run" / "pruned" / "model")
    assert loaded.qa_outputs.out_features == 2
    assert GLOBAL_BATCH % 2 == 0
