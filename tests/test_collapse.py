"""Collapse detection (capscale.train.collapse) and the robust default it backs.

The detector on synthetic step records (a jump that comes back, one that does not, one
that lasts to the end, noise, a gradual rise, an evaluation at the majority-class rate),
then one tiny run through the ``capscale`` command whose collapse must reach the log,
``results.json`` and the report.
"""

from __future__ import annotations

import json
import logging
import random

import pytest
from _tiny_run import overrides, setup

from capscale.checks import load_run_config
from capscale.cli import main
from capscale.config import PruningConfig
from capscale.train.collapse import CollapseDetector, majority_rate, remedies


def _records(kd: list[float], sparsity: list[float]) -> list[dict]:
    return [{"step": i + 1, "kd": k, "ce": 0.07, "sparsity": s}
            for i, (k, s) in enumerate(zip(kd, sparsity))]


def _detect(history: list[dict], evals: list[dict] | None = None,
            majority: float | None = None, reference: float | None = None,
            final: bool = True) -> tuple[CollapseDetector, list[str]]:
    """Feed ``history`` one record at a time, as the loop does; the warnings logged."""
    warned: list[str] = []
    seen: list[dict] = []
    evals_seen: list[dict] = []
    det = CollapseDetector(seen, evals_seen, majority, reference, "REMEDY", warned.append)
    for rec in history:
        seen.append(rec)
        evals_seen.extend(e for e in evals or [] if e["step"] == rec["step"])
        det.after_step(rec)
    if final:
        det.on_end()
    return det, warned


def _noisy(level: float, n: int, rng: random.Random) -> list[float]:
    """Per-batch noise of a KD loss near a student that is its teacher: up to 8x apart
    (the dense steps of bench/results/short_schedule.json span 0.0035 to 0.0281)."""
    return [level * rng.uniform(0.35, 2.8) for _ in range(n)]


def _sparsity(dense: int, pruned: int, final: float = 0.9) -> list[float]:
    """Dense for ``dense`` steps, then a cubic rise to ``final`` over ``pruned``."""
    return [0.0] * dense + [final * (1 - (1 - (t + 1) / pruned) ** 3) for t in range(pruned)]


def test_a_jump_that_stays_up_is_reported_with_the_remedy():
    rng = random.Random(0)
    kd = _noisy(0.01, 20, rng) + _noisy(0.3, 60, rng)
    det, warned = _detect(_records(kd, _sparsity(20, 60)), final=False)
    assert len(det.events) == 1 and len(warned) == 1
    e = det.events[0]
    assert (e["kind"], e["loss"], e["step"]) == ("loss_jump", "kd", 21)
    assert e["ratio"] >= 10 and 0.005 < e["before"] < 0.03
    assert "did not come back within 20 steps" in e["message"]
    assert e["message"].endswith("Remedies: REMEDY") and warned[0] == e["message"]
    assert det.summary()["detected"]


def test_it_is_reported_while_it_happens_not_at_the_end():
    rng = random.Random(1)
    kd = _noisy(0.01, 20, rng) + _noisy(0.3, 200, rng)
    history = _records(kd, _sparsity(20, 200))
    warned: list[str] = []
    seen: list[dict] = []
    det = CollapseDetector(seen, [], None, None, "R", warned.append)
    for rec in history:
        seen.append(rec)
        det.after_step(rec)
        if warned:
            break
    # the update at step 21, its 5-step window, then 20 steps of patience
    assert seen[-1]["step"] == 21 + 5 - 1 + 20


def test_a_jump_that_comes_back_is_a_transient():
    rng = random.Random(2)
    kd = _noisy(0.01, 20, rng) + _noisy(0.3, 8, rng) + _noisy(0.012, 50, rng)
    det, warned = _detect(_records(kd, _sparsity(20, 58)))
    assert det.events == [] and warned == []
    assert not det.summary()["detected"]


def test_a_jump_still_up_when_the_run_ends_is_reported_at_the_end():
    rng = random.Random(3)
    kd = _noisy(0.01, 12, rng) + _noisy(0.5, 10, rng)
    history = _records(kd, _sparsity(12, 10))
    det, _ = _detect(history, final=False)
    assert det.events == []  # patience not over yet
    det.on_end()
    assert [e["step"] for e in det.events] == [13]
    assert "by the end of the run" in det.events[0]["message"]


def test_healthy_runs_raise_nothing():
    rng = random.Random(4)
    # noise alone, a single huge batch, and a gradual rise of 20x over the pruning phase
    dense = _noisy(0.01, 20, rng)
    spike = [*dense, 0.9, *_noisy(0.01, 59, rng)]
    gradual = dense + [x * (1 + 19 * t / 80) for t, x in enumerate(_noisy(0.01, 80, rng))]
    for kd, n in ((dense + _noisy(0.01, 60, rng), 60), (spike, 60), (gradual, 80)):
        det, warned = _detect(_records(kd, _sparsity(20, n)))
        assert det.events == [] and warned == []


def test_a_short_dense_phase_is_a_shorter_baseline():
    rng = random.Random(8)
    for dense, found in ((6, [7]), (2, [])):  # 5 steps before an update, mostly dense
        kd = _noisy(0.01, dense, rng) + _noisy(0.3, 40, rng)
        det, _ = _detect(_records(kd, _sparsity(dense, 40)))
        assert [e["step"] for e in det.events] == found
    assert "over the 6 steps before" in _detect(_records(
        _noisy(0.01, 6, rng) + _noisy(0.3, 40, rng), _sparsity(6, 40)))[0].events[0]["message"]


