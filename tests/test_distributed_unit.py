"""Strategy selection, mask slicing by shard layout, and zeroing pruned weights (1 process)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capscale.checks import run_config_from_dict
from capscale.config import ConfigError
from capscale.distributed import (
    DistContext,
    Strategy,
    launcher_strategy,
    local_param_bytes,
    resolve_strategy,
)
from capscale.distributed.fsdp2 import FSDP2Strategy
from capscale.distributed.zero3 import ZeRO3Strategy
from capscale.pruning import MaskedLinear


def test_launcher_environment_selects_strategy():
    assert launcher_strategy({}) is None
    assert launcher_strategy({"ACCELERATE_USE_DEEPSPEED": "true"}) == "zero3"
    assert launcher_strategy({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}) == "fsdp2"
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        launcher_strategy({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"})
    assert launcher_strategy({"CAPSCALE_STRATEGY": "fsdp2",
                              "ACCELERATE_USE_DEEPSPEED": "true"}) == "fsdp2"


def test_resolve_strategy():
    assert resolve_strategy("single", {}, 1) == "single"
    assert resolve_strategy("single", {}, 2) == "ddp"
    assert resolve_strategy("single", {"ACCELERATE_USE_DEEPSPEED": "true"}, 2) == "zero3"
    assert resolve_strategy("zero3", {"ACCELERATE_USE_DEEPSPEED": "true"}, 2) == "zero3"
    with pytest.raises(ValueError, match="make them agree"):
        resolve_strategy("fsdp2", {"ACCELERATE_USE_DEEPSPEED": "true"}, 2)


def _cfg(**extra):
    return {"data": {"preset": "tweets"}, **extra}


def test_config_strategy_fields():
    assert run_config_from_dict(_cfg(strategy="fsdp2")).strategy == "fsdp2"
    with pytest.raises(ConfigError, match="strategy"):
        run_config_from_dict(_cfg(strategy="fsdp1"))
    with pytest.raises(ConfigError, match="offload"):
        run_config_from_dict(_cfg(strategy="fsdp2", distributed={"offload_params": True}))
    with pytest.raises(ConfigError, match="deepspeed_config"):
        run_config_from_dict(_cfg(distributed={"deepspeed_config": "/no/such.json"}))
    assert run_config_from_dict(_cfg()).pruning.zero_pruned_weights is False


def _sharded(cls, rank, world):
    # Only the layout arithmetic is exercised: no process group needed.
    s = cls.__new__(cls)
    s.ctx = DistContext(rank=rank, world_size=world)
    return s


@pytest.mark.parametrize("shape", [(4, 6), (5, 3), (7, 1)])
def test_zero3_mask_slices_tile_the_flat_parameter(shape):
    full = torch.rand(shape) > 0.5
    parts = [_sharded(ZeRO3Strategy, r, 2).local_mask(full) for r in range(2)]
    size = -(-full.numel() // 2)
    assert all(p.numel() == size for p in parts)  # ds_tensor length, padding included
    assert torch.equal(torch.cat(parts)[: full.numel()], full.flatten())
    assert not torch.cat(parts)[full.numel():].any()


@pytest.mark.parametrize("rows", [4, 5, 1])
def test_fsdp2_mask_slices_are_row_chunks(rows):
    full = torch.rand(rows, 3) > 0.5
    parts = [_sharded(FSDP2Strategy, r, 2).local_mask(full) for r in range(2)]
    assert [p.shape[0] for p in parts] == [c.shape[0] for c in torch.chunk(full, 2)] + \
        [0] * (2 - len(torch.chunk(full, 2)))
    assert torch.equal(torch.cat(parts), full)


def test_zero3_local_importance_drops_padding():
    m = MaskedLinear(3, 3)  # 9 scores -> partitions of 5, the last padded by 1
    m.mask_scores.data = torch.arange(9.0).view(3, 3)
    s = [_sharded(ZeRO3Strategy, r, 2) for r in range(2)]
    padded = torch.cat([m.mask_scores.data.flatten(), torch.zeros(1)])
    for r in range(2):
        m.mask_scores.ds_tensor = padded[5 * r: 5 * r + 5]
        local = s[r].local_importance(m)
        assert torch.equal(local, torch.arange(9.0)[5 * r: 5 * r + 5])


def _one_step(zero: bool) -> tuple[MaskedLinear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    layer = MaskedLinear(8, 6, method="magnitude")
    layer.keep_frac.fill_(0.5)
    model = nn.Sequential(layer)
    strategy = Strategy(DistContext())
    strategy.bind_masks([layer], zero_pruned=zero)
    model, opt, sched = strategy.prepare_student(
        model, [{"params": list(model.parameters()), "lr": 0.1, "weight_decay": 0.0}],
        lambda s: 1.0)
    before = layer.weight.detach().clone()
    mask = layer.mask().detach().bool()
    loss = model(torch.randn(4, 8)).pow(2).sum()
    strategy.backward_and_step(loss, model, opt, sched, grad_clip=1.0)
    return layer, mask, before


def test_zero_pruned_weights_single_process():
    layer, mask, before = _one_step(zero=True)
    assert torch.all(layer.weight[~mask] == 0)
    assert torch.all(layer.weight[mask] != before[mask])  # kept weights trained
    layer, mask, before = _one_step(zero=False)
    # Functional mask only: pruned weights keep their values (no gradient reached them).
    assert torch.equal(layer.weight[~mask], before[~mask])
    assert local_param_bytes(layer) == (6 * 8 + 6) * 4
