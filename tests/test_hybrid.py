"""Hybrid pruning (movement scores on whole heads and FFN neurons) under CAP."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import eval_inputs, run_cap
from torch import nn
from transformers import AutoModelForSequenceClassification

from capscale.pruning import MaskedLinear
from capscale.pruning.hybrid import HybridController, UnitMaskedLinear


def test_unit_score_gradient_is_block_movement():
    """dL/dS of a head is the sum over its columns of the weight-level movement score
    dL/dW' * W (block movement pruning), and a pruned head's columns get no gradient."""
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    unit = UnitMaskedLinear.wrap(lin, 4, score_init=0.0)
    with torch.no_grad():
        unit.mask_scores.copy_(torch.tensor([0.3, -1.0, 0.7]))
    unit.keep_frac.fill_(2 / 3)
    x = torch.randn(7, 12)
    unit(x).pow(2).sum().backward()
    # The same map with the mask on the weight columns, W' = W * M.
    cols = torch.tensor([1.0, 0.0, 1.0]).repeat_interleave(4)
    wp = (lin.weight.detach() * cols).requires_grad_(True)
    torch.nn.functional.linear(x, wp, lin.bias.detach()).pow(2).sum().backward()
    expected = (wp.grad * lin.weight.detach()).sum(0).reshape(3, 4).sum(1)
    torch.testing.assert_close(unit.mask_scores.grad, expected)
    assert torch.equal(unit.mask().bool(), torch.tensor([True, False, True]))
    torch.testing.assert_close(lin.weight.grad, wp.grad * cols)  # pruned columns: 0


@pytest.mark.parametrize("scope", ["local", "global"])
def test_hybrid_cap_exports_smaller_with_parity(scope, tiny_model_factory, tiny_csv,
                                                tmp_path):
    """A CAP run (PrC, FiC, SnC, KD) with hybrid pruning at 50% of heads and neurons:
    exactly half of each go (per layer with local scope, over all layers with global),
    the export is physically smaller, and transformers alone reloads it with the masked
    student's logits."""
    run = run_cap(tiny_model_factory("bert"), tiny_csv, tmp_path / "run",
                  "pruning.method=hybrid", "pruning.final_sparsity=0.5",
                  f"pruning.scope={scope}", "pruning.score_warm_start=magnitude")
    units = [m for m in run.student.model.modules() if isinstance(m, UnitMaskedLinear)]
    assert units and not any(type(m) is MaskedLinear for m in run.student.model.modules())
    heads, ffn = run.controller.keep()
    n_heads = sum(h.numel() for h in heads)
    n_ffn = sum(f.numel() for f in ffn)
    assert sum(int(h.sum()) for h in heads) == n_heads // 2
    assert sum(int(f.sum()) for f in ffn) == n_ffn // 2
    if scope == "local":
        assert all(int(h.sum()) == h.numel() // 2 for h in heads)
    report = run.controller.report()
    assert report["head_sparsity"] == pytest.approx(0.5)
    assert report["ffn_sparsity"] == pytest.approx(0.5)
    inputs = eval_inputs(run)
    model = run.student.model.eval()
    with torch.no_grad():
        masked = model(**inputs).logits
    exported = run.export(tmp_path / "pruned")
    assert exported["exported_encoder_parameters"] < exported["encoder_parameters"]
    structure = json.loads((tmp_path / "pruned" / "structure.json").read_text())
    assert structure["kept"]["heads"] == [torch.nonzero(h).flatten().tolist() for h in heads]
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pruned" / "model", trust_remote_code=True).eval()
    assert not any("mask_scores" in n for n, _ in reloaded.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=1e-5, atol=1e-5)


def test_hybrid_scores_are_trained(tiny_model_factory, tiny_csv, tmp_path):
    """The scores are trained (their own optimiser group) and the masks follow them."""
    run = run_cap(tiny_model_factory("bert"), tiny_csv, tmp_path / "run",
                  "pruning.method=hybrid", "pruning.final_sparsity=0.5")
    c = run.student.model.config
    scores = run.controller.score_parameters()
    assert sorted({tuple(s.shape) for s in scores}) == sorted(
        {(c.num_attention_heads,), (c.intermediate_size,)})
    groups = run.student.optimizer.param_groups
    assert any(all(any(p is s for p in g["params"]) for s in scores) for g in groups)
    assert all(float(s.detach().abs().max()) > 0 for s in scores)  # moved from 0
    assert run.controller.current_sparsity() == pytest.approx(0.5)


@pytest.mark.parametrize("family", ["modernbert", "albert", "mpnet", "deberta"])
def test_hybrid_on_other_layouts_exports_with_parity(family, tiny_model_factory, tiny_csv,
                                                     tmp_path):
    """Fused / gated (ModernBERT), shared (ALBERT), per-head inputs (MPNet) and per-head
    vectors (DeBERTa v1): hybrid CAP exports a smaller model with the masked logits."""
    run = run_cap(tiny_model_factory(family), tiny_csv, tmp_path / "run",
                  "pruning.method=hybrid", "pruning.final_sparsity=0.5",
                  "pruning.score_warm_start=magnitude")
    inputs = eval_inputs(run)
    with torch.no_grad():
        masked = run.student.model.eval()(**inputs).logits
    report = run.export(tmp_path / "pruned")
    assert report["exported_encoder_parameters"] < report["encoder_parameters"]
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pruned" / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=1e-5, atol=1e-5)


def test_hybrid_removes_emptied_blocks_and_hidden_dimensions(tiny_model_factory, tiny_csv,
                                                            tmp_path):
    """Hybrid at 90% with global scope keeps one head of eight, so one of the two
    attention blocks empties: the masked student skips it and prunes half the hidden
    dimension by movement scores; the export removes both, and transformers alone
    reloads it with the masked logits."""
    run = run_cap(tiny_model_factory("bert"), tiny_csv, tmp_path / "run",
                  "pruning.method=hybrid", "pruning.scope=global",
                  "pruning.score_warm_start=magnitude", "structured.remove_empty_blocks=true",
                  "structured.hidden_sparsity=0.5")
    heads, _ = run.controller.keep()
    emptied = [i for i, h in enumerate(heads) if not h.any()]
    assert len(emptied) == 1
    hidden = run.controller.hidden_keep()
    assert hidden is not None and int(hidden.sum()) == 16
    report = run.controller.report()
    assert report["hidden_sparsity"] == pytest.approx(0.5)
    inputs = eval_inputs(run)
    with torch.no_grad():
        masked = run.student.model.eval()(**inputs).logits
    # A resumed controller restores the hidden mask and scores when it makes the mask.
    state = json.loads(json.dumps(run.controller.state_dict()))  # as a checkpoint holds it
    fresh = HybridController(run.controller.method, run.controller.run)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.hidden_keep(), hidden)
    torch.testing.assert_close(fresh.hidden.score, run.controller.hidden.score)
    fresh.hidden.mask.remove()
    exported = run.export(tmp_path / "pruned")
    structure = json.loads((tmp_path / "pruned" / "structure.json").read_text())
    assert structure["removed_blocks"]["attention"] == emptied
    assert structure["hidden_kept"] == torch.nonzero(hidden).flatten().tolist()
    assert exported["hidden_size_kept"] == 16
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pruned" / "model", trust_remote_code=True).eval()
    assert exported["exported_encoder_parameters"] == sum(
        p.numel() for p in reloaded.bert.encoder.parameters())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=1e-5, atol=1e-5)


