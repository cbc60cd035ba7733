"""Every encoder family beside BERT (fused, gated, shared, per-head-input layouts and the
BERT-like ones with their own embeddings and heads): 2 ranks under ZeRO-3 and
FSDP2 equal one process on the global batch (losses, gradients, masks, zeroed weights).

One 2-rank job per strategy, on the session's two ranks (tests/rank_pool.py), runs
every family;
tolerances as in test_distributed_strategies.
"""

from __future__ import annotations

import pytest
import rank_pool
import torch
from distributed_helpers import (
    FAMILY_OVERRIDES,
    GLOBAL_BATCH,
    assert_losses_and_grads_match,
    build_run,
    family_worker,
    make_family_assets,
    train_and_record,
)

from capscale.distributed import DistContext

pytestmark = pytest.mark.multiprocess

FAMILIES = ("deberta", "modernbert", "albert", "distilbert", "mpnet", "deberta-v2", "roberta",
            "electra")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return {f: make_family_assets(tmp_path_factory.mktemp(f), f) for f in FAMILIES}


@pytest.fixture(scope="module")
def single(assets):
    torch.set_num_threads(1)
    out = {}
    for family, paths in assets.items():
        run = build_run(paths, DistContext(), GLOBAL_BATCH, **FAMILY_OVERRIDES)
        out[family] = train_and_record(run, run.ctx)
    return out


_JOBS: dict[str, dict] = {}


def two_ranks(strategy: str, assets, tmp_path_factory) -> dict:
    if strategy not in _JOBS:
        out = tmp_path_factory.mktemp(f"families_{strategy}")
        rank_pool.run(family_worker, strategy, assets, str(out))
        _JOBS[strategy] = torch.load(out / "records.pt", weights_only=False)
    return _JOBS[strategy]


@pytest.mark.parametrize("strategy", ["zero3", "fsdp2"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_two_ranks_match_one_process(family, strategy, assets, single,
                                            tmp_path_factory):
    one = single[family]
    two = two_ranks(strategy, assets, tmp_path_factory)[family]
    assert_losses_and_grads_match(one, two, {"ce", "kd", "prc_unsup", "fic_sup", "snc_unsup"})
    for key, mask in one["masks"].items():
        assert 0 < int((~mask).sum()) < mask.numel(), key
        assert torch.equal(two["masks"][key], mask), key
        assert torch.all(two["weights"][key][~mask] == 0), key
    assert two["export_masks_equal"] and one["export_masks_equal"]
