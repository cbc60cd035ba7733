"""Layer-wise distillation (loss.w_layer): the maps, the token-masked distance, the
config rules, and a real run with the term in its objective (2 ranks: test_tasks_ranks)."""

from __future__ import annotations

import pytest
import torch
from task_helpers import build_run, save_tagger, task_overrides, write_ner

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.distributed import DistContext
from capscale.train.terms import (
    OBJECTIVE_TERMS,
    LayerDistillation,
    TermBatch,
    build_terms,
    distance_table,
    dynamic_map,
    fixed_map,
    register_term,
    token_sq_distance,
)


def _states(n: int, seed: int, shape=(3, 5, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=g) for _ in range(n)]


def _mask() -> torch.Tensor:
    m = torch.ones(3, 5, dtype=torch.long)
    m[0, 3:] = 0
    m[2, 1:] = 0
    return m


def test_fixed_map_by_relative_depth():
    assert fixed_map([1, 2, 3, 4], 4, 4) == [1, 2, 3, 4]
    assert fixed_map([3, 6, 9, 12], 12, 6) == [2, 3, 4, 6]  # round half to even at 4.5
    assert fixed_map([1], 12, 3) == [1]  # never layer 0


def test_dynamic_map_picks_closest_strictly_below_the_next_pick():
    table = torch.tensor([[0.0, 5.0, 5.0, 5.0],    # teacher layer 1: closest is student 0
                          [9.0, 9.0, 1.0, 0.5],    # teacher 2: 3 is closest, but 3 is taken
                          [9.0, 9.0, 9.0, 0.0]])   # teacher 3: student 3
    assert dynamic_map(table) == [0, 2, 3]
    # Nothing left below: the next pick again.
    assert dynamic_map(torch.tensor([[1.0, 0.0], [0.0, 1.0]])) == [0, 0]


def test_distance_table_equals_the_masked_pairwise_distance():
    s, t, mask = _states(3, 0), _states(2, 1), _mask()
    table = distance_table(s, t, mask)
    assert table.shape == (2, 3)
    for i, h in enumerate(t):
        for j, g in enumerate(s):
            assert table[i, j] == pytest.approx(float(token_sq_distance(g, h, mask)),
                                                rel=1e-4, abs=1e-4)
    # Padding positions do not count.
    other = [h.clone() for h in s]
    other[0][0, 4] += 100.0
    assert torch.equal(distance_table(other, t, mask), table)


def test_layer_distillation_fixed_and_dynamic():
    mask = _mask()
    teacher = _states(4, 2)
    tokens = int(mask.sum())
    same = LayerDistillation(1.0, "fixed", [])
    assert float(same(TermBatch({"attention_mask": mask}, teacher, teacher))) == 0.0
    # A student whose layers are the teacher's shifted by one: the fixed map pays for
    # the shift, the dynamic map finds it.
    student = [torch.zeros(3, 5, 8), *teacher[:3]]
    student = [h.clone().requires_grad_(True) for h in student]
    fixed = LayerDistillation(2.0, "fixed", [2, 3, 4])
    loss = fixed(TermBatch({"attention_mask": mask}, student, teacher))
    want = sum(float(token_sq_distance(student[i - 1].detach(), teacher[i - 1], mask))
               for i in (2, 3, 4)) / tokens
    assert float(loss.detach()) == pytest.approx(2.0 * want, rel=1e-5)
    assert fixed.last_map == [(2, 2), (3, 3), (4, 4)]
    loss.backward()
    assert student[0].grad is None or float(student[0].grad.abs().sum()) == 0.0
    assert float(student[1].grad.abs().sum()) > 0
    dynamic = LayerDistillation(1.0, "dynamic", [1, 2, 3])
    assert float(dynamic(TermBatch({"attention_mask": mask}, student, teacher)).detach()) == \
        pytest.approx(0.0, abs=1e-6)
    assert dynamic.last_map == [(1, 2), (2, 3), (3, 4)]


def test_layer_distillation_refuses_what_it_cannot_do():
    mask = _mask()
    term = LayerDistillation(1.0, "fixed", [5])
    with pytest.raises(ConfigError, match="layer_teacher_layers: the teacher has 4"):
        term(TermBatch({"attention_mask": mask}, _states(4, 0), _states(4, 1)))
    narrow = _states(4, 0, shape=(3, 5, 4))
    with pytest.raises(ConfigError, match="equal hidden sizes"):
        LayerDistillation(1.0, "fixed", [])(TermBatch({"attention_mask": mask}, narrow,
                                                      _states(4, 1)))
    with pytest.raises(RuntimeError, match="no layer outputs"):
        LayerDistillation(1.0, "fixed", [])(TermBatch({"attention_mask": mask}, [], []))


def test_config_rules_and_the_term_table(tmp_path):
    base = "capscale/configs/demo_minilm_tweets.yaml"
    for bad, field in (("loss.layer_map=nearest", "loss.layer_map"),
                       ("loss.w_layer=-1", "loss.w_ce"),
                       ("loss.layer_teacher_layers=[0,2]", "loss.layer_teacher_layers"),
                       ("loss.layer_teacher_layers=[2,2]", "loss.layer_teacher_layers")):
        with pytest.raises(ConfigError, match=field):
            load_run_config(base, [bad])
    cfg = load_run_config(base, ["loss.w_layer=0.5", "loss.layer_map=dynamic"])
    terms = build_terms(cfg)
    assert [t.name for t in terms] == ["layer"] and terms[0].layer_map == "dynamic"
    assert build_terms(load_run_config(base, [])) == []
    with pytest.raises(ValueError, match="already registered"):
        register_term("layer", lambda c: None)
    assert "layer" in OBJECTIVE_TERMS


def test_a_run_distils_layer_by_layer_with_cap(tmp_path):
    """A real token-classification run (student and teacher differ) with the layer term
    beside CE, KD and PrC / FiC / SnC: the term is logged, falls as the student trains,
    and the export verifies."""
    student, teacher = save_tagger(tmp_path / "s", 0), save_tagger(tmp_path / "t", 1)
    over = task_overrides("token_classification", student, teacher, write_ner(tmp_path / "d"),
                          tmp_path / "out", **{"loss.w_layer": 1.0, "loss.layer_map": "dynamic",
                                               "train.max_steps": 6, "pruning.final_warmup": 2,
                                               "train.lr": 3e-3})
    run = build_run(over, DistContext())
    run.train()
    history = run.state.history
    layer = [h["layer"] for h in history]
    assert {"ce", "kd", "layer", "prc_unsup", "fic_unsup", "snc_unsup"} <= set(history[0])
    assert layer[-1] < layer[0]
    assert run.loss.terms[0].last_map  # a map was picked
    results = run.finish()
    assert results["export_verified"]["ok"]


def test_a_teacher_layer_past_the_depth_is_refused_before_loading(tmp_path):
    student, teacher = save_tagger(tmp_path / "s", 0), save_tagger(tmp_path / "t", 1)
    over = task_overrides("token_classification", student, teacher, write_ner(tmp_path / "d"),
                          tmp_path / "out", **{"loss.w_layer": 1.0,
                                               "loss.layer_teacher_layers": [1, 9]})
    with pytest.raises(ConfigError, match=r"layer_teacher_layers = \[1, 9\]: the teacher has"):
        build_run(over, DistContext())
