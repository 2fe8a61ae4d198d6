"""Image classification: backbone + classifier head, label-smoothed cross-entropy, top-1/top-5, predict."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

import backbones
from heads import ClassificationHead

from .schema import backbone_spec


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
                 label_smoothing: float = 0.0, class_names: list[str] | None = None):
        super().__init__()
        self.net = net
        self.class_names = class_names  # stored with the weights; predict reads them back
        # Normalisation runs on the device, on uint8 input: (x - 255 * mean) * 1 / (255 * std).
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_scale", 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255), persistent=False)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    @property
    def num_classes(self) -> int:
        return self.net.head.num_classes

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) images -> normalised float; the input is never modified."""
        return (images.float() - self.pixel_mean) * self.pixel_scale

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
    """The classification task module described by a ``tasks.config.ClassificationConfig``.

    ``model.weights`` fills the whole classifier (EMA weights of an effdense checkpoint when it has
    them); ``model.backbone_weights`` only the backbone.
    """
    model_cfg = cfg.model
    name, options = backbone_spec(model_cfg)
    for key in ("norm_eps", "norm_momentum"):
        if getattr(model_cfg, key) is not None:
            options[key] = getattr(model_cfg, key)
    dropout = model_cfg.dropout
    if dropout is None and model_cfg.phi is not None:  # a fractional phi: between the two rows' dropouts
        from .scaling import backbone_at

        dropout = backbone_at(model_cfg.phi)[3]
    net = build_classifier(name, num_classes=model_cfg.num_classes, weights=model_cfg.weights,
                           dropout=dropout, drop_path=model_cfg.drop_path,
                           padding=model_cfg.padding, **options)
    if model_cfg.backbone_weights is not None:
        from backbones.weights import load_weights

        load_weights(net.backbone, model_cfg.backbone_weights)
    return ClassificationTask(net, mean=cfg.data.mean, std=cfg.data.std,
                              label_smoothing=cfg.loss.label_smoothing)


def imagenet_categories() -> list[str]:
    """The 1000 ImageNet class names, in label order (they ship with torchvision; nothing is downloaded)."""
    from torchvision.models import EfficientNet_B0_Weights

    return list(EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"])


def class_names_of(model: ClassificationTask) -> list[str]:
    """The names stored with the weights, else ImageNet's for a 1000-class model, else "0", "1", ..."""
    if model.class_names is not None and len(model.class_names) == model.num_classes:
        return list(model.class_names)
    if model.num_classes == 1000:
        return imagenet_categories()
    return [str(i) for i in range(model.num_classes)]


@torch.no_grad()
def predict(cfg, model: ClassificationTask, paths: list[str], out: str | None = None, topk: int = 5,
            **_options) -> list[dict]:
    """Top-k labels of each image (printed); ``out``: also ``<out>/predictions.json``."""
    from .config import resolve_image_size
    from .data.imagefolder import read_rgb
    from .data.transforms import classification_eval_transform

    model.eval()
    device = next(model.parameters()).device
    classes = class_names_of(model)
    transform = classification_eval_transform(cfg.data.augment, resolve_image_size(cfg))
    results = []
    for path in paths:
        image = transform(read_rgb(path)).unsqueeze(0).to(device)
        probs = model(image).float().softmax(dim=1)[0]
        top = probs.topk(min(topk, probs.numel()))
        labels = [{"label": classes[i], "index": int(i), "prob": round(float(p), 5)}
                  for p, i in zip(top.values.tolist(), top.indices.tolist())]
        results.append({"image": str(path), "top": labels})
        print(f"{path}: " + ", ".join(f"{item['label']} {item['prob']:.3f}" for item in labels))
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "predictions.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {folder / 'predictions.json'}")
    return results
