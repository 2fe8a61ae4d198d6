"""Image classification: backbone + classifier head, label-smoothed cross-entropy, top-1/top-5."""

from __future__ import annotations

import torch
from torch import nn

import backbones
from heads import ClassificationHead


class Classifier(nn.Module):
    """An EfficientNet classifier: ``backbone`` (s32 tap only) followed by ``head``; returns logits."""

    def __init__(self, backbone: backbones.EfficientNet, head: ClassificationHead):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self._tap = backbone.feature_info[-1].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[self._tap])


def build_classifier(name: str, num_classes: int = 1000, weights: str | None = None, *,
                     dropout: float | None = None, **options) -> Classifier:
    """Backbone ``name`` + its classifier head as one module whose output is logits.

    ``weights``: a classifier checkpoint from torchvision, timm, EfficientNet-PyTorch or effdense
    (path), or ``"imagenet"``. ``options`` go to ``backbones.create`` (``phi``, ``padding``, ...).
    When ``num_classes`` differs from the checkpoint's, the final linear layer is left freshly
    initialised (and a message says so), as in timm.
    """
    backbone = backbones.create(name, out_indices=(4,), **options)
    model = Classifier(backbone, ClassificationHead.for_backbone(backbone, num_classes, dropout=dropout))
    if weights is not None:
        from backbones.weights import load_weights

        load_weights(model, weights)
    return model
