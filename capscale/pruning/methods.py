"""The pruning method table: every ``pruning.method`` by name.

An entry is a :class:`~capscale.pruning.controller.PruningMethod`; the built-in ones:

* ``movement`` / ``soft_movement`` / ``magnitude``: unstructured weight masks through a
  :mod:`~capscale.pruning.weight_rules` rule and the cubic schedule
  (:mod:`capscale.pruning.unstructured`);
* ``structured``: heads and FFN neurons, CAP-f (:mod:`capscale.pruning.structured_run`);
* ``hybrid``: movement scores on whole heads and FFN neurons, exported physically
  smaller (:mod:`capscale.pruning.hybrid`);
* ``none``: no pruning (distillation and contrastive terms only).

A new unstructured method is one rule and one entry::

    register_pruning_method(WeightPruning(MyRule()))

and any other method is one module with a :class:`PruningMethod` subclass (its flags,
``attach`` and ``controller``) plus its registration.
"""

from __future__ import annotations

from capscale.pruning.controller import PruningMethod
from capscale.pruning.hybrid import HybridPruning
from capscale.pruning.structured_run import StructuredPruning
from capscale.pruning.unstructured import NoPruning, WeightPruning
from capscale.pruning.weight_rules import WEIGHT_RULES, register_weight_rule
from capscale.registry import add_entry

PRUNING_METHODS: dict[str, PruningMethod] = {}


def register_pruning_method(method: PruningMethod, overwrite: bool = False) -> PruningMethod:
    """Add ``method`` to the table (``pruning.method`` selects it by name). A
    :class:`WeightPruning` entry also makes its rule known to the masked layers."""
    if method.name in PRUNING_METHODS and not overwrite:  # refused before the rule joins
        add_entry(PRUNING_METHODS, method.name, method, "pruning method")
    if isinstance(method, WeightPruning) and WEIGHT_RULES.get(method.rule.name) is not method.rule:
        register_weight_rule(method.rule, overwrite=overwrite)
    return add_entry(PRUNING_METHODS, method.name, method, "pruning method", overwrite)


for _name in ("movement", "soft_movement", "magnitude"):
    register_pruning_method(WeightPruning(WEIGHT_RULES[_name]))
register_pruning_method(StructuredPruning())
register_pruning_method(HybridPruning())
register_pruning_method(NoPruning())

__all__ = ["PRUNING_METHODS", "HybridPruning", "NoPruning", "PruningMethod",
           "StructuredPruning", "WeightPruning", "register_pruning_method"]
