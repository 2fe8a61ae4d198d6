"""Image classification: an EfficientNet backbone + classifier head, trained with label-smoothed
cross-entropy, scored by top-1 / top-5.

>>> from tasks.classification import build_classifier
>>> clf = build_classifier("efficientnet-b0", num_classes=10)      # float normalised images -> logits
"""

from .evaluate import TopKEvaluator
from .model import ClassificationTask, Classifier, build_classifier, build_model
from .predict import class_names_of, imagenet_categories, predict
from .progressive import epoch_callbacks, progressive_callback
from .scale import describe_scale

__all__ = ["Classifier", "ClassificationTask", "TopKEvaluator", "build_classifier", "build_model", "predict",
           "class_names_of", "imagenet_categories", "describe_scale", "progressive_callback", "epoch_callbacks"]
