"""EfficientDet anchors, Faster R-CNN box coding and anchor matching, batched on the device.

Anchors (effdet/automl layout): for each level, locations in row-major order, then 9 anchors per
location: 3 octave scales (2^0, 2^(1/3), 2^(2/3)) outer x 3 aspect ratios (w:h 1:1, 1.4:0.7,
0.7:1.4) inner; sizes ``anchor_scale * stride * scale * aspect``, centres at ``stride / 2`` offsets,
where ``stride = input size / feature size`` per axis (exact for any input size). Boxes are xyxy in
input pixels. Box codes are (ty, tx, th, tw), without scale factors.

Matching (:func:`match_anchors`): IoU >= 0.5 positive, < 0.5 negative, and every ground-truth box
forced onto its best anchor (ties: the lowest box index), as effdet's ``AnchorLabeler``; crowd boxes
never become positives, and anchors that are not positive and lie mostly inside a crowd box
(intersection over anchor area >= 0.5, the COCO crowd rule) are ignored. One ``box_iou`` call covers
the whole padded batch: no Python loop over images and no host synchronisation. :func:`atss_match` is the
ATSS alternative (adaptive IoU threshold per box over the nearest locations of each level), same inputs
and outputs, same crowd rule, batched alike.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torchvision.ops import box_iou

ASPECT_RATIOS = ((1.0, 1.0), (1.4, 0.7), (0.7, 1.4))  # (w, h) multipliers
BOX_CODE_EPS = 1e-7  # added to widths/heights before division and log (automl/effdet)

BACKGROUND, IGNORE = -1, -2  # class targets that are not a class


class AnchorGenerator:
    """Anchors for an input size and its feature-map sizes, built once and cached per device.

    ``levels``: pyramid levels (P3 first); ``anchor_scale``: base size in strides; ``num_scales``
    octave scales per level; ``aspect_ratios``: (w, h) multipliers.
    """

    def __init__(self, levels: Sequence[int] = range(3, 8), anchor_scale: float = 4.0, num_scales: int = 3,
                 aspect_ratios: Sequence[tuple[float, float]] = ASPECT_RATIOS, cache_size: int = 8):
        self.levels = tuple(levels)
        self.anchor_scale, self.num_scales = float(anchor_scale), int(num_scales)
        self.aspect_ratios = tuple((float(w), float(h)) for w, h in aspect_ratios)
        self.cache_size = cache_size
        self._cache: OrderedDict = OrderedDict()

    @property
    def num_anchors(self) -> int:
        """Anchors per location."""
        return self.num_scales * len(self.aspect_ratios)

    def __call__(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]],
                 device: torch.device | str = "cpu") -> torch.Tensor:
        """(sum_l H_l * W_l * anchors, 4) float32 xyxy anchors for ``image_size`` = (H, W)."""
        key = (tuple(int(s) for s in image_size), tuple(tuple(int(s) for s in f) for f in feature_sizes),
               str(torch.device(device)))
        anchors = self._cache.get(key)
        if anchors is None:
            anchors = self.build(key[0], key[1]).to(device)
            self._cache[key] = anchors
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return anchors

    def build(self, image_size: Sequence[int], feature_sizes: Sequence[Sequence[int]]) -> torch.Tensor:
        """The anchors computed afresh on the CPU (float64 arithmetic, float32 result)."""
        if len(feature_sizes) != len(self.levels):
            raise ValueError(f"{len(feature_sizes)} feature sizes for {len(self.levels)} levels {self.levels}")
        height, width = image_size
        rows = []
        for fh, fw in feature_sizes:
            stride_y, stride_x = height / fh, width / fw
            cy = stride_y / 2 + torch.arange(fh, dtype=torch.float64) * stride_y
            cx = stride_x / 2 + torch.arange(fw, dtype=torch.float64) * stride_x
            cy, cx = torch.meshgrid(cy, cx, indexing="ij")
            half = []
            for octave in range(self.num_scales):
                scale = 2.0 ** (octave / self.num_scales)
                base_x, base_y = self.anchor_scale * stride_x * scale, self.anchor_scale * stride_y * scale
                half += [(base_x * aw / 2.0, base_y * ah / 2.0) for aw, ah in self.aspect_ratios]
            half = torch.tensor(half, dtype=torch.float64)  # (anchors, 2): half width, half height
            centres = torch.stack([cx, cy], dim=-1).reshape(-1, 1, 2)
            rows.append(torch.cat([centres - half, centres + half], dim=-1).reshape(-1, 4))
        return torch.cat(rows).float()


def feature_sizes(image_size: Sequence[int], levels: Sequence[int]) -> list[tuple[int, int]]:
    """The map sizes a stride-2 chain gives (ceil division per level), as the BiFPN produces them."""
    sizes, (h, w) = [], image_size
    for level in range(1, max(levels) + 1):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        if level in levels:
            sizes.append((h, w))
    return sizes


# ------------------------------------------------------------------------------------- box coding

def encode_boxes(boxes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """xyxy ``boxes`` relative to xyxy ``anchors`` (broadcast) -> (ty, tx, th, tw) codes."""
    wa = anchors[..., 2] - anchors[..., 0] + BOX_CODE_EPS
    ha = anchors[..., 3] - anchors[..., 1] + BOX_CODE_EPS
    xa = (anchors[..., 0] + anchors[..., 2]) / 2
    ya = (anchors[..., 1] + anchors[..., 3]) / 2
    w = boxes[..., 2] - boxes[..., 0] + BOX_CODE_EPS
    h = boxes[..., 3] - boxes[..., 1] + BOX_CODE_EPS
    x = (boxes[..., 0] + boxes[..., 2]) / 2
    y = (boxes[..., 1] + boxes[..., 3]) / 2
    return torch.stack([(y - ya) / ha, (x - xa) / wa, torch.log(h / ha), torch.log(w / wa)], dim=-1)


# The largest size code decoded: a box at most 1000/16 times its anchor (torchvision's bbox_xform_clip), so an
# exploding code gives a large box, not an infinite or NaN one.
SIZE_CODE_CLIP = math.log(1000.0 / 16)


def decode_boxes(codes: torch.Tensor, anchors: torch.Tensor) -> torch.Tensor:
    """(ty, tx, th, tw) ``codes`` on xyxy ``anchors`` (broadcast) -> xyxy boxes; th, tw clamped at
    :data:`SIZE_CODE_CLIP`."""
    wa = anchors[..., 2] - anchors[..., 0]
    ha = anchors[..., 3] - anchors[..., 1]
    xa = (anchors[..., 0] + anchors[..., 2]) / 2
    ya = (anchors[..., 1] + anchors[..., 3]) / 2
    ty, tx, th, tw = codes.unbind(-1)
    th, tw = th.clamp(max=SIZE_CODE_CLIP), tw.clamp(max=SIZE_CODE_CLIP)
    w, h = torch.exp(tw) * wa, torch.exp(th) * ha
    x, y = tx * wa + xa, ty * ha + ya
    return torch.stack([x - w / 2, y - h / 2, x + w / 2, y + h / 2], dim=-1)


# --------------------------------------------------------------------------------------- matching

def match_anchors(anchors: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                  crowd: torch.Tensor | None = None, threshold: float = 0.5
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets for a padded batch.

    ``anchors`` (A, 4) xyxy; ``boxes`` (N, M, 4) xyxy; ``labels`` (N, M) int64, class index >= 0 or
    -1 for padding; ``crowd`` (N, M) bool or None. Returns ``class_targets`` (N, A) int64 (class, -1
    background, -2 ignored), ``box_targets`` (N, A, 4) float32 codes (0 where not positive) and
    ``num_positives`` (N,) float32.
    """
    batch, count = labels.shape
    if count == 0:
        return _all_background(batch, anchors)
    boxes = boxes.to(device=anchors.device, dtype=torch.float32)
    valid = labels >= 0
    real = valid if crowd is None else valid & ~crowd
    iou = box_iou(boxes.reshape(-1, 4), anchors).view(batch, count, anchors.shape[0])
    iou_real = iou.masked_fill(~real.unsqueeze(-1), -1.0)
    best_iou, matched = iou_real.max(dim=1)  # per anchor: the best real box (first on ties)
    positive = best_iou >= threshold

    # Each real box claims its best anchor (first on ties), even below the threshold; an anchor claimed
    # by several boxes goes to the lowest box index (effdet/TF). Boxes that overlap no anchor claim none.
    box_best_iou, box_best_anchor = iou_real.max(dim=2)
    claims = real & (box_best_iou > 0)
    index = torch.arange(count, device=anchors.device).expand(batch, count)
    claim = torch.full((batch, anchors.shape[0]), count, dtype=torch.long, device=anchors.device)
    claim.scatter_reduce_(1, box_best_anchor, torch.where(claims, index, count), reduce="amin")
    forced = claim < count
    matched = torch.where(forced, claim, matched)
    positive |= forced
    return _targets(anchors, boxes, labels, crowd, iou, matched, positive)


