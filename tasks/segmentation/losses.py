"""Segmentation losses: a weighted sum of named terms, each returned under its own name, in smp's three modes.

``mode`` (smp's convention, ``model.segmentation.mode``):

* ``multiclass``: logits (N, C, H, W), softmax; masks int64 (N, H, W) of class indices.
* ``binary``: logits (N, 1, H, W), sigmoid; masks (N, H, W) (or (N, 1, H, W)) of 0/1.
* ``multilabel``: logits (N, C, H, W), a sigmoid per channel; masks (N, C, H, W) of 0/1.

``ignore_index`` (255) pixels leave every term, in every mode (per channel in multilabel).

Terms. ``cross_entropy`` (multiclass only: ``ignore_index``, optional ``class_weights``, optional OHEM);
``bce`` (binary / multilabel only: ``F.binary_cross_entropy_with_logits`` with ``pos_weight`` -- one per
channel -- averaged over the unignored pixels); ``dice``, ``lovasz``, ``focal``, ``tversky``: smp's
``DiceLoss``, ``LovaszLoss``, ``FocalLoss``, ``TverskyLoss`` in the same mode with the same
``ignore_index``. Two translations: in binary / multilabel mode a ``cross_entropy`` weight given without a
``bce`` weight is the BCE's weight (the presets keep ``cross_entropy: 1.0``; the term is returned as
``bce``), and both at once is an error; multilabel ``focal`` is smp's binary ``FocalLoss`` per channel,
averaged over the channels -- what smp's multilabel ``FocalLoss`` computes, except that its
``ignore_index`` path fails on (N, C, H, W) masks (smp 0.6). A term that has no meaning in the mode
(``bce`` or ``pos_weight`` in multiclass; ``class_weights`` or OHEM outside it) is a one-line error.

With the auxiliary head on, ``aux_presence`` adds a multi-label BCE on which classes (multiclass) or
channels (binary / multilabel: a pixel of value 1) each image contains. With the FCN auxiliary head
(mmseg's, on the stride-16 tap; training only), ``fcn_aux`` is ``fcn_aux_weight`` x the pixel loss of its
logits resized to the masks (bilinear, ``align_corners=False``): cross-entropy with ``ignore_index`` and
``class_weights`` (multiclass; no OHEM), BCE with ``pos_weight`` (binary / multilabel), averaged over the
labelled pixels as the main terms are (mmseg's default averages over every pixel, ignored ones as 0).
The engine sums the returned terms; each is already weighted.

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

__all__ = ["LOSS_TERMS", "MODES", "SegmentationLoss", "ohem_cross_entropy", "presence_targets", "binary_targets",
           "masked_bce"]

LOSS_TERMS = ("cross_entropy", "bce", "dice", "lovasz", "focal", "tversky")
MODES = ("multiclass", "binary", "multilabel")


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


def presence_targets(masks: torch.Tensor, num_classes: int, ignore_index: int = 255,
                     mode: str = "multiclass") -> torch.Tensor:
    """(N, num_classes) float: 1 where the class occurs in the image's mask (ignore pixels excluded); in
    binary / multilabel mode, where the channel has a pixel of value 1."""
    n = masks.shape[0]
    if mode != "multiclass":
        return (binary_targets(masks, num_classes) == 1).reshape(n, num_classes, -1).any(-1).float()
    flat = masks.reshape(n, -1)
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    offsets = torch.arange(n, device=masks.device).view(n, 1) * num_classes
    counts = torch.bincount((flat + offsets)[valid], minlength=n * num_classes)
    return (counts.view(n, num_classes) > 0).float()


def binary_targets(masks: torch.Tensor, channels: int) -> torch.Tensor:
    """Binary / multilabel masks as (N, channels, H, W): binary (N, H, W) gains its channel axis."""
    if masks.dim() == 3 and channels == 1:
        masks = masks.unsqueeze(1)
    if masks.dim() != 4 or masks.shape[1] != channels:
        raise ValueError(f"masks {tuple(masks.shape)}: expected (N, {channels}, H, W) 0/1 masks (binary: (N, H, W)) "
                         f"for {channels} sigmoid channels")
    return masks


def masked_bce(logits: torch.Tensor, masks: torch.Tensor, ignore_index: int = 255,
               pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy with logits, ``pos_weight`` (C,) per channel, averaged over the unignored pixels of
    (N, C, H, W) ``masks`` (0 when every pixel is ignored)."""
    valid = masks != ignore_index
    weight = None if pos_weight is None else pos_weight.view(1, -1, *([1] * (logits.dim() - 2)))
    losses = F.binary_cross_entropy_with_logits(logits, (masks == 1).to(logits.dtype), pos_weight=weight,
                                                reduction="none")
    return (losses * valid).sum() / valid.sum().clamp(min=1)


