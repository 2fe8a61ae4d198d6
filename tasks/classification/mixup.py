"""Mixup / CutMix on the device, with soft targets and the loss that takes them (timm's batch mode).

Each training batch is mixed with itself reversed (``images.flip(0)``): Mixup blends whole images with weight
``lam ~ Beta(mixup, mixup)``; CutMix pastes a box covering ``1 - lam`` of the area (``lam ~ Beta(cutmix,
cutmix)``; ``lam`` is then recomputed from the box as clipped to the image). With both alphas above 0, each
batch uses one of the two, CutMix with probability ``switch_prob`` (timm's 0.5). Targets become
``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``, with label smoothing ``eps`` spreading ``eps / K`` over
the ``K`` classes (on value ``1 - eps + eps / K``: ``nn.CrossEntropyLoss(label_smoothing=eps)``'s target);
the loss is the soft-target cross-entropy ``mean(sum(-target * log_softmax(logits)))``.

Images are mixed after normalisation (mixing is linear, so this equals normalising mixed pixels, and uint8
never has to hold a blend). Random draws use torch's CPU generator (the trainer seeds it and checkpoints it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["MixupCutmix", "soft_targets", "soft_target_cross_entropy", "cutmix_box"]


def soft_targets(labels: torch.Tensor, num_classes: int, lam: float = 1.0, smoothing: float = 0.0) -> torch.Tensor:
    """``lam * smooth(one_hot(labels)) + (1 - lam) * smooth(one_hot(labels.flip(0)))`` (float32, (N, K))."""
    off = smoothing / num_classes
    one_hot = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    one_hot.scatter_(1, labels.view(-1, 1).long(), 1.0 - smoothing + off)
    return one_hot * lam + one_hot.flip(0) * (1.0 - lam) if lam != 1.0 else one_hot


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean over the batch of sum over classes of -target * log_softmax(logits)`` (in float32)."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def cutmix_box(lam: float, height: int, width: int) -> tuple[int, int, int, int]:
    """A box (y0, y1, x0, x1) of side ``sqrt(1 - lam)`` of the image's, centred uniformly, clipped to it."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y0, y1, x0, x1


def _beta(alpha: float) -> float:
    alpha_t = torch.tensor(float(alpha))
    return float(torch.distributions.Beta(alpha_t, alpha_t).sample())


class MixupCutmix:
    """``(images, labels) -> (mixed images, soft targets)``; ``mixup``/``cutmix``: the Beta alphas (0: off).

    ``mixup`` may change between batches (EfficientNetV2's progressive learning raises it stage by stage).
    ``last``: ``(kind, lam)`` of the latest batch (``"none"``, ``"mixup"`` or ``"cutmix"``), for tests and logs.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0, label_smoothing: float = 0.0,
                 switch_prob: float = 0.5):
        self.num_classes, self.mixup, self.cutmix = int(num_classes), float(mixup), float(cutmix)
        self.label_smoothing, self.switch_prob = float(label_smoothing), float(switch_prob)
        self.last: tuple[str, float] = ("none", 1.0)

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        use_cutmix = self.cutmix > 0 and (self.mixup <= 0 or bool(torch.rand(()) < self.switch_prob))
        if use_cutmix:
            lam = _beta(self.cutmix)
            y0, y1, x0, x1 = cutmix_box(lam, *images.shape[-2:])
            images = images.clone()
            images[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
            lam = 1.0 - (y1 - y0) * (x1 - x0) / float(images.shape[-2] * images.shape[-1])
        elif self.mixup > 0:
            lam = _beta(self.mixup)
            images = images * lam + images.flip(0) * (1.0 - lam)
        else:
            lam = 1.0
        self.last = ("cutmix" if use_cutmix else "mixup" if self.mixup > 0 else "none", lam)
        return images, soft_targets(labels, self.num_classes, lam, self.label_smoothing)

    def __repr__(self) -> str:
        return (f"MixupCutmix(mixup={self.mixup:g}, cutmix={self.cutmix:g}, label_smoothing={self.label_smoothing:g}, "
                f"switch_prob={self.switch_prob:g})")
