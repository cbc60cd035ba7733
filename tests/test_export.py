"""Export: masks baked into a plain Hugging Face model that loads without capscale."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import eval_inputs, run_cap
from transformers import AutoModelForSequenceClassification

from capscale.export.huggingface import export_pruned
from capscale.pruning import MaskedLinear

RELOAD = """
import json, sys
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(**load_file(sys.argv[2])).logits
assert "capscale" not in sys.modules, "the exported model needed capscale"
print(json.dumps(logits.tolist()))
"""


@pytest.fixture(scope="module")
def pruned(tiny_bert, tiny_csv, tmp_path_factory):
    """A tiny BERT after 6 CAP-m steps at 90% sparsity, and its export (a copy)."""
    out = tmp_path_factory.mktemp("export")
    pruner = run_cap(tiny_bert, tiny_csv, out / "run")
    report = export_pruned(pruner.student.model, pruner.adapter, out / "pruned")
    return pruner, report, out / "pruned"


def test_export_logits_equal_masked_model(pruned):
    pruner, _, out = pruned
    inputs = eval_inputs(pruner)
    pruner.student.model.eval()
    with torch.no_grad():
        masked = pruner.student.model(**inputs).logits
        plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
        exported = plain(**inputs).logits
    assert not any(isinstance(m, MaskedLinear) for m in plain.modules())
    torch.testing.assert_close(exported, masked, rtol=0, atol=1e-5)
    # the student still carries its masks (the export baked a copy), and they matter
    assert any(isinstance(m, MaskedLinear) for m in pruner.student.model.modules())
    dense = AutoModelForSequenceClassification.from_pretrained(
        pruner.cfg.model.name_or_path).eval()
    for name, mod in pruner.student.model.named_modules():
        if isinstance(mod, MaskedLinear):
            dense.get_submodule(name).weight.data.copy_(mod.weight)
    with torch.no_grad():
        assert not torch.allclose(dense(**inputs).logits, masked, atol=1e-4)


def test_export_reloads_without_capscale(pruned, tmp_path):
    pruner, _, out = pruned
    inputs = {k: v.contiguous() for k, v in eval_inputs(pruner).items()}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RELOAD, str(out / "model"),
                           str(tmp_path / "inputs.safetensors")],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits = torch.tensor(json.loads(proc.stdout.strip().splitlines()[-1]))
    pruner.student.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(logits, pruner.student.model(**inputs).logits, rtol=0, atol=1e-5)


def test_masks_and_report_files(pruned):
    pruner, report, out = pruned
    saved = json.loads((out / "sparsity_report.json").read_text())
    masks = load_file(str(out / "masks.safetensors"))
    qualified = pruner.adapter.qualified_names(pruner.student.model)
    assert set(masks) == set(qualified.values())  # 2 layers x 6 roles, by module name
    kept = sum(int(m.sum()) for m in masks.values())
    numel = sum(m.numel() for m in masks.values())
    assert saved["linear_sparsity"] == pytest.approx(1 - kept / numel)
    assert saved["linear_sparsity"] == pytest.approx(report["linear_sparsity"])
    assert abs(saved["linear_sparsity"] - 0.9) < 0.005
    assert saved["linear_sparsity"] == pytest.approx(pruner.controller.report()["linear_sparsity"])
    assert 0 < saved["encoder_sparsity"] < saved["linear_sparsity"]
    assert saved["total_sparsity"] < saved["encoder_sparsity"]
    # the baked weights are zero exactly where the saved masks say pruned
    weights = load_file(str(out / "model" / "model.safetensors"))
    assert not any("mask_scores" in k for k in weights)
    for name, mask in masks.items():
        w, kept = weights[f"{name}.weight"], mask.bool()
        assert int((w[~kept] != 0).sum()) == 0  # pruned weights are zero ...
        assert int((w[kept] == 0).sum()) == 0  # ... and kept ones are untouched


@pytest.mark.parametrize("overrides", [
    ["pruning.scope=global"],
    ["pruning.method=soft_movement", "pruning.score_init=-2.1", "pruning.final_lambda=50",
     "cap.representation=cls"],
    ["pruning.method=magnitude", "cap.representation=mean", "cap.normalization=clean"],
], ids=["movement-global", "soft-movement-cls", "magnitude-mean"])
def test_other_methods_export_with_parity(overrides, tiny_bert, tiny_csv, tmp_path):
    pruner = run_cap(tiny_bert, tiny_csv, tmp_path / "run", *overrides)
    last = pruner.state.history[-1]
    assert all(torch.isfinite(torch.tensor(v)) for k, v in last.items()
               if isinstance(v, float)), last
    sparsity = pruner.controller.report()["linear_sparsity"]
    masks = pruner.controller.pruner.masks().values()  # the report's figure, by hand
    pruned = sum(m.numel() - int(m.sum()) for m in masks)
    assert sparsity == pytest.approx(pruned / sum(m.numel() for m in masks), abs=1e-12)
    if "pruning.method=soft_movement" in overrides:
        assert last["l1"] > 0  # the L1 penalty is on; sparsity is reached indirectly
        assert pruned > 0
    else:
        assert abs(sparsity - 0.9) < 0.005
    export_pruned(pruner.student.model, pruner.adapter, tmp_path / "pruned")
    inputs = eval_inputs(pruner)
    pruner.student.model.eval()
    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "pruned" / "model")
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(**inputs).logits,
                                   pruner.student.model(**inputs).logits, rtol=0, atol=1e-5)
    saved = json.loads((tmp_path / "pruned" / "sparsity_report.json").read_text())
    assert saved["linear_sparsity"] == pytest.approx(sparsity)
