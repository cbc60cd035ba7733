"""A sentence-embedding model as capscale trains and exports it: a plain Hugging Face
encoder (``AutoModel``), pooled and optionally normalised the way its
sentence-transformers configuration says.

:class:`SentenceEmbedder` holds the encoder under the encoder's own
``base_model_prefix`` (``bert``, ``roberta``, ...), so parameter names, encoder
adapters and every pruning method see the same paths as in the family's task models.
Its forward takes ``input_ids`` of shape ``(B, k, L)`` (``k`` texts per example: a
pair, a triple) or ``(B, L)`` (one text each) and returns ``logits`` of shape
``(B, k, H)``: one embedding per text. The pooled embeddings pass through
:class:`EmbeddingHead` (normalisation, no parameters); its input is the ``head``
representation CAP's contrastive terms read (the first text's pooled embedding).

Saving writes the encoder with ``save_pretrained`` plus the files
``sentence_transformers.SentenceTransformer`` reads (``modules.json``,
``1_Pooling/config.json``, ``2_Normalize/``, ``sentence_bert_config.json``), so one
folder loads both as ``AutoModel`` and as a ``SentenceTransformer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

POOLING_MODES = ("mean", "cls", "max")
_ST_MODE_KEYS = {"mean": "pooling_mode_mean_tokens", "cls": "pooling_mode_cls_token",
                 "max": "pooling_mode_max_tokens"}


@dataclass
class Pooling:
    """How token states become one embedding: ``mode`` (mean over the attention mask,
    first token, or max over it) and whether the result is L2-normalised."""

    mode: str = "mean"
    normalize: bool = True

    def __post_init__(self) -> None:
        if self.mode not in POOLING_MODES:
            raise ValueError(f"pooling mode {self.mode!r} is not one of "
                             f"{', '.join(POOLING_MODES)}")


def read_pooling(path: str | Path) -> Pooling | None:
    """The pooling a sentence-transformers folder declares (``modules.json`` and its
    Pooling module's ``config.json``); None when ``path`` has no ``modules.json``.

    Raises:
        ValueError: a Pooling module whose mode capscale does not implement (it would
            otherwise be trained and exported with another pooling than the model's).
    """
    root = Path(path)
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return None
    modules = json.loads(modules_file.read_text())
    kinds = {str(m.get("type", "")).rpartition(".")[2]: m for m in modules}
    mode = "mean"
    if "Pooling" in kinds:
        conf = json.loads((root / kinds["Pooling"].get("path", "") / "config.json").read_text())
        chosen = [m for m, key in _ST_MODE_KEYS.items() if conf.get(key)]
        others = [k for k, v in conf.items() if k.startswith("pooling_mode_") and v
                  and k not in _ST_MODE_KEYS.values()]
        if len(chosen) != 1 or others:
            raise ValueError(f"{root}: sentence-transformers pooling "
                             f"{', '.join(chosen + others) or 'none'} is not one capscale "
                             f"implements ({', '.join(POOLING_MODES)}, exactly one)")
        mode = chosen[0]
    return Pooling(mode, "Normalize" in kinds)


def pool(hidden: Tensor, mask: Tensor, mode: str) -> Tensor:
    """(N, H) embeddings of (N, L, H) token states under (N, L) attention mask ``mask``."""
    if mode == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class EmbeddingHead(nn.Module):
    """The last step of the embedding: L2 normalisation (or nothing). No parameters;
    ``in_features`` tells capscale the representation's width."""

    def __init__(self, width: int, normalize: bool) -> None:
        super().__init__()
        self.in_features = self.out_features = width
        self.normalize = normalize

    def forward(self, pooled: Tensor) -> Tensor:
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


class SentenceEmbedder(nn.Module):
    """An encoder, its pooling and its head (see the module docstring).

    Args:
        encoder: the Hugging Face base model (``AutoModel``).
        pooling: how its token states are pooled.
    """

    main_input_name = "input_ids"

    def __init__(self, encoder: PreTrainedModel, pooling: Pooling) -> None:
        super().__init__()
        self.prefix = getattr(encoder, "base_model_prefix", "") or "encoder"
        self.add_module(self.prefix, encoder)
        pooler = getattr(encoder, "pooler", None)  # BERT's pooler: unused by the pooling
        if isinstance(pooler, nn.Module):  # frozen, so that no rank waits for its grads
            pooler.requires_grad_(False)
        self.config: PretrainedConfig = encoder.config
        self.pooling = pooling
        self.embedding_head = EmbeddingHead(int(encoder.config.hidden_size), pooling.normalize)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, path: str | Path, trust_remote_code: bool = False,
                        pooling: Pooling | None = None, **kwargs: Any) -> SentenceEmbedder:
        """The encoder in ``path`` (AutoModel) with the folder's own pooling (mean and
        normalised when it declares none), unless ``pooling`` is given."""
        encoder = AutoModel.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                            **kwargs)
        return cls(encoder, pooling or read_pooling(path) or Pooling())

    @classmethod
    def from_config(cls, config: PretrainedConfig, trust_remote_code: bool = False
                    ) -> SentenceEmbedder:
        """A freshly initialised model of ``config`` (mean pooling, normalised)."""
        return cls(AutoModel.from_config(config, trust_remote_code=trust_remote_code),
                   Pooling())

    # -- what capscale and transformers ask of a model ---------------------------------
    @property
    def encoder_model(self) -> PreTrainedModel:
        return self.get_submodule(self.prefix)  # type: ignore[return-value]

    @property
    def base_model(self) -> nn.Module:
        return self.encoder_model.base_model

    @property
    def hf_class_name(self) -> str:
        """The class the export is saved as (the encoder's)."""
        return type(self.encoder_model).__name__

    def get_input_embeddings(self) -> nn.Module:
        return self.encoder_model.get_input_embeddings()

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, output_hidden_states: bool = False,
                **kwargs: Any) -> ModelOutput:
        """``logits``: (B, k, H) embeddings of ``input_ids`` (B, k, L) or (B, L)."""
        lead = input_ids.shape[:-1]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        flat = {"input_ids": input_ids.reshape(-1, input_ids.shape[-1]),
                "attention_mask": attention_mask.reshape(-1, attention_mask.shape[-1])}
        if token_type_ids is not None:
            flat["token_type_ids"] = token_type_ids.reshape(-1, token_type_ids.shape[-1])
        out = self.encoder_model(**flat, output_hidden_states=output_hidden_states, **kwargs)
        pooled = pool(out.last_hidden_state, flat["attention_mask"], self.pooling.mode)
        width = pooled.shape[-1]
        shape = (*lead, width) if len(lead) == 2 else (lead[0], 1, width)
        emb = self.embedding_head(pooled.reshape(shape))
        return ModelOutput(logits=emb, hidden_states=out.hidden_states if
                           output_hidden_states else None)

    def save_pretrained(self, path: str | Path, **kwargs: Any) -> None:
        """The encoder (``save_pretrained``) and the sentence-transformers files."""
        self.encoder_model.save_pretrained(path, **kwargs)
        write_sentence_transformers_files(path, self.pooling, int(self.config.hidden_size),
                                          getattr(self.config, "max_position_embeddings", 512))


