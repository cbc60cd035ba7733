"""The encoder families capscale knows, each described by an
:class:`~capscale.models.adapters.EncoderAdapter` and registered on import (the package
imports this module, so every adapter lookup sees them)."""

from __future__ import annotations

from typing import Any

from capscale.models.adapters import EncoderAdapter, register_adapter

# Families whose blocks add the residual inside their own forward (no module to skip).
NO_BLOCKS: dict[str, Any] = {"attn_block": None, "ffn_block": None}
# Post-LN layouts whose residual stream is always a LayerNorm's output (hidden pruning).
POST_LN: dict[str, Any] = {"embedding_norm": "embeddings.LayerNorm",
                           "hidden_norms": ("attention.output.LayerNorm", "output.LayerNorm")}
# BERT-like layouts (BERT, RoBERTa, XLM-R, ELECTRA, CamemBERT, ...).
register_adapter(EncoderAdapter(model_types=("bert",), **POST_LN))
register_adapter(EncoderAdapter(model_types=("roberta", "xlm-roberta", "camembert",
                                             "electra"),
                                head_linear="classifier.out_proj", **POST_LN))
register_adapter(EncoderAdapter(model_types=("deberta-v2",),
                                query="attention.self.query_proj",
                                key="attention.self.key_proj",
                                value="attention.self.value_proj",
                                extra_head_linears=("attention.self.pos_key_proj",
                                                    "attention.self.pos_query_proj")))
# Fused attention input and gated FFN (ModernBERT), fused per-head Q/K/V (DeBERTa v1).
register_adapter(EncoderAdapter(model_types=("modernbert",), layers="layers",
                                qkv="attn.Wqkv", qkv_layout="stacked", attn_out="attn.Wo",
                                ffn_in="mlp.Wi", ffn_out="mlp.Wo", ffn_gated=True, **NO_BLOCKS))
register_adapter(EncoderAdapter(model_types=("deberta",),
                                qkv="attention.self.in_proj", qkv_layout="per_head",
                                extra_head_linears=("attention.self.pos_proj",
                                                    "attention.self.pos_q_proj"),
                                extra_head_params=("attention.self.q_bias",
                                                   "attention.self.v_bias")))
# One layer's weights shared by every application (ALBERT: num_hidden_groups groups).
register_adapter(EncoderAdapter(model_types=("albert",),
                                layers="encoder.albert_layer_groups.*.albert_layers",
                                query="attention.query", key="attention.key",
                                value="attention.value", attn_out="attention.dense",
                                ffn_in="ffn", ffn_out="ffn_output", **NO_BLOCKS))
register_adapter(EncoderAdapter(model_types=("distilbert",), layers="transformer.layer",
                                query="attention.q_lin", key="attention.k_lin",
                                value="attention.v_lin", attn_out="attention.out_lin",
                                ffn_in="ffn.lin1", ffn_out="ffn.lin2", num_heads_attr="n_heads",
                                **NO_BLOCKS))
# MPNet's relative position bias is computed once for all layers, one slice per head.
register_adapter(EncoderAdapter(model_types=("mpnet",), query="attention.attn.q",
                                key="attention.attn.k", value="attention.attn.v",
                                attn_out="attention.attn.o", head_linear="classifier.out_proj",
                                head_inputs=(("attention.attn", "position_bias", 2),),
                                attn_block=None))
# BERT copies with their own module names at the top (MegatronBERT: pre-LayerNorm;
# ERNIE: task-type embeddings; RoFormer: rotary positions, a RoBERTa-style head).
register_adapter(EncoderAdapter(model_types=("megatron-bert",)))
register_adapter(EncoderAdapter(model_types=("ernie",), **POST_LN))
register_adapter(EncoderAdapter(model_types=("roformer",), head_linear="classifier.out_proj",
                                **POST_LN))
# ConvBERT: Q/K/V hold the self-attention half of the heads, the other half are
# span-based convolutions (their linear maps are not pruned); structured pruning is refused.
register_adapter(EncoderAdapter(
    model_types=("convbert",), head_linear="classifier.out_proj",
    structured_refusal="ConvBERT's attention output joins its self-attention heads (Q/K/V, "
    "half the width) with as many span-based convolution heads, whose kernels "
    "(conv_kernel_layer) read every query head at once: a head is not one unit of Q/K/V "
    "and attn_out, so heads cannot be removed one by one; use an unstructured method"))
# Longformer: separate projections for the tokens with global attention, per head too.
register_adapter(EncoderAdapter(
    model_types=("longformer",), head_linear="classifier.out_proj",
    extra_head_linears=("attention.self.query_global", "attention.self.key_global",
                        "attention.self.value_global"),
    structured_refusal="LongformerSelfAttention reshapes the heads' output to the width of "
    "its input (the hidden size) and checks that width against embed_dim, so a layer "
    "with fewer heads cannot run the stock forward; use an unstructured method"))
# Funnel: blocks of layers (the sequence is pooled between blocks), relative attention
# with per-head bias and kernel tensors; the attention reads its head count from the config.
register_adapter(EncoderAdapter(model_types=("funnel",), layers="encoder.blocks.*",
                                query="attention.q_head", key="attention.k_head",
                                value="attention.v_head", attn_out="attention.post_proj",
                                ffn_in="ffn.linear_1", ffn_out="ffn.linear_2",
                                head_linear="classifier.linear_out", num_heads_attr="n_head",
                                head_size_attr="d_head", **NO_BLOCKS,
                                extra_head_params=("attention.r_w_bias:0", "attention.r_r_bias:0",
                                                   "attention.r_s_bias:0", "attention.r_kernel:1",
                                                   "attention.seg_embed:1")))
# Nystromformer: a depthwise convolution over the values, one channel per head.
register_adapter(EncoderAdapter(model_types=("nystromformer",),
                                head_linear="classifier.out_proj",
                                extra_head_params=("attention.self.conv.weight:0",),
                                attn_block=("attention.self", 1, "attention.output")))
