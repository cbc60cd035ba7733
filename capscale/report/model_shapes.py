"""What the memory planner needs to know about a run before anything loads: the
encoder's shape and the training-set size.

The shape comes from the model's own config when it is on this machine (a local folder,
the packaged ``minilm``, or the Hugging Face cache), read with no network access, and
otherwise from :data:`KNOWN_MODELS`, the published config numbers of a few well-known
hub encoders. Either way the task model is built on the meta device
(capscale.models.specs.skeleton) and its parameters are counted, so the counts are the
model's own, heads and embeddings included.

The training-set size N (the rows of every representation bank) comes from
``--train-examples`` when given, from the data when it is local (``data.train_file``
or a packaged preset), and otherwise from :data:`KNOWN_TRAIN_SIZES` (the published sizes
of the GLUE training sets and SQuAD v1.1); ``data.max_train_samples`` caps it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn
from transformers import AutoConfig, PretrainedConfig

from capscale.errors import ConfigError, ModelError
from capscale.models.loading import PACKAGED_MODELS, adapter_for, freeze_embeddings, read_config
from capscale.models.specs import skeleton
from capscale.tasks import get_task

if TYPE_CHECKING:
    from capscale.config import Config

# Published config.json numbers of well-known encoders: model_type and the fields of
# its config class. Used only when the config is not on this machine.
_BERT = {"hidden_act": "gelu", "type_vocab_size": 2, "max_position_embeddings": 512}
_ROBERTA = {"hidden_act": "gelu", "type_vocab_size": 1, "max_position_embeddings": 514,
            "vocab_size": 50265, "pad_token_id": 1}
KNOWN_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "bert-base-uncased": ("bert", {**_BERT, "hidden_size": 768, "num_hidden_layers": 12,
                                   "num_attention_heads": 12, "intermediate_size": 3072,
                                   "vocab_size": 30522}),
    "bert-base-cased": ("bert", {**_BERT, "hidden_size": 768, "num_hidden_layers": 12,
                                 "num_attention_heads": 12, "intermediate_size": 3072,
                                 "vocab_size": 28996}),
    "bert-large-uncased": ("bert", {**_BERT, "hidden_size": 1024, "num_hidden_layers": 24,
                                    "num_attention_heads": 16, "intermediate_size": 4096,
                                    "vocab_size": 30522}),
    "bert-large-cased": ("bert", {**_BERT, "hidden_size": 1024, "num_hidden_layers": 24,
                                  "num_attention_heads": 16, "intermediate_size": 4096,
                                  "vocab_size": 28996}),
    "roberta-base": ("roberta", {**_ROBERTA, "hidden_size": 768, "num_hidden_layers": 12,
                                 "num_attention_heads": 12, "intermediate_size": 3072}),
    "roberta-large": ("roberta", {**_ROBERTA, "hidden_size": 1024, "num_hidden_layers": 24,
                                  "num_attention_heads": 16, "intermediate_size": 4096}),
    "distilroberta-base": ("roberta", {**_ROBERTA, "hidden_size": 768,
                                       "num_hidden_layers": 6, "num_attention_heads": 12,
                                       "intermediate_size": 3072}),
}
# The same models under their organisation's name on the hub.
for _name in [n for n in KNOWN_MODELS if n.startswith("bert")]:
    KNOWN_MODELS[f"google-bert/{_name}"] = KNOWN_MODELS[_name]
for _name in [n for n in KNOWN_MODELS if "roberta" in n]:
    KNOWN_MODELS[f"FacebookAI/{_name}"] = KNOWN_MODELS[_name]

# (dataset_name, dataset_config) -> (training examples, labels; 1: regression).
KNOWN_TRAIN_SIZES: dict[tuple[str, str | None], tuple[int, int]] = {
    ("glue", "mnli"): (392_702, 3), ("glue", "qqp"): (363_846, 2),
    ("glue", "qnli"): (104_743, 2), ("glue", "sst2"): (67_349, 2),
    ("glue", "cola"): (8_551, 2), ("glue", "stsb"): (5_749, 1),
    ("glue", "mrpc"): (3_668, 2), ("glue", "rte"): (2_490, 2),
    # Questions; the windows the bank holds are about 1% more at 384 tokens.
    ("squad", None): (87_599, 2), ("rajpurkar/squad", None): (87_599, 2),
}


@dataclass(frozen=True)
class ModelShape:
    """The counts the planner multiplies, all read off the task model.

    Attributes:
        name, source: the model and where its config came from (said in the output).
        parameters: every parameter of the task model (embeddings, layers, head).
        layer_parameters: parameters of one distinct encoder layer.
        prunable: weights of the prunable linear maps over all layers (what per-weight
            scores and masks cover); largest_matrix: the biggest one of them.
        embedding_parameters: what ``train.freeze_embeddings`` freezes.
        largest_table: the biggest embedding table (FSDP2 gathers it as one unit).
        unit_scores: heads plus FFN neurons over all layers (unit-scored methods).
        hidden: the layer width H; representation: the width of CAP's representation
            (the bank's H); heads, intermediate (FFN width), ffn_in_width (the first
            FFN map's outputs: twice ``intermediate`` for a gated FFN).
        layers: distinct layers; applications: times each is applied (ALBERT > 1).
    """

    name: str
    source: str
    model_type: str
    parameters: int
    layer_parameters: int
    prunable: int
    largest_matrix: int
    embedding_parameters: int
    largest_table: int
    unit_scores: int
    hidden: int
    representation: int
    heads: int
    intermediate: int
    ffn_in_width: int
    layers: int
    applications: int = 1

    @property
    def positions(self) -> int:
        """Layer applications in one forward (activations are kept per application)."""
        return self.layers * self.applications


def _local_config(name: str, trust_remote_code: bool) -> tuple[PretrainedConfig, str] | None:
    """The model's config and where it was found, when it is on this machine."""
    if name in PACKAGED_MODELS or Path(name).is_dir():
        where = "packaged model" if name in PACKAGED_MODELS else "local config"
        return read_config(name, trust_remote_code), f"{where} ({name})"
    try:  # the Hugging Face cache, never the network
        found = AutoConfig.from_pretrained(name, local_files_only=True,
                                           trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None
    return found, "Hugging Face cache"


def model_config(name: str, trust_remote_code: bool = False) -> tuple[PretrainedConfig, str]:
    """The config of ``name`` and a phrase saying where it came from; ModelError when it
    is neither on this machine nor in :data:`KNOWN_MODELS`."""
    found = _local_config(name, trust_remote_code)
    if found is not None:
        return found
    if name in KNOWN_MODELS:
        model_type, fields = KNOWN_MODELS[name]
        return (AutoConfig.for_model(model_type, **fields),
                "built-in table of published config numbers; not on this machine")
    known = ", ".join(n for n in KNOWN_MODELS if "/" not in n)
    raise ModelError(f"model {name!r}: its config is not on this machine (no local folder, "
                     f"not in the Hugging Face cache) and not in the planner's table "
                     f"({known}); download it or give a local path")


def model_shape(cfg: Config, num_labels: int = 2) -> ModelShape:
    """The student's shape for ``cfg`` (``model.name_or_path``, its adapter and the
    task's head with ``num_labels`` outputs), counted on the meta device."""
    name = cfg.model.name_or_path
    config, source = model_config(name, cfg.model.trust_remote_code)
    task = get_task(cfg.data.task_type)
    config.num_labels = num_labels
    model = skeleton(config, cfg.model.trust_remote_code, task)
    adapter = adapter_for(model, cfg.model.adapter, task)
    layers = adapter.layer_modules(model)
    first = adapter.layer_linears(layers[0])
    matrices = [lin.in_features * lin.out_features
                for lin in adapter.prunable_linears(model).values()]
    base = getattr(model, "base_model", model)
    tables = [m.weight.numel() for m in base.modules() if isinstance(m, nn.Embedding)]
    heads = adapter.num_heads(config)
    intermediate = first["ffn_out"].in_features
    return ModelShape(
        name=name, source=source, model_type=config.model_type,
        parameters=sum(p.numel() for p in model.parameters()),
        layer_parameters=sum(p.numel() for p in layers[0].parameters()),
        prunable=sum(matrices), largest_matrix=max(matrices),
        embedding_parameters=freeze_embeddings(model), largest_table=max(tables, default=0),
        unit_scores=len(layers) * (heads + intermediate),
        hidden=int(getattr(config, "hidden_size", first["attn_out"].out_features)),
        representation=adapter.head(model).in_features, heads=heads,
        intermediate=intermediate, ffn_in_width=first["ffn_in"].out_features
        if "ffn_in" in first else intermediate,
        layers=len(layers), applications=adapter.applications(model))


def training_set_size(cfg: Config, given: int | None = None) -> tuple[int, int, str]:
    """(N, labels, where N came from) for the banks: ``given``, the local data, or the
    table of known training sets; ``data.max_train_samples`` caps N. ConfigError when
    none applies."""
    d = cfg.data
    cap = d.max_train_samples or None
    if given is not None:
        n, labels, source = given, _known_labels(cfg), "--train-examples"
    elif d.train_file is not None or d.preset is not None:
        from capscale.data import load_task_data

        data = load_task_data(d)  # already subsampled to max_train_samples
        return len(data.train), data.num_labels, "the local training data"
    elif d.dataset_name is not None and (d.dataset_name, d.dataset_config) in KNOWN_TRAIN_SIZES:
        n, labels = KNOWN_TRAIN_SIZES[(d.dataset_name, d.dataset_config)]
        source = f"published size of {d.dataset_name}/{d.dataset_config or 'train'}"
    else:
        raise ConfigError(f"data {d.dataset_name!r} / {d.dataset_config!r}: the training-set "
                          "size (the banks' rows) is not known offline; give "
                          "--train-examples N")
    if cap is not None and cap < n:
        return cap, labels, f"{source}, capped by data.max_train_samples"
    return n, labels, source


def _known_labels(cfg: Config) -> int:
    d = cfg.data
    if d.label_names:
        return len(d.label_names)
    found = KNOWN_TRAIN_SIZES.get((d.dataset_name or "", d.dataset_config))
    return found[1] if found is not None else 2
