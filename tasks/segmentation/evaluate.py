"""Segmentation evaluation: one confusion matrix over the split, on the device; IoU as the Cityscapes script.

Evaluation targets (what the segmentation datasets + ``tasks.data.seg_common.collate_eval`` yield)::

    targets = {
        "masks":      int64 (N, Hm, Wm)  labels at the ORIGINAL resolution, padded with ignore_index (255),
        "image_size": int64 (N, 2)       valid (h, w) of each image on the input canvas (the rest is padding),
        "orig_size":  int64 (N, 2)       (h, w) of each original image = the valid part of its mask,
        "image_id":   list[str]          (not used here),
    }

For each image the evaluator crops the logits to ``image_size``, resizes them (bilinear) to
``orig_size`` when the input was resized, takes the argmax and compares it with the cropped mask:
predictions go to the label's resolution, never labels to the prediction's. A plain int64 tensor of
masks with the logits' size is accepted too.

Metrics: per-class IoU = TP / (TP + FP + FN) over pixels whose truth is a class (ignore pixels and
out-of-range labels leave the matrix); ``mIoU`` averages the classes that occur in truth or
prediction (the others have no IoU, as in cityscapesScripts); ``pixel_acc`` = trace / total; with
``categories`` (e.g. Cityscapes' 7), the same on the category-level matrix (``mIoU_category``). A
split without a single labelled pixel has no metrics: ``compute()`` raises a one-line ``DataError``.
Under torch.distributed the matrix is summed over ranks, so every rank returns the same numbers; a
rank with an empty shard still joins (its matrix exists from ``reset``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from tasks.data.errors import DataError
from tasks.engine.distributed import all_reduce_sum_

__all__ = ["SegmentationEvaluator", "labels_at_original"]


def labels_at_original(logits: torch.Tensor, image_size: Sequence[int] | None = None,
                       orig_size: Sequence[int] | None = None) -> torch.Tensor:
    """One image's logits (C, H, W) on the canvas -> int64 labels (h, w) at its original size."""
    if image_size is not None:
        logits = logits[:, : int(image_size[0]), : int(image_size[1])]
    if orig_size is not None and tuple(int(s) for s in orig_size) != tuple(logits.shape[-2:]):
        size = (int(orig_size[0]), int(orig_size[1]))
        logits = F.interpolate(logits.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False)[0]
    return logits.argmax(dim=0)


