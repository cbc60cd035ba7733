"""A trial structured export on a tiny random copy of a model, before any weight loads.

The deep checks (capscale.models.deep_check) read the layout; only running the model
tells whether its stock forward accepts a layer with fewer heads. :func:`trial_export`
builds the task model from the config with random weights (at most two layers and a
small vocabulary where the config allows it, so it takes a second even for a large
model), masks a different set of heads and FFN neurons in each layer, writes the
physically smaller export to a temporary folder, reloads it with transformers alone (as
its model card says) and compares its logits with the masked model's. Passing means a
structured export of this family runs and reproduces the masked model.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoModelForSequenceClassification, PretrainedConfig

from capscale.export.huggingface import export_structured, saved_class_name
from capscale.export.verify import reload_export
from capscale.models.adapters import EncoderAdapter
from capscale.models.loading import output_logits
from capscale.models.specs import for_task
from capscale.pruning.structured import StructuredMasks

if TYPE_CHECKING:
    from capscale.tasks import Task

TRIAL_DEPTH = 2
TRIAL_VOCAB = 4096


@dataclass
class Trial:
    """The outcome: ``ok`` True (the export runs and matches), False (``message`` says
    how it fails: structured pruning is refused) or None (the trial could not be set
    up; ``message`` says why, and nothing is concluded)."""

    ok: bool | None
    message: str = ""


def trial_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of ``config`` with at most :data:`TRIAL_DEPTH` layers (lists of one entry
    per layer cut to match) and a vocabulary of :data:`TRIAL_VOCAB` ids that still holds
    every special token id; widths and the head layout are unchanged."""
    small = copy.deepcopy(config)
    depth = getattr(small, "num_hidden_layers", None)
    if isinstance(depth, int) and depth > TRIAL_DEPTH:
        try:
            for key, value in list(vars(small).items()):
                if isinstance(value, list | tuple) and len(value) == depth:
                    setattr(small, key, type(value)(value[:TRIAL_DEPTH]))
            small.num_hidden_layers = TRIAL_DEPTH
        except Exception:  # a config that derives its depth (Funnel's block_sizes)
            small = copy.deepcopy(config)
    vocab = getattr(small, "vocab_size", None)
    special = [v for k, v in vars(small).items() if k.endswith("token_id") and isinstance(v, int)]
    if isinstance(vocab, int) and vocab > TRIAL_VOCAB and max(special, default=0) < TRIAL_VOCAB:
        small.vocab_size = TRIAL_VOCAB
    return small


def _keep(n: int, layer: int) -> torch.Tensor:
    """Every other unit, shifted by the layer (at least one kept)."""
    keep = (torch.arange(n) + layer) % 2 == 0
    keep[layer % n] = True
    return keep


def trial_inputs(vocab: int, length: int | None, batch: int = 3) -> dict[str, torch.Tensor]:
    """Random token ids (away from the low special ids) and a mask with one padded row."""
    t = length or 12
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), min(vocab, 100), (batch, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, t - t // 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _build(config: PretrainedConfig, trust_remote_code: bool, task: Task | None) -> Any:
    auto = (task.model_class if task is not None else None) or AutoModelForSequenceClassification
    torch.manual_seed(0)
    try:
        return auto.from_config(trial_config(config), trust_remote_code=trust_remote_code)
    except Exception:  # a shrunken config some modeling code refuses: the real one
        return auto.from_config(config, trust_remote_code=trust_remote_code)


def trial_export(config: PretrainedConfig, adapter: EncoderAdapter,
                 trust_remote_code: bool = False, task: Task | None = None,
                 length: int | None = None, atol: float = 1e-4) -> Trial:
    """Run a structured export of a tiny random copy of the model of ``config`` (see the
    module docstring). ``length``: the input length the model needs, when fixed."""
    try:
        model = _build(config, trust_remote_code, task).eval()
        adapter = for_task(adapter, task, model)
        masks = StructuredMasks(model, adapter)
        heads = [_keep(masks.num_heads, i) for i in range(masks.num_layers)]
        ffn = [_keep(n, i) for i, n in enumerate(masks.intermediate)]
        masks.set(heads, ffn)
        inputs = trial_inputs(int(getattr(model.config, "vocab_size", 100) or 100), length)
        with torch.no_grad():
            expected = output_logits(model(**inputs)).float()
    except Exception as err:  # foreign modeling code: nothing concluded
        return Trial(None, f"a tiny random copy could not be built or run "
                           f"({type(err).__name__}: {_first(err)})")
    with tempfile.TemporaryDirectory(prefix="capscale-trial-") as tmp:
        try:
            export_structured(model, adapter, heads, ffn, tmp, inplace=True)
            loaded = reload_export(Path(tmp) / "model", saved_class_name(model), True)
            with torch.no_grad():
                got = output_logits(loaded(**inputs)).float()
        except Exception as err:  # the export itself fails: that is the finding
            return Trial(False, "a structured export of a tiny random copy fails: "
                                f"{type(err).__name__}: {_first(err)}")
    diff = float((got - expected).abs().max()) if got.shape == expected.shape else None
    if diff is None or not diff <= atol:
        shown = "outputs of another shape" if diff is None else f"max |Δlogit| {diff:.3g}"
        return Trial(False, "a structured export of a tiny random copy does not reproduce "
                            f"the masked model ({shown})")
    return Trial(True)


def padded_forward_error(config: PretrainedConfig, length: int,
                         trust_remote_code: bool = False, task: Task | None = None) -> str:
    """Run a tiny random copy of the model on a batch of ``length`` tokens with one padded
    row (capscale's batches hold padding); the error it raises, or "" when it runs."""
    try:
        model = _build(config, trust_remote_code, task).eval()
        vocab = int(getattr(model.config, "vocab_size", 100) or 100)
        with torch.no_grad():
            model(**trial_inputs(vocab, length))
    except Exception as err:  # the finding itself
        return f"{type(err).__name__}: {_first(err)}"
    return ""


def _first(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else "no message"