def _mode_problems(mode: str, weights: dict[str, float], class_weights, ohem: bool, pos_weight,
                   channels: int) -> list[str]:
    """What ``SegmentationLoss``'s arguments get wrong for ``mode`` (one line each, naming the config key too)."""
    problems = []
    if mode not in MODES:
        return [f"mode={mode!r} is not one of {', '.join(MODES)}"]
    if mode == "multiclass":
        if "bce" in weights:
            problems.append("loss.bce (bce) is a binary / multilabel term; in mode=multiclass use loss.cross_entropy")
        if pos_weight is not None:
            problems.append("loss.pos_weight (pos_weight) weights BCE's positives in binary / multilabel mode; "
                            "in mode=multiclass use loss.class_weights")
        return problems
    if "cross_entropy" in weights and "bce" in weights:
        problems.append(f"loss.cross_entropy and loss.bce are both set in mode={mode}, where cross_entropy means "
                        f"BCE; set loss.cross_entropy=0")
    if class_weights is not None:
        problems.append(f"loss.class_weights (class_weights) weights softmax cross-entropy; in mode={mode} use "
                        f"loss.pos_weight (one per channel)")
    if ohem:
        problems.append(f"loss.ohem (ohem_thresh) is softmax cross-entropy mining; expected it off in mode={mode}")
    if pos_weight is not None and len(pos_weight) != channels:
        problems.append(f"loss.pos_weight (pos_weight) has {len(pos_weight)} entries; expected one per output "
                        f"channel ({channels}) in mode={mode}")
    return problems


