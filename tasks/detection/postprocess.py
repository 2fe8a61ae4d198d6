"""EfficientDet post-processing: top-k candidates, box decoding, NMS, at most N detections per image.

As effdet/automl: the top ``max_candidates`` (anchor, class) logits of each image over all levels,
their boxes decoded on the anchors and clipped to the input, then per-class NMS — hard
(``torchvision.ops.batched_nms``, IoU 0.5, effdet's default) or gaussian soft-NMS (the official
EfficientDet evaluation: scores decay by exp(-IoU^2 / sigma), sigma 0.5, as automl's ``nms_np.soft_nms``
(its TF2 path passes sigma / 2 to TensorFlow's op, whose convention is exp(-IoU^2 / (2 sigma))) and effdet) —
and the best ``max_detections`` kept. No score threshold by default: COCO evaluation wants them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from heads.anchors import decode_boxes

NMS_METHODS = ("hard", "soft")


@dataclass(frozen=True)
class PostProcess:
    """Post-processing settings (what is recorded with every mAP)."""

    nms: str = "hard"  # "hard" (batched_nms) or "soft" (gaussian soft-NMS)
    iou_threshold: float = 0.5  # hard NMS
    sigma: float = 0.5  # soft-NMS
    max_candidates: int = 5000
    max_detections: int = 100
    score_threshold: float = 0.0  # keep detections scoring above this

    def __post_init__(self):
        if self.nms not in NMS_METHODS:
            raise ValueError(f"nms={self.nms!r} is not one of {', '.join(NMS_METHODS)}")
        if self.max_candidates < 1 or self.max_detections < 1:
            raise ValueError(f"max_candidates and max_detections must be >= 1, got {self.max_candidates}, "
                             f"{self.max_detections}")
        if not 0 < self.iou_threshold <= 1 or self.sigma <= 0:
            raise ValueError(f"nms iou_threshold must be in (0, 1] and sigma > 0, got {self.iou_threshold}, "
                             f"{self.sigma}")

    def describe(self) -> dict:
        """A JSON-able record of the settings, e.g. for the metrics log."""
        method = (f"batched_nms iou={self.iou_threshold:g}" if self.nms == "hard"
                  else f"gaussian soft-NMS sigma={self.sigma:g}")
        return {"nms": self.nms, "nms_method": method, "max_candidates": self.max_candidates,
                "max_detections": self.max_detections, "score_threshold": self.score_threshold}


MIN_SIDE = 1e-2  # px: a thinner box after clipping is empty


def select_candidates(class_out: torch.Tensor, box_out: torch.Tensor, anchors: torch.Tensor,
                      image_size: tuple[int, int], max_candidates: int):
    """Top-k (anchor, class) pairs per image -> (boxes (N, k, 4) clipped xyxy, scores (N, k), classes (N, k)).

    A box that is empty after clipping (width or height under :data:`MIN_SIDE` px: outside the image, or a
    collapsed size code) gets score 0, so no score threshold (0 included) keeps it."""
    batch, num_anchors, num_classes = class_out.shape
    k = min(max_candidates, num_anchors * num_classes)
    logits, index = class_out.reshape(batch, -1).topk(k, dim=1)
    anchor_index = index // num_classes
    classes = index % num_classes
    codes = box_out.gather(1, anchor_index.unsqueeze(-1).expand(-1, -1, 4)).float()
    boxes = decode_boxes(codes, anchors[anchor_index])
    height, width = image_size
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, width)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, height)
    sides = boxes[..., 2:] - boxes[..., :2]
    scores = logits.float().sigmoid() * (sides > MIN_SIDE).all(-1)
    return boxes, scores, classes


def postprocess(class_out: torch.Tensor, box_out: torch.Tensor, anchors: torch.Tensor,
                image_size: tuple[int, int], settings: PostProcess = PostProcess()) -> list[dict[str, torch.Tensor]]:
    """Flattened outputs ``class_out`` (N, A, C) logits and ``box_out`` (N, A, 4) codes on ``anchors``
    (A, 4) -> one ``{"boxes" (k, 4) xyxy input pixels, "scores" (k,), "labels" (k,) int64}`` per image,
    best first."""
    boxes, scores, classes = select_candidates(class_out, box_out, anchors, image_size, settings.max_candidates)
    if settings.nms == "soft":
        return _soft_nms(boxes, scores, classes, settings)
    results = []
    for i in range(boxes.shape[0]):
        b, s, c = boxes[i], scores[i], classes[i]
        keep = s > settings.score_threshold  # also drops the empty boxes (score 0)
        b, s, c = b[keep], s[keep], c[keep]
        keep = batched_nms(b, s, c, settings.iou_threshold)[: settings.max_detections]
        results.append({"boxes": b[keep], "scores": s[keep], "labels": c[keep]})
    return results


def _pairwise_iou_one(box: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """IoU of ``box`` (N, 1, 4) with each of ``boxes`` (N, K, 4) -> (N, K)."""
    top_left = torch.maximum(box[..., :2], boxes[..., :2])
    bottom_right = torch.minimum(box[..., 2:], boxes[..., 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(-1)
    area = lambda b: (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])  # noqa: E731
    union = area(box) + area(boxes) - inter
    return torch.where(inter > 0, inter / union.clamp(min=1e-12), torch.zeros_like(inter))


def _soft_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor,
              settings: PostProcess) -> list[dict[str, torch.Tensor]]:
    """Gaussian soft-NMS per class, for the whole batch at once: ``max_detections`` rounds, each taking
    every image's best remaining candidate and decaying the scores of the same class by its IoU.

    Scores only decrease, so the picks come out in decreasing order and the first ``max_detections``
    are exactly the best of a full soft-NMS.
    """
    batch, k = scores.shape
    current = torch.where(scores > settings.score_threshold, scores, torch.full_like(scores, -1.0))
    rows = torch.arange(batch, device=scores.device)
    picks, picked_scores = [], []
    scale = -1.0 / settings.sigma  # exp(-IoU^2 / sigma): automl's nms_np.soft_nms and effdet (sigma 0.5)
    for _ in range(min(settings.max_detections, k)):
        best_score, best = current.max(dim=1)
        picks.append(best)
        picked_scores.append(best_score)
        best_box = boxes[rows, best].unsqueeze(1)
        iou = _pairwise_iou_one(best_box, boxes)
        same_class = classes == classes[rows, best].unsqueeze(1)
        decay = torch.where(same_class, torch.exp(scale * iou * iou), torch.ones_like(iou))
        current = current * decay
        current[rows, best] = -1.0
        current = torch.where(current > settings.score_threshold, current, torch.full_like(current, -1.0))
    picks, picked_scores = torch.stack(picks, 1), torch.stack(picked_scores, 1)
    results = []
    for i in range(batch):
        keep = picked_scores[i] > settings.score_threshold
        index = picks[i][keep]
        results.append({"boxes": boxes[i, index], "scores": picked_scores[i][keep], "labels": classes[i, index]})
    return results
