"""Segmentation evaluation over a whole split, on the device: IoU as the Cityscapes script, Dice beside it, in
smp's three modes (``model.segmentation.mode``).

Evaluation targets (what the segmentation datasets + ``tasks.data.seg_common.collate_eval`` yield)::

    targets = {
        "masks":      int64 (N, Hm, Wm)  labels at the ORIGINAL resolution, padded with ignore_index (255);
                      multilabel: (N, C, Hm, Wm) 0/1 per channel; binary: (N, Hm, Wm) 0/1
        "image_size": int64 (N, 2)       valid (h, w) of each image on the input canvas (the rest is padding),
        "orig_size":  int64 (N, 2)       (h, w) of each original image = the valid part of its mask,
        "image_id":   list[str]          (not used here),
    }

For each image the evaluator crops the logits to ``image_size``, resizes them (bilinear) to
``orig_size`` when the input was resized, then takes the argmax (multiclass) or ``sigmoid > threshold``
per channel (binary, multilabel) and compares that with the cropped mask: predictions go to the label's
resolution, never labels to the prediction's. A plain int64 tensor of masks with the logits' size is
accepted too.

Counts. Multiclass: one confusion matrix over pixels whose truth is a class (ignore pixels and
out-of-range labels leave it). Binary / multilabel: per channel TP, FP, FN, TN over the pixels whose truth
is 0 or 1 in that channel (ignore pixels leave that channel only).

Metrics (flat names): per class ``iou/<name>`` = TP / (TP + FP + FN) and ``dice/<name>`` = 2 TP /
(2 TP + FP + FN) (F1); ``mIoU`` and ``mDice`` average the classes that occur in truth or prediction (the
others have neither, as in cityscapesScripts); ``pixel_acc`` = correct / counted pixels (multiclass:
trace / total; binary / multilabel: (TP + TN) / all counted channel-pixels). Binary has one class (the
foreground, value 1): its ``mIoU`` is the foreground's IoU and ``mDice`` its Dice -- the background is
not averaged in. With ``categories`` (multiclass, e.g. Cityscapes' 7), the same IoU on the category-level
matrix (``mIoU_category``). A split without a single labelled pixel has no metrics: ``compute()`` raises
a one-line ``DataError``. Under torch.distributed the counts are summed over ranks, so every rank returns
the same numbers; a rank with an empty shard still joins (its counts exist from ``reset``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from tasks.data.errors import DataError
from tasks.engine.distributed import all_reduce_sum_

__all__ = ["SegmentationEvaluator", "labels_at_original", "logits_at_original", "MODES"]

MODES = ("multiclass", "binary", "multilabel")


def logits_at_original(logits: torch.Tensor, image_size: Sequence[int] | None = None,
                       orig_size: Sequence[int] | None = None) -> torch.Tensor:
    """One image's logits (C, H, W) on the canvas -> float logits (C, h, w) at its original size."""
    if image_size is not None:
        logits = logits[:, : int(image_size[0]), : int(image_size[1])]
    if orig_size is not None and tuple(int(s) for s in orig_size) != tuple(logits.shape[-2:]):
        size = (int(orig_size[0]), int(orig_size[1]))
        logits = F.interpolate(logits.unsqueeze(0).float(), size=size, mode="bilinear", align_corners=False)[0]
    return logits


def labels_at_original(logits: torch.Tensor, image_size: Sequence[int] | None = None,
                       orig_size: Sequence[int] | None = None) -> torch.Tensor:
    """One image's logits (C, H, W) on the canvas -> int64 labels (h, w) at its original size (argmax)."""
    return logits_at_original(logits, image_size, orig_size).argmax(dim=0)


