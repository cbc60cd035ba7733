"""2 ranks (gloo, CPU) under ddp / zero3 / fsdp2 equal one process on the global batch.

One 2-rank job per strategy, on the session's two ranks (tests/rank_pool.py), runs
every check (see distributed_helpers.worker); the single-process reference runs here
once. Tolerances: fp32 throughout; losses to 1e-5 relative, gradients to 1e-5 absolute
+ 1e-4 relative (reduction order differs between an all-reduce / reduce-scatter and one
process' sums); masks, zeroed weights and the global threshold exactly.
"""

from __future__ import annotations

import json

import pytest
import rank_pool
import torch
from distributed_helpers import (
    GLOBAL_BATCH,
    HYBRID_OVERRIDES,
    assert_losses_and_grads_match,
    build_run,
    make_assets,
    teacher_record,
    train_and_record,
    worker,
)

from capscale.distributed import DistContext

pytestmark = pytest.mark.multiprocess


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def single(assets):
    torch.set_num_threads(1)
    run = build_run(assets, DistContext(), GLOBAL_BATCH)
    hybrid = build_run(assets, DistContext(), GLOBAL_BATCH, **HYBRID_OVERRIDES)
    return {**train_and_record(run, run.ctx), **teacher_record(run),
            "teacher_full_bytes": sum(p.numel() * p.element_size()
                                      for p in run.teacher.parameters()),
            "hybrid": train_and_record(hybrid, hybrid.ctx)}


_JOBS: dict[str, dict] = {}


def two_ranks(strategy: str, assets, tmp_path_factory) -> dict:
    """Run (once per session) the 2-rank job of ``strategy``; rank 0's record."""
    if strategy not in _JOBS:
        out = tmp_path_factory.mktemp(f"job_{strategy}")
        smoke = strategy != "ddp"
        rank_pool.run(worker, strategy, assets, str(out), smoke)
        record = torch.load(out / "record.pt", weights_only=False)
        if smoke:
            record["smoke_rc"] = json.loads((out / "smoke_rc.json").read_text())["rc"]
            record["smoke_dir"] = out / "smoke"
        _JOBS[strategy] = record
    return _JOBS[strategy]


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_loss_and_gradient_parity(strategy, assets, single, tmp_path_factory):
    dist_rec = two_ranks(strategy, assets, tmp_path_factory)
    assert dist_rec["strategy"] == strategy
    # CE, KD and the six contrastive terms (PrC / FiC / SnC banks filled), per component.
    assert_losses_and_grads_match(single, dist_rec, {
        "ce", "kd", "prc_unsup", "prc_sup", "fic_unsup", "fic_sup", "snc_unsup", "snc_sup"})


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_masks_follow_shards(strategy, assets, single, tmp_path_factory):
    dist_rec = two_ranks(strategy, assets, tmp_path_factory)
    for key, mask in single["masks"].items():
        assert 0 < int((~mask).sum()) < mask.numel(), key  # really pruned, not all
        assert torch.equal(dist_rec["masks"][key], mask), key
        w = dist_rec["weights"][key]
        assert torch.all(w[~mask] == 0), key  # gathered weights exactly masked
        assert torch.all(single["weights"][key][~mask] == 0), key
    assert dist_rec["sparsity"] == pytest.approx(single["sparsity"])
    # The unsharded copy the export bakes has the live (global-scope) masks.
    assert dist_rec["export_masks_equal"] and single["export_masks_equal"]


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_global_threshold_on_sharded_scores(strategy, assets, single, tmp_path_factory):
    dist_rec = two_ranks(strategy, assets, tmp_path_factory)
    # Exact: the same selection as one process over the same scores, no score gathered.
    assert dist_rec["thresholds"] == dist_rec["thresholds_full"]
    assert single["thresholds"] == single["thresholds_full"]
    # And the sharded run's scores track the single-process run's.
    assert dist_rec["thresholds"] == pytest.approx(single["thresholds"], rel=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "zero3", "fsdp2"])
def test_hybrid_units_follow_shards(strategy, assets, single, tmp_path_factory):
    """Hybrid pruning (scores per head and per FFN neuron, inside the sharded student;
    emptied blocks skipped; hidden dimensions pruned by movement scores outside it):
    every loss term and gradient, the head and neuron masks, the two global thresholds
    (from this rank's shard of the scores), the hidden scores and mask and the export
    copy's masks equal one process'."""
    one, two = single["hybrid"], two_ranks(strategy, assets, tmp_path_factory)["hybrid"]
    assert_losses_and_grads_match(one, two, {"ce", "kd", "prc_unsup", "fic_unsup",
                                             "snc_unsup"})
    for kind, (a, b) in enumerate(zip(one["unit_keep"], two["unit_keep"])):
        assert any(int((~m).sum()) for m in a), kind  # really pruned
        assert all(torch.equal(x, y) for x, y in zip(a, b)), kind
    assert two["thresholds"] == two["thresholds_full"]
    assert two["ffn_thresholds"] == pytest.approx(one["ffn_thresholds"], rel=1e-4)
    assert two["thresholds"] == pytest.approx(one["thresholds"], rel=1e-4)
    assert two["export_masks_equal"] and one["export_masks_equal"]
    assert two["sparsity"] == pytest.approx(one["sparsity"])
    # The hidden dimensions' movement scores (dL/dz averaged over ranks) and the
    # dimensions they pruned.
    assert int((~one["hidden_keep"]).sum()) == 8
    assert torch.equal(one["hidden_keep"], two["hidden_keep"])
    torch.testing.assert_close(two["hidden_score"], one["hidden_score"], rtol=1e-4,
                               atol=1e-6)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_frozen_teacher_is_sharded(strategy, assets, single, tmp_path_factory):
    dist_rec = two_ranks(strategy, assets, tmp_path_factory)
    full = single["teacher_full_bytes"]
    # Half of the bytes per rank, plus what stays replicated (ZeRO-3's small persistent
    # params, FSDP2's root head) and the padding of uneven shards.
    assert 0.45 * full < dist_rec["teacher_bytes"] < 0.56 * full
    torch.testing.assert_close(dist_rec["teacher_logits"], single["teacher_logits"],
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
def test_entry_point_smoke(strategy, assets, tmp_path_factory):
    dist_rec = two_ranks(strategy, assets, tmp_path_factory)
    assert dist_rec["smoke_rc"] == 0
    out = dist_rec["smoke_dir"]
    results = json.loads((out / "results.json").read_text())
    assert results["world_size"] == 2 and results["steps"] == 2
    assert results["strategy"] == strategy
    report = json.loads((out / "pruned" / "sparsity_report.json").read_text())
    assert report["linear_sparsity"] > 0.25
    from transformers import AutoModelForSequenceClassification

    from capscale.models.loading import adapter_for
    model = AutoModelForSequenceClassification.from_pretrained(out / "pruned" / "model")
    names = adapter_for(model).qualified_names(model)
    assert set(report["per_matrix"]) == set(names)
    for key, entry in report["per_matrix"].items():
        w = model.get_submodule(names[key]).weight
        # Every pruned weight is baked to zero (kept ones may be zero too: they were
        # zeroed while pruned, pruning.zero_pruned_weights).
        assert int((w == 0).sum()) >= entry["pruned"] > 0, key
