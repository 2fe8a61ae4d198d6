"""Segmentation losses: a weighted sum of named terms, each returned under its own name.

Terms: ``cross_entropy`` (``ignore_index``, optional class weights, optional OHEM), and ``dice``,
``lovasz``, ``focal`` from ``segmentation_models_pytorch.losses`` (multiclass mode, same
``ignore_index``). With the auxiliary head on, ``aux_presence`` adds a multi-label BCE on which
classes each image contains. The engine sums the returned terms; each is already weighted.

OHEM (online hard example mining): among the labelled pixels of the batch, keep those whose softmax
probability of the true class is below ``max(thresh, p_k)``, where ``p_k`` is the ``min_kept``-th
smallest such probability (0-based), so at least ``min_kept`` pixels remain -- the selection of mmseg's
``OHEMPixelSampler``; the loss is the (class-weighted) mean over the kept pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LOSS_TERMS", "SegmentationLoss", "ohem_cross_entropy", "presence_targets"]

LOSS_TERMS = ("cross_entropy", "dice", "lovasz", "focal")


def ohem_cross_entropy(logits: torch.Tensor, masks: torch.Tensor, thresh: float, min_kept: int,
                       ignore_index: int = 255, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy over the hard pixels only (see the module docstring); 0 when no pixel is labelled."""
    valid = masks != ignore_index
    losses = F.cross_entropy(logits, masks, weight=weight, ignore_index=ignore_index, reduction="none")
    if not valid.any():
        return losses.sum() * 0.0
    with torch.no_grad():
        safe = masks.masked_fill(~valid, 0)
        prob = logits.float().softmax(dim=1).gather(1, safe.unsqueeze(1)).squeeze(1)[valid]
        sorted_prob = prob.sort().values
        floor = sorted_prob[min(min_kept, sorted_prob.numel() - 1)]
        keep = torch.zeros_like(valid)
        keep[valid] = prob < torch.clamp(floor, min=thresh)
    if weight is None:
        return losses[keep].sum() / keep.sum().clamp(min=1)
    pixel_weight = weight[masks.masked_fill(~valid, 0)]
    return losses[keep].sum() / pixel_weight[keep].sum().clamp(min=1e-12)


def presence_targets(masks: torch.Tensor, num_classes: int, ignore_index: int = 255) -> torch.Tensor:
    """(N, num_classes) float: 1 where the class occurs in the image's mask (ignore pixels excluded)."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    offsets = torch.arange(n, device=masks.device).view(n, 1) * num_classes
    counts = torch.bincount((flat + offsets)[valid], minlength=n * num_classes)
    return (counts.view(n, num_classes) > 0).float()


class SegmentationLoss(nn.Module):
    """``losses`` (term -> weight) on ``(logits (N, C, H, W), masks int64 (N, H, W))``.

    ``class_weights`` apply to cross-entropy (and OHEM). ``ohem_thresh=None`` turns OHEM off.
    ``aux_weight`` scales ``aux_presence`` when ``forward`` receives aux logits.
    """

    def __init__(self, num_classes: int, losses: Mapping[str, float] | None = None, ignore_index: int = 255,
                 class_weights: Sequence[float] | None = None, ohem_thresh: float | None = None,
                 ohem_min_kept: int = 100_000, aux_weight: float = 0.4, focal_gamma: float = 2.0):
        super().__init__()
        losses = dict(losses if losses is not None else {"cross_entropy": 1.0})
        unknown = [name for name in losses if name not in LOSS_TERMS]
        if unknown or not losses:
            raise ValueError(f"losses: unknown terms {unknown or '(none given)'}; expected a mapping of "
                             f"{', '.join(LOSS_TERMS)} to weights, e.g. {{'cross_entropy': 1.0, 'dice': 0.5}}")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries; expected one per class ({num_classes})")
        if ohem_thresh is not None and not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh={ohem_thresh} must be in (0, 1] (or None for plain cross-entropy)")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.weights = {name: float(w) for name, w in losses.items()}
        self.ohem_thresh, self.ohem_min_kept, self.aux_weight = ohem_thresh, ohem_min_kept, aux_weight
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        self.terms = nn.ModuleDict(self._smp_terms(focal_gamma))

    def _smp_terms(self, focal_gamma: float) -> dict[str, nn.Module]:
        from segmentation_models_pytorch import losses as smp_losses

        made = {}
        if "dice" in self.weights:
            made["dice"] = smp_losses.DiceLoss("multiclass", ignore_index=self.ignore_index)
        if "lovasz" in self.weights:
            made["lovasz"] = smp_losses.LovaszLoss("multiclass", ignore_index=self.ignore_index)
        if "focal" in self.weights:
            made["focal"] = smp_losses.FocalLoss("multiclass", gamma=focal_gamma, ignore_index=self.ignore_index)
        return made

    def forward(self, logits: torch.Tensor, masks: torch.Tensor,
                aux_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = logits.float()
        if masks.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape)} and logits {tuple(logits.shape)} differ in size; "
                             f"expected (N, H, W) masks matching (N, C, H, W) logits")
        out = {}
        for name, weight in self.weights.items():
            if name == "cross_entropy":
                value = self._cross_entropy(logits, masks)
            else:
                value = self.terms[name](logits, masks)
            out[name] = weight * value
        if aux_logits is not None:
            targets = presence_targets(masks, aux_logits.shape[1], self.ignore_index)
            out["aux_presence"] = self.aux_weight * F.binary_cross_entropy_with_logits(aux_logits.float(), targets)
        return out

    def _cross_entropy(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.ohem_thresh is not None:
            return ohem_cross_entropy(logits, masks, self.ohem_thresh, self.ohem_min_kept, self.ignore_index,
                                      self.class_weights)
        if not (masks != self.ignore_index).any():  # torch returns NaN for an all-ignored batch
            return logits.sum() * 0.0
        return F.cross_entropy(logits, masks, weight=self.class_weights, ignore_index=self.ignore_index)
