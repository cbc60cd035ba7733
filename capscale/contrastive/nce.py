"""CAP's contrastive loss as pure tensor math: InfoNCE with many positives.

Nothing here looks up distributed state. The caller passes the *global* candidate set
(batch vectors gathered from every rank, detached, plus bank views) and ``world_size``;
each rank scores only its local anchors. See :func:`contrastive_loss` for the gradient
convention that makes N ranks equal one process on the concatenated batch.

Reference: Xu et al., "From Dense to Sparse: Contrastive Pruning for Better Pre-trained
Language Model Compression", AAAI 2022, eq. 1-6; docs/algorithm.md section 3 (with the
reference's double normalisation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Normalization = Literal["faithful", "clean"]
MASKED_LOGIT = -1e6  # the reference masks the anchor's own stop-grad copy with -1e6


@dataclass
class Candidates:
    """Everything an anchor is contrasted with, for one module (PrC, FiC or SnC).

    Attributes:
        vectors: (C, H) L2-normalised, no gradient.
        ids: (C,) example id of each candidate.
        labels: (C,) class label of each candidate (-1 where unknown).
        batch_size: number of global batch items at the front of the set; item ``g``'s
            own current vector (the "self copy") sits at index ``g * (views + 1)``.
        views: R, reference views per example.
    """

    vectors: Tensor
    ids: Tensor
    labels: Tensor
    batch_size: int
    views: int

    def self_index(self, global_positions: Tensor) -> Tensor:
        """Index of the self copy of each anchor, given its position in the global batch."""
        return global_positions * (self.views + 1)


def build_candidates(current: Tensor, ids: Tensor, labels: Tensor, views: Tensor,
                     extra_views: Tensor | None = None, extra_ids: Tensor | None = None,
                     extra_labels: Tensor | None = None) -> Candidates:
    """Lay out candidates as the reference does: per batch item its current vector then
    its R reference views, followed by the R views of each extra example.

    Args:
        current: (Bg, H) the student's vectors for the whole (gathered) batch, normalised.
        ids, labels: (Bg,) example ids and labels of the batch.
        views: (Bg, R, H) reference views of the batch examples, normalised.
        extra_views: (E, R, H) views of E extra examples drawn from the bank.
        extra_ids, extra_labels: (E,).
    """
    bg, r, h = views.shape
    batch = torch.cat([current.detach()[:, None, :].to(views.dtype), views], dim=1)  # (Bg, R+1, H)
    vecs = [batch.reshape(bg * (r + 1), h)]
    cid = [ids.repeat_interleave(r + 1)]
    clab = [labels.repeat_interleave(r + 1)]
    if extra_views is not None and extra_views.shape[0] > 0:
        assert extra_ids is not None and extra_labels is not None, \
            "extra_views needs extra_ids and extra_labels"
        e = extra_views.shape[0]
        vecs.append(extra_views.reshape(e * r, h).to(views.dtype))
        cid.append(extra_ids.repeat_interleave(r))
        clab.append(extra_labels.repeat_interleave(r))
    return Candidates(torch.cat(vecs), torch.cat(cid), torch.cat(clab), bg, r)


def positive_counts(keys: Tensor, cand_keys: Tensor, self_index: Tensor) -> Tensor:
    """|P(i)|: candidates sharing anchor i's key, the self copy excluded. (B,) long."""
    same = keys[:, None] == cand_keys[None, :]
    return same.sum(1) - same.gather(1, self_index[:, None]).squeeze(1).long()


def contrastive_loss(anchors: Tensor, keys: Tensor, self_index: Tensor, cands: Candidates,
                     cand_keys: Tensor, temperature: float,
                     normalization: Normalization = "faithful",
                     global_keys: Tensor | None = None,
                     global_self_index: Tensor | None = None,
                     world_size: int = 1) -> Tensor:
    """InfoNCE with multiple positives, exactly as CAP's reference code computes it.

    ``s = a_i . c / tau``; the anchor's self copy is masked; ``log_softmax`` over all
    candidates; positives are candidates with the anchor's key (its example id for the
    unsupervised term, its label for the supervised one).

    * faithful: ``-sum_i sum_{p in P(i)} logp_ip / |P(i)|  /  sum_i |P(i)|`` -- the
      reference's double division. The effective weight is ``w / |P|``.
    * clean: ``-mean_i sum_{p in P(i)} logp_ip / |P(i)|`` (anchors with no positive
      skipped). ``w_clean = w_faithful * n_anchors / sum_i |P(i)|`` gives the same value;
      e.g. ``w_faithful / R`` for an unsupervised term with R views per example.

    Gradient convention (distributed): candidates carry no gradient, only the local
    anchors do. The denominators are global (computed from ``global_keys``), and the
    result is multiplied by ``world_size``, so that when the data-parallel wrapper
    *averages* gradients over ranks, they equal the single-process gradient on the
    concatenated batch, and the mean of the per-rank values equals the global loss.

    Args:
        anchors: (B, H) local student vectors, L2-normalised, with gradient.
        keys: (B,) anchor keys (ids or labels).
        self_index: (B,) index of each anchor's self copy in ``cands``.
        cands: the global candidate set.
        cand_keys: (C,) ``cands.ids`` or ``cands.labels``.
        temperature: tau > 0.
        normalization: ``faithful`` or ``clean``.
        global_keys, global_self_index: (Bg,) keys / self indices of all anchors on all
            ranks; default: the local ones (world 1).
        world_size: number of ranks sharing the global batch.

    Returns:
        scalar loss (0 when no anchor has a positive).
    """
    if global_keys is None:
        global_keys, global_self_index = keys, self_index
    assert global_self_index is not None, "global_keys needs global_self_index"
    logp, is_self = candidate_log_probs(anchors, cands, self_index, temperature)
    return nce_from_log_probs(logp, is_self, keys, cand_keys, normalization, global_keys,
                              global_self_index, world_size)


def candidate_log_probs(anchors: Tensor, cands: Candidates, self_index: Tensor,
                        temperature: float) -> tuple[Tensor, Tensor]:
    """``log_softmax(a . c / tau)`` over the candidates, each anchor's self copy masked.

    Shared by a module's unsupervised and supervised terms (they differ only in which
    candidates are positives), so the (B, C) scores are computed once.

    Returns:
        logp: (B, C) float32 log-probabilities; is_self: (B, C) bool, the masked entries.
    """
    logits = anchors @ cands.vectors.to(anchors.dtype).T / temperature  # (B, C)
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self.scatter_(1, self_index[:, None], True)
    logits = logits.masked_fill(is_self, MASKED_LOGIT)
    return F.log_softmax(logits.float(), dim=1), is_self


def nce_from_log_probs(logp: Tensor, is_self: Tensor, keys: Tensor, cand_keys: Tensor,
                       normalization: Normalization, global_keys: Tensor,
                       global_self_index: Tensor, world_size: int) -> Tensor:
    """The multi-positive InfoNCE term from :func:`candidate_log_probs`' output.

    Same arguments and normalisation as :func:`contrastive_loss`.
    """
    pos = (keys[:, None] == cand_keys[None, :]) & ~is_self
    n_pos = pos.sum(1)
    per_anchor = torch.where(pos, logp, torch.zeros_like(logp)).sum(1) / n_pos.clamp(min=1)
    g_pos = positive_counts(global_keys, cand_keys, global_self_index)
    denom = g_pos.sum() if normalization == "faithful" else (g_pos > 0).sum()
    if int(denom) == 0:
        return logp.sum() * 0.0
    return -per_anchor.sum() / denom.to(logp.dtype) * world_size