def test_a_jump_without_a_mask_update_is_not_this_detector_s():
    rng = random.Random(5)
    kd = _noisy(0.01, 20, rng) + _noisy(0.3, 40, rng)
    det, _ = _detect(_records(kd, [0.5] * 60))
    assert det.events == []


def test_each_logged_loss_is_watched_and_reported_once():
    rng = random.Random(6)
    kd = _noisy(0.01, 20, rng) + _noisy(0.3, 60, rng)
    history = [{**r, "ce": 0.001 if r["step"] <= 20 else 0.05}
               for r in _records(kd, _sparsity(20, 60))]
    det, _ = _detect(history)
    assert sorted(e["loss"] for e in det.events) == ["ce", "kd"]


def test_an_evaluation_at_the_majority_class_rate():
    history = _records([0.01] * 30, _sparsity(10, 20))
    evals = [{"step": 10, "sparsity": 0.0, "metrics": {"accuracy": 0.70}},
             {"step": 20, "sparsity": 0.6, "metrics": {"accuracy": 0.3912}},
             {"step": 30, "sparsity": 0.9, "metrics": {"accuracy": 0.3912}}]
    det, warned = _detect(history, evals, majority=0.3912, reference=0.7047)
    assert [(e["kind"], e["step"]) for e in det.events] == [("majority_class", 20)]
    assert "the majority-class rate 0.3912; the dense teacher had 0.7047" in warned[0]
    # no teacher: an earlier evaluation of the run is the reference
    det, _ = _detect(history, evals, majority=0.3912, reference=None)
    assert "this run, earlier, had 0.7000" in det.events[0]["message"]


def test_no_majority_alarm_when_the_reference_never_beat_it():
    """A tiny random teacher at 50% on a balanced dev set: nothing to lose."""
    history = _records([0.01] * 20, _sparsity(10, 10))
    evals = [{"step": 20, "sparsity": 0.5, "metrics": {"accuracy": 0.5}}]
    assert _detect(history, evals, majority=0.5, reference=0.5)[0].events == []
    assert _detect(history, evals, majority=0.5, reference=None)[0].events == []
    regression = [{"step": 20, "sparsity": 0.5, "metrics": {"pearson": 0.0}}]
    assert _detect(history, regression, majority=None, reference=0.9)[0].events == []


def test_a_resumed_run_replays_what_it_restored():
    rng = random.Random(7)
    history = _records(_noisy(0.01, 20, rng) + _noisy(0.3, 60, rng), _sparsity(20, 60))
    live, _ = _detect(history)
    warned: list[str] = []
    restored = CollapseDetector(history[:50], [], None, None, "R", warned.append)
    restored.history.extend(history[50:])
    restored.after_step(history[-1])
    assert [e["step"] for e in restored.events] == [e["step"] for e in live.events] == [21]


def test_majority_rate_and_remedies():
    assert majority_rate([0, 1, 1, 2]) == 0.5 and majority_rate([]) is None
    movement = remedies(PruningConfig(method="movement", score_warm_start="none"))
    assert "pruning.score_warm_start=magnitude" in movement
    assert "pruning.initial_warmup" in movement and "pruning.score_lr" in movement
    warm = remedies(PruningConfig(method="movement", score_warm_start="magnitude"))
    assert "score_warm_start" not in warm and "pruning.score_lr" in warm
    assert "score_lr" not in remedies(PruningConfig(method="magnitude"))
    assert "structured.levels" in remedies(PruningConfig(method="structured"))


def test_a_user_config_warm_starts_the_scores_from_magnitude():
    assert PruningConfig().score_warm_start == "magnitude"
    demo = load_run_config("demo_minilm_tweets.yaml")
    assert demo.pruning.score_warm_start == "magnitude"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return setup(tmp_path_factory.mktemp("collapse"))


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_collapsing_run_says_so_in_the_log_results_and_report(assets, tmp_path):
    """A fine-tuned teacher (100% on the tiny dev set), the student started from it and
    pruned from 0 to 95% in one step after 12 dense steps: KD and CE jump by two orders
    of magnitude and the student answers one class."""
    out = tmp_path / "run"
    args = overrides(assets, out, **{
        "model.teacher": "null", "model.student_init": "teacher",
        "teacher_training.epochs": 50, "teacher_training.batch_size": 16,
        "teacher_training.lr": 2e-3, "pruning.final_sparsity": 0.95,
        "pruning.initial_warmup": 12, "pruning.final_warmup": 11})
    log = _Lines()
    logging.getLogger("capscale").addHandler(log)
    try:
        assert main(["prune", *args]) == 0
    finally:
        logging.getLogger("capscale").removeHandler(log)
    results = json.loads((out / "results.json").read_text())
    assert results["teacher_metrics"]["accuracy"] >= 0.9  # there was something to lose
    collapse = results["collapse"]
    assert collapse["detected"] and collapse["checks"]["majority_rate"] == 0.5
    kinds = {(e["kind"], e.get("loss")) for e in collapse["events"]}
    assert {("loss_jump", "kd"), ("majority_class", None)} <= kinds
    jump = next(e for e in collapse["events"] if e.get("loss") == "kd")
    assert jump["step"] == 14 and jump["ratio"] >= 10
    for e in collapse["events"]:
        assert "Remedies:" in e["message"] and "pruning.initial_warmup" in e["message"]
        assert log.lines.count(e["message"]) == 2  # when found, and under the summary
    report = (out / "report" / "report.md").read_text()
    assert "## Warning: training collapse" in report and jump["message"] in report
    row = next(line for line in report.splitlines() if line.startswith("| collapse detected"))
    assert row.startswith("| collapse detected | YES: ") and f"kd loss {jump['ratio']:.0f}x" in row
