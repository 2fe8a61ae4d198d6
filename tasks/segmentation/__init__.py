"""Semantic segmentation: an EfficientNet backbone + U-Net or BiFPN head, smp's losses, the Cityscapes
evaluator's mIoU, sliding-window and TTA inference, and smp interop.

>>> from tasks.segmentation import build_segmenter, register_smp_encoders
>>> unet = build_segmenter("efficientnet-b3", num_classes=19)        # float normalised images -> logits
"""

from .build import build_model, build_segmenter, demo_overrides
from .evaluate import SegmentationEvaluator
from .inference import slide_logits
from .losses import SegmentationLoss
from .model import SegmentationTask, Segmenter
from .predict import predict
from .scale import describe_scale
from .smp import register_smp_encoders

__all__ = ["Segmenter", "SegmentationTask", "SegmentationEvaluator", "SegmentationLoss", "build_segmenter",
           "build_model", "demo_overrides", "predict", "register_smp_encoders", "slide_logits", "describe_scale"]
