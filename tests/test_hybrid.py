"""Hybrid pruning (movement scores on whole heads and FFN neurons) under CAP."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import eval_inputs, run_cap
from torch import nn
from transformers import AutoModelForSequenceClassification

from capscale.pruning import MaskedLinear
from capscale.pruning.hybrid import UnitMaskedLinear


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
