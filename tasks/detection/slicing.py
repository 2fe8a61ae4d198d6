"""Sliced inference for small objects in large images (SAHI's method, Akyon et al. 2022).

:func:`slice_detect` runs a detector on the tiles of an image at their native resolution (the grid of
``tasks.data.tiles``: tiles of ``slice_size`` px sharing ``overlap`` of the side, the last row/column moved
back to the border) and on the whole image letterboxed to the input size (the large objects no tile
holds whole), moves each tile's boxes back into the image and merges everything with class-wise NMS.

The merge's overlap measure is ``ios`` by default (intersection over the smaller box, SAHI's
default match metric): an object cut by a tile's edge leaves a partial box inside the whole one a
neighbouring tile (or the full-image pass) found, and the partial box's IoU with it may be far below
any threshold while its IoS is ~1. ``iou`` is ``torchvision.ops.batched_nms``. Greedy: the best score of
a group is kept, the others dropped (SAHI's NMS; its NMM, which grows the kept box over the matches, is
not done here).

:class:`SlicedDetection` is the same thing with the engine's task protocol (``forward`` on batches of
whole original images, ``make_evaluator``), and :func:`original_image_loader` the validation split's
original images, so ``effdense eval --slice`` runs the ordinary evaluation loop and COCO evaluator on it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from tasks.data.tiles import tile_grid

__all__ = ["MERGE_METRICS", "slice_detect", "merge_detections", "SlicedDetection", "original_image_loader"]

MERGE_METRICS = ("ios", "iou")


def slice_detect(task, image: torch.Tensor, slice_size: int, overlap: float = 0.2, *,
                 size: int | Sequence[int] | None = None, full_image: bool = True, merge: str = "ios",
                 threshold: float = 0.5, batch_size: int = 8, max_detections: int | None = None
                 ) -> dict[str, torch.Tensor]:
    """Detections on ``image`` (uint8 or uint16 (C, H, W), any size) as ``{"boxes", "scores", "labels"}``
    in the image's pixels, best first.

    ``task``: a :class:`tasks.detection.DetectionTask` (or anything with its ``detect(images, size)``:
    original-size images in, boxes in their pixels out). Each tile of ``slice_size`` px is letterboxed to
    ``size`` (default: the detector's input size; tiles the size of the input keep their native
    resolution), ``batch_size`` tiles per forward pass; ``full_image``: the whole image too (letterboxed
    to ``size``). ``merge`` (``ios`` | ``iou``) and ``threshold``: the class-wise NMS (see the module doc);
    ``max_detections``: the best that many (None: the detector's ``net.post.max_detections``, or all when it
    has none).
    """
    if image.dim() != 3:
        raise ValueError(f"slice_detect takes one image (C, H, W), got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    windows = tile_grid(height, width, int(slice_size), overlap)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(windows), max(1, batch_size)):
        chunk = windows[start:start + max(1, batch_size)]
        tiles = [image[:, y1:y2, x1:x2] for x1, y1, x2, y2 in chunk]
        for (x1, y1, _, _), found in zip(chunk, task.detect(tiles, size)):
            shift = found["boxes"].new_tensor([x1, y1, x1, y1])
            parts.append(dict(found, boxes=found["boxes"] + shift))
    if full_image and windows != [(0, 0, width, height)]:  # one tile that is the image: already seen whole
        parts.extend(task.detect([image], size))
    boxes = torch.cat([p["boxes"].float().reshape(-1, 4) for p in parts])
    scores = torch.cat([p["scores"].float().reshape(-1) for p in parts])
    labels = torch.cat([p["labels"].reshape(-1) for p in parts])
    if max_detections is None:
        post = getattr(getattr(task, "net", None), "post", None)
        max_detections = getattr(post, "max_detections", None)
    return merge_detections(boxes, scores, labels, merge, threshold, max_detections)


def merge_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, metric: str = "ios",
                     threshold: float = 0.5, max_detections: int | None = None) -> dict[str, torch.Tensor]:
    """Class-wise greedy NMS over detections pooled from several passes: a box is dropped when a better one
    of its class overlaps it by more than ``threshold`` (``ios``: intersection over the smaller area;
    ``iou``: ``batched_nms``). Returns the kept detections, best first, at most ``max_detections``."""
    from torchvision.ops import batched_nms

    if metric not in MERGE_METRICS:
        raise ValueError(f"merge metric {metric!r} is not one of {', '.join(MERGE_METRICS)}")
    if metric == "iou":
        keep = batched_nms(boxes, scores, labels, threshold)
    else:
        keep = _ios_nms(boxes, scores, labels, threshold)
    if max_detections is not None:
        keep = keep[:max_detections]
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}


def _ios_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """Indices kept by greedy class-wise NMS on intersection over the smaller box, best score first.

    On the CPU in NumPy (a loop over the boxes; each kept box is compared with the boxes after it: memory
    O(n), not an n x n matrix); classes are kept apart by shifting each class's boxes to its own region
    (``batched_nms``'s trick)."""
    import numpy as np

    if not len(boxes):
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    order = scores.detach().float().cpu().argsort(descending=True)
    b = boxes.detach().double().cpu()[order].numpy()
    b = b + ((b.max() - min(b.min(), 0) + 1) * labels.detach().cpu()[order].double().numpy())[:, None]
    areas = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    removed = np.zeros(len(b), dtype=bool)
    kept = []
    for i in range(len(b)):
        if removed[i]:
            continue
        kept.append(i)
        rest = b[i + 1:]
        width = np.clip(np.minimum(b[i, 2], rest[:, 2]) - np.maximum(b[i, 0], rest[:, 0]), 0, None)
        height = np.clip(np.minimum(b[i, 3], rest[:, 3]) - np.maximum(b[i, 1], rest[:, 1]), 0, None)
        smaller = np.maximum(np.minimum(areas[i], areas[i + 1:]), 1e-9)
        removed[i + 1:] |= width * height / smaller > threshold
    return order[torch.as_tensor(kept, dtype=torch.int64)].to(boxes.device)


class SlicedDetection(nn.Module):
    """A detection task module run by :func:`slice_detect` on whole original images: the engine's task
    protocol in eval mode (``forward(images (N, C, H, W))`` -> detections in the images' pixels;
    ``make_evaluator()``: the task's COCO evaluator, its record naming the slicing). Feed it
    :func:`original_image_loader` batches (their targets map boxes with scale 1, offset 0)."""

    def __init__(self, task, slice_size: int, overlap: float = 0.2, size: int | Sequence[int] | None = None,
                 **options):
        super().__init__()
        self.task, self.slice_size, self.overlap, self.size = task, int(slice_size), float(overlap), size
        self.options = options
        tile_grid(self.slice_size, self.slice_size, self.slice_size, self.overlap)  # bad values fail here

    def forward(self, images: torch.Tensor, targets=None):
        if self.training:
            raise RuntimeError("SlicedDetection is for inference; train the detection task itself")
        return [slice_detect(self.task, image, self.slice_size, self.overlap, size=self.size, **self.options)
                for image in images]

    def describe(self) -> dict:
        get = self.options.get
        return {"slice": self.slice_size, "slice_overlap": self.overlap, "full_image": get("full_image", True),
                "merge": f"class-wise NMS {get('merge', 'ios')} > {get('threshold', 0.5):g}"}

    def make_evaluator(self):
        evaluator = self.task.make_evaluator()
        base = evaluator.describe
        evaluator.describe = lambda: {**base(), "slicing": self.describe()}  # recorded beside the mAP
        return evaluator


def original_image_loader(cfg):
    """The validation split of a detection config as its original images, one per batch (no letterbox:
    targets carry scale 1 and offset 0), sharded across the ranks under torchrun as ``build_loaders`` does."""
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from tasks.data.formats import FORMATS
    from tasks.data.loaders import SequentialShard, ShardSampler
    from tasks.data.transforms.detection import detection_collate

    dataset = FORMATS[cfg.data.format].dataset(cfg, cfg.data.val_split, False)
    dataset.transform = None
    if dist.is_available() and dist.is_initialized():
        sampler = ShardSampler(len(dataset), dist.get_rank(), dist.get_world_size())
    else:
        sampler = SequentialShard(dataset)
    return DataLoader(dataset, batch_size=1, sampler=sampler, num_workers=cfg.data.workers,
                      collate_fn=detection_collate, pin_memory=cfg.data.pin_memory and torch.cuda.is_available())
