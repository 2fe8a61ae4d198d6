"""EfficientDet training loss: sigmoid focal loss + a box loss (Huber on the codes, or GIoU / CIoU on the
decoded boxes), normalised by the positive anchors.

Both terms are computed in float32 whatever the autocast dtype (bf16/fp16 logits are cast first), per
pyramid level on views of the head outputs (no copy into one flat tensor) and without a Python loop
over images. The class term avoids materialising one-hot targets: every valid anchor pays the
negative-class loss on all classes, and each positive anchor's true class is corrected by
(positive - negative) loss at that one logit (a gather, not a mask).

Normalisation (automl/effdet): ``class_loss = focal_sum / (P + 1)`` and
``box_loss = box_loss_weight * huber_sum / (4 * (P + 1))`` with P the positive anchors of the batch.
Under DDP, P must be the same number on every rank: each rank all-reduces (sums) its count and uses
``P = sum / world_size``, the mean count per rank. DDP then averages the gradients over ranks, so the
result is the gradient of (sum of every rank's loss sums) / (total positives + world_size): the
single-process normalisation of the global batch (with +1 per rank instead of +1).

``box_loss="giou"`` / ``"ciou"`` replaces the Huber term by ``iou_weight * iou_loss_sum / (P + 1)`` (one value
per box, so no factor 4): the positive anchors' predicted and target codes are decoded on their anchors and
torchvision's ``generalized_box_iou_loss`` / ``complete_box_iou_loss`` compare the boxes, in float32. The
codes of the other anchors are replaced by zeros first (both boxes are then the anchor: finite, masked out, no
gradient), which keeps the term dense: no boolean indexing, no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F
from torchvision.ops import complete_box_iou_loss, generalized_box_iou_loss

from heads.anchors import IGNORE, decode_boxes
from tasks.engine.distributed import global_mean

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 1.5
HUBER_DELTA, BOX_LOSS_WEIGHT = 0.1, 50.0
IOU_WEIGHT = 2.0
BOX_LOSSES = {"giou": generalized_box_iou_loss, "ciou": complete_box_iou_loss}  # besides "huber"


def focal_loss_sum(logits: torch.Tensor, class_targets: torch.Tensor, alpha: float = FOCAL_ALPHA,
                   gamma: float = FOCAL_GAMMA) -> torch.Tensor:
    """Sum of the sigmoid focal loss over (N, A, C) ``logits`` with (N, A) targets (class, -1, -2).

    Per logit x with target t: alpha_t * (1 - p_t)^gamma * BCE(x, t); anchors with target -2 count
    nothing. Computed in float32 with log-sigmoids, so large logits neither overflow nor lose the tail.
    """
    logits = logits.float()
    positive = class_targets >= 0
    log_p = F.logsigmoid(logits)  # log sigmoid(x)
    # Negative term p^gamma * -log(1 - p), with -log(1 - p) = x - log_p, summed per anchor over the
    # classes (one pass over the logits; (1 - alpha) and the ignore mask apply to the per-anchor sums).
    per_anchor = (torch.exp(gamma * log_p) * (logits - log_p)).sum(-1)
    total = (1.0 - alpha) * (per_anchor * (class_targets != IGNORE)).sum()
    # Positive anchors: replace the negative term at their class by alpha * (1 - p)^gamma * -log(p).
    x = logits.gather(-1, class_targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    log_p_true = F.logsigmoid(x)
    log_q_true = F.logsigmoid(-x)  # log(1 - p)
    positive_loss = alpha * torch.exp(gamma * log_q_true) * -log_p_true
    negative_loss = (1.0 - alpha) * torch.exp(gamma * log_p_true) * -log_q_true
    return total + ((positive_loss - negative_loss) * positive).sum()


def box_loss_sum(box_codes: torch.Tensor, box_targets: torch.Tensor, positive: torch.Tensor,
                 delta: float = HUBER_DELTA) -> torch.Tensor:
    """Sum of the Huber loss (``delta``) over the 4 codes of the positive anchors, in float32."""
    loss = F.huber_loss(box_codes.float(), box_targets, reduction="none", delta=delta)
    return (loss.sum(-1) * positive).sum()


def iou_loss_sum(box_codes: torch.Tensor, box_targets: torch.Tensor, positive: torch.Tensor,
                 anchors: torch.Tensor, kind: str = "giou") -> torch.Tensor:
    """Sum of the GIoU or CIoU loss (``kind``) between the boxes the predicted and the target codes decode to on
    ``anchors`` (broadcast), over the positive anchors, in float32."""
    anchors = anchors.float()
    keep = positive.unsqueeze(-1)
    predicted = decode_boxes(torch.where(keep, box_codes.float(), 0.0), anchors)
    target = decode_boxes(torch.where(keep, box_targets.float(), 0.0), anchors)
    return (BOX_LOSSES[kind](predicted, target, reduction="none") * positive).sum()


def global_positives(num_positives: torch.Tensor) -> torch.Tensor:
    """The batch's positive count as a global quantity: sum over ranks / world size under DDP (the engine's
    ``global_mean``, the normaliser every task uses for a loss divided by a global count)."""
    return global_mean(num_positives.sum().float())


def detection_loss(class_out: Sequence[torch.Tensor], box_out: Sequence[torch.Tensor],
                   class_targets: Sequence[torch.Tensor], box_targets: Sequence[torch.Tensor],
                   num_positives: torch.Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA,
                   delta: float = HUBER_DELTA, box_loss_weight: float = BOX_LOSS_WEIGHT, box_loss: str = "huber",
                   iou_weight: float = IOU_WEIGHT, anchors: Sequence[torch.Tensor] | None = None
                   ) -> dict[str, torch.Tensor]:
    """``{"class_loss", "box_loss"}`` (the box term already weighted) summed over matching parts (the
    pyramid levels, or one flat tensor each): logits (..., C) with class targets (...), box codes (..., 4)
    with box targets (..., 4), as ``match_anchors`` gives them; ``num_positives`` per image. ``box_loss``:
    ``"huber"`` (``delta``, ``box_loss_weight``) or ``"giou"`` / ``"ciou"`` (``iou_weight``), which need the
    parts' ``anchors`` (..., 4), broadcast against the box codes."""
    normaliser = global_positives(num_positives) + 1.0
    focal = sum(focal_loss_sum(x, t, alpha, gamma) for x, t in zip(class_out, class_targets))
    if box_loss == "huber":
        huber = sum(box_loss_sum(x, t, c >= 0, delta) for x, t, c in zip(box_out, box_targets, class_targets))
        return {"class_loss": focal / normaliser, "box_loss": box_loss_weight * huber / (4.0 * normaliser)}
    if box_loss not in BOX_LOSSES:
        raise ValueError(f"box_loss must be 'huber', 'giou' or 'ciou', got {box_loss!r}")
    if anchors is None:
        raise ValueError(f"box_loss={box_loss!r} decodes the box codes: pass the anchors of each part")
    total = sum(iou_loss_sum(x, t, c >= 0, a, box_loss)
                for x, t, c, a in zip(box_out, box_targets, class_targets, anchors, strict=True))
    return {"class_loss": focal / normaliser, "box_loss": iou_weight * total / normaliser}