def write_sentence_transformers_files(path: str | Path, pooling: Pooling, width: int,
                                      max_seq_length: int) -> None:
    """``modules.json`` (Transformer, Pooling[, Normalize]), the Pooling config and
    ``sentence_bert_config.json`` in ``path``, next to the encoder's own files."""
    root = Path(path)
    modules = [{"idx": 0, "name": "0", "path": "",
                "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling",
                "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
        (root / "2_Normalize").mkdir(parents=True, exist_ok=True)
    (root / "modules.json").write_text(json.dumps(modules, indent=2))
    (root / "1_Pooling").mkdir(parents=True, exist_ok=True)
    conf = {"word_embedding_dimension": width,
            **{key: mode == pooling.mode for mode, key in _ST_MODE_KEYS.items()},
            "pooling_mode_mean_sqrt_len_tokens": False}
    (root / "1_Pooling" / "config.json").write_text(json.dumps(conf, indent=2))
    (root / "sentence_bert_config.json").write_text(json.dumps(
        {"max_seq_length": int(max_seq_length), "do_lower_case": False}, indent=2))


def is_sentence_folder(path: str | Path) -> bool:
    """Whether ``path`` is a sentence-transformers folder (has ``modules.json``)."""
    return (Path(path) / "modules.json").is_file()

