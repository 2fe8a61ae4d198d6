"""The classification network (backbone + classifier head) and its task module (label-smoothed cross-entropy;
with Mixup / CutMix, the soft-target cross-entropy of the mixed batch)."""

from __future__ import annotations

import torch
from torch import nn

import backbones
from heads import ClassificationHead

from tasks.config.scaling import backbone_build
from tasks.config.schema import IMAGENET_MEAN, IMAGENET_STD
from tasks.engine.normalize import PixelNormalization, pixel_options

from .evaluate import TopKEvaluator
from .mixup import MixupCutmix, soft_target_cross_entropy


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


class ClassificationTask(PixelNormalization):
    """The task protocol for classification: uint8 images in; losses (train) or logits (eval) out.

    ``mixup``/``cutmix``: Beta alphas (0: off) of :class:`~tasks.classification.mixup.MixupCutmix`, applied to
    normalised training batches; the loss is then the soft-target cross-entropy (label smoothing inside the
    targets, as timm's ``mixup_target``), still logged as ``cross_entropy``. ``self.mix.mixup`` may be changed
    between epochs (progressive learning)."""

    primary_metric = "top1"

    def __init__(self, net: Classifier, mean=IMAGENET_MEAN, std=IMAGENET_STD, label_smoothing: float = 0.0,
                 class_names: list[str] | None = None, mixup: float = 0.0, cutmix: float = 0.0, **pixel):
        super().__init__(mean, std, **pixel)  # normalisation on the device (pixel: input_range / percentiles)
        self.net = net
        self.class_names = class_names  # stored with the weights; predict reads them back
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.mix = MixupCutmix(net.head.num_classes, mixup, cutmix, label_smoothing)

    @property
    def num_classes(self) -> int:
        return self.net.head.num_classes

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        images = self.normalize(images)
        if self.training and self.mix.active:
            images, soft = self.mix(images, targets)
            return {"cross_entropy": soft_target_cross_entropy(self.net(images), soft)}
        logits = self.net(images)
        if self.training:
            return {"cross_entropy": self.criterion(logits, targets)}
        return logits

    def make_evaluator(self) -> TopKEvaluator:
        # Top-5 says nothing with five classes or fewer.
        return TopKEvaluator(topk=(1, 5) if self.num_classes > 5 else (1,), device=self.pixel_mean.device)


def build_model(cfg) -> ClassificationTask:
    """The classification task module described by a ``tasks.config.ClassificationConfig``.

    ``model.weights`` fills the whole classifier (EMA weights of an effdense checkpoint when it has
    them); ``model.backbone_weights`` only the backbone.
    """
    model_cfg = cfg.model
    name, options = backbone_build(model_cfg)
    dropout = model_cfg.dropout
    if dropout is None and model_cfg.phi is not None:  # a fractional phi: between the two rows' dropouts
        from tasks.config.scaling import backbone_at

        dropout = backbone_at(model_cfg.phi)[3]
    net = build_classifier(name, num_classes=model_cfg.num_classes, weights=model_cfg.weights,
                           dropout=dropout, drop_path=model_cfg.drop_path,
                           padding=model_cfg.padding, **options)
    if model_cfg.backbone_weights is not None and model_cfg.weights is None:  # whole-model weights replace them
        from backbones.weights import load_weights

        load_weights(net.backbone, model_cfg.backbone_weights)
    augment = cfg.data.augment
    return ClassificationTask(net, **pixel_options(cfg), label_smoothing=cfg.loss.label_smoothing,
                              mixup=augment.mixup, cutmix=augment.cutmix)
