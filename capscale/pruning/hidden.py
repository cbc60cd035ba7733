"""Pruning the hidden dimension: one mask over the residual stream's width, shared by
the embeddings and every layer (``structured.hidden_sparsity``).

In a post-LN encoder every value of the residual stream is the output of a LayerNorm:
the embeddings' (``adapter.embedding_norm``) or the one closing each attention / FFN
block (``adapter.hidden_norms``). Multiplying those outputs by a mask ``z`` (one entry
per hidden dimension) removes the pruned dimensions from every layer's input, so
their columns of Q / K / V and ffn_in read zeros. What remains to make the masked
model equal a model whose hidden size is really smaller is the normalisation: a
narrower LayerNorm normalises over the kept dimensions only. A forward pre-hook gives
each of these LayerNorms an input whose statistics over all ``H`` dimensions are those
of the kept ones: the kept entries are left as they are and the ``m`` pruned ones are
set to ``mu_k + sigma_k * v``, with ``mu_k`` / ``sigma_k^2`` the mean and (biased)
variance over the kept entries and ``v`` a fixed vector of mean 0 and variance 1 over
``m`` entries (``m`` is never 1: dimensions are pruned 8 at a time). The full
LayerNorm then computes, at every kept dimension, exactly the narrow LayerNorm's
value (same mean, same variance, same ``eps``), as a differentiable function of the
kept entries alone; a forward hook multiplies its output by ``z``. Neither hook reads
the LayerNorm's parameters, so both work on ZeRO-3 / FSDP2 shards.

Importance is first-order Taylor like heads' and neurons': ``|dL/dz|`` summed over the
importance batches. The export slices the embeddings' columns, the LayerNorms, the
input columns of Q / K / V and ffn_in and the output rows of attn_out and ffn_out, and
widens the last layer's output back to ``H`` (zeros at pruned dimensions; the loader's
``widen`` hook, capscale/export/hf_pruned_model.py), so the pooler, the task head and a
sentence embedding see the width they were built for.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from capscale.models.adapters import EncoderAdapter, get_submodule

STEP = 8  # hidden dimensions are pruned in multiples of this


def hidden_norms(model: nn.Module, adapter: EncoderAdapter) -> list[nn.Module]:
    """The LayerNorms whose outputs make up the residual stream, embeddings' first;
    ValueError where the family does not declare them or they are not ``H`` wide."""
    if adapter.embedding_norm is None or adapter.hidden_norms is None:
        raise ValueError(f"structured.hidden_sparsity: the {adapter.name} adapter does not "
                         "declare its residual-stream LayerNorms (embedding_norm / "
                         "hidden_norms; post-LN encoders only); set it to 0")
    width = model_width(model)
    base = getattr(model, "base_model", model)
    norms = [get_submodule(base, adapter.embedding_norm, what="adapter embedding_norm")]
    for layer in adapter.layer_modules(model):
        norms += [get_submodule(layer, p, what="adapter hidden_norms")
                  for p in adapter.hidden_norms]
    for norm in norms:
        shape = tuple(getattr(norm, "normalized_shape", ()))
        if shape != (width,):
            raise ValueError(f"structured.hidden_sparsity: {type(norm).__name__} normalises "
                             f"{shape}, not the hidden size {width} (embeddings of another "
                             "width, projected to the hidden size?); set it to 0")
    return norms


def pruned_count(fraction: float, width: int) -> int:
    """Hidden dimensions to prune at ``fraction``: a multiple of STEP, at most width - STEP."""
    return max(0, min(STEP * round(fraction * width / STEP), width - STEP))


def filler(m: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """``m`` values of mean 0 and (biased) variance 1 (``m >= 2``)."""
    v = torch.arange(m, dtype=torch.float64)
    v = (v - v.mean()) / v.std(unbiased=False)
    return v.to(device, dtype)


class HiddenMask(nn.Module):
    """The hidden-dimension mask of one encoder, applied by hooks (module docstring).

    Args:
        model: the task model (unwrapped).
        adapter: its encoder adapter (``embedding_norm`` / ``hidden_norms`` declared).
        mark: tags each hook so that capscale.pruning.structured.strip_mask_hooks
            removes it with the others.
    """

    def __init__(self, model: nn.Module, adapter: EncoderAdapter,
                 mark: Callable[[Callable], Callable]) -> None:
        super().__init__()
        norms = hidden_norms(model, adapter)
        dev = next(model.parameters()).device
        self.mask = nn.Parameter(torch.ones(model_width(model), device=dev),
                                 requires_grad=False)
        # (mask version, kept indices, pruned indices, filler of the pruned count)
        self._cache: tuple[int, Tensor, Tensor, Tensor | None] | None = None
        self._handles = []
        def pre(module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
            return self._pre_hook(module, args)

        def post(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return self._post_hook(module, args, output)
        for norm in norms:
            self._handles.append(norm.register_forward_pre_hook(mark(pre)))
            self._handles.append(norm.register_forward_hook(mark(post)))

    def kept(self) -> Tensor:
        """Indices of the kept dimensions (on the mask's device)."""
        return self._split()[0]

    def _split(self) -> tuple[Tensor, Tensor, Tensor | None]:
        """Kept and pruned indices and the pruned inputs' filler, made again only when
        the mask changed in place."""
        version = self.mask._version
        if self._cache is None or self._cache[0] != version:
            on = self.mask.detach() != 0
            keep, pruned = torch.nonzero(on).flatten(), torch.nonzero(~on).flatten()
            fill = (filler(pruned.numel(), self.mask.device, torch.float32)
                    if pruned.numel() else None)
            self._cache = (version, keep, pruned, fill)
        return self._cache[1], self._cache[2], self._cache[3]

    def _pre_hook(self, module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        keep, pruned, v = self._split()
        if v is None:
            return args
        x = args[0]
        kept = x.index_select(-1, keep.to(x.device)).float()
        mu = kept.mean(-1, keepdim=True)
        sigma = (kept.var(-1, unbiased=False, keepdim=True)).sqrt()
        fill = mu + sigma * v.to(x.device)
        new = x.index_copy(-1, pruned.to(x.device), fill.to(x.dtype))
        return (new, *args[1:])

    def _post_hook(self, module: nn.Module, args: tuple[Tensor, ...], output: Tensor
                   ) -> Tensor:
        return output * self.mask.to(output.dtype)

    def set(self, keep: Tensor) -> None:
        with torch.no_grad():
            self.mask.copy_(keep.to(self.mask))

    def keep(self) -> Tensor:
        """The mask as a bool tensor (CPU)."""
        return self.mask.detach().cpu() > 0.5

    def pruned(self) -> int:
        """How many dimensions are pruned (from the cached split: no copy)."""
        return int(self._split()[1].numel())

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def select_hidden(importance: Tensor, fraction: float, current: Tensor | None) -> Tensor:
    """Keep mask of the hidden dimensions at ``fraction`` pruned (:func:`pruned_count`):
    the most important kept; pruned ones stay pruned."""
    width = importance.numel()
    scores = importance.double().clone()
    if current is not None:
        scores[~current] = float("-inf")
    keep_n = width - max(pruned_count(fraction, width),
                         0 if current is None else int((~current).sum()))
    order = torch.sort(-scores, stable=True).indices
    keep = torch.zeros(width, dtype=torch.bool)
    keep[order[:keep_n]] = True
    return keep


def model_width(model: nn.Module) -> int:
    """The hidden size of a task model (its config's ``hidden_size``)."""
    return int(cast(Any, model).config.hidden_size)


def hidden_pruned_parameters(layer: nn.Module, adapter: EncoderAdapter, heads: int,
                             neurons: int, head_size: int, pruned: int,
                             removed: tuple[bool, bool]) -> int:
    """Weights of one (masked, unsliced) layer that ``pruned`` hidden dimensions remove
    beyond its pruned heads and neurons: the input columns of the kept heads' Q / K / V
    rows and of the kept neurons' ffn_in rows, the output rows of attn_out and ffn_out
    (weights over the kept heads / neurons, and biases) and the LayerNorms' entries.
    ``removed``: whether the attention / FFN block is removed (counted already)."""
    if pruned == 0:
        return 0
    lins = adapter.layer_linears(layer)
    total = 0
    if not removed[0]:
        total += 3 * heads * head_size * pruned  # Q, K and V rows (separate or fused)
        out = lins["attn_out"]
        total += pruned * (heads * head_size + (out.bias is not None))
    if not removed[1]:
        total += (2 if adapter.ffn_gated else 1) * neurons * pruned
        total += pruned * (neurons + (lins["ffn_out"].bias is not None))
    for i, path in enumerate(adapter.hidden_norms or ()):
        if removed[min(i, 1)]:
            continue
        norm = get_submodule(layer, path)
        total += pruned * sum(p is not None for p in (getattr(norm, "weight", None),
                                                       getattr(norm, "bias", None)))
    return total


class HiddenMovement:
    """The hidden dimensions' movement scores of the ``hybrid`` method.

    Hybrid learns its head and neuron scores by straight-through top-k; the hidden mask
    ``z`` gets the same kind of score without becoming a model parameter (it lives
    outside the model, so ZeRO-3 / FSDP2 never partition it): with ``z`` requiring a
    gradient, every training step leaves ``g = dL/dz`` (all micro-batches, averaged over
    ranks), and the score of dimension ``j`` is ``S_j = -sum_t g_j(t) / ||g(t)||``, the
    score a straight-through top-k would learn by SGD (``dL/dS = dL/dz``), each step's
    gradient divided by its L2 norm so that neither a loss scale (fp16) nor a loss that
    shrinks along the run weighs one step more than another. A dimension whose removal
    the loss keeps asking for (``dL/dz > 0``) sinks. The lowest-scoring kept dimensions
    are pruned as the head / neuron schedule moves (:func:`select_hidden`); pruned ones
    stay pruned and their scores stop moving: their ``dL/dz`` is taken at the filler
    inputs, which a narrower model does not have, so it says nothing.
    """

    def __init__(self, mask: HiddenMask) -> None:
        self.mask = mask
        self.score = torch.zeros(mask.mask.numel(), dtype=torch.float64)
        mask.mask.requires_grad_(True)

    def accumulate(self, all_reduce: Callable[[Tensor], Tensor] | None = None,
                   world_size: int = 1) -> None:
        """Add the last step's ``dL/dz`` to the scores and clear it (collective under
        several ranks: every rank calls it at the same step)."""
        z = self.mask.mask
        # A pruned dimension's score stays where it was pruned (the same mask on every
        # rank, so it is applied before the sum).
        g = (torch.zeros_like(self.score) if z.grad is None
             else (z.grad.detach() * (z.detach() != 0)).to("cpu", torch.float64))
        z.grad = None
        if all_reduce is not None:
            g = all_reduce(g) / world_size
        norm = g.norm()
        if bool(torch.isfinite(norm)) and float(norm) > 0:  # a skipped step adds nothing
            self.score -= g / norm

    def prune_to(self, fraction: float) -> bool:
        """Prune the lowest-scoring kept dimensions up to ``fraction``; whether any went."""
        if pruned_count(fraction, self.score.numel()) <= self.mask.pruned():
            return False  # called every step: most steps prune nothing
        current = self.mask.keep()
        keep = select_hidden(self.score, fraction, current)
        if bool((keep == current).all()):
            return False
        self.mask.set(keep)
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score.tolist(), "keep": self.mask.keep().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.score = torch.tensor(state["score"], dtype=torch.float64)
            self.mask.set(torch.tensor(state["keep"]))
