"""Binarizers, masked layers, the cubic schedule, sparsity targets, global thresholds."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F

from capscale.config import PruningConfig
from capscale.pruning import (
    MaskedLinear,
    Pruner,
    SigmoidThresholdBinarizer,
    ThresholdBinarizer,
    TopKBinarizer,
    cubic_sparsity,
    kth_largest,
)

BINARIZERS = {
    "topk": lambda s: TopKBinarizer.apply(s, 0.3),
    "threshold": lambda s: ThresholdBinarizer.apply(s, torch.tensor(0.2), 1.0),
    "sigmoid": lambda s: SigmoidThresholdBinarizer.apply(s, 0.5, 0.005),
}


@pytest.mark.parametrize("name", list(BINARIZERS))
def test_binarizer_passes_gradient_straight_through(name):
    torch.manual_seed(0)
    scores = torch.randn(12, 20, requires_grad=True)
    upstream = torch.randn(12, 20)
    mask = BINARIZERS[name](scores)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    assert 0 < mask.sum() < mask.numel()
    (mask * upstream).sum().backward()
    torch.testing.assert_close(scores.grad, upstream, rtol=0, atol=0)


def test_topk_binarizer_keeps_the_largest_scores():
    scores = torch.randn(40, 25)
    mask = TopKBinarizer.apply(scores, 0.2)
    assert int(mask.sum()) == 200
    assert scores[mask.bool()].min() > scores[~mask.bool()].max()


def _masked(method: str, out_f: int = 24, in_f: int = 16, seed: int = 0) -> MaskedLinear:
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    m = MaskedLinear.from_linear(lin, method)
    if m.mask_scores is not None:
        with torch.no_grad():
            m.mask_scores.normal_()
    assert m.weight is lin.weight and m.bias is lin.bias  # same Parameters, no copy
    return m


@pytest.mark.parametrize("setting", ["local", "global", "soft"])
def test_movement_score_gradient_is_grad_of_masked_weight_times_weight(setting):
    """Sanh et al. 2020: dL/dS = dL/dW' * W with W' = W * M (straight-through)."""
    m = _masked("soft_movement" if setting == "soft" else "movement")
    m.keep_frac.fill_(0.4)
    m.threshold.fill_(0.5 if setting == "soft" else 0.3)
    m.global_scope = setting == "global"
    x, g = torch.randn(5, 16), torch.randn(5, 24)
    (m(x) * g).sum().backward()

    with torch.no_grad():
        mask = m.mask()
    assert 0 < mask.sum() < mask.numel()
    w_masked = (m.weight.detach() * mask).requires_grad_()
    (F.linear(x, w_masked, m.bias.detach()) * g).sum().backward()
    torch.testing.assert_close(m.mask_scores.grad, w_masked.grad * m.weight.detach())
    # and the weight itself only learns where the mask keeps it
    torch.testing.assert_close(m.weight.grad, w_masked.grad * mask)


def test_magnitude_mask_follows_abs_weight():
    m = _masked("magnitude", 32, 32)
    m.keep_frac.fill_(0.25)
    mask = m.mask().bool()
    w = m.weight.detach().abs()
    assert int(mask.sum()) == 256
    assert w[mask].min() >= w[~mask].max()
    with torch.no_grad():  # the mask follows the weights when they change
        m.weight.mul_(-1).add_(torch.randn_like(m.weight))
    w2 = m.weight.detach().abs()
    mask2 = m.mask().bool()
    assert w2[mask2].min() >= w2[~mask2].max()
    assert not torch.equal(mask, mask2)


@pytest.mark.parametrize("t_i,t_f", [(10, 30), (0, 0), (25, 0), (0, 50)])
def test_cubic_schedule_endpoints_and_monotonicity(t_i, t_f):
    total, final = 100, 0.9
    values = [cubic_sparsity(t, total, 0.0, final, t_i, t_f) for t in range(total + 1)]
    assert all(v == 0.0 for v in values[: t_i + 1])  # dense up to and including t_i
    assert all(v == final for v in values[total - t_f + 1:])  # final after T - t_f
    assert all(b >= a for a, b in itertools.pairwise(values))
    assert values[t_i + 1] > 0.0  # the ramp starts right after t_i
    # the cubic shape: half way through the ramp, 1 - 1/8 of the way to final
    ramp = total - t_i - t_f
    if ramp % 2 == 0:
        assert values[t_i + ramp // 2] == pytest.approx(final * (1 - 0.5**3))


SHAPES = [(48, 32), (32, 128), (128, 32), (20, 20)]


def _modules(method: str, seed: int = 0) -> dict[str, MaskedLinear]:
    out = {}
    for i, (o, n) in enumerate(SHAPES):
        m = _masked(method, o, n, seed + i)
        if m.mask_scores is not None:  # give matrices different score scales
            with torch.no_grad():
                m.mask_scores.mul_(i + 1)
        out[f"{i}.query"] = m
    return out


@pytest.mark.parametrize("method,scope", [("movement", "local"), ("movement", "global"),
                                          ("magnitude", "local"), ("magnitude", "global")])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.97])
def test_achieved_sparsity_matches_target(method, scope, target):
    mods = _modules(method)
    cfg = PruningConfig(method=method, scope=scope, final_sparsity=target,
                        initial_warmup=0, final_warmup=0)
    pruner = Pruner(mods, cfg, total_steps=10)
    assert pruner.update(10) == target
    masks = pruner.masks()
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs((1 - kept / total) - target) < 0.005
    if scope == "local":  # every matrix on its own hits the target
        for m in masks.values():
            assert abs((1 - m.float().mean().item()) - target) < 0.005
    elif method == "movement" and target >= 0.9:
        # one threshold far in the tails: the matrix with 4x wider scores keeps more
        per = [m.float().mean().item() for m in masks.values()]
        assert per[3] > 2 * per[0]


def test_soft_movement_keeps_at_least_min_keep():
    """Even a matrix whose every sigmoid(S) is under tau keeps min_keep of its entries."""
    for shape in [(32, 32), (20, 10), (7, 3)]:
        scores = torch.full(shape, -8.0) + 0.01 * torch.randn(shape)
        n = scores.numel()
        mask = SigmoidThresholdBinarizer.apply(scores, 0.1, 0.005)
        assert mask.sum() >= 0.005 * n and mask.sum() == math.ceil(0.005 * n)
        assert scores[mask.bool()].min() > scores[~mask.bool()].max()
    # through the Pruner and MaskedLinear, at the end of the schedule
    mods = _modules("soft_movement")
    for m in mods.values():
        with torch.no_grad():
            m.mask_scores.fill_(-20.0)
    pruner = Pruner(mods, PruningConfig(method="soft_movement", final_sparsity=0.9,
                                        initial_warmup=0, final_warmup=0,
                                        soft_threshold="schedule"), total_steps=4)
    pruner.update(4)
    for m in pruner.masks().values():
        assert int(m.sum()) == math.ceil(0.005 * m.numel())
    # and the L1 penalty is on, at full strength: final_lambda * mean sigmoid(S)
    reg = pruner.regularization()
    assert float(reg.detach()) == pytest.approx(100.0 * 1 / (1 + math.exp(20.0)), rel=1e-5)


def test_kth_largest_equals_topk_min():
    torch.manual_seed(0)
    tensors = [torch.randn(30, 17), torch.randn(5) * 10, torch.randn(8, 8).abs(),
               torch.tensor([0.0, -0.0, 1e-30, -1e-30, 3.0, 3.0])]
    flat = torch.cat([t.flatten() for t in tensors])
    for k in [1, 2, 7, 100, flat.numel() // 2, flat.numel() - 1, flat.numel()]:
        assert kth_largest(tensors, k) == flat.topk(k).values.min().item(), k


def test_kth_largest_over_two_fake_ranks_equals_one_process():
    """Two threads stand in for two ranks; the all-reduce sums their counts."""
    torch.manual_seed(1)
    full = [torch.randn(64, 32), torch.randn(32, 16), torch.randn(100)]
    shards = [[t.flatten()[: t.numel() // 3] for t in full],
              [t.flatten()[t.numel() // 3:] for t in full]]
    flat = torch.cat([t.flatten() for t in full])
    k = round(0.1 * flat.numel())
    barrier = threading.Barrier(2)
    slots: list[torch.Tensor] = [torch.zeros(()), torch.zeros(())]
    results: list[float] = [0.0, 0.0]

    def make_all_reduce(rank: int):
        def all_reduce(count: torch.Tensor) -> torch.Tensor:
            slots[rank] = count.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()  # both have read before the next round overwrites
            return total
        return all_reduce

    def run(rank: int) -> None:
        results[rank] = kth_largest(shards[rank], k, make_all_reduce(rank))

    threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    expected = flat.topk(k).values.min().item()
    assert results == [expected, expected]


@pytest.mark.parametrize("target", [0.05, 0.3, 0.7])
def test_global_scope_hits_target_with_tied_scores(target):
    """score_init=0 and AdamW's first +-lr steps leave most scores tied: the global
    threshold must not keep every tie (that kept all weights: sparsity 0)."""
    torch.manual_seed(0)
    mods = _modules("movement")
    for i, m in enumerate(mods.values()):  # what one AdamW step from score_init=0 gives
        with torch.no_grad():
            m.mask_scores.copy_(torch.where(torch.rand_like(m.mask_scores) < 0.5, 0.01, -0.01))
            m.mask_scores[0, 0] = 0.02 * (i + 1)
    pruner = Pruner(mods, PruningConfig(scope="global", final_sparsity=target,
                                        initial_warmup=0, final_warmup=0), total_steps=4)
    pruner.update(4)
    masks = pruner.masks()
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs((1 - kept) - target) < 0.005
    for m, mask in zip(mods.values(), masks.values()):  # every score above a pruned one
        s = m.mask_scores.detach()
        assert s[mask].min() >= s[~mask].max()
    # all scores equal (score_init): still the target, not dense
    for m in mods.values():
        with torch.no_grad():
            m.mask_scores.zero_()
    pruner.update(4)
    masks = pruner.masks()
    kept = sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert abs((1 - kept) - target) < 0.005


@pytest.mark.parametrize("scope", ["global", "local"])
def test_soft_movement_steered_to_the_target(scope):
    """soft_threshold: target keeps exactly 1 - s_t at every update, whatever the
    scores (here pushed far under the reference's tau, where schedule mode keeps only
    min_keep), globally (uneven per matrix) or per matrix."""
    torch.manual_seed(0)
    mods = _modules("soft_movement")
    for i, m in enumerate(mods.values()):
        with torch.no_grad():
            m.mask_scores.copy_(torch.randn_like(m.mask_scores) * (1 + i) - 20.0)
    cfg = PruningConfig(method="soft_movement", final_sparsity=0.97, initial_warmup=0,
                        final_warmup=0, scope=scope)
    pruner = Pruner(mods, cfg, total_steps=10)
    assert pruner.global_scope == (scope == "global")
    for step in (3, 6, 10):
        target = pruner.update(step)
        masks = pruner.masks()
        kept = sum(int(m.sum()) for m in masks.values())
        total = sum(m.numel() for m in masks.values())
        assert abs((1 - kept / total) - target) < 1.0 / total + 1e-9, step
        if scope == "local":
            for m in masks.values():
                assert int(m.sum()) == round((1 - target) * m.numel())
    per = [m.float().mean().item() for m in pruner.masks().values()]
    if scope == "global":
        assert max(per) > 2 * min(per)  # one threshold: wider score spread keeps more
    assert float(pruner.regularization().detach()) > 0  # the L1 penalty is still on


def test_cap_soft_run_reaches_its_target(tiny_model_factory, tiny_csv, tmp_path):
    """A short CAP-soft run (soft movement + PrC / FiC / SnC) ends at final_sparsity
    with the default steered threshold; with the reference's schedule threshold and
    lambda the same run prunes (almost) nothing: the sparsity is left to the penalty."""
    from tiny import run_cap

    model = tiny_model_factory("bert")
    common = ["pruning.method=soft_movement", "pruning.final_lambda=100",
              "pruning.scope=global", "pruning.score_init=0"]
    steered = run_cap(model, tiny_csv, tmp_path / "target", *common)
    reached = steered.controller.report()["linear_sparsity"]
    assert abs(reached - 0.9) < 0.005, reached
    reference = run_cap(model, tiny_csv, tmp_path / "schedule", *common,
                        "pruning.soft_threshold=schedule")
    assert reference.controller.report()["linear_sparsity"] < 0.5


def test_score_warm_start_from_magnitude(tiny_model_factory, tiny_csv, tmp_path):
    """pruning.score_warm_start: magnitude seeds the movement scores so that the first
    masks are magnitude masks (per matrix); ``none`` leaves every score at 0."""
    from tiny import fast_overrides

    from capscale.checks import load_run_config
    from capscale.console import Console
    from capscale.distributed import DistContext
    from capscale.pruning.binarizers import topk_mask
    from capscale.recipe import CAPRecipe

    def setup(*extra: str) -> CAPRecipe:
        cfg = load_run_config(None, [*fast_overrides(tiny_model_factory("bert"), tiny_csv,
                                                 tmp_path / extra[0]), *extra[1:]])
        recipe = CAPRecipe(cfg, DistContext(), Console(enabled=False, progress=False))
        recipe.setup()
        return recipe

    warm = setup("warm", "pruning.score_warm_start=magnitude",
                 "pruning.score_warm_start_scale=0.2")
    pruner = warm.controller.pruner
    pruner.set_keep_fraction(0.3)
    for key, m in pruner.modules.items():
        w = m.weight.detach().abs()
        assert float(m.mask_scores.detach().mean()) == pytest.approx(0.2, rel=1e-4), key
        assert torch.equal(m.mask().bool(), topk_mask(w, 0.3).bool()), key
    cold = setup("cold", "pruning.score_warm_start=none")
    assert all(float(m.mask_scores.detach().abs().max()) == 0
               for m in cold.controller.pruner.modules.values())
