"""Every supported encoder family, and a custom one, prunes with CAP and exports with parity.

The custom encoder is defined here from scratch (its own config class, model_type and
module names), registered with the Auto classes and with one EncoderAdapter, to show
that capscale needs no fork of modeling code to prune a new architecture.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import FAMILIES, MINILM_VOCAB, eval_inputs, run_cap
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

from capscale.export.huggingface import export_pruned
from capscale.models.adapters import ROLES, EncoderAdapter, register_adapter
from capscale.models.loading import resolve_model_path
from capscale.pruning import MaskedLinear


class TinyEncConfig(PretrainedConfig):
    model_type = "capscale-test-encoder"

    def __init__(self, vocab_size: int = MINILM_VOCAB, width: int = 32, depth: int = 2,
                 heads: int = 4, ffn: int = 64, max_len: int = 64, **kwargs) -> None:
        self.vocab_size, self.width, self.depth = vocab_size, width, depth
        self.heads, self.ffn, self.max_len = heads, ffn, max_len
        super().__init__(**kwargs)


class Attention(nn.Module):
    def __init__(self, c: TinyEncConfig) -> None:
        super().__init__()
        self.heads = c.heads
        self.q, self.k, self.v, self.o = (nn.Linear(c.width, c.width) for _ in range(4))

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        b, t, w = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:  # (B, T, W) -> (B, nh, T, hs)
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)
        att = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) / math.sqrt(w // self.heads)
        att = att.masked_fill(pad[:, None, None, :], -1e4).softmax(-1)
        return self.o((att @ split(self.v(x))).transpose(1, 2).reshape(b, t, w))


class Block(nn.Module):
    def __init__(self, c: TinyEncConfig) -> None:
        super().__init__()
        self.attn = Attention(c)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = nn.Linear(c.width, c.ffn), nn.Linear(c.ffn, c.width)
        self.norm1, self.norm2 = nn.LayerNorm(c.width), nn.LayerNorm(c.width)

    def forward(self, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, pad))
        return self.norm2(x + self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class TinyEncPreTrained(PreTrainedModel):
    config_class = TinyEncConfig
    base_model_prefix = "backbone"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, std=0.05)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class TinyEncModel(TinyEncPreTrained):
    def __init__(self, config: TinyEncConfig) -> None:
        super().__init__(config)
        self.tok = nn.Embedding(config.vocab_size, config.width)
        self.pos = nn.Embedding(config.max_len, config.width)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.depth))
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> list[torch.Tensor]:
        pad = (attention_mask == 0) if attention_mask is not None else \
            torch.zeros_like(input_ids, dtype=torch.bool)
        x = self.tok(input_ids) + self.pos(torch.arange(input_ids.shape[1]))
        states = [x]
        for block in self.blocks:
            states.append(block(states[-1], pad))
        return states


class TinyEncForSequenceClassification(TinyEncPreTrained):
    def __init__(self, config: TinyEncConfig) -> None:
        super().__init__(config)
        self.backbone = TinyEncModel(config)
        self.head = nn.Module()
        self.head.dense = nn.Linear(config.width, config.width)
        self.head.drop = nn.Dropout(0.1)
        self.head.proj = nn.Linear(config.width, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, **kwargs) -> SequenceClassifierOutput:
        states = self.backbone(input_ids, attention_mask)
        pooled = self.head.drop(torch.tanh(self.head.dense(states[-1][:, 0])))
        return SequenceClassifierOutput(logits=self.head.proj(pooled),
                                        hidden_states=tuple(states) if output_hidden_states
                                        else None)


AutoConfig.register(TinyEncConfig.model_type, TinyEncConfig, exist_ok=True)
AutoModelForSequenceClassification.register(TinyEncConfig, TinyEncForSequenceClassification,
                                            exist_ok=True)
register_adapter(EncoderAdapter(
    model_types=(TinyEncConfig.model_type,), layers="blocks", query="attn.q", key="attn.k",
    value="attn.v", attn_out="attn.o", ffn_in="mlp.fc1", ffn_out="mlp.fc2",
    head_linear="head.proj", num_heads_attr="heads"))


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("custom-encoder")
    torch.manual_seed(0)
    TinyEncForSequenceClassification(TinyEncConfig(num_labels=2)).save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(path)
    return path


@pytest.mark.parametrize("family", [*FAMILIES, "custom"])
def test_family_prunes_and_exports_with_parity(family, tiny_model_factory, custom_model,
                                               tiny_csv, tmp_path):
    model_dir = custom_model if family == "custom" else tiny_model_factory(family)
    pruner = run_cap(model_dir, tiny_csv, tmp_path / "run", "cap.representation=head")
    # six CAP steps with every loss component, at the final sparsity at the end
    assert pruner.state.step == 6
    last = pruner.state.history[-1]
    for name in ("ce", "kd", "prc_unsup", "prc_sup", "fic_unsup", "fic_sup", "snc_unsup",
                 "snc_sup"):
        assert math.isfinite(last[name]), name
    masked = {n: m for n, m in pruner.student.model.named_modules() if isinstance(m, MaskedLinear)}
    adapter = pruner.adapter
    distinct = len(adapter.layer_modules(pruner.student.model))
    assert len(masked) == distinct * len(adapter.physical_roles)  # every prunable map, no other
    report = pruner.controller.report()
    # one entry per logical matrix (fused Q/K/V and GLU halves split), each at 90%
    fused = len(ROLES) + (1 if adapter.ffn_gated else 0)
    assert len(report["per_matrix"]) == distinct * fused
    for key, entry in report["per_matrix"].items():
        assert abs(entry["sparsity"] - 0.9) < 0.005, key
    scores = pruner.controller.pruner.score_parameters()
    assert any(float(s.detach().abs().max()) > 0 for s in scores)  # the scores learned

    export_pruned(pruner.student.model, pruner.adapter, tmp_path / "pruned")
    inputs = eval_inputs(pruner)
    pruner.student.model.eval()
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pruned" / "model").eval()
    assert type(reloaded).__name__ == type(pruner.student.model).__name__
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, pruner.student.model(**inputs).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["deberta", "modernbert", "albert", "distilbert", "mpnet"])
def test_family_structured_cap_exports_smaller_with_parity(family, tiny_model_factory,
                                                           tiny_csv, tmp_path):
    """Structured CAP (Taylor importance through the full CAP loss, two levels with
    retraining) on the fused / gated / shared / per-head-input layouts; the physically
    smaller export, loaded by transformers, gives the masked student's logits."""
    pruner = run_cap(tiny_model_factory(family), tiny_csv, tmp_path / "run",
                     "pruning.method=structured", "structured.levels=[0.25,0.5]",
                     "structured.retrain_steps=2", "structured.importance_fraction=0.5")
    heads, ffn = pruner.controller.masks.keep()
    assert sum(int(h.sum()) for h in heads) < sum(h.numel() for h in heads)
    assert sum(int(f.sum()) for f in ffn) <= sum(f.numel() for f in ffn) // 2 + len(ffn)
    inputs = eval_inputs(pruner)
    model = pruner.student.model.eval()
    with torch.no_grad():
        masked = model(**inputs).logits
    report = pruner.export(tmp_path / "pruned")
    assert report["exported_encoder_parameters"] < report["encoder_parameters"]
    assert report["layer_applications"] == (2 if family == "albert" else 1)
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "pruned" / "model", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, masked, rtol=1e-5, atol=1e-5)
