"""What a detection config's scale resolves to: the EfficientDet row (backbone, BiFPN, heads, input size)."""

from __future__ import annotations

import torch

import backbones

from tasks.config.scaling import ScaleFamily, detector_row, random_images, resolve_image_size

__all__ = ["describe_scale", "example_batch", "SCALES", "SUMMARY_KEYS", "LITE_COCO_AP", "LITE_NAMES"]

SUMMARY_KEYS = ("bifpn_width", "bifpn_repeats", "head_depth")

# automl's official COCO val AP (shared/reference/efficientdet.md)
COCO_AP = {"0": 34.3, "1": 40.2, "2": 43.5, "3": 46.8, "4": 49.3, "5": 51.2, "6": 52.1, "7": 53.4, "7x": 54.4}
# EfficientDet-Lite (model.scale lite0..lite4): automl efficientdet/README.md, "mobile-size lite models", mAP (float)
# on COCO val2017 (int8: 26.10, 31.12, 34.69, 38.42, 42.83). Not in SCALES.names: those are the D sweep, smallest
# first, that `effdense budget` measures by default; `--scales lite0` (or efficientdet-lite0) measures a Lite row.
LITE_COCO_AP = {"lite0": 26.41, "lite1": 31.50, "lite2": 35.06, "lite3": 38.77, "lite4": 43.18}
LITE_NAMES = tuple(LITE_COCO_AP)
SCALES = ScaleFamily(prefix="D", names=tuple(str(i) for i in range(8)) + ("7x",), cpu_names=("0", "1"),
                     published=COCO_AP, metric="COCO AP",
                     pattern=r"(?:efficientdet-?d(?=\d)|d(?=\d)|efficientdet-(?=lite))?([0-7]|7x|lite[0-4])",
                     other_backbones=False)


def describe_scale(cfg) -> dict:
    """Plain data: task, phi / scale, input size, the detector row and the backbone it uses, and the sizes the
    config's ``model.detection`` keys leave to the row (BiFPN width and repeats, head depth, levels, anchors)."""
    m, det = cfg.model, cfg.model.detection
    row = detector_row(m)
    options = dict(row.backbone_options)
    backbone = row.backbone if row.backbone_phi is None and not options else \
        backbones.get_preset("efficientnet", phi=row.backbone_phi, **options).name
    return {"task": m.task, "phi": m.phi, "scale": m.scale, "input_size": list(resolve_image_size(cfg)),
            "detector": row.name, "backbone": backbone, "bifpn_width": det.width or row.width,
            "bifpn_repeats": det.repeats or row.repeats, "head_depth": det.head_depth or row.head_depth,
            "levels": list(row.levels), "anchor_scale": det.anchor_scale or row.anchor_scale,
            "fusion": det.fusion or row.fusion, "act": row.act}


def example_batch(cfg, batch_size: int, device="cpu", boxes_per_image: int = 8):
    """uint8 images and one ``{"boxes": float (n, 4) xyxy pixels, "labels": int64 (n,)}`` per image
    (``boxes_per_image`` boxes of 5-50% of the image side; COCO averages ~7 per image)."""
    generator = torch.Generator().manual_seed(0)
    images = random_images(cfg, batch_size, generator)
    height, width = images.shape[-2:]
    scale = torch.tensor([width, height, width, height], dtype=torch.float32)
    targets = []
    for _ in range(batch_size):
        size = torch.rand(boxes_per_image, 2, generator=generator) * 0.45 + 0.05
        corner = torch.rand(boxes_per_image, 2, generator=generator) * (1 - size)
        boxes = torch.cat([corner, corner + size], 1) * scale
        labels = torch.randint(0, cfg.model.num_classes, (boxes_per_image,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images.to(device), targets
