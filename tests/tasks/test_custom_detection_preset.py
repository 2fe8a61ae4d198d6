"""The small-data detection preset (issue 22): what it switches on, and the demo run on it.

Each option's own behaviour is tested where it lives (test_detection_augment, test_detection_assign,
test_time_limit); here: the preset carries the recipe the ablation chose, and `effdense demo detection --preset`
trains it on the demo's data (its data and CPU schedule, the preset's recipe), refusing another task's preset.
"""

from __future__ import annotations

import json

import yaml

from tasks.cli import main
from tasks.config import load

PRESET = "configs/detection/efficientdet_d0_custom.yaml"


def test_the_custom_preset_carries_the_ablations_choice():
    cfg = load(PRESET)
    augment = cfg.data.augment
    # the ablation's choice (issue 22's note): ATSS + GIoU + EMA on the demo's zoom / crop / flip; mosaic, mixup,
    # HSV and the zoom/shift affine cost mAP50 at minute budgets and stay options, off
    assert (augment.mosaic, augment.mixup, augment.hsv_h, augment.hsv_s, augment.hsv_v) == (0, 0, 0, 0, 0)
    assert (augment.translate, augment.affine_scale, augment.scale_min, augment.scale_max) == (0, 0, 0.5, 1.5)
    assert cfg.model.detection.assigner == "atss" and cfg.loss.box_loss == "giou"
    assert cfg.train.ema and cfg.data.persistent_workers and cfg.optim.name == "adamw"
    # the COCO presets keep effdet's recipe: the options are off there
    coco = load("configs/detection/efficientdet_d0_coco.yaml")
    assert (coco.data.augment.mosaic, coco.model.detection.assigner, coco.loss.box_loss) == (0.0, "iou", "huber")


def test_demo_detection_trains_the_custom_preset_on_the_demo_data(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    code = main(["demo", "detection", "--preset", "detection/efficientdet_d0_custom", "--output", str(run),
                 "--set", "train.max_steps=2", "--set", "train.progress=false", "--set", "data.workers=0",
                 "--set", "data.persistent_workers=false", "--set", "data.image_size=128"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"mAP", "mAP50"} <= set(metrics)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["root"] == "runs/demo-data/detection" and saved["model"]["num_classes"] == 3
    assert saved["model"]["detection"]["assigner"] == "atss" and saved["loss"]["box_loss"] == "giou"


def test_demo_refuses_another_tasks_preset(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = main(["demo", "detection", "--preset", "classification/efficientnet_b0_imagenet", "--set",
                 "train.max_steps=1"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and "is a classification preset" in err
