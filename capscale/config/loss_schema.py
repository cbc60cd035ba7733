"""The ``loss`` section: the weights of the objective's non-contrastive terms.

CE on the labels, logit distillation (KD) from the fine-tuned teacher, and layer-wise
distillation of hidden states (capscale.train.terms, docs/algorithm.md "Layer-wise
distillation"). The contrastive terms' weights live in ``cap.modules``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from capscale.config.qa_schema import Check

LAYER_MAPS = ("fixed", "dynamic")


@dataclass
class LossConfig:
    """Cross-entropy, logit distillation and layer distillation weights."""

    w_ce: float = 0.1
    w_kd: float = 0.9
    kd_temperature: float = 2.0
    # Layer-wise distillation: sum over the matched teacher layers of the mean squared
    # distance between the teacher's layer output and its student layer's (0: off).
    w_layer: float = 0.0
    # fixed: teacher layer i is matched with student layer round(i * Ls / Lt); dynamic:
    # each step picks, from the last teacher layer down, the closest student layer below
    # the one the next teacher layer took (CoFi, Xia et al. 2022).
    layer_map: str = "fixed"
    # 1-based teacher layers matched; empty: every layer.
    layer_teacher_layers: list[int] = field(default_factory=list)

    def check(self) -> list[Check]:
        return [
            (self.kd_temperature > 0, "loss.kd_temperature", "must be > 0"),
            (min(self.w_ce, self.w_kd, self.w_layer) >= 0, "loss.w_ce",
             "loss weights must be >= 0"),
            (self.layer_map in LAYER_MAPS, "loss.layer_map",
             f"must be one of {', '.join(LAYER_MAPS)}"),
            (all(i >= 1 for i in self.layer_teacher_layers), "loss.layer_teacher_layers",
             "teacher layers are counted from 1"),
            (len(set(self.layer_teacher_layers)) == len(self.layer_teacher_layers),
             "loss.layer_teacher_layers", "a teacher layer is listed twice"),
        ]