class SegmentationEvaluator:
    """``reset() / update(logits, targets) / compute()`` over a whole split (see the module docstring).

    ``categories``: ``[(name, [class indices]), ...]`` for a category-level mIoU.
    """

    primary_metric = "mIoU"
    higher_is_better = True

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = 255,
                 categories: Sequence[tuple[str, Sequence[int]]] | None = None, device: torch.device | str = "cpu"):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names; expected num_classes={num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(num_classes)]
        self.categories = [(name, list(members)) for name, members in categories] if categories else None
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.long, device=self.device)
        self._last: dict[str, torch.Tensor] = {}

    def add(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        """Count one pair of int label maps of the same shape (truth outside [0, C) is skipped)."""
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ in size")
        c = self.num_classes
        truth, prediction = truth.reshape(-1).to(self.device), prediction.reshape(-1).to(self.device)
        valid = (truth >= 0) & (truth < c)
        pairs = truth[valid] * c + prediction[valid].clamp(0, c - 1)
        self.confusion += torch.bincount(pairs, minlength=c * c).view(c, c)

    def update(self, logits: torch.Tensor, targets) -> None:
        if isinstance(logits, (tuple, list)):  # (logits, aux_logits)
            logits = logits[0]
        if torch.is_tensor(targets):
            if targets.shape[-2:] != logits.shape[-2:]:
                raise ValueError(f"masks {tuple(targets.shape)} and logits {tuple(logits.shape)} differ in size; "
                                 f"pass the evaluation targets dict (masks, image_size, orig_size)")
            self.add(logits.argmax(dim=1), targets)
            return
        masks = targets["masks"]
        image_size, orig_size = targets.get("image_size"), targets.get("orig_size")
        for i in range(logits.shape[0]):
            valid = image_size[i].tolist() if image_size is not None else None
            orig = orig_size[i].tolist() if orig_size is not None else list(masks.shape[-2:])
            labels = labels_at_original(logits[i], valid, orig)
            self.add(labels, masks[i, : orig[0], : orig[1]])

    def compute(self) -> dict[str, float]:
        confusion = self.confusion.clone()
        all_reduce_sum_(confusion)
        if confusion.sum() == 0:
            raise DataError(f"segmentation evaluation: no labelled pixels were evaluated: the validation split is "
                            f"empty or every pixel of its masks is ignore_index={self.ignore_index} (or outside "
                            f"0..{self.num_classes - 1}); expected masks with class labels, check data.val_split "
                            f"and data.ignore_index (`effdense data check` names the folder)")
        iou = _iou(confusion)
        metrics = {"mIoU": _nanmean(iou), "pixel_acc": (confusion.diag().sum().double() / confusion.sum()).item()}
        for name, value in zip(self.class_names, iou.tolist()):
            if value == value:  # classes with neither truth nor prediction have no IoU
                metrics[f"iou/{name}"] = value
        if self.categories:
            assign = torch.zeros(len(self.categories), self.num_classes, dtype=torch.double, device=confusion.device)
            for k, (_, members) in enumerate(self.categories):
                assign[k, members] = 1.0
            category_iou = _iou(assign @ confusion.double() @ assign.T)
            metrics["mIoU_category"] = _nanmean(category_iou)
            for (name, _), value in zip(self.categories, category_iou.tolist()):
                if value == value:
                    metrics[f"iou_category/{name}"] = value
        self._last = {"iou": iou, "truth": confusion.sum(1).double(), "metrics": metrics}
        return metrics

    def per_class(self) -> list[tuple[str, float | None]]:
        """(class name, IoU or None when absent) for the last ``compute()``: the per-class table."""
        iou = self._last.get("iou")
        if iou is None:
            raise RuntimeError("per_class() needs compute() first")
        return [(name, value if value == value else None) for name, value in zip(self.class_names, iou.tolist())]


    def table(self) -> str:
        """The per-class IoU table of the last ``compute()``, as aligned text (absent classes: "-")."""
        rows = self.per_class()
        truth = self._last["truth"]
        share = (truth / truth.sum().clamp(min=1)).tolist()
        width = max(len("mIoU (categories)"), *(len(name) for name, _ in rows))
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'pixels':>7}", "-" * (width + 18)]
        lines += [f"{name:<{width}}  {'-' if value is None else f'{value:.4f}':>7}  {share[i]:>6.1%}"
                  for i, (name, value) in enumerate(rows)]
        metrics = self._last["metrics"]
        lines.append(f"{'mIoU':<{width}}  {metrics['mIoU']:>7.4f}  (pixel accuracy {metrics['pixel_acc']:.4f})")
        if "mIoU_category" in metrics:
            lines.append(f"{'mIoU (categories)':<{width}}  {metrics['mIoU_category']:>7.4f}")
        return "\n".join(lines)

    def save(self, directory) -> None:
        """``per_class_iou.txt`` (the table) and ``per_class_iou.csv`` (class,iou,pixel_share) in ``directory``."""
        from pathlib import Path

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        truth = self._last["truth"]
        share = (truth / truth.sum().clamp(min=1)).tolist()
        (folder / "per_class_iou.txt").write_text(self.table() + "\n")
        csv = ["class,iou,pixel_share"] + [f"{name},{'' if value is None else f'{value:.6f}'},{share[i]:.6f}"
                                           for i, (name, value) in enumerate(self.per_class())]
        (folder / "per_class_iou.csv").write_text("\n".join(csv) + "\n")


def _iou(confusion: torch.Tensor) -> torch.Tensor:
    confusion = confusion.double()
    tp = confusion.diag()
    denominator = confusion.sum(0) + confusion.sum(1) - tp
    return torch.where(denominator > 0, tp / denominator.clamp(min=1), torch.full_like(tp, float("nan")))


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return present.mean().item() if present.numel() else float("nan")
