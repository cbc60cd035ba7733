"""Contrastive, KD and task losses against independent, loop-based references."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from capscale.contrastive.nce import build_candidates, contrastive_loss
from capscale.tasks import get_task


def reference_cap_loss(anchors, ids, labels, views, extra_views, extra_ids, extra_labels,
                       tau, supervised, normalization):
    """docs/algorithm.md section 3, written out with Python loops over plain floats.

    Candidates: for each batch item j, stopgrad(a_j) then its R views; then each extra
    example's R views. Anchor i's own stop-grad copy is masked (-1e6); log-softmax over
    all candidates; positives share the id (unsup) or the label (sup), self copy excluded.
    faithful: -sum_i sum_{p in P(i)} logp / |P(i)|, divided again by sum_i |P(i)|.
    clean: the same sum divided by the number of anchors that have a positive.
    """
    cands = []  # (vector, id, label, owner index of a self copy or None)
    for j in range(anchors.shape[0]):
        cands.append((anchors[j].detach(), int(ids[j]), int(labels[j]), j))
        for r in range(views.shape[1]):
            cands.append((views[j, r], int(ids[j]), int(labels[j]), None))
    for e in range(extra_views.shape[0]):
        for r in range(extra_views.shape[1]):
            cands.append((extra_views[e, r], int(extra_ids[e]), int(extra_labels[e]), None))
    total = anchors.new_zeros(())
    n_pos_total, n_with_pos = 0, 0
    for i in range(anchors.shape[0]):
        scores = []
        for vec, _, _, owner in cands:
            scores.append(torch.tensor(-1e6) if owner == i else anchors[i] @ vec / tau)
        scores = torch.stack(scores)
        log_norm = torch.logsumexp(scores, 0)
        key = int(labels[i]) if supervised else int(ids[i])
        pos = [c for c, (_, cid, clab, owner) in enumerate(cands)
               if owner != i and (clab if supervised else cid) == key]
        if pos:
            total = total + sum(scores[c] - log_norm for c in pos) / len(pos)
            n_with_pos += 1
        n_pos_total += len(pos)
    denom = n_pos_total if normalization == "faithful" else n_with_pos
    return -total / denom


def make_case(b=6, r=1, e=0, h=8, seed=0, n_classes=3, id_offset=0):
    g = torch.Generator().manual_seed(seed)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=g), dim=-1)
    anchors = unit(b, h).requires_grad_()
    ids = torch.randperm(50, generator=g)[:b] + id_offset
    labels = torch.randint(0, n_classes, (b,), generator=g)
    views = unit(b, r, h)
    # extras may repeat a batch example (drawn from the whole set): one does here
    extra_ids = torch.cat([ids[:1], torch.randint(100, 200, (max(e - 1, 0),), generator=g)])[:e]
    extra_labels = torch.randint(0, n_classes, (e,), generator=g)
    return anchors, ids, labels, views, unit(e, r, h), extra_ids, extra_labels


def capscale_loss(anchors, ids, labels, views, ev, eids, elabels, tau, supervised,
                  normalization):
    cands = build_candidates(anchors, ids, labels, views, ev, eids, elabels)
    self_index = cands.self_index(torch.arange(anchors.shape[0]))
    return contrastive_loss(anchors, labels if supervised else ids, self_index, cands,
                            cands.labels if supervised else cands.ids, tau, normalization)


@pytest.mark.parametrize("normalization", ["faithful", "clean"])
@pytest.mark.parametrize("supervised", [False, True])
@pytest.mark.parametrize("r,e", [(1, 0), (3, 0), (1, 5), (3, 4)])
def test_contrastive_loss_matches_loop_reference(normalization, supervised, r, e):
    case = make_case(r=r, e=e, seed=r * 10 + e)
    got = capscale_loss(*case, 0.1, supervised, normalization)
    want = reference_cap_loss(*case, 0.1, supervised, normalization)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got, = torch.autograd.grad(got, case[0])
    g_want, = torch.autograd.grad(want, case[0])
    torch.testing.assert_close(g_got, g_want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("supervised", [False, True])
def test_clean_weight_equals_faithful_weight_times_anchors_over_positives(supervised):
    """w_clean = w_faithful * n_anchors / sum_i |P(i)| gives the same weighted loss."""
    case = make_case(b=8, r=3, e=6, seed=3)
    anchors, ids, labels, views, ev, eids, elabels = case
    faithful = capscale_loss(*case, 0.2, supervised, "faithful")
    clean = capscale_loss(*case, 0.2, supervised, "clean")
    keys = labels if supervised else ids
    cands = build_candidates(anchors, ids, labels, views, ev, eids, elabels)
    ckeys = cands.labels if supervised else cands.ids
    n_pos = [(ckeys == k).sum().item() - 1 for k in keys]  # minus the self copy
    assert all(n > 0 for n in n_pos)
    w_faithful = 0.3
    w_clean = w_faithful * len(n_pos) / sum(n_pos)
    torch.testing.assert_close(w_clean * clean, w_faithful * faithful)
    if not supervised:  # R views per example plus one extra repeating example 0
        assert sum(n_pos) == 8 * 3 + 3


def test_aligned_anchors_give_lower_loss_than_random():
    anchors, ids, labels, views, ev, eids, elabels = make_case(b=16, r=1, e=16, h=32, seed=5)
    aligned = views[:, 0].clone().requires_grad_()
    random_loss = capscale_loss(anchors, ids, labels, views, ev, eids, elabels, 0.1, False,
                                "clean")
    aligned_loss = capscale_loss(aligned, ids, labels, views, ev, eids, elabels, 0.1, False,
                                 "clean")
    assert aligned_loss < random_loss - 1.0


@pytest.mark.parametrize("normalization", ["faithful", "clean"])
@pytest.mark.parametrize("supervised", [False, True])
def test_two_ranks_average_to_one_process(normalization, supervised):
    """Each 'rank' scores its half of the anchors against the global candidates with
    global keys and world_size=2: the mean of the losses and the average of the
    gradients (what DDP computes) equal the single-process loss and gradient."""
    anchors, ids, labels, views, ev, eids, elabels = make_case(b=8, r=3, e=5, seed=7)
    cands = build_candidates(anchors, ids, labels, views, ev, eids, elabels)
    keys = labels if supervised else ids
    ckeys = cands.labels if supervised else cands.ids
    g_self = cands.self_index(torch.arange(8))
    one = contrastive_loss(anchors, keys, g_self, cands, ckeys, 0.1, normalization)
    g_one, = torch.autograd.grad(one, anchors)

    losses, grads = [], []
    for rank in range(2):
        local = slice(4 * rank, 4 * rank + 4)
        loss = contrastive_loss(anchors[local], keys[local], g_self[local], cands, ckeys, 0.1,
                                normalization, global_keys=keys, global_self_index=g_self,
                                world_size=2)
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, anchors)[0])
    torch.testing.assert_close((losses[0] + losses[1]) / 2, one)
    torch.testing.assert_close((grads[0] + grads[1]) / 2, g_one)
    # each rank's gradient touches only its own anchors
    assert grads[0][4:].abs().sum() == 0 and grads[1][:4].abs().sum() == 0


def test_contrastive_loss_without_positives_is_zero_with_gradient_graph():
    anchors, ids, labels, views, *_ = make_case(b=4, r=1, seed=9)
    cands = build_candidates(anchors, ids, labels, views)
    loss = contrastive_loss(anchors, ids + 1000, cands.self_index(torch.arange(4)), cands,
                            cands.ids, 0.1)
    assert loss.item() == 0.0 and loss.requires_grad


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_kd_loss_is_t_squared_kl(temperature):
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    want = 0.0
    for b in range(5):
        ps = [math.exp(v / temperature) for v in s[b].tolist()]
        pt = [math.exp(v / temperature) for v in t[b].tolist()]
        ps = [p / sum(ps) for p in ps]
        pt = [p / sum(pt) for p in pt]
        want += sum(q * math.log(q / p) for p, q in zip(ps, pt))
    want = temperature**2 * want / 5
    kd = get_task("classification").distill
    assert kd(s, t, temperature).item() == pytest.approx(want, rel=1e-5)
    assert kd(t, t, temperature).item() == pytest.approx(0.0, abs=1e-6)


def test_task_losses_regression_mse_classification_ce():
    reg, cls = get_task("regression"), get_task("classification")
    s, t = torch.tensor([[0.5], [1.0], [-2.0]]), torch.tensor([[1.5], [1.0], [0.0]])
    assert reg.distill(s, t, 2.0).item() == pytest.approx((1.0 + 0.0 + 4.0) / 3)
    labels = torch.tensor([1.0, 3.0, -2.0])
    assert reg.loss(s, labels).item() == pytest.approx((0.25 + 4.0 + 0.0) / 3)
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    ce = -(math.log(math.exp(2) / (math.exp(2) + 1)) + math.log(math.e / (1 + math.e))) / 2
    assert cls.loss(logits, torch.tensor([0, 1])).item() == pytest.approx(ce, rel=1e-6)
