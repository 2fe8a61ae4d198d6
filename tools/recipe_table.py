"""Every preset's training recipe beside the published recipe it reproduces, as one markdown table.

    python tools/recipe_table.py                          # every shipped preset
    python tools/recipe_table.py detection/efficientdet_d0_coco segmentation/unet_efficientnet_cityscapes

Two rows per preset: ``preset`` (read from the YAML through ``tasks.config.load``; the global batch, lr,
steps and EMA decay as the engine derives them: ``tasks.engine.batching``, ``tasks.engine.optim``) and
``reference`` (typed in below from ``/work/shared/reference/``; the ``source`` column names the file and
the row or section). ``-`` means the reference does not state it. Cells where the preset differs from
its reference are marked ``*``. Iterations are ``epochs * floor(train images / global batch)``, the
engine's count with ``data.global_batch_size`` (dataset sizes: datasets.md).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import math
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import list_presets, load, resolve_image_size, resolve_preset  # noqa: E402
from tasks.engine.batching import ema_step_decay, global_batch  # noqa: E402
from tasks.engine.optim import scaled_lr  # noqa: E402

TRAIN_IMAGES = {"imagenet": 1_281_167, "coco": 118_287, "cityscapes": 2975}  # datasets.md

IMAGENET = {
    "source": "efficientnet.md: 'Training recipe (ImageNet, TF reference)'; B0 row of 'Coefficients and sizes'; "
              "top-1: 'Paper (Table 2)'",
    "global batch": "4096", "lr": "0.256", "length": "~350 ep",
    "optimizer": "rmsprop_tf (decay 0.9, mom 0.9, eps 1e-3)",
    "weight decay": "1e-05, not on BN", "schedule": "warm-up 5 ep, x0.97 every 2.4 ep", "clip": "-",
    "EMA per step": "0.9999", "NMS": "-", "image": "224x224", "augmentation": "AutoAugment or RandAugment N=2 M=9..28; "
    "label smoothing 0.1; stochastic depth 0.2", "target": "top-1 77.1",
}
DETECTION_ROWS = {  # efficientdet.md table: input size, COCO val AP (official)
    "0": (512, "34.3"), "1": (640, "40.2"), "2": (768, "43.5"), "3": (896, "46.8"), "4": (1024, "49.3"),
    "5": (1280, "51.2"), "6": (1280, "52.1"), "7": (1536, "53.4"), "7x": (1536, "54.4")}


def detection_reference(scale: str) -> dict:
    size, ap = DETECTION_ROWS[scale]
    return {
        "source": f"efficientdet.md: 'Training recipe (official)'; D{scale} row (input, AP); batch 128: "
                  f"'0.16 at batch 128'; the Gaussian's form: automl nms_np.soft_nms, effdet soft_nms",
        "global batch": "128", "lr": "0.16", "length": "600 ep" if scale in ("7", "7x") else "300 ep",
        "optimizer": "sgd (mom 0.9)", "weight decay": "4e-05 (BN/bias excluded: automl, effdet; issue 17)",
        "schedule": "warm-up 1 ep, cosine", "clip": "10",
        "EMA per step": "0.9998", "NMS": "soft sigma 0.5 = exp(-IoU^2/0.5), 5000 cand, 100 det", "image": f"{size}x{size}",
        "augmentation": "hflip; scale jitter 0.1-2.0, crop/pad", "target": f"AP {ap}",
    }


def cityscapes_reference(target: str) -> dict:
    return {
        "source": "datasets.md: 'Reference (mmsegmentation, val, single scale...)' and 'Recipe'",
        "global batch": "8", "lr": "0.01", "length": "80k it" if "73.6" in target else "160k it (UNet-S5)",
        "optimizer": "sgd", "weight decay": "-", "schedule": "poly 0.9", "clip": "-", "EMA per step": "off",
        "NMS": "-", "image": "512x1024", "augmentation": "resize 0.5-2.0, crop, flip, photometric distortion; "
        "optional OHEM 0.7 / 100000", "target": target,
    }


def reference_for(name: str) -> tuple[dict | None, int | None]:
    """The reference row of preset ``name`` and its dataset's train images (None: nothing published)."""
    if name == "classification/efficientnet_b0_imagenet":
        return IMAGENET, TRAIN_IMAGES["imagenet"]
    match = re.fullmatch(r"detection/efficientdet_d(\d|7x)_coco", name)
    if match:
        return detection_reference(match.group(1)), TRAIN_IMAGES["coco"]
    match = re.fullmatch(r"detection/efficientdet_lite(\d)_coco", name)
    if match:  # the official recipe; the Lite row itself is not in shared/reference
        row = {**detection_reference("0"), "image": "-", "target": header_target(resolve_preset(name)),
               "source": f"efficientdet.md: 'Training recipe (official)'; the Lite{match.group(1)} row (input, AP) "
                         f"is not in shared/reference: the preset header cites automl's README"}
        return row, TRAIN_IMAGES["coco"]
    match = re.fullmatch(r"segmentation/(unet|bifpn)_efficientnet_(cityscapes|folder)(_160k)?", name)
    if match:
        target = "mIoU 69.1 (mmseg UNet-S5)" if match.group(1) == "unet" else "mIoU 73.6 (mmseg FCN R50)"
        row = cityscapes_reference(target)
        if match.group(3):
            row["length"] = "160k it"
        if match.group(2) == "folder":  # the Cityscapes recipe on the user's data: nothing published for it
            return {**row, "target": f"- (your data; on Cityscapes {target})", "image": "-",
                    "length": f"- (your data; on Cityscapes {row['length']})"}, None
        return row, TRAIN_IMAGES["cityscapes"]
    return None, None


