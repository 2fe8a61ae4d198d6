"""Heads for EfficientNet backbones: classification, U-Net and BiFPN segmentation, BiFPN + EfficientDet detection."""

from .bifpn import BiFPN
from .bifpn_seg import BiFPNSegDecoder, BiFPNSegHead
from .classification import ClassificationHead
from .efficientdet import EfficientDet, EfficientDetPreset, efficientdet_preset, list_presets
from .unet import SCSE, AuxClassificationHead, SegmentationHead, UNetDecoder

__all__ = ["AuxClassificationHead", "BiFPN", "BiFPNSegDecoder", "BiFPNSegHead", "ClassificationHead", "EfficientDet", "EfficientDetPreset", "SCSE",
           "SegmentationHead", "UNetDecoder", "efficientdet_preset", "list_presets"]
