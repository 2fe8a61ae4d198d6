"""What each backbone scale costs: parameters, GMACs at native resolution, taps."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

import backbones

from tasks.classification import build_classifier
from tasks.registry import get


def describe(name: str, **options) -> dict:
    """One row: classifier params (1000 classes), GMACs at native resolution, resolution, taps.

    Built on the meta device, so even L2 costs no memory and about a second.
    """
    preset = backbones.get_preset(name, **{k: v for k, v in options.items() if k in ("phi", "width", "depth")})
    with torch.device("meta"):
        model = build_classifier(name, num_classes=1000, **options).eval()
        image = torch.empty(1, 3, preset.resolution, preset.resolution)
        with FlopCounterMode(display=False) as counter:
            model(image)
    return {
        "name": preset.name,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "backbone_params_m": sum(p.numel() for p in model.backbone.parameters()) / 1e6,
        # Multiply-accumulates: the unit the EfficientNet paper calls "FLOPs" (B0: 0.39B).
        "gmacs": counter.get_total_flops() / 2e9,
        "resolution": preset.resolution,
        "dropout": preset.dropout,
        "taps": [spec.channels for spec in model.backbone.all_feature_info],
    }


def format_table(rows: list[dict]) -> str:
    header = f"{'name':<28}{'params(M)':>10}{'backbone(M)':>12}{'GMACs':>9}{'res':>6}{'dropout':>8}  taps s2/s4/s8/s16/s32"
    lines = [header, "-" * len(header)]
    for row in rows:
        taps = "/".join(str(c) for c in row["taps"])
        lines.append(f"{row['name']:<28}{row['params_m']:>10.2f}{row['backbone_params_m']:>12.2f}"
                     f"{row['gmacs']:>9.2f}{row['resolution']:>6}{row['dropout']:>8.2f}  {taps}")
    lines.append("params: the classifier with 1000 classes; GMACs: multiply-accumulates of one image at the "
                 "native resolution (what the EfficientNet paper calls FLOPs).")
    return "\n".join(lines)


def describe_task(task: str, scale: str | None = None, phi: float | None = None, size=None, head: str = "unet") -> dict:
    """One row for ``effdense backbones --task``: the whole task model at a named ``scale`` or a free ``phi``:
    parameters, GMACs at the task's input size (classification and detection: the scale's own; segmentation:
    512x1024 unless ``size``), the resolution, and what the scale resolves to. Built on the meta device."""
    from tasks.budget.measure import count_cost
    from tasks.config import resolve_image_size, validate

    row = get(task)
    cfg = row.config()
    cfg.model.scale, cfg.model.phi = scale, phi
    if hasattr(cfg.model, "segmentation"):
        cfg.model.segmentation.head = head
    size = size or row.scales.summary_size
    if size is not None:
        cfg.data.image_size = list(size)
    cfg.train.device = "cpu"
    validate(cfg)
    height, width = resolve_image_size(cfg)
    params_m, gmacs = count_cost(cfg)
    info = row.describe_scale(cfg)
    label = info.get("detector") or info["backbone"]
    return {"name": f"{info['head']}-{label}" if "head" in info else label, "params_m": params_m, "gmacs": gmacs,
            "resolution": f"{height}x{width}", "info": info}


def format_task_table(task: str, rows: list[dict]) -> str:
    header = f"{'model':<34}{'params(M)':>10}{'GMACs':>10}{'input':>12}  resolved"
    lines = [header, "-" * len(header)]
    for row in rows:
        info = row["info"]
        keys = get(task).summary_keys
        resolved = ", ".join(f"{k}={info[k]}" for k in keys if info.get(k) is not None)
        lines.append(f"{row['name']:<34}{row['params_m']:>10.2f}{row['gmacs']:>10.2f}{row['resolution']:>12}  {resolved}")
    lines.append(f"GMACs: multiply-accumulates of one image at the input shown ({task} model, "
                 f"the network without post-processing).")
    return "\n".join(lines)
