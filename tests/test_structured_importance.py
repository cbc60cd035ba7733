"""Taylor importance: equals finite differences, selection rules, 2-rank agreement."""

from __future__ import annotations

import os

import pytest
import rank_pool
import torch
import torch.nn.functional as F
from structured_models import tiny_inputs, tiny_model

from capscale.distributed import DistContext
from capscale.models.loading import adapter_for
from capscale.pruning.structured import (
    Importance,
    StructuredMasks,
    select_structure,
    taylor_importance,
)


def _batches(n: int, size: int, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(n):
        b = tiny_inputs(batch=size, length=10, seed=seed + i)
        b["labels"] = torch.randint(0, 3, (size,), generator=torch.Generator().manual_seed(i))
        out.append(b)
    return out


def _ce(model: torch.nn.Module):
    def loss_fn(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return F.cross_entropy(model(**inputs).logits, batch["labels"])
    return loss_fn


def test_taylor_importance_matches_finite_differences():
    model = tiny_model("bert").double()
    masks = StructuredMasks(model, adapter_for(model)).double()
    # A partly pruned expansion point: gradients exist for pruned units too.
    masks.head[1].data[2] = 0.0
    batches = _batches(2, 4)
    loss_fn = _ce(model)
    imp = taylor_importance(masks, loss_fn, batches)

    def fd(param: torch.nn.Parameter, j: int, batch: dict, eps: float = 1e-6) -> float:
        with torch.no_grad():
            old = float(param[j])
            param[j] = old + eps
            up = float(loss_fn(batch))
            param[j] = old - eps
            down = float(loss_fn(batch))
            param[j] = old
        return (up - down) / (2 * eps)

    for layer in range(masks.num_layers):
        for j in range(masks.num_heads):
            expect = sum(abs(fd(masks.head[layer], j, b)) for b in batches)
            assert imp.heads[layer][j].item() == pytest.approx(expect, rel=1e-5, abs=1e-9)
        for j in (0, masks.intermediate[layer] - 1):
            expect = sum(abs(fd(masks.ffn[layer], j, b)) for b in batches)
            assert imp.ffn[layer][j].item() == pytest.approx(expect, rel=1e-5, abs=1e-9)
    assert not any(p.requires_grad for p in masks.parameters())  # left as found


def test_select_structure_rules():
    heads = [torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([9.0, 8.0, 7.0, 6.0]),
             torch.tensor([1.0, 1.0, 1.0, 1.0])]
    ffn = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 0.5]), torch.tensor([0.1, 0.2])]
    imp = Importance(heads, ffn)
    keep_h, keep_f = select_structure(imp, 0.75, min_heads_per_layer=1)
    assert [int(k.sum()) for k in keep_h] == [1, 1, 1]  # 3 of 12: the minimum per layer
    assert bool(keep_h[0][3]) and bool(keep_h[1][0]) and bool(keep_h[2][0])  # ties -> lower
    assert int(torch.cat(keep_f).sum()) == 2  # round(0.25 * 6)
    # Normalised per layer (L2), ranked globally: layer 1's 3.0 / |(3, .5)| wins.
    assert bool(keep_f[1][0])
    # Monotone: a unit pruned earlier never comes back, even when now most important.
    keep_h2, _ = select_structure(imp, 0.5, 0, current=(
        [torch.tensor([False, True, True, True])] + [torch.ones(4, dtype=torch.bool)] * 2,
        [torch.ones(2, dtype=torch.bool)] * 3))
    assert not bool(keep_h2[0][0]) and int(torch.cat(keep_h2).sum()) == 6
    with pytest.raises(ValueError, match="min_heads_per_layer"):
        select_structure(imp, 0.5, min_heads_per_layer=5)


def _worker(rank: int, world: int, out_dir: str) -> None:
    """One of the session's two gloo ranks (tests/rank_pool.py)."""
    ctx = DistContext(rank=rank, world_size=world)
    model = tiny_model("bert")
    masks = StructuredMasks(model, adapter_for(model))
    # Rank r holds rows [r*B, (r+1)*B) of every global batch of 2B rows.
    local = [{k: v[rank * 3:(rank + 1) * 3] for k, v in b.items()} for b in _batches(3, 6)]
    imp = taylor_importance(masks, _ce(model), local, ctx.all_reduce_sum, ctx.world_size)
    keep = select_structure(imp, 0.5, 1)
    torch.save({"imp": imp, "keep": keep}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.multiprocess
def test_importance_two_ranks_equal_one_process(tmp_path):
    rank_pool.run(_worker, str(tmp_path))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    for a, b in zip(r0["imp"].heads + r0["imp"].ffn, r1["imp"].heads + r1["imp"].ffn):
        assert torch.equal(a, b)  # bitwise identical on both ranks
    for a, b in zip(r0["keep"][0] + r0["keep"][1], r1["keep"][0] + r1["keep"][1]):
        assert torch.equal(a, b)
    # One process on the full (concatenated) batches.
    model = tiny_model("bert")
    masks = StructuredMasks(model, adapter_for(model))
    imp = taylor_importance(masks, _ce(model), _batches(3, 6))
    for a, b in zip(imp.heads + imp.ffn, r0["imp"].heads + r0["imp"].ffn):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    keep = select_structure(imp, 0.5, 1)
    for a, b in zip(keep[0] + keep[1], r0["keep"][0] + r0["keep"][1]):
        assert torch.equal(a, b)
