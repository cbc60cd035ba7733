"""A model folder that ships its own modeling code (``trust_remote_code``).

"Ember" is an encoder no table in capscale knows: its own ``model_type``, config
attribute names and module names (``trunk.stack[i].mixer.to_q``, ``ff.w_in``, ...), in
``configuration_ember.py`` / ``modeling_ember.py`` next to ``config.json``, whose
``auto_map`` points the Auto classes at them. Two optional layouts: ``fused_qkv`` (one
``to_qkv`` map whose rows are ``[Q; K; V]``) and ``glu`` (``w_in`` outputs ``[input;
gate]`` halves). The weights are random; the tokenizer is a word-level WordPiece.
"""

from __future__ import annotations

import json
from pathlib import Path

from _tiny_run import WORDS

CONFIGURATION = '''\
from transformers import PretrainedConfig


class EmberConfig(PretrainedConfig):
    model_type = "ember"

    def __init__(self, vocab_size=32, d_model=32, n_layers=2, attn_heads=4, ff_dim=64,
                 max_len=64, fused_qkv=False, glu=False, **kwargs):
        self.vocab_size, self.d_model, self.n_layers = vocab_size, d_model, n_layers
        self.attn_heads, self.ff_dim, self.max_len = attn_heads, ff_dim, max_len
        self.fused_qkv, self.glu = fused_qkv, glu
        super().__init__(**kwargs)
'''

MODELING = '''\
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from .configuration_ember import EmberConfig


class EmberMixer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.heads, self.fused = c.attn_heads, c.fused_qkv
        if self.fused:
            self.to_qkv = nn.Linear(c.d_model, 3 * c.d_model)
        else:
            self.to_q = nn.Linear(c.d_model, c.d_model)
            self.to_k = nn.Linear(c.d_model, c.d_model)
            self.to_v = nn.Linear(c.d_model, c.d_model)
        self.to_out = nn.Linear(c.d_model, c.d_model)

    def forward(self, x, pad):
        b, t, w = x.shape
        if self.fused:
            q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        else:
            q, k, v = self.to_q(x), self.to_k(x), self.to_v(x)

        def split(y):
            return y.view(b, t, self.heads, w // self.heads).transpose(1, 2)
        att = split(q) @ split(k).transpose(-1, -2) / math.sqrt(w // self.heads)
        att = att.masked_fill(pad[:, None, None, :], -1e4).softmax(-1)
        return self.to_out((att @ split(v)).transpose(1, 2).reshape(b, t, w))


class EmberFeedForward(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.glu = c.glu
        self.w_in = nn.Linear(c.d_model, (2 if c.glu else 1) * c.ff_dim)
        self.w_out = nn.Linear(c.ff_dim, c.d_model)

    def forward(self, x):
        h = self.w_in(x)
        if self.glu:
            h, gate = h.chunk(2, dim=-1)
            return self.w_out(F.gelu(h) * gate)
        return self.w_out(F.gelu(h))


class EmberBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.mixer, self.ff = EmberMixer(c), EmberFeedForward(c)
        self.norm_a, self.norm_b = nn.LayerNorm(c.d_model), nn.LayerNorm(c.d_model)

    def forward(self, x, pad):
        x = self.norm_a(x + self.mixer(x, pad))
        return self.norm_b(x + self.ff(x))


class EmberPreTrainedModel(PreTrainedModel):
    config_class = EmberConfig
    base_model_prefix = "trunk"

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.05)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)


class EmberModel(EmberPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.max_len, config.d_model)
        self.stack = nn.ModuleList(EmberBlock(config) for _ in range(config.n_layers))
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        pad = (attention_mask == 0) if attention_mask is not None else \\
            torch.zeros_like(input_ids, dtype=torch.bool)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        states = [self.tokens(input_ids) + self.positions(positions)]
        for block in self.stack:
            states.append(block(states[-1], pad))
        return states


class EmberForSequenceClassification(EmberPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.trunk = EmberModel(config)
        self.pool = nn.Linear(config.d_model, config.d_model)
        self.drop = nn.Dropout(0.1)
        self.score = nn.Linear(config.d_model, config.num_labels)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, labels=None,
                output_hidden_states=None, **kwargs):
        states = self.trunk(input_ids, attention_mask)
        pooled = self.drop(torch.tanh(self.pool(states[-1][:, 0])))
        return SequenceClassifierOutput(
            logits=self.score(pooled),
            hidden_states=tuple(states) if output_hidden_states else None)
'''


def save_remote_encoder(path: Path, fused_qkv: bool = False, glu: bool = False,
                        num_labels: int = 2, seed: int = 0) -> Path:
    """Write the Ember code, config, random weights and a tokenizer to ``path``."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    (path / "configuration_ember.py").write_text(CONFIGURATION)
    (path / "modeling_ember.py").write_text(MODELING)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (path / "config.json").write_text(json.dumps({
        "model_type": "ember", "vocab_size": len(vocab), "fused_qkv": fused_qkv, "glu": glu,
        "num_labels": num_labels, "pad_token_id": 0,
        "auto_map": {
            "AutoConfig": "configuration_ember.EmberConfig",
            "AutoModel": "modeling_ember.EmberModel",
            "AutoModelForSequenceClassification":
                "modeling_ember.EmberForSequenceClassification"}}))
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(str(path / "vocab.txt")).save_pretrained(path)
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config, trust_remote_code=True)
    model.save_pretrained(path)
    return path