METRIC = re.compile(r"(top-1|AP|mIoU|mAP50) (\d+(?:\.\d+)?)")


def header_target(path: Path) -> str:
    """The metric and number that the ``# Target:`` lines of a preset's header name."""
    lines = path.read_text().split("\n\n", 1)[0].splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("# Target:")), None)
    if start is None:
        return "-"
    text = " ".join(line.lstrip("# ") for line in lines[start:start + 3] if not line.startswith("# Score:"))
    match = METRIC.search(text)
    number = f"{match.group(1)} {match.group(2)}" if match else "-"
    return f"- (your data; on Cityscapes {number})" if "nothing published for your data" in text else number


def soft_nms_denominator(sigma: float) -> float:
    """The d of the decay exp(-IoU^2 / d) that ``tasks.detection.postprocess`` applies at ``sigma`` (two boxes
    of IoU 0.5, zero box codes on them as anchors)."""
    import torch

    from tasks.detection.postprocess import PostProcess, postprocess

    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 50.0]])
    logits = torch.full((1, 2, 1), 2.0)
    scores = postprocess(logits, torch.zeros(1, 2, 4), boxes, (128, 128), PostProcess(nms="soft", sigma=sigma))[0]
    return -0.25 / math.log(float(scores["scores"][1] / scores["scores"][0]))


