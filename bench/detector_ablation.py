"""Each option of the small-data detection recipe switched off in turn from all of them on (and all off), several seeds.

    python bench/detector_ablation.py                                   # 128 px, seeds 0 1 2, 2 min a run
    python bench/detector_ablation.py --sizes 256 --minutes 4 --only full no_mosaic
    python bench/detector_ablation.py --set model.scale=0 --set model.backbone_weights=null   # from scratch

Every run is ``bench/detector_vs_ultralytics.py --sides effdense`` (the same shapes data, the same time budget
through ``train.time_limit``, pycocotools on the same validation images) with the preset
(``configs/detection/efficientdet_d0_custom.yaml`` by default, plus ``--set``) and one variant's overrides.
Every variant but the last three starts from the whole recipe on (``RECIPE_ON``: mosaic 1.0 closed for the last 3
epochs, HSV 0.015 / 0.7 / 0.4, zoom/shift 0.5 / 0.1, ATSS, GIoU, EMA), whatever the preset sets:

- ``full``: the whole recipe on;
- ``no_mosaic``: ``data.augment.mosaic=0`` (single images, with the zoom/shift and HSV still on);
- ``no_colour_affine``: HSV gains and the random zoom/shift off;
- ``iou_assigner``: effdet's IoU >= 0.5 matching instead of ATSS;
- ``huber``: the Huber loss on the box codes instead of GIoU;
- ``no_ema``: evaluate the trained weights instead of their EMA;
- ``mixup``: mixup 0.15 added (off in the preset);
- ``recipe_off``: all of the above off (the demo's augmentation: scale jitter 0.5-1.5, crop, flip; IoU, Huber,
  no EMA);
- ``atss_giou_only``: ``recipe_off`` with ATSS and GIoU kept;
- ``atss_giou_ema``: ``atss_giou_only`` with the EMA kept.

Prints per variant the mean and standard deviation over the seeds of mAP50 and mAP and the steps trained,
and writes ablation.json / ablation.md in a fresh folder under --output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECIPE_OFF = ["data.augment.mosaic=0", "data.augment.mixup=0", "data.augment.hsv_h=0", "data.augment.hsv_s=0",
              "data.augment.hsv_v=0", "data.augment.translate=0", "data.augment.affine_scale=0",
              "data.augment.scale_min=0.5", "data.augment.scale_max=1.5", "model.detection.assigner=iou",
              "loss.box_loss=huber", "train.ema=false"]
RECIPE_ON = ["data.augment.mosaic=1.0", "data.augment.mixup=0", "data.augment.close_mosaic=3",
             "data.augment.hsv_h=0.015", "data.augment.hsv_s=0.7", "data.augment.hsv_v=0.4",
             "data.augment.translate=0.1", "data.augment.affine_scale=0.5", "data.augment.scale_min=1.0",
             "data.augment.scale_max=1.0", "model.detection.assigner=atss", "loss.box_loss=giou", "train.ema=true"]
VARIANTS = {
    "full": RECIPE_ON,
    "no_mosaic": [*RECIPE_ON, "data.augment.mosaic=0"],
    "no_colour_affine": [*RECIPE_ON, "data.augment.hsv_h=0", "data.augment.hsv_s=0", "data.augment.hsv_v=0",
                         "data.augment.translate=0", "data.augment.affine_scale=0"],
    "iou_assigner": [*RECIPE_ON, "model.detection.assigner=iou"],
    "huber": [*RECIPE_ON, "loss.box_loss=huber"],
    "no_ema": [*RECIPE_ON, "train.ema=false"],
    "mixup": [*RECIPE_ON, "data.augment.mixup=0.15"],
    "recipe_off": RECIPE_OFF,
    # the augmentation and EMA off, ATSS and GIoU kept; the same with EMA (the preset)
    "atss_giou_only": [item for item in RECIPE_OFF if not item.startswith(("model.detection.assigner", "loss.box_loss"))],
    "atss_giou_ema": [item for item in RECIPE_OFF
                      if not item.startswith(("model.detection.assigner", "loss.box_loss", "train.ema"))],
}


def summary(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=str(HERE.parent / "configs/detection/efficientdet_d0_custom.yaml"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[128])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=2.0, help="training budget per run (default 2)")
    parser.add_argument("--only", nargs="+", choices=list(VARIANTS), help="these variants only")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="overrides for every variant (e.g. the Lite0 backbone weights)")
    parser.add_argument("--output", default="runs/bench/detector_ablation")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import detector_vs_ultralytics as bench

    out = Path(args.output) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=False)
    rows = []
    for name in args.only or list(VARIANTS):
        sets = [item for override in (*args.overrides, *VARIANTS[name]) for item in ("--set", override)]
        before = set(Path(out / name).glob("*")) if (out / name).exists() else set()
        code = bench.main(["--sides", "effdense", "--preset", args.preset, "--minutes", str(args.minutes),
                           "--sizes", *map(str, args.sizes), "--seeds", *map(str, args.seeds),
                           "--output", str(out / name), *sets])
        runs = sorted(set(Path(out / name).glob("*")) - before)
        results = json.loads((runs[-1] / "results.json").read_text())["runs"] if runs else []
        for size in args.sizes:
            done = [r for r in results if r.get("size") == size and "error" not in r]
            rows.append({"variant": name, "size": size, "overrides": VARIANTS[name], "exit": code,
                         "mAP50": [r["mAP50"] for r in done], "mAP": [r["mAP"] for r in done],
                         "steps": [r["steps"] for r in done]})
        (out / "ablation.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
    lines = [f"preset {args.preset} {' '.join(args.overrides)}; {args.minutes:g} min a run, seeds {args.seeds}", "",
             "| variant | size | mAP50 (mean +- sd) | mAP | steps |", "|---|---|---|---|---|"]
    for row in rows:
        steps = f"{statistics.mean(row['steps']):.0f}" if row["steps"] else "-"
        lines.append(f"| {row['variant']} | {row['size']} | {summary(row['mAP50'])} | {summary(row['mAP'])} | {steps} |")
    text = "\n".join(lines) + "\n"
    (out / "ablation.md").write_text(text)
    print(text + f"wrote {out / 'ablation.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