class SegmentationEvaluator:
    """``reset() / update(logits, targets) / compute()`` over a whole split (see the module docstring).

    ``mode``: ``multiclass`` (argmax), ``binary`` (one channel) or ``multilabel`` (C channels): a pixel is
    the class where its sigmoid is above ``threshold``. ``categories`` (multiclass):
    ``[(name, [class indices]), ...]`` for a category-level mIoU.
    """

    primary_metric = "mIoU"
    higher_is_better = True

    def __init__(self, num_classes: int, class_names: Sequence[str] | None = None, ignore_index: int = 255,
                 categories: Sequence[tuple[str, Sequence[int]]] | None = None, device: torch.device | str = "cpu",
                 mode: str = "multiclass", threshold: float = 0.5):
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names; expected num_classes={num_classes}")
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
        if mode == "binary" and num_classes != 1:
            raise ValueError(f"mode='binary' scores one sigmoid channel; expected num_classes=1, got {num_classes}")
        if categories and mode != "multiclass":
            raise ValueError(f"categories group the classes of mode='multiclass'; mode={mode!r} has none")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold={threshold} must be in (0, 1)")
        self.num_classes, self.ignore_index, self.mode, self.threshold = num_classes, ignore_index, mode, threshold
        default = ["foreground"] if mode == "binary" else [str(i) for i in range(num_classes)]
        self.class_names = list(class_names) if class_names is not None else default
        self.categories = [(name, list(members)) for name, members in categories] if categories else None
        self.device = torch.device(device)
        self.reset()

    def reset(self) -> None:
        c = self.num_classes
        if self.mode == "multiclass":
            self.confusion = torch.zeros(c, c, dtype=torch.long, device=self.device)
        else:  # per channel: TP, FP, FN, TN
            self.counts = torch.zeros(c, 4, dtype=torch.long, device=self.device)
        self._last: dict = {}

    def add(self, prediction: torch.Tensor, truth: torch.Tensor) -> None:
        """Count one pair of the same shape. Multiclass: int label maps (truth outside [0, C) is skipped).
        Binary / multilabel: 0/1 (or bool) maps with the channels at dim -3 ((C, H, W) or (N, C, H, W));
        truth other than 0 or 1 (``ignore_index``) is skipped in its channel."""
        if prediction.shape != truth.shape:
            raise ValueError(f"prediction {tuple(prediction.shape)} and truth {tuple(truth.shape)} differ in size")
        c = self.num_classes
        truth, prediction = truth.to(self.device), prediction.to(self.device)
        if self.mode != "multiclass":
            if truth.dim() < 3 or truth.shape[-3] != c:
                raise ValueError(f"truth {tuple(truth.shape)}: expected the {c} channels at dim -3")
            truth, prediction = truth.movedim(-3, 0).reshape(c, -1), prediction.movedim(-3, 0).reshape(c, -1).bool()
            positive, negative = truth == 1, truth == 0
            self.counts += torch.stack([(prediction & positive).sum(1), (prediction & negative).sum(1),
                                        (~prediction & positive).sum(1), (~prediction & negative).sum(1)], dim=1)
            return
        truth, prediction = truth.reshape(-1), prediction.reshape(-1)
        valid = (truth >= 0) & (truth < c)
        pairs = truth[valid] * c + prediction[valid].clamp(0, c - 1)
        self.confusion += torch.bincount(pairs, minlength=c * c).view(c, c)

    def _decide(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (..., C, H, W) -> argmax labels (multiclass) or per-channel 0/1 maps."""
        if self.mode == "multiclass":
            return logits.argmax(dim=-3)
        return logits.float().sigmoid() > self.threshold

    def update(self, logits: torch.Tensor, targets) -> None:
        if isinstance(logits, (tuple, list)):  # (logits, aux_logits)
            logits = logits[0]
        if torch.is_tensor(targets):
            if targets.shape[-2:] != logits.shape[-2:]:
                raise ValueError(f"masks {tuple(targets.shape)} and logits {tuple(logits.shape)} differ in size; "
                                 f"pass the evaluation targets dict (masks, image_size, orig_size)")
            if self.mode == "binary" and targets.dim() == 3:
                targets = targets.unsqueeze(1)
            self.add(self._decide(logits), targets)
            return
        masks = targets["masks"]
        image_size, orig_size = targets.get("image_size"), targets.get("orig_size")
        for i in range(logits.shape[0]):
            valid = image_size[i].tolist() if image_size is not None else None
            orig = orig_size[i].tolist() if orig_size is not None else list(masks.shape[-2:])
            truth = masks[i, ..., : orig[0], : orig[1]]
            if self.mode == "binary" and truth.dim() == 2:
                truth = truth.unsqueeze(0)
            self.add(self._decide(logits_at_original(logits[i], valid, orig)), truth)

    def _class_counts(self) -> tuple[torch.Tensor, ...]:
        """(TP, FP, FN, counted pixels per class, correct pixels), summed over ranks; multiclass counts every
        pixel once for all classes, binary / multilabel per channel."""
        if self.mode == "multiclass":
            confusion = self.confusion.clone()
            all_reduce_sum_(confusion)
            self._confusion = confusion = confusion.double()
            tp = confusion.diag()
            return tp, confusion.sum(0) - tp, confusion.sum(1) - tp, confusion.sum().expand_as(tp), tp.sum()
        counts = self.counts.clone()
        all_reduce_sum_(counts)
        tp, fp, fn, tn = counts.double().unbind(1)
        return tp, fp, fn, tp + fp + fn + tn, (tp + tn).sum()

    def compute(self) -> dict[str, float]:
        tp, fp, fn, counted, correct = self._class_counts()
        total = counted[0].item() if self.mode == "multiclass" else counted.sum().item()
        if total == 0:
            values = f"0..{self.num_classes - 1}" if self.mode == "multiclass" else "0 or 1"
            raise DataError(f"segmentation evaluation: no labelled pixels were evaluated: the validation split is "
                            f"empty or every pixel of its masks is ignore_index={self.ignore_index} (or not "
                            f"{values}); expected masks with class labels, check data.val_split "
                            f"and data.ignore_index (`effdense data check` names the folder)")
        iou, dice = _ratio(tp, tp + fp + fn), _ratio(2 * tp, 2 * tp + fp + fn)
        metrics = {"mIoU": _nanmean(iou), "mDice": _nanmean(dice), "pixel_acc": correct.item() / total}
        for name, value in zip(self.class_names, iou.tolist()):
            if value == value:  # classes with neither truth nor prediction have no IoU
                metrics[f"iou/{name}"] = value
        for name, value in zip(self.class_names, dice.tolist()):
            if value == value:
                metrics[f"dice/{name}"] = value
        if self.categories:
            confusion = self._confusion
            assign = torch.zeros(len(self.categories), self.num_classes, dtype=torch.double, device=confusion.device)
            for k, (_, members) in enumerate(self.categories):
                assign[k, members] = 1.0
            grouped = assign @ confusion @ assign.T
            category_iou = _ratio(grouped.diag(), grouped.sum(0) + grouped.sum(1) - grouped.diag())
            metrics["mIoU_category"] = _nanmean(category_iou)
            for (name, _), value in zip(self.categories, category_iou.tolist()):
                if value == value:
                    metrics[f"iou_category/{name}"] = value
        share = (tp + fn) / counted.clamp(min=1)  # each class's share of its counted pixels
        self._last = {"iou": iou, "dice": dice, "share": share, "metrics": metrics}
        return metrics

    def per_class(self) -> list[tuple[str, float | None]]:
        """(class name, IoU or None when absent) for the last ``compute()``: the per-class table."""
        iou = self._last.get("iou")
        if iou is None:
            raise RuntimeError("per_class() needs compute() first")
        return [(name, value if value == value else None) for name, value in zip(self.class_names, iou.tolist())]

    def table(self) -> str:
        """The per-class IoU / Dice table of the last ``compute()``, as aligned text (absent classes: "-")."""
        rows = self.per_class()
        dice, share = self._last["dice"].tolist(), self._last["share"].tolist()
        width = max(len("mIoU (categories)"), *(len(name) for name, _ in rows))
        show = lambda v: "-" if v is None or v != v else f"{v:.4f}"  # noqa: E731
        pixels = "pixels" if self.mode == "multiclass" else "pos."
        lines = [f"{'class':<{width}}  {'IoU':>7}  {'Dice':>7}  {pixels:>7}", "-" * (width + 27)]
        lines += [f"{name:<{width}}  {show(value):>7}  {show(dice[i]):>7}  {share[i]:>6.1%}"
                  for i, (name, value) in enumerate(rows)]
        metrics = self._last["metrics"]
        lines.append(f"{'mean':<{width}}  {metrics['mIoU']:>7.4f}  {metrics['mDice']:>7.4f}  "
                     f"(mIoU, mDice; pixel accuracy {metrics['pixel_acc']:.4f})")
        if "mIoU_category" in metrics:
            lines.append(f"{'mIoU (categories)':<{width}}  {metrics['mIoU_category']:>7.4f}")
        return "\n".join(lines)

    def save(self, directory) -> None:
        """``per_class_iou.txt`` (the table) and ``per_class_iou.csv`` (class,iou,pixel_share) in ``directory``
        (binary / multilabel: pixel_share is the share of positives among the channel's counted pixels)."""
        from pathlib import Path

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        share = self._last["share"].tolist()
        (folder / "per_class_iou.txt").write_text(self.table() + "\n")
        csv = ["class,iou,pixel_share"] + [f"{name},{'' if value is None else f'{value:.6f}'},{share[i]:.6f}"
                                           for i, (name, value) in enumerate(self.per_class())]
        (folder / "per_class_iou.csv").write_text("\n".join(csv) + "\n")


def _ratio(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator > 0, numerator / denominator.clamp(min=1), torch.full_like(numerator, float("nan")))


def _nanmean(values: torch.Tensor) -> float:
    present = values[~values.isnan()]
    return present.mean().item() if present.numel() else float("nan")
