"""The assembled CAP objective (``BankObjective.forward``) against a plain loop reference.

The reference below shares nothing with ``capscale.losses``: it looks every view and
label up by example id in Python dicts filled alongside the banks, builds each anchor's
candidate list with loops, and writes the multi-positive InfoNCE out term by term
(docs/algorithm.md section 3). ``num_negatives`` is large enough that the extras are the whole
training set, so the reference needs no copy of the random draw.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from capscale.config import CAPConfig, ModuleWeights
from capscale.contrastive.objectives import BankObjective
from capscale.distributed import DistContext

N, H, TAU = 10, 6, 0.25
BATCH_IDS = [7, 2, 9, 4]  # not sorted, not contiguous: views must be found by id
# 3 classes, unbalanced, so a wrong label on any extra changes the supervised positives
LABELS = [0, 1, 2, 0, 2, 1, 1, 0, 2, 1]
WEIGHTS = {"prc": (0.3, 2.0), "fic": (0.7, 0.5), "snc": (1.3, 4.0)}  # (w_unsup, w_sup)
MAX_SNAPSHOTS = 2
SNAPSHOTS = 3  # SnC is filled 3 times with room for 2: the oldest is evicted, R = 2


def make_objective(cfg: CAPConfig, train_labels: torch.Tensor) -> BankObjective:
    """The one place the objective is built (its constructor may change)."""
    return BankObjective(cfg, len(train_labels), H, train_labels, seed=0)


def _config(normalization: str) -> CAPConfig:
    return CAPConfig(modules={m: ModuleWeights(True, *w) for m, w in WEIGHTS.items()},
                     temperature=TAU, num_negatives=3 * N, normalization=normalization,
                     max_snapshots=MAX_SNAPSHOTS)


def _filled(normalization: str, labels: list[int]
            ) -> tuple[BankObjective, dict[str, dict[int, list[torch.Tensor]]]]:
    """The objective with banks filled, and the same views as {module: {id: [views]}}."""
    obj = make_objective(_config(normalization), torch.tensor(labels))
    g = torch.Generator().manual_seed(1)
    views: dict[str, dict[int, list[torch.Tensor]]] = {m: {i: [] for i in range(N)}
                                                       for m in WEIGHTS}
    for name in ("prc", "fic", *["snc"] * SNAPSHOTS):
        table = F.normalize(torch.randn(N, H, generator=g), dim=-1)
        order = torch.randperm(N, generator=g)  # the loader's order is not id order
        obj.fill(name, ((c, table[c]) for c in order.split(3)))
        for i in range(N):
            views[name][i] = (views[name][i] + [table[i]])[-MAX_SNAPSHOTS:]
    return obj, views


def _reference_term(anchors, views_by_id, labels, supervised, normalization):
    """One module's unweighted unsupervised or supervised term, with loops."""
    batch = [(i, labels[i]) for i in BATCH_IDS]  # (example id, label), looked up by id
    cands = []  # (vector, example id, label, index of the anchor whose self copy it is)
    for j, (eid, lab) in enumerate(batch):
        cands.append((anchors[j].detach(), eid, lab, j))
        cands += [(v, eid, lab, None) for v in views_by_id[eid]]
    for eid in range(N):  # the extras: every training example, each with its R views
        cands += [(v, eid, labels[eid], None) for v in views_by_id[eid]]
    total, n_pos_total, n_with_pos = 0.0, 0, 0
    for i, (eid, lab) in enumerate(batch):
        others = [(vec, cid, clab) for vec, cid, clab, owner in cands if owner != i]
        scores = [sum(anchors[i, k] * vec[k].double() for k in range(H)) / TAU
                  for vec, _, _ in others]
        log_norm = torch.logsumexp(torch.stack(scores), 0)
        key = lab if supervised else eid
        pos = [s for s, (_, cid, clab) in zip(scores, others)
               if (clab if supervised else cid) == key]
        if pos:
            total = total + sum(s - log_norm for s in pos) / len(pos)
            n_with_pos += 1
        n_pos_total += len(pos)
    denom = n_pos_total if normalization == "faithful" else n_with_pos
    return -total / denom


@pytest.mark.parametrize("normalization", ["faithful", "clean"])
@pytest.mark.parametrize("supervised", [True, False])
def test_objective_matches_loop_reference(normalization, supervised):
    labels = LABELS if supervised else [-1] * N  # -1 everywhere: regression, no sup term
    obj, views = _filled(normalization, labels)
    assert {m: obj.banks[m].num_views for m in WEIGHTS} == {"prc": 1, "fic": 1, "snc": 2}
    anchors = F.normalize(torch.randn(len(BATCH_IDS), H,
                                      generator=torch.Generator().manual_seed(2)), dim=-1)
    anchors.requires_grad_()
    ids = torch.tensor(BATCH_IDS)
    got = obj(anchors, ids, torch.tensor([labels[i] for i in BATCH_IDS]), step=3,
              ctx=DistContext())

    ref_anchors = anchors.double()
    want = {}
    for m, (w_unsup, w_sup) in WEIGHTS.items():
        want[f"{m}_unsup"] = w_unsup * _reference_term(ref_anchors, views[m], labels, False,
                                                       normalization)
        if supervised:
            want[f"{m}_sup"] = w_sup * _reference_term(ref_anchors, views[m], labels, True,
                                                       normalization)
    assert set(got) == set(want)
    for k in want:
        assert float(got[k].detach()) == pytest.approx(float(want[k].detach()), rel=1e-5), k
    g_got, = torch.autograd.grad(torch.stack(list(got.values())).sum(), anchors)
    g_want, = torch.autograd.grad(sum(want.values()), anchors)
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-6)
