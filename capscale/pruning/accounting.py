"""Sparsity accounting by the paper's convention and over all parameters.

Paper convention (docs/algorithm.md section 6): sparsity over encoder weights only; biases and
LayerNorm inside the encoder layers count as kept; embeddings, pooler and classifier are
excluded. ``linear_sparsity`` is the same count over the prunable matrices alone.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from capscale.models.adapters import LOGICAL_ROLES, EncoderAdapter
from capscale.models.deep_check import unpruned_linears


def sparsity_report(model: nn.Module, adapter: EncoderAdapter,
                    masks: dict[str, Tensor]) -> dict[str, Any]:
    """Summarise ``masks`` (keyed ``"<layer>.<role>"``) against ``model``'s parameters.

    A fused linear map is reported per logical matrix (``0.qkv`` as ``0.query``,
    ``0.key``, ``0.value``; a GLU input as ``0.ffn_in`` and ``0.ffn_gate``). Layers that
    the model applies several times (ALBERT) are counted once, as they are stored;
    ``shared_layers`` says how often each is applied.

    Args:
        model: the task model (masked or baked; only parameter counts are read, through
            module attributes, so partitioned parameters are counted right).
        adapter: the model's encoder adapter.
        masks: binary masks by ``layer.role`` (True = kept).

    Returns:
        a JSON-ready dict: ``linear_sparsity``, ``encoder_sparsity`` (paper),
        ``total_sparsity``, ``per_layer`` and ``per_role`` sparsities, ``per_matrix``;
        ``reachable_encoder_sparsity`` (every prunable weight pruned) and
        ``unpruned_linears``: the linear maps of the layers the adapter leaves unpruned
        (path in a layer -> ``"in -> out"``).
    """
    per_matrix = {}
    pruned_total = 0
    linear_total = 0
    layers: dict[int, list[int]] = {}
    roles: dict[str, list[int]] = {r: [0, 0] for r in LOGICAL_ROLES}
    for key, m in logical_masks(model, adapter, masks).items():
        numel = m.numel()
        pruned = int(numel - int(m.sum()))
        per_matrix[key] = {"numel": numel, "pruned": pruned, "sparsity": pruned / numel}
        layer, role = key.split(".", 1)
        layers.setdefault(int(layer), [0, 0])
        layers[int(layer)][0] += pruned
        layers[int(layer)][1] += numel
        roles.setdefault(role, [0, 0])
        roles[role][0] += pruned
        roles[role][1] += numel
        pruned_total += pruned
        linear_total += numel
    encoder_total = sum(_numel(p) for p in adapter.layer_modules(model).parameters())
    # Scores and other capscale-only parameters are not model parameters.
    encoder_total -= sum(_numel(p) for n, p in adapter.layer_modules(model).named_parameters()
                         if n.endswith("mask_scores"))
    all_total = sum(_numel(p) for n, p in model.named_parameters()
                    if not n.endswith("mask_scores"))
    return {
        "linear_sparsity": pruned_total / max(linear_total, 1),
        "encoder_sparsity": pruned_total / max(encoder_total, 1),
        "total_sparsity": pruned_total / max(all_total, 1),
        "pruned_weights": pruned_total,
        "prunable_weights": linear_total,
        "encoder_parameters": encoder_total,
        "all_parameters": all_total,
        "per_layer": {str(k): v[0] / max(v[1], 1) for k, v in sorted(layers.items())},
        "per_role": {k: v[0] / max(v[1], 1) for k, v in roles.items() if v[1]},
        "per_matrix": per_matrix,
        "shared_layers": {"distinct_layers": len(adapter.layer_modules(model)),
                          "applications": adapter.applications(model)},
        "reachable_encoder_sparsity": linear_total / max(encoder_total, 1),
        "unpruned_linears": unpruned_linears(adapter, model),
    }


def logical_masks(model: nn.Module, adapter: EncoderAdapter, masks: dict[str, Tensor]
                  ) -> dict[str, Tensor]:
    """``masks`` by physical ``layer.role`` split into logical matrices (row groups)."""
    num_heads = adapter.num_heads(model.config) if adapter.qkv else 0
    out = {}
    for key, m in masks.items():
        layer, role = key.split(".", 1)
        groups = adapter.row_groups(role, m.shape[0], num_heads)
        if groups is None:
            out[key] = m
            continue
        for name, rows in groups.items():
            out[f"{layer}.{name}"] = m.index_select(0, rows.to(m.device))
    return out


def _numel(p: nn.Parameter) -> int:
    # ZeRO-3 partitioned parameters report numel 0; their full size is ds_numel.
    return int(getattr(p, "ds_numel", p.numel()))
