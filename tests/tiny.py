"""Tiny real models, tiny task data and a few-second CAP run, shared by the tests.

Every model here is a real Hugging Face model with random weights (hidden 32, 2 layers),
saved with ``save_pretrained`` next to the packaged MiniLM WordPiece tokenizer, so the
whole pipeline (AutoConfig, AutoTokenizer, from_pretrained) runs as it does for users.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoTokenizer

from capscale.models.loading import resolve_model_path

MINILM_VOCAB = 30522  # the packaged tokenizer's vocabulary; token ids index the embeddings
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 80, "vocab_size": MINILM_VOCAB}
FAMILIES = ("bert", "roberta", "xlm-roberta", "electra", "deberta-v2", "deberta", "modernbert",
            "albert", "distilbert", "mpnet")


def tiny_config(family: str, num_labels: int = 2) -> transformers.PretrainedConfig:
    """A 2-layer, 32-wide config of ``family`` that MiniLM's token ids fit."""
    kw: dict[str, Any] = {**TINY, "num_labels": num_labels}
    if family == "bert":
        return transformers.BertConfig(**kw)
    if family in ("roberta", "xlm-roberta"):  # positions start after padding_idx
        cls = transformers.RobertaConfig if family == "roberta" else \
            transformers.XLMRobertaConfig
        return cls(**{**kw, "max_position_embeddings": 82}, pad_token_id=0)
    if family == "electra":
        return transformers.ElectraConfig(**kw, embedding_size=32)
    if family == "deberta-v2":
        return transformers.DebertaV2Config(**kw, pad_token_id=0, type_vocab_size=0,
                                            relative_attention=True, position_buckets=16,
                                            pos_att_type=["p2c", "c2p"])
    if family == "deberta":  # fused per-head in_proj, q_bias / v_bias
        return transformers.DebertaConfig(**kw, relative_attention=True,
                                          max_relative_positions=16, pos_att_type=["p2c", "c2p"])
    if family == "modernbert":  # fused stacked Wqkv, gated FFN; MiniLM's special ids
        return transformers.ModernBertConfig(**kw, pad_token_id=0, cls_token_id=101,
                                             sep_token_id=102, bos_token_id=101,
                                             eos_token_id=102, global_attn_every_n_layers=2,
                                             local_attention=8)
    if family == "albert":  # one layer applied twice
        return transformers.AlbertConfig(**kw, embedding_size=16, num_hidden_groups=1)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                                             max_position_embeddings=80,
                                             vocab_size=MINILM_VOCAB, num_labels=num_labels)
    if family == "mpnet":  # relative position bias shared by all layers
        return transformers.MPNetConfig(**{**kw, "max_position_embeddings": 82})
    return _more_config(family, kw)


# Families checked deeply at setup (tests/test_families_deep.py): each either prunes
# and exports, or is refused before training.
MORE_FAMILIES = ("roformer", "convbert", "megatron-bert", "ernie", "longformer", "funnel",
                 "nystromformer")


def _more_config(family: str, kw: dict[str, Any]) -> transformers.PretrainedConfig:
    if family == "roformer":  # rotary positions
        return transformers.RoFormerConfig(**kw)
    if family == "convbert":  # head_ratio 2: half the heads are span convolutions
        return transformers.ConvBertConfig(**kw, embedding_size=32)
    if family == "megatron-bert":
        return transformers.MegatronBertConfig(**kw)
    if family == "ernie":
        return transformers.ErnieConfig(**kw)
    if family == "longformer":  # global Q/K/V for the first token, sliding windows of 8
        return transformers.LongformerConfig(**{**kw, "max_position_embeddings": 82},
                                             pad_token_id=0, attention_window=8)
    if family == "funnel":  # two blocks of one layer, pooled in between
        return transformers.FunnelConfig(vocab_size=MINILM_VOCAB, block_sizes=[1, 1],
                                         d_model=32, n_head=4, d_head=8, d_inner=64,
                                         num_labels=kw["num_labels"])
    if family == "nystromformer":  # as many landmarks as segment positions: full attention
        return transformers.NystromformerConfig(**kw, segment_means_seq_len=64,
                                                num_landmarks=64, conv_kernel_size=5)
    if family == "nystromformer-landmarks":  # 8 landmarks: inputs of exactly 32 tokens
        return transformers.NystromformerConfig(**kw, segment_means_seq_len=32,
                                                num_landmarks=8, conv_kernel_size=5)
    raise ValueError(family)


def save_tiny(family: str, path: Path, num_labels: int = 2, seed: int = 0) -> Path:
    """A tiny ``family`` classifier + the MiniLM tokenizer, saved like a hub checkpoint."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForSequenceClassification.from_config(
        tiny_config(family, num_labels))
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve_model_path("minilm")).save_pretrained(path)
    return path


POSITIVE = ["good", "great", "happy", "nice", "love", "fine"]
NEGATIVE = ["bad", "awful", "sad", "poor", "hate", "worst"]
FILLER = ["the", "movie", "was", "a", "day", "it", "really", "very", "food", "so"]


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def sentiment_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` short sentences whose label (``pos`` / ``neg``) one word decides."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = [*rng.sample(FILLER, 4), rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


def fast_overrides(model_dir: Path, data: tuple[Path, Path], out: Path) -> list[str]:
    """Overrides for a few-second CAP-m run to 90% sparsity (PrC, FiC, SnC and KD on)."""
    return [f"model.name_or_path={model_dir}", f"model.teacher={model_dir}",
            f"data.train_file={data[0]}", f"data.validation_file={data[1]}",
            "data.max_length=32", f"output_dir={out}",
            "pruning.method=movement", "pruning.final_sparsity=0.9",
            "pruning.initial_warmup=0", "pruning.final_warmup=2",
            "cap.num_negatives=16", "cap.snapshot_schedule=epoch",
            "train.batch_size=16", "train.eval_batch_size=32", "train.max_steps=6",
            "train.epochs=2", "train.lr=1e-3", "pruning.score_lr=0.1",
            "train.progress=false"]


def run_cap(model_dir: Path, data: tuple[Path, Path], out: Path, *extra: str) -> Any:
    """Set up and train the real CAPRecipe; return it (its student still masked)."""
    from capscale.checks import load_run_config
    from capscale.console import Console
    from capscale.distributed import DistContext
    from capscale.recipe import CAPRecipe

    cfg = load_run_config(None, [*fast_overrides(model_dir, data, out), *extra])
    recipe = CAPRecipe(cfg, DistContext(), Console(enabled=False, progress=False))
    recipe.setup()
    recipe.train()
    return recipe


def eval_inputs(pruner: Any) -> dict[str, torch.Tensor]:
    """Model inputs of the run's first evaluation batch."""
    from capscale.data import model_inputs
    return model_inputs(next(iter(pruner.loaders.eval)), "cpu")
