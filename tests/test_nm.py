"""N:M semi-structured sparsity (pruning.pattern): masks, schedule, export check."""

from __future__ import annotations

import pytest
import torch
from tiny import eval_inputs, run_cap
from transformers import AutoModelForSequenceClassification

from capscale.checks import load_run_config
from capscale.config import ConfigError
from capscale.export.huggingface import export_pruned
from capscale.pruning.binarizers import NMBinarizer, nm_mask
from capscale.pruning.nm import check_pattern, to_semi_structured


def test_nm_mask_keeps_the_largest_per_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, -1.0, 5.0, 5.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[1, 0, 1, 0, 0, 0, 1, 1]]
    assert nm_mask(scores, 3, 4).sum() == 6 and nm_mask(scores, 4, 4).sum() == 8
    s = torch.randn(6, 16, requires_grad=True)
    NMBinarizer.apply(s, 2, 4).mul(torch.arange(96.0).view(6, 16)).sum().backward()
    assert torch.equal(s.grad, torch.arange(96.0).view(6, 16))  # straight through
    rep = check_pattern({"a": nm_mask(torch.randn(8, 16), 2, 4).bool()}, 2, 4)
    assert rep["exact"] and rep["groups"] == 32
    bad = nm_mask(torch.randn(8, 16), 2, 4).bool()
    bad[0, 0] = ~bad[0, 0]
    assert check_pattern({"a": bad}, 2, 4)["groups_off_pattern"] == 1


@pytest.mark.parametrize("method", ["movement", "magnitude"])
def test_two_four_cap_run_exports_the_exact_pattern(method, tiny_model_factory, tiny_csv,
                                                     tmp_path):
    """A CAP run with pattern 2:4 goes from dense through 3:4 to exactly 2 of every 4,
    and the export passes the pattern check with the masked model's logits."""
    recipe = run_cap(tiny_model_factory("bert"), tiny_csv, tmp_path / "run",
                     f"pruning.method={method}", "pruning.pattern=2:4",
                     "pruning.final_sparsity=0.5")
    pruner = recipe.controller.pruner
    pruner.update(1)  # early in the schedule: between 4:4 and 2:4 per group
    mid = {k: m.cpu() for k, m in pruner.masks().items()}
    kept = {int(g) for m in mid.values() for g in m.reshape(m.shape[0], -1, 4).sum(-1).unique()}
    assert kept <= {2, 3, 4} and kept != {2}
    pruner.update(recipe.state.step)
    model = recipe.student.model.eval()
    # The skeleton a sharded run's export loads into rebuilds the same N:M masks.
    skeleton = recipe._skeleton()
    skeleton.load_state_dict(model.state_dict())
    names = recipe.adapter.qualified_names(model)
    for key, mask in pruner.masks().items():
        assert torch.equal(skeleton.get_submodule(names[key]).mask().bool(), mask), key
    inputs = eval_inputs(recipe)
    with torch.no_grad():
        masked = model(**inputs).logits
    report = export_pruned(model, recipe.adapter, tmp_path / "out")
    assert report["pattern_check"]["exact"] and report["pattern_check"]["matrices"] == 12
    assert report["linear_sparsity"] == pytest.approx(0.5)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    with torch.no_grad():
        torch.testing.assert_close(reloaded.eval()(**inputs).logits, masked, rtol=0,
                                   atol=1e-6)
    w = reloaded.bert.encoder.layer[0].attention.self.query.weight
    assert torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2)


def test_pattern_config_is_checked():
    with pytest.raises(ConfigError, match=r"final_sparsity 0\.5"):
        load_run_config(None, ["data.preset=tweets", "pruning.pattern=2:4"])
    with pytest.raises(ConfigError, match="movement or magnitude"):
        load_run_config(None, ["data.preset=tweets", "pruning.pattern=1:4",
                           "pruning.final_sparsity=0.75", "pruning.method=soft_movement"])
    cfg = load_run_config(None, ["data.preset=tweets", "pruning.pattern=1:4",
                             "pruning.final_sparsity=0.75"])
    assert cfg.pruning.nm() == (1, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="semi-structured kernels: CUDA only")
def test_semi_structured_on_gpu():  # pragma: no cover - needs a GPU
    lin = torch.nn.Sequential(torch.nn.Linear(128, 128))
    with torch.no_grad():
        lin[0].weight.mul_(nm_mask(torch.randn(128, 128), 2, 4))
    x = torch.randn(64, 128)
    dense = lin(x)
    to_semi_structured(lin, ["0"])
    torch.testing.assert_close(lin(x.cuda().half()).float().cpu(), dense, atol=2e-2, rtol=2e-2)


def test_semi_structured_refused_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        to_semi_structured(torch.nn.Linear(8, 8), [])
