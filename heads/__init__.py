"""Heads for EfficientNet backbones: classification, U-Net and BiFPN segmentation (+ mmseg's FCN auxiliary
head), BiFPN + EfficientDet detection."""

from .bifpn import BiFPN
from .bifpn_seg import BiFPNSegDecoder, BiFPNSegHead
from .classification import ClassificationHead
from .efficientdet import EfficientDet, EfficientDetPreset, efficientdet_preset, list_presets
from .fcn import FCNHead
from .unet import SCSE, AuxClassificationHead, SegmentationHead, UNetDecoder

__all__ = ["AuxClassificationHead", "BiFPN", "BiFPNSegDecoder", "BiFPNSegHead", "ClassificationHead", "EfficientDet", "EfficientDetPreset", "FCNHead", "SCSE",
           "SegmentationHead", "UNetDecoder", "efficientdet_preset", "list_presets"]
