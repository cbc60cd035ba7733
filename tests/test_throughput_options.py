"""CUDA throughput options chosen at run setup, checked where they are decided: fused
AdamW (capscale.distributed.strategy.adamw)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from capscale.distributed import DistContext, Strategy
from capscale.distributed.strategy import adamw

CUDA = torch.cuda.is_available()


def _groups(model: nn.Module) -> list[dict]:
    weights = [p for p in model.parameters() if p.ndim > 1]
    biases = [p for p in model.parameters() if p.ndim == 1]
    return [{"params": weights, "lr": 0.1, "weight_decay": 0.01},
            {"params": biases, "lr": 0.2, "weight_decay": 0.0}]


def test_adamw_is_torch_default_on_cpu():
    """A CPU run keeps torch's own choice (foreach / loop): fused stays unset, and the
    groups keep their own learning rates and decay."""
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    opt = adamw(_groups(model), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["fused"] for g in opt.param_groups] == [None, None]
    assert [(g["lr"], g["weight_decay"]) for g in opt.param_groups] == [(0.1, 0.01),
                                                                        (0.2, 0.0)]


def test_adamw_on_a_cuda_run_with_parameters_off_the_gpu_is_not_fused():
    """The device says CUDA but a parameter is not a CUDA tensor: the fused kernel
    would refuse it, so torch's default is kept (no CUDA needed to decide)."""
    model = nn.Linear(4, 3)
    opt = adamw(_groups(model), torch.device("cuda"))
    assert all(not g["fused"] for g in opt.param_groups)


def test_strategy_optimisers_go_through_adamw():
    """prepare_student and fresh_optimizer both build the helper's optimiser, and it
    steps like a plain torch AdamW."""
    torch.manual_seed(0)
    model, twin = nn.Linear(4, 3), nn.Linear(4, 3)
    twin.load_state_dict(model.state_dict())
    strategy = Strategy(DistContext())
    wrapped, opt, _ = strategy.prepare_student(model, _groups(model), lambda s: 1.0)
    fresh, _ = strategy.fresh_optimizer(wrapped, opt, _groups(model), lambda s: 1.0)
    plain = torch.optim.AdamW(_groups(twin))
    for o, m in ((opt, model), (plain, twin)):
        m(torch.ones(2, 4)).sum().backward()
        o.step()
    assert torch.equal(model.weight, twin.weight)
    assert [g["fused"] for g in fresh.param_groups] == [None, None]


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_adamw_fused_on_cuda():
    model = nn.Linear(4, 3).cuda()
    assert all(g["fused"] for g in adamw(_groups(model), torch.device("cuda")).param_groups)
    half_on_cpu = [{"params": [model.weight]}, {"params": [nn.Parameter(torch.ones(3))]}]
    assert not any(g["fused"] for g in adamw(half_on_cpu,
                                             torch.device("cuda")).param_groups)
