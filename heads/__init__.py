"""Heads for EfficientNet backbones: classification (U-Net and BiFPN/EfficientDet to follow)."""

from .classification import ClassificationHead

__all__ = ["ClassificationHead"]