def _all_background(batch: int, anchors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The targets of a batch without boxes: every anchor background, no positives."""
    device = anchors.device
    return (torch.full((batch, anchors.shape[0]), BACKGROUND, dtype=torch.long, device=device),
            torch.zeros(batch, anchors.shape[0], 4, device=device), torch.zeros(batch, device=device))


def _targets(anchors: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, crowd: torch.Tensor | None,
             iou: torch.Tensor, matched: torch.Tensor, positive: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(class targets, box codes, positives per image) from each anchor's ``matched`` box index and
    ``positive`` flag (N, A); ``iou`` (N, M, A). Non-positive anchors mostly inside a crowd box are ignored."""
    valid = labels >= 0
    class_targets = labels.gather(1, matched).masked_fill(~positive, BACKGROUND)
    if crowd is not None:
        # Intersection over anchor area from the IoU: inter = iou * (area_a + area_b) / (1 + iou).
        iou_crowd = iou.masked_fill(~(valid & crowd).unsqueeze(-1), 0.0)
        area_anchor = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
        area_box = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])).unsqueeze(-1)
        ioa = iou_crowd * (area_anchor + area_box) / ((1 + iou_crowd) * area_anchor.clamp(min=1e-6))
        ignored = (ioa.amax(dim=1) >= 0.5) & ~positive
        class_targets = class_targets.masked_fill(ignored, IGNORE)
    matched_boxes = boxes.gather(1, matched.unsqueeze(-1).expand(-1, -1, 4))
    box_targets = encode_boxes(matched_boxes, anchors).masked_fill(~positive.unsqueeze(-1), 0.0)
    return class_targets, box_targets, positive.sum(dim=1).float()


