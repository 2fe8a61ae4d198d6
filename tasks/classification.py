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


class ClassificationTask(nn.Module):
    """The task protocol for classification: uint8 images in; losses (train) or logits (eval) out."""

    primary_metric = "top1"

    def __init__(self, net: Classifier, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                 label_smoothing: float = 0.0):
        super().__init__()
        self.net = net
        # Normalisation runs on the device, on uint8 input: (x - 255 * mean) * 1 / (255 * std).
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_scale", 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255), persistent=False)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    @property
    def num_classes(self) -> int:
        return self.net.head.num_classes

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().sub_(self.pixel_mean).mul_(self.pixel_scale)

    def forward(self, images: torch.Tensor, targets: torch.Tensor | None = None):
        logits = self.net(self.normalize(images))
        if self.training:
            return {"cross_entropy": self.criterion(logits, targets)}
        return logits

    def make_evaluator(self) -> "TopKEvaluator":
        # Top-5 says nothing with five classes or fewer.
        return TopKEvaluator(topk=(1, 5) if self.num_classes > 5 else (1,), device=self.pixel_mean.device)


class TopKEvaluator:
    """Top-1/top-5 accuracy over a whole split; counts stay on the device until ``compute``."""

    primary_metric = "top1"
    higher_is_better = True

    def __init__(self, topk: tuple[int, ...] = (1, 5), device: torch.device | str = "cpu"):
        self.topk, self.device = topk, torch.device(device)
        self.reset()

    def reset(self) -> None:
        # Counts exist from the start, so a rank whose shard is empty still joins the all-reduce.
        self.correct = torch.zeros(len(self.topk), dtype=torch.long, device=self.device)
        self.total = torch.zeros((), dtype=torch.long, device=self.device)

    def update(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        top = logits.topk(max(self.topk), dim=1).indices
        hits = top.eq(targets.view(-1, 1))
        self.correct += torch.stack([hits[:, :k].any(dim=1).sum() for k in self.topk]).to(self.device)
        self.total += targets.numel()

    def compute(self) -> dict[str, float]:
        counts = torch.cat([self.correct, self.total.view(1)]).double()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)
        total = counts[-1].item()
        if total == 0:
            raise RuntimeError("TopKEvaluator.compute(): no samples were evaluated (empty validation split?)")
        return {f"top{k}": counts[i].item() / total for i, k in enumerate(self.topk)}


def build_model(cfg) -> ClassificationTask:
    """The classification task module described by a ``tasks.config.Config``."""
    model_cfg = cfg.model
    name, options = model_cfg.backbone, {}
    if model_cfg.phi is not None:
        name, options["phi"] = "efficientnet", model_cfg.phi
    for key in ("norm_eps", "norm_momentum"):
        if getattr(model_cfg, key) is not None:
            options[key] = getattr(model_cfg, key)
    net = build_classifier(name, num_classes=model_cfg.num_classes, weights=model_cfg.weights,
                           dropout=model_cfg.dropout, drop_path=model_cfg.drop_path,
                           padding=model_cfg.padding, **options)
    return ClassificationTask(net, mean=cfg.data.mean, std=cfg.data.std,
                              label_smoothing=cfg.loss.label_smoothing)