def test_hidden_movement_scores():
    """The score adds -dL/dz / ||dL/dz|| per step (averaged over ranks first; pruned
    dimensions' scores frozen), a non-finite step adds nothing, and pruning takes the
    lowest kept dimensions, 8 at a time, never bringing one back."""
    from structured_models import tiny_inputs, tiny_model

    from capscale.models.loading import adapter_for
    from capscale.pruning.hidden import HiddenMask, HiddenMovement
    from capscale.pruning.structured import mark_mask_hook

    model = tiny_model("bert")
    move = HiddenMovement(HiddenMask(model, adapter_for(model), mark_mask_hook))
    z = move.mask.mask
    inputs = tiny_inputs()
    model(**inputs).logits.pow(2).sum().backward()
    g = z.grad.detach().double().clone()
    move.accumulate(all_reduce=lambda t: 2 * t, world_size=2)  # two equal ranks
    torch.testing.assert_close(move.score, -g / g.norm())
    assert z.grad is None
    z.grad = torch.full_like(z, float("nan"))
    move.accumulate()
    torch.testing.assert_close(move.score, -g / g.norm())
    assert move.prune_to(0.3)  # round(0.3 * 32 / 8) * 8 = 8 dimensions
    keep = move.mask.keep()
    assert int((~keep).sum()) == 8
    assert set(torch.argsort(move.score)[:8].tolist()) == set(torch.nonzero(~keep).flatten()
                                                            .tolist())
    frozen = move.score[~keep].clone()
    model(**inputs).logits.pow(2).sum().backward()
    g = z.grad.detach().double() * keep
    before = move.score.clone()
    move.accumulate()
    torch.testing.assert_close(move.score, before - g / g.norm())
    assert torch.equal(move.score[~keep], frozen)
    move.score[~keep] = 1e9  # a pruned dimension's score cannot bring it back
    assert not move.prune_to(0.3)
    assert torch.equal(move.mask.keep(), keep)
    assert move.prune_to(0.55)  # 16 in all: 8 more, the first 8 still pruned
    assert int((~move.mask.keep()).sum()) == 16 and not bool((move.mask.keep() & ~keep).any())
