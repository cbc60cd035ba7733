"""Tiny encoders of every supported family, built from configs (shared by the tests)."""

from __future__ import annotations

import torch
from transformers import (
    AlbertConfig,
    AutoModelForSequenceClassification,
    BertConfig,
    DebertaConfig,
    DebertaV2Config,
    DistilBertConfig,
    ElectraConfig,
    ErnieConfig,
    ModernBertConfig,
    MPNetConfig,
    RobertaConfig,
    RoFormerConfig,
    XLMRobertaConfig,
)

COMMON = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4,
          "intermediate_size": 48, "vocab_size": 101, "max_position_embeddings": 64,
          "num_labels": 3, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}

CONFIGS = {
    "bert": lambda: BertConfig(**COMMON),
    "roberta": lambda: RobertaConfig(**COMMON, pad_token_id=1),
    "xlm-roberta": lambda: XLMRobertaConfig(**COMMON, pad_token_id=1),
    "electra": lambda: ElectraConfig(**COMMON, embedding_size=24),
    # relative attention with unshared position projections: per-head pos_*_proj too
    "deberta-v2": lambda: DebertaV2Config(**COMMON, relative_attention=True,
                                          position_buckets=8, max_relative_positions=16,
                                          pos_att_type=["p2c", "c2p"], share_att_key=False),
    # fused per-head Q/K/V (in_proj), per-head q_bias / v_bias and position projections
    "deberta": lambda: DebertaConfig(**COMMON, relative_attention=True,
                                     max_relative_positions=16, pos_att_type=["p2c", "c2p"]),
    # fused stacked Wqkv, gated FFN (Wi gives input and gate halves), no biases
    "modernbert": lambda: ModernBertConfig(
        **{k: v for k, v in COMMON.items() if not k.endswith("dropout_prob")},
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2,
        global_attn_every_n_layers=2, local_attention=8, classifier_pooling="mean"),
    # three groups of one layer each, every group applied twice (6 layers deep)
    "albert": lambda: AlbertConfig(**{**COMMON, "num_hidden_layers": 6}, num_hidden_groups=3,
                                   embedding_size=24, classifier_dropout_prob=0.0),
    "distilbert": lambda: DistilBertConfig(
        dim=32, n_layers=3, n_heads=4, hidden_dim=48, vocab_size=101,
        max_position_embeddings=64, num_labels=3, dropout=0.0, attention_dropout=0.0,
        seq_classif_dropout=0.0),
    # the relative position bias (one slice per head) is shared by all layers
    "mpnet": lambda: MPNetConfig(**COMMON),
}


# BERT copies under their own model types, built on demand (not in every family sweep).
MORE_CONFIGS = {
    "ernie": lambda: ErnieConfig(**COMMON),
    "roformer": lambda: RoFormerConfig(**COMMON),  # rotary positions
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config({**CONFIGS, **MORE_CONFIGS}[
        family]())
    # Random biases, so that a fully pruned block's bias really matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.1)
    return model.eval()


def tiny_inputs(batch: int = 4, length: int = 12, vocab: int = 101, seed: int = 1
                ) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length // 2:] = 0  # one padded row
    return {"input_ids": ids, "attention_mask": mask}