def preset_row(name: str, train_images: int | None) -> dict:
    path = resolve_preset(name)
    cfg = load(path)
    d, o, s, t = cfg.data, cfg.optim, cfg.schedule, cfg.train
    batch = global_batch(cfg)
    if d.global_batch_size is None:
        batch_cell = f"{d.batch_size} per process (x GPUs x {t.grad_accum})"
        lr_cell = f"{scaled_lr(cfg):.4g} on 1 process"
    else:
        batch_cell, lr_cell = str(batch), f"{scaled_lr(cfg):.4g}"
    length = f"{t.epochs} ep"
    if train_images and d.global_batch_size is not None:
        iterations = t.epochs * (train_images // batch)
        length += f" = {iterations / 1000:.1f}k it" if iterations >= 10_000 else f" = {iterations} it"
    optimizer = {"sgd": f"sgd (mom {o.momentum:g}{', nesterov' if o.nesterov else ''})",
                 "rmsprop_tf": f"rmsprop_tf (decay {o.rmsprop_alpha:g}, mom {o.momentum:g}, eps {o.eps:g})",
                 "rmsprop": f"rmsprop (decay {o.rmsprop_alpha:g}, mom {o.momentum:g}, eps {o.eps:g})",
                 "adamw": f"adamw (eps {o.eps:g})"}[o.name]
    schedule = {"cosine": "cosine", "step": f"x{s.step_gamma:g} every {s.step_epochs:g} ep",
                "poly": f"poly {s.poly_power:g}", "constant": "constant"}[s.name]
    if s.warmup_epochs:
        schedule = f"warm-up {s.warmup_epochs:g} ep, {schedule}"
    if not t.ema:
        ema = "off"
    elif t.ema_reference_batch is None:
        ema = f"{t.ema_decay:g}"
    else:
        ema = f"{ema_step_decay(cfg, batch):.6g} ({t.ema_decay:g} per {t.ema_reference_batch} images)"
    nms = "-"
    det = getattr(cfg.model, "detection", None)
    if det is not None:
        how = f"hard iou {det.nms_iou:g}"
        if det.nms == "soft":  # the Gaussian effdense applies, read off postprocess (effdet/automl: exp(-IoU^2/0.5))
            how = f"soft sigma 0.5 = exp(-IoU^2/{soft_nms_denominator(0.5):.3g})"
        nms = f"{how}, {det.candidates} cand, {det.max_detections} det"
    height, width = resolve_image_size(cfg)
    augment = getattr(d, "augment", None)
    augmentation = "; ".join(f"{k} {v}" for k, v in dataclasses.asdict(augment).items()) if augment else "-"
    extras = []
    if hasattr(cfg.loss, "label_smoothing"):
        extras.append(f"label smoothing {cfg.loss.label_smoothing:g}")
    extras.append(f"drop_path {cfg.model.drop_path:g}")
    return {
        "source": f"configs/{name}.yaml", "global batch": batch_cell, "lr": lr_cell, "length": length,
        "optimizer": optimizer,
        "weight decay": f"{o.weight_decay:g}" + (", not on norm/bias" if o.no_decay_norm_and_bias else ", on all"),
        "schedule": schedule, "clip": f"{t.clip_grad:g}" if t.clip_grad else "-", "EMA per step": ema, "NMS": nms,
        "image": f"{height}x{width}", "augmentation": f"{augmentation}; {'; '.join(extras)}",
        "target": header_target(path),
    }


COLUMNS = ["global batch", "lr", "length", "optimizer", "weight decay", "schedule", "clip", "EMA per step", "NMS",
           "image", "augmentation", "target", "source"]


def _differs(column: str, mine: str, theirs: str) -> bool:
    """A loose comparison: the reference's leading value against the preset's (``-`` never differs)."""
    if theirs.startswith("-") or column in ("source", "augmentation", "target"):
        return False
    first = lambda text: re.split(r"[ ,(]", text.strip())[0]  # noqa: E731
    if column == "image":
        return first(mine) != first(theirs)
    if column == "length":
        if "k it" in theirs:  # iterations, within 1%
            wanted = float(re.search(r"([\d.]+)k it", theirs).group(1))
            got = re.search(r"([\d.]+)k it", mine)
            return got is None or abs(float(got.group(1)) - wanted) > 0.01 * wanted
        return first(mine) != first(theirs).lstrip("~")
    if column == "weight decay" and "not on BN" in theirs and "not on norm" not in mine:
        return True
    if column == "NMS" and "exp(-IoU^2/" in mine:  # the official Gaussian is exp(-IoU^2 / 0.5)
        return first(mine) != first(theirs) or "exp(-IoU^2/0.5)" not in mine
    if column == "EMA per step":
        return first(mine) != first(theirs) and f"({first(theirs)} per" not in mine
    return first(mine) != first(theirs)


def table(names: list[str]) -> str:
    lines = ["| preset | row | " + " | ".join(COLUMNS) + " |", "|" + "---|" * (len(COLUMNS) + 2)]
    for name in names:
        reference, train_images = reference_for(name)
        mine = preset_row(name, train_images)
        none = "none published (a CPU demo)" if name.startswith("demo/") else "not in tools/recipe_table.py yet"
        theirs = reference or {column: "-" for column in COLUMNS} | {"source": none}
        cells = [f"{mine[c]}{' *' if _differs(c, mine[c], theirs[c]) else ''}" for c in COLUMNS]
        lines.append(f"| {name} | preset | " + " | ".join(cells) + " |")
        lines.append("| | reference | " + " | ".join(theirs[c] for c in COLUMNS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", help="preset names or patterns (default: every shipped preset)")
    args = parser.parse_args(argv)
    names = list_presets()
    if args.presets:
        names = [n for n in names if any(fnmatch.fnmatch(n, p) or n == p for p in args.presets)]
        if not names:
            parser.error(f"no preset matches {args.presets}; `effdense configs list` names them")
    print(table(names))
    print("\n* the preset differs from its reference. Global batch: data.global_batch_size (the engine splits it "
          "over the GPUs and accumulates); lr: optim.lr x global batch / optim.base_batch_size; EMA per step: "
          "ema_decay ** (global batch / train.ema_reference_batch).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