# The margin (pixels) by which an ATSS candidate's centre must lie inside its box (the ATSS authors' 0.01).
ATSS_CENTRE_MARGIN = 0.01


def atss_match(anchors: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor, crowd: torch.Tensor | None = None,
               *, locations_per_level: Sequence[int], anchors_per_location: int, topk: int = 9
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ATSS targets (Zhang et al., CVPR 2020) for a padded batch; inputs and outputs as :func:`match_anchors`.

    ``anchors`` in :class:`AnchorGenerator`'s layout: per level ``locations_per_level[l]`` locations, each
    with ``anchors_per_location`` anchors sharing one centre. Per real box and per level, the ``topk``
    locations whose centres are nearest (L2) the box centre (all of a level's locations where it has fewer)
    give all their anchors as candidates. The box's IoU threshold is the mean + standard deviation (Bessel-
    corrected, as the authors' code) of its candidates' IoUs over all levels; a candidate is positive when its
    IoU reaches the threshold and its centre lies inside the box. An anchor positive for several boxes takes
    the one with the highest IoU (first on ties). Crowd and padded boxes give no candidates; the crowd-ignore
    rule of :func:`match_anchors` applies. Only the loop over the levels is in Python.

    Why locations and not anchors: the anchors of one location are all at the same distance, so "the k nearest
    anchors" would be settled by ties among the shapes; the k nearest locations (k x anchors-per-location
    nearest anchors, also what the ATSS authors' code takes for several anchors per location) keep the paper's
    spatial rule and let the IoU statistics choose among the shapes.
    """
    batch, count = labels.shape
    num_anchors, device = anchors.shape[0], anchors.device
    made = sum(locations_per_level) * anchors_per_location
    if made != num_anchors:
        raise ValueError(f"{num_anchors} anchors, but locations_per_level {list(locations_per_level)} x "
                         f"{anchors_per_location} anchors per location make {made}")
    if count == 0:
        return _all_background(batch, anchors)
    boxes = boxes.to(device=device, dtype=torch.float32)
    real = labels >= 0 if crowd is None else (labels >= 0) & ~crowd
    iou = box_iou(boxes.reshape(-1, 4), anchors).view(batch, count, num_anchors)

    location_boxes = anchors[::anchors_per_location]
    centres = (location_boxes[:, :2] + location_boxes[:, 2:]) / 2  # (locations, 2) xy
    box_centres = ((boxes[..., :2] + boxes[..., 2:]) / 2).unsqueeze(2)  # (N, M, 1, 2)
    nearest, start = [], 0
    for locations in locations_per_level:  # (N, M, k) location indices per level
        distance = (box_centres - centres[start:start + locations]).square().sum(-1)
        nearest.append(distance.topk(min(topk, locations), dim=2, largest=False).indices + start)
        start += locations
    nearest = torch.cat(nearest, dim=2)  # (N, M, C) candidate locations
    offsets = torch.arange(anchors_per_location, device=device)
    candidates = (nearest.unsqueeze(-1) * anchors_per_location + offsets).flatten(2)  # (N, M, C * anchors)

    candidate_iou = iou.gather(2, candidates)
    threshold = candidate_iou.mean(dim=2, keepdim=True) + candidate_iou.std(dim=2, keepdim=True)
    x, y = centres[nearest].unbind(-1)  # (N, M, C)
    x1, y1, x2, y2 = boxes.unsqueeze(2).unbind(-1)
    inside = torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1).amin(-1) > ATSS_CENTRE_MARGIN
    inside = inside.repeat_interleave(anchors_per_location, dim=2)
    chosen = (candidate_iou >= threshold) & inside & real.unsqueeze(-1)
    selected = torch.zeros_like(iou, dtype=torch.bool).scatter_(2, candidates, chosen)  # (N, M, A)

    _, matched = iou.masked_fill(~selected, -1.0).max(dim=1)  # the highest-IoU box among an anchor's own
    return _targets(anchors, boxes, labels, crowd, iou, matched, selected.any(dim=1))
