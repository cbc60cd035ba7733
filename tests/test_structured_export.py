"""Masked model == physically pruned, exported model, for every encoder family."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from structured_models import CONFIGS, tiny_inputs, tiny_model
from transformers import AutoModelForSequenceClassification

from capscale.export.huggingface import export_structured
from capscale.models.loading import adapter_for
from capscale.pruning.structured import StructuredMasks


def _keep_masks(masks: StructuredMasks) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Layer 0: one head, fully pruned FFN; layer 1: no head at all, half the FFN;
    layer 2: a mixed random pattern."""
    g = torch.Generator().manual_seed(3)
    heads = [torch.tensor([False, False, True, False]), torch.zeros(4, dtype=torch.bool),
             torch.rand(4, generator=g) > 0.4]
    ffn = [torch.zeros(masks.intermediate[0], dtype=torch.bool),
           torch.arange(masks.intermediate[1]) % 2 == 0,
           torch.rand(masks.intermediate[2], generator=g) > 0.7]
    heads[2][1] = True
    return heads, ffn


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_masked_equals_exported(family, tmp_path):
    model = tiny_model(family)
    adapter = adapter_for(model)
    inputs = tiny_inputs()
    with torch.no_grad():
        dense = model(**inputs).logits
    masks = StructuredMasks(model, adapter)
    heads, ffn = _keep_masks(masks)
    masks.set(heads, ffn)
    with torch.no_grad():
        masked = model(**inputs).logits
    assert not torch.allclose(masked, dense, atol=1e-4)  # the masks do something
    report = export_structured(model, adapter, heads, ffn, tmp_path / "out")
    assert report["heads_per_layer"] == [1, 1, int(heads[2].sum())]
    assert report["intermediate_per_layer"] == [1, masks.intermediate[1] // 2,
                                                int(ffn[2].sum())]
    assert report["exported_encoder_parameters"] < sum(
        p.numel() for p in adapter.layer_modules(model).parameters())
    # The original model is untouched by a copying export.
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, masked)

    from transformers import AutoModelForSequenceClassification
    loaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "out" / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        got = loaded(**inputs).logits
    torch.testing.assert_close(got, masked, atol=1e-5, rtol=1e-5)


def test_export_loads_without_capscale(tmp_path):
    """A fresh interpreter with transformers alone (capscale not importable) loads the
    exported models of every family and reproduces the masked logits."""
    expected = {}
    inputs = tiny_inputs()
    for family in sorted(CONFIGS):
        model = tiny_model(family)
        masks = StructuredMasks(model, adapter_for(model))
        heads, ffn = _keep_masks(masks)
        masks.set(heads, ffn)
        with torch.no_grad():
            expected[family] = model(**inputs).logits.tolist()
        export_structured(model, adapter_for(model), heads, ffn, tmp_path / family)
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "expected.json").write_text(json.dumps(expected))
    script = textwrap.dedent(f"""
        import json, sys
        sys.modules["capscale"] = None  # any import of capscale fails
        import torch
        from transformers import AutoModelForSequenceClassification
        inputs = torch.load({str(tmp_path / "inputs.pt")!r})
        expected = json.load(open({str(tmp_path / "expected.json")!r}))
        for family, logits in expected.items():
            m = AutoModelForSequenceClassification.from_pretrained(
                {str(tmp_path)!r} + "/" + family + "/model", trust_remote_code=True).eval()
            with torch.no_grad():
                got = m(**inputs).logits
            torch.testing.assert_close(got, torch.tensor(logits), atol=1e-5, rtol=1e-5)
            print("ok", family)
    """)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("ok") == len(CONFIGS)


def test_talking_heads_refused():
    """DeBERTa v1 with talking-head projections mixes heads: structured pruning refuses."""
    from transformers import DebertaConfig

    model = AutoModelForSequenceClassification.from_config(DebertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48,
        vocab_size=101, talking_head=True))
    with pytest.raises(ValueError, match="talking_head"):
        StructuredMasks(model, adapter_for(model))
    from capscale.pruning.hybrid import attach_unit_masks
    with pytest.raises(ValueError, match="talking_head"):  # hybrid removes heads too
        attach_unit_masks(model, adapter_for(model))
