"""The paper recipes (capscale/configs/paper): every file loads through the config loader
and holds the reference code's hyper-parameters; the README maps each to its command."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from capscale.checks import load_run_config

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "capscale" / "configs" / "paper"
RECIPES = sorted(PAPER.glob("*.yaml"))
TASKS = {"mnli": ("premise", "hypothesis", "validation_matched"),
         "qqp": ("question1", "question2", "validation"),
         "sst2": ("sentence", None, "validation")}
# Soft movement reaches its sparsity through the L1 weight (reference README).
SOFT_LAMBDA = {("qqp", 90): 190, ("qqp", 97): 550, ("mnli", 90): 290, ("mnli", 97): 680}
UNSTRUCTURED = {"cap_m": ("movement", True), "cap_soft": ("soft_movement", True),
                "movement_kd": ("movement", False),
                "soft_movement_kd": ("soft_movement", False),
                "magnitude_kd": ("magnitude", False)}


def test_the_paper_rows_are_all_there():
    names = {p.stem for p in RECIPES}
    for task in ("mnli", "qqp"):
        for sp in (50, 90, 97):
            assert {f"cap_m_{task}_{sp}", f"movement_kd_{task}_{sp}",
                    f"magnitude_kd_{task}_{sp}"} <= names
        for sp in (90, 97):
            assert {f"cap_soft_{task}_{sp}", f"soft_movement_kd_{task}_{sp}"} <= names
    assert {"cap_f_mnli", "cap_f_qqp", "cap_f_sst2", "cap_f_squad"} <= names
    for sp in (90, 97):
        assert {f"{k}_squad_{sp}" for k in UNSTRUCTURED} <= names
    assert len(names) == 40


def _common(cfg, task: str) -> None:
    text, pair, validation = TASKS[task]
    d = cfg.data
    assert (d.dataset_name, d.dataset_config) == ("nyu-mll/glue", task)
    assert (d.text_column, d.text_pair_column, d.label_column) == (text, pair, "label")
    assert (d.train_split, d.validation_split, d.max_length) == ("train", validation, 128)
    assert cfg.model.name_or_path == "bert-base-uncased"
    assert cfg.model.student_init == "pretrained" and cfg.model.teacher is None
    c = cfg.cap
    assert (c.temperature, c.num_negatives, c.normalization) == (0.1, 4096, "faithful")
    assert (c.representation, c.mode, c.bank_dtype) == ("head", "bank", "float32")
    assert c.max_snapshots is None and not c.snapshot_head_dropout
    assert (cfg.loss.w_ce, cfg.loss.w_kd) == (0.1, 0.9)
    assert (cfg.train.grad_clip, cfg.train.seed) == (1.0, 42)
    t = cfg.teacher_training
    assert (t.epochs, t.batch_size, t.lr, t.weight_decay, t.warmup_ratio) == (
        3, 32, 2e-5, 0.0, 0.0)
    assert cfg.output_dir == f"outputs/paper/{Path(cfg.output_dir).name}"


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_holds_the_reference_hyperparameters(path):
    cfg = load_run_config(path)
    name = path.stem
    assert Path(cfg.output_dir).name == name
    if "squad" in name:
        _squad(cfg, name)
        return
    if name.startswith("cap_f_"):
        task = name.removeprefix("cap_f_")
        _common(cfg, task)
        s, t = cfg.structured, cfg.train
        assert cfg.pruning.method == "structured" and s.schedule == "iterative"
        assert s.levels == [round(0.1 * k, 1) for k in range(1, 10)]
        assert (s.retrain_epochs, s.retrain_steps, s.importance_fraction,
                s.min_heads_per_layer) == (2, None, 1.0, 1)
        assert (t.batch_size, t.lr, t.weight_decay, t.warmup_ratio, t.warmup_steps) == (
            16, 2e-5, 0.01, 0.1, None)
        assert not t.freeze_embeddings  # the structured reference trains them
        assert cfg.loss.kd_temperature == 1.0 and not cfg.cap.snapshot_train_mode
        assert all((w.enabled, w.w_unsup, w.w_sup) == (True, 0.3, 3.0)
                   for w in cfg.cap.modules.values())
        return
    key, task, sp = re.fullmatch(r"(\w+)_(mnli|qqp)_(\d+)", name).groups()
    method, cap = UNSTRUCTURED[key]
    _common(cfg, task)
    p, t, c = cfg.pruning, cfg.train, cfg.cap
    assert p.method == method and p.final_sparsity == int(sp) / 100
    assert (p.initial_sparsity, p.scope, p.initial_warmup, p.final_warmup) == (
        0.0, "local", 22000, 33000)
    assert (p.score_lr, p.score_init) == (0.01, 0.0)
    if method == "soft_movement":
        assert (p.final_threshold, p.final_lambda, p.min_keep, p.soft_threshold) == (
            0.1, SOFT_LAMBDA[(task, int(sp))], 0.005, "schedule")
    assert (t.epochs, t.max_steps, t.batch_size, t.lr, t.weight_decay) == (
        10, None, 32, 3e-5, 0.0)
    assert (t.warmup_steps, t.warmup_ratio, t.freeze_embeddings) == (11000, 0.0, True)
    assert cfg.loss.kd_temperature == 2.0
    assert (c.snapshot_schedule, c.snapshot_first_epoch, c.snapshot_train_mode) == (
        "epoch", False, True)
    expected = (True, 0.1, 10.0) if cap else (False,)
    assert all((w.enabled, w.w_unsup, w.w_sup)[: len(expected)] == expected
               for w in c.modules.values())


def _squad(cfg, name: str) -> None:
    """SQuAD v1.1 rows: the reference's QA settings (unsupervised terms on the CLS state)."""
    d, c, p, t = cfg.data, cfg.cap, cfg.pruning, cfg.train
    assert (d.task_type, d.dataset_name, d.max_length) == ("qa", "squad", 384)
    assert (d.qa.doc_stride, d.qa.version_2_with_negative) == (128, False)
    assert cfg.model.name_or_path == "bert-base-uncased" and cfg.model.teacher is None
    assert (c.representation, c.num_negatives, c.max_snapshots) == ("cls", 4096, None)
    assert all(w.w_sup == 0.0 for w in c.modules.values())
    assert (cfg.loss.w_ce, cfg.loss.w_kd) == (0.1, 0.9)
    if name == "cap_f_squad":
        assert p.method == "structured" and cfg.loss.kd_temperature == 1.0
        assert c.temperature == 0.3 and not c.snapshot_train_mode
        assert all((w.enabled, w.w_unsup) == (True, 0.3) for w in c.modules.values())
        assert (t.lr, t.batch_size, t.weight_decay, t.warmup_ratio) == (2e-5, 16, 0.01, 0.1)
        return
    key, sp = re.fullmatch(r"(\w+)_squad_(\d+)", name).groups()
    method, cap = UNSTRUCTURED[key]
    assert p.method == method and p.final_sparsity == int(sp) / 100
    assert (p.initial_warmup, p.final_warmup, p.scope) == (5400, 10800, "local")
    assert (t.epochs, t.batch_size, t.lr, t.warmup_steps, t.freeze_embeddings) == (
        10, 16, 3e-5, 5400, True)
    assert cfg.loss.kd_temperature == 2.0 and c.temperature == 0.1
    assert all((w.enabled, w.w_unsup) == (cap, 0.5) for w in c.modules.values())
    if method == "soft_movement":
        assert (p.soft_threshold, p.final_lambda) == ("schedule", {90: 600, 97: 2000}[int(sp)])


def test_readme_maps_every_recipe_to_its_command():
    readme = (ROOT / "README.md").read_text()
    for path in RECIPES:
        command = f"python -m capscale.run --config capscale/configs/paper/{path.name}"
        assert command in readme, path.name


def test_packaged_recipe_by_relative_name_from_anywhere(tmp_path):
    here = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = load_run_config("paper/cap_m_qqp_90.yaml", ["train.lr=1e-4"])
    finally:
        os.chdir(here)
    assert cfg.data.dataset_config == "qqp" and cfg.train.lr == 1e-4


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_scored_recipes_pin_the_reference_zero_scores(path):
    """capscale's default starts movement scores from |W|; a paper recipe whose method
    learns scores pins the reference's zero start in its own file, so the default
    never reaches it."""
    cfg = load_run_config(path)
    if cfg.pruning.method not in ("movement", "soft_movement", "hybrid"):
        return
    assert cfg.pruning.score_warm_start == "none"
    assert re.search(r"^  score_warm_start: none\b", path.read_text(), re.M), path.name