class SegmentationLoss(nn.Module):
    """``losses`` (term -> weight) on ``(logits (N, C, H, W), masks)`` in ``mode`` (see the module docstring).

    ``class_weights`` apply to cross-entropy (and OHEM). ``ohem_thresh=None`` turns OHEM off.
    ``pos_weight`` (one per channel) applies to BCE. ``aux_weight`` scales ``aux_presence`` when
    ``forward`` receives aux logits, ``fcn_aux_weight`` scales ``fcn_aux`` when it receives FCN logits.
    ``num_classes`` is the number of output channels (1 in binary mode).
    """

    def __init__(self, num_classes: int, losses: Mapping[str, float] | None = None, ignore_index: int = 255,
                 class_weights: Sequence[float] | None = None, ohem_thresh: float | None = None,
                 ohem_min_kept: int = 100_000, aux_weight: float = 0.4, focal_gamma: float = 2.0,
                 mode: str = "multiclass", pos_weight: Sequence[float] | None = None, tversky_alpha: float = 0.5,
                 tversky_beta: float = 0.5, fcn_aux_weight: float = 0.4):
        super().__init__()
        losses = dict(losses if losses is not None else {"cross_entropy": 1.0})
        unknown = [name for name in losses if name not in LOSS_TERMS]
        if unknown or not losses:
            raise ValueError(f"losses: unknown terms {unknown or '(none given)'}; expected a mapping of "
                             f"{', '.join(LOSS_TERMS)} to weights, e.g. {{'cross_entropy': 1.0, 'dice': 0.5}}")
        problems = _mode_problems(mode, losses, class_weights, ohem_thresh is not None, pos_weight, num_classes)
        if mode == "binary" and num_classes != 1:
            problems.append(f"mode=binary has one sigmoid channel; expected model.num_classes=1 (num_classes), "
                            f"got {num_classes}")
        if problems:
            raise ValueError(problems[0])
        if mode != "multiclass" and "cross_entropy" in losses:  # the presets' cross_entropy: 1.0 is the BCE here
            losses["bce"] = losses.pop("cross_entropy")
        if class_weights is not None and len(class_weights) != num_classes:
            raise ValueError(f"class_weights has {len(class_weights)} entries; expected one per class ({num_classes})")
        if ohem_thresh is not None and not 0.0 < ohem_thresh <= 1.0:
            raise ValueError(f"ohem_thresh={ohem_thresh} must be in (0, 1] (or None for plain cross-entropy)")
        self.mode, self.num_classes, self.ignore_index = mode, num_classes, ignore_index
        self.weights = {name: float(w) for name, w in losses.items()}
        self.ohem_thresh, self.ohem_min_kept, self.aux_weight = ohem_thresh, ohem_min_kept, aux_weight
        self.fcn_aux_weight = float(fcn_aux_weight)
        self.register_buffer("class_weights", None if class_weights is None else
                             torch.tensor(class_weights, dtype=torch.float32), persistent=False)
        self.register_buffer("pos_weight", None if pos_weight is None else
                             torch.tensor(pos_weight, dtype=torch.float32), persistent=False)
        self.terms = nn.ModuleDict(self._smp_terms(focal_gamma, tversky_alpha, tversky_beta))

    def _smp_terms(self, focal_gamma: float, alpha: float, beta: float) -> dict[str, nn.Module]:
        from segmentation_models_pytorch import losses as smp_losses

        mode, ignore = self.mode, self.ignore_index
        made = {}
        if "dice" in self.weights:
            made["dice"] = smp_losses.DiceLoss(mode, ignore_index=ignore)
        if "lovasz" in self.weights:
            made["lovasz"] = smp_losses.LovaszLoss(mode, ignore_index=ignore)
        if "focal" in self.weights:  # multilabel: per channel in binary mode (see the module docstring)
            made["focal"] = smp_losses.FocalLoss("binary" if mode == "multilabel" else mode, gamma=focal_gamma,
                                                 ignore_index=ignore)
        if "tversky" in self.weights:
            made["tversky"] = smp_losses.TverskyLoss(mode, ignore_index=ignore, alpha=alpha, beta=beta)
        return made

    def forward(self, logits: torch.Tensor, masks: torch.Tensor, aux_logits: torch.Tensor | None = None,
                fcn_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = logits.float()
        if masks.shape[-2:] != logits.shape[-2:]:
            raise ValueError(f"masks {tuple(masks.shape)} and logits {tuple(logits.shape)} differ in size; "
                             f"expected masks matching (N, C, H, W) logits")
        if self.mode != "multiclass":
            masks = binary_targets(masks, logits.shape[1])
        out = {}
        for name, weight in self.weights.items():
            if name == "cross_entropy":
                value = self._cross_entropy(logits, masks)
            elif name == "bce":
                value = masked_bce(logits, masks, self.ignore_index, self.pos_weight)
            elif name == "focal" and self.mode == "multilabel":
                value = torch.stack([self.terms[name](logits[:, c], masks[:, c]) for c in range(logits.shape[1])]).mean()
            else:
                value = self.terms[name](logits, masks)
            out[name] = weight * value
        if aux_logits is not None:
            targets = presence_targets(masks, aux_logits.shape[1], self.ignore_index, self.mode)
            out["aux_presence"] = self.aux_weight * F.binary_cross_entropy_with_logits(aux_logits.float(), targets)
        if fcn_logits is not None:
            out["fcn_aux"] = self.fcn_aux_weight * self.fcn_aux(fcn_logits, masks)
        return out

    def fcn_aux(self, fcn_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The FCN auxiliary head's pixel loss, unweighted: its logits resized to the masks (see the module
        docstring); ``masks`` as ``forward`` has them (binary: with the channel axis)."""
        resized = F.interpolate(fcn_logits.float(), size=masks.shape[-2:], mode="bilinear", align_corners=False)
        if self.mode != "multiclass":
            return masked_bce(resized, masks, self.ignore_index, self.pos_weight)
        if not (masks != self.ignore_index).any():
            return resized.sum() * 0.0
        return F.cross_entropy(resized, masks, weight=self.class_weights, ignore_index=self.ignore_index)

    def _cross_entropy(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        if self.ohem_thresh is not None:
            return ohem_cross_entropy(logits, masks, self.ohem_thresh, self.ohem_min_kept, self.ignore_index,
                                      self.class_weights)
        if not (masks != self.ignore_index).any():  # torch returns NaN for an all-ignored batch
            return logits.sum() * 0.0
        return F.cross_entropy(logits, masks, weight=self.class_weights, ignore_index=self.ignore_index)
