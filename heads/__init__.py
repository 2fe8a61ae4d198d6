"""Heads for EfficientNet backbones: classification, U-Net segmentation (BiFPN/EfficientDet to follow)."""

from .classification import ClassificationHead
from .unet import SCSE, AuxClassificationHead, SegmentationHead, UNetDecoder

__all__ = ["AuxClassificationHead", "ClassificationHead", "SCSE", "SegmentationHead", "UNetDecoder"]
