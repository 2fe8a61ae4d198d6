"""Object detection: EfficientDet D0..D7x (or any phi) in torchvision's convention, focal + Huber training,
COCO evaluation through pycocotools, hard or soft NMS, and effdet's checkpoints.

>>> from tasks.detection import build_detector
>>> det = build_detector("efficientdet-d0", num_classes=80)   # float normalised images -> losses / detections
"""

from .evaluate import CocoEvaluator
from .model import DetectionTask, EfficientDetector, build_detector, build_model, pad_targets
from .postprocess import PostProcess, postprocess
from .predict import draw_detections, predict, predict_paths
from .scale import describe_scale

__all__ = ["EfficientDetector", "DetectionTask", "CocoEvaluator", "PostProcess", "build_detector", "build_model",
           "postprocess", "predict", "predict_paths", "draw_detections", "pad_targets", "describe_scale"]
