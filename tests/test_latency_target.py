"""``pruning.target_latency_ms``: structured and hybrid runs stop pruning at the first
sparsity whose measured export meets the target.

Wall-clock latency is not asserted: a target no model can miss (1e6 ms) and one none
can meet (1e-6 ms) make the decisions deterministic, and the real measurement runs in
both (its figures: bench/frontier.py)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import run_cap

from capscale.checks import load_run_config
from capscale.errors import ConfigError
from capscale.pruning.latency import exported_latency, time_forward

REACHABLE, UNREACHABLE = "1e6", "1e-6"


@pytest.mark.parametrize("method", ["hybrid", "structured"])
def test_met_target_stops_pruning_there(method, tiny_model_factory, tiny_csv, tmp_path):
    extra = (["structured.schedule=cubic", "structured.update_every=2"]
             if method == "structured" else ["pruning.latency_every=2"])
    run = run_cap(tiny_model_factory("bert"), tiny_csv, tmp_path / "run",
                  f"pruning.method={method}", "pruning.final_sparsity=0.75",
                  "pruning.final_warmup=0", f"pruning.target_latency_ms={REACHABLE}",
                  "pruning.latency_batch_size=2", "pruning.latency_seq_length=8",
                  "pruning.latency_repeats=1", *extra)
    lat = run.controller.latency.summary()
    assert lat["met"] and len(lat["measured"]) == 1
    stopped = lat["met_at_sparsity"]
    assert 0 < stopped < 0.75  # stopped on the way, below the final sparsity
    first = lat["measured"][0]
    assert first["ms"] > 0
    # Where the time went: every part timed, the parts within one forward's time.
    parts = first["parts_ms"]
    assert set(parts) == {"embeddings", "attention", "ffn", "other"}
    assert parts["attention"] > 0 and parts["ffn"] > 0 and parts["embeddings"] > 0
    assert 0 < first["kept"]["heads"] < 8 and first["kept"]["hidden"] is None
    assert run.controller.current_sparsity() == pytest.approx(stopped)
    results = run.finish()
    assert results["latency"]["met_at_sparsity"] == pytest.approx(stopped)
    report = json.loads((tmp_path / "run" / "pruned" / "sparsity_report.json").read_text())
    assert report["results"]["latency"]["target_ms"] == 1e6
    assert report["ffn_sparsity"] < 0.75


def test_missed_target_prunes_to_the_end_and_says_so(tiny_model_factory, tiny_csv, tmp_path):
    run = run_cap(tiny_model_factory("bert"), tiny_csv, tmp_path / "run",
                  "pruning.method=hybrid", "pruning.final_sparsity=0.75",
                  "pruning.final_warmup=0", f"pruning.target_latency_ms={UNREACHABLE}",
                  "pruning.latency_every=2", "pruning.latency_batch_size=2",
                  "pruning.latency_seq_length=8", "pruning.latency_repeats=1")
    lat = run.controller.latency.summary()
    assert not lat["met"] and lat["met_at_sparsity"] is None
    assert run.controller.current_sparsity() == pytest.approx(0.75)
    sparsities = [m["sparsity"] for m in lat["measured"]]
    assert sparsities == sorted(sparsities) and sparsities[-1] == pytest.approx(0.75)


def test_exported_latency_times_the_smaller_model(tiny_model_factory):
    from transformers import AutoModelForSequenceClassification

    from capscale.models.loading import adapter_for
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_factory("bert"))
    adapter = adapter_for(model)
    layers = len(adapter.layer_modules(model))
    heads = [torch.tensor([True] + [False] * (model.config.num_attention_heads - 1))] * layers
    ffn = [torch.arange(model.config.intermediate_size) < 4] * layers
    before = {n: p.clone() for n, p in model.named_parameters()}
    ms = exported_latency(model, adapter, heads, ffn, 2, 8, repeats=1)
    assert ms > 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # untouched
    assert time_forward(model, 2, 8, repeats=1) > 0


def test_latency_target_needs_a_physically_smaller_method():
    with pytest.raises(ConfigError, match="target_latency_ms"):
        load_run_config(None, ["data.preset=tweets", "pruning.method=movement",
                              "pruning.target_latency_ms=10"])
    with pytest.raises(ConfigError, match="target_latency_ms"):
        load_run_config(None, ["data.preset=tweets", "pruning.method=hybrid",
                              "pruning.target_latency_ms=-1"])


def test_shipped_hybrid_latency_config_loads():
    from pathlib import Path
    cfg = load_run_config(Path(__file__).resolve().parent.parent / "capscale" / "configs"
                      / "hybrid_minilm_tweets.yaml", [])
    assert cfg.pruning.method == "hybrid" and cfg.pruning.target_latency_ms == 300


def test_iterative_structured_stops_at_the_level_that_meets_it(tiny_model_factory, tiny_csv,
                                                                tmp_path):
    run = run_cap(tiny_model_factory("bert"), tiny_csv, tmp_path / "run",
                  "pruning.method=structured", "structured.levels=[0.25,0.5]",
                  "structured.retrain_steps=2", "structured.importance_fraction=0.5",
                  f"pruning.target_latency_ms={REACHABLE}", "pruning.latency_batch_size=2",
                  "pruning.latency_seq_length=8", "pruning.latency_repeats=1")
    lat = run.controller.latency.summary()
    assert lat["met_at_sparsity"] == 0.25 and len(lat["measured"]) == 1
    ffn = run.controller.masks.keep()[1]
    assert sum(int(f.sum()) for f in ffn) == round(0.75 * sum(f.numel() for f in ffn))
    assert [e["sparsity"] for e in run.state.evals] == [0.25, 0.25]  # retrained, not pruned
