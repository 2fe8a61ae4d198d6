"""Empty and duplicate labels (issue 15, items 5-7): refused in one line before training, never a silent result.

COCO: a split with no boxes is an error naming the json, some images without boxes train with a warning
giving the count, duplicate annotation ids are refused naming the ids (loader, data check, evaluator).
Segmentation: a split whose masks hold no labelled pixel is an error naming the folder and the ignore
value, single all-ignore masks are a warning with the count. The evaluators raise one-line
``EffdenseError`` subclasses instead of a RuntimeError or a row of -1. ``check_labels(cfg, level)``
runs the quick or full checks of both splits before the first training step.
"""

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.config
from backbones.errors import EffdenseError
from tasks.data import DataError, build_loaders, check_dataset
from tasks.data.synthetic.detection import write_coco
from tasks.data.synthetic.segmentation import write_cityscapes, write_maskfolder


def _one_line(error) -> str:
    text = str(error.value if hasattr(error, "value") else error)
    assert "\n" not in text and text
    return text


# ----------------------------------------------------------------------------------------------- COCO


@pytest.fixture
def coco(tmp_path):
    return write_coco(tmp_path / "coco", train_images=4, val_images=2, min_size=64, max_size=96)


def _coco_cfg(root, *overrides):
    return tasks.config.load("demo/detection", [f"data.root={root}", "data.workers=0", "train.device=cpu",
                                                "data.batch_size=2", *overrides])


def _edit(root, split, change):
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_empty_annotations_are_a_one_line_loader_error(coco):
    path = _edit(coco, "train", lambda data: data["annotations"].clear())
    with pytest.raises(DataError, match="no boxes") as error:
        build_loaders(_coco_cfg(coco))
    text = _one_line(error)
    assert str(path) in text and "'annotations' is empty" in text and "expected" in text


def test_empty_annotations_are_listed_by_data_check(coco):
    path = _edit(coco, "val", lambda data: data["annotations"].clear())
    cfg = _coco_cfg(coco)
    assert any("no boxes" in p for p in check_dataset(cfg, workers=1))
    from tasks.data import check_labels

    for problems in (check_dataset(cfg, workers=1), check_labels(cfg, "quick"), check_labels(cfg, "full")):
        empty = [p for p in problems if "no boxes" in p]
        assert len(empty) == 1 and str(path) in empty[0] and "\n" not in empty[0]


def test_some_images_without_boxes_train_with_a_warning(coco, caplog):
    data = json.loads((coco / "annotations" / "instances_train.json").read_text())
    cleared = {im["id"] for im in data["images"][:2]}

    def clear(data):
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in cleared]

    _edit(coco, "train", clear)
    data = json.loads((coco / "annotations" / "instances_train.json").read_text())
    with_boxes = {a["image_id"] for a in data["annotations"] if not a.get("iscrowd")}
    empty = sum(im["id"] not in with_boxes for im in data["images"])
    assert 2 <= empty < len(data["images"])
    with caplog.at_level(logging.WARNING, logger="effdense"):
        loaders = build_loaders(_coco_cfg(coco))
        next(iter(loaders["train"]))  # it trains
    assert f"{empty} of {len(data['images'])} images have no boxes" in caplog.text


def test_duplicate_annotation_ids_are_refused_naming_the_ids(coco):
    from tasks.data.coco import CocoFormatError
    from tasks.detection.evaluate import load_ground_truth

    def duplicate(data):
        first, second = data["annotations"][0], data["annotations"][1]
        data["annotations"][2]["id"] = first["id"]
        data["annotations"][3]["id"] = second["id"]

    path = _edit(coco, "train", duplicate)
    ids = [a["id"] for a in json.loads(path.read_text())["annotations"][:2]]
    with pytest.raises(CocoFormatError, match="duplicate annotation ids") as error:
        build_loaders(_coco_cfg(coco))
    text = _one_line(error)
    assert str(path) in text and f"{ids[0]}, {ids[1]}" in text and "expected unique" in text
    with pytest.raises(CocoFormatError, match="duplicate annotation ids"):
        load_ground_truth(path)  # the evaluator's path refuses them too
    from tasks.data import check_labels

    cfg = _coco_cfg(coco)
    for problems in (check_dataset(cfg, workers=1), check_labels(cfg, "quick")):
        assert [p for p in problems if "duplicate annotation ids" in p] == [text]


def test_coco_evaluator_without_ground_truth_boxes_is_a_one_line_error(coco):
    from tasks.detection.evaluate import CocoEvaluator, load_ground_truth

    path = _edit(coco, "val", lambda data: data["annotations"].clear())
    image_id = json.loads(path.read_text())["images"][0]["id"]
    evaluator = CocoEvaluator(load_ground_truth(path))
    detection = {"boxes": torch.tensor([[2.0, 2.0, 30.0, 30.0]]), "scores": torch.tensor([0.9]),
                 "labels": torch.tensor([0])}
    evaluator.update([detection], [{"image_id": image_id}])
    with pytest.raises(EffdenseError, match="no ground-truth boxes") as error:
        evaluator.compute()
    assert str(path) in _one_line(error)


# ---------------------------------------------------------------------------------------- segmentation


def _fill_masks(folder, value, pattern="*.png", count=None):
    paths = sorted(folder.rglob(pattern))[:count]
    for path in paths:
        with Image.open(path) as mask:
            size = mask.size
        Image.fromarray(np.full(size[::-1], value, dtype=np.uint8)).save(path)
    return paths


@pytest.fixture
def maskfolder(tmp_path):
    return write_maskfolder(tmp_path / "masks", train=4, val=2)


def _mask_cfg(root, *overrides):
    return tasks.config.load("demo/segmentation", [f"data.root={root}", "data.workers=0", "train.device=cpu",
                                                   "data.format=maskfolder", "model.num_classes=6", *overrides])


@pytest.mark.parametrize("split", ["train", "val"])
def test_all_ignore_masks_fail_before_training(maskfolder, split):
    from tasks.data import check_labels

    _fill_masks(maskfolder / "masks" / split, 255)
    cfg = _mask_cfg(maskfolder)
    for level in ("quick", "full"):
        problems = check_labels(cfg, level)
        assert len(problems) == 1, problems
        text = problems[0]
        assert "\n" not in text and str(maskfolder / "masks" / split) in text and "ignore_index=255" in text
        assert "no labelled pixel" in text


def test_all_ignore_cityscapes_val_fails_quick_check(tmp_path):
    from tasks.data import check_labels

    root = write_cityscapes(tmp_path / "cs", train_per_city=2, val_per_city=1, size=(64, 128))
    for label_ids in sorted((root / "gtFine" / "val").rglob("*_gtFine_labelIds.png")):  # preferred over labelIds
        with Image.open(label_ids) as mask:
            size = mask.size
        train_ids = label_ids.with_name(label_ids.name.replace("_labelIds", "_labelTrainIds"))
        Image.fromarray(np.full(size[::-1], 255, dtype=np.uint8)).save(train_ids)
    cfg = tasks.config.load("demo/segmentation", [f"data.root={root}", "data.workers=0", "train.device=cpu"])
    problems = check_labels(cfg, "quick")
    assert len(problems) == 1 and str(root / "gtFine" / "val") in problems[0] and "255" in problems[0]


def test_single_all_ignore_masks_are_a_warning_with_the_count(maskfolder, caplog):
    from tasks.data import check_labels

    _fill_masks(maskfolder / "masks" / "train", 255, count=2)
    cfg = _mask_cfg(maskfolder)
    with caplog.at_level(logging.WARNING, logger="effdense"):
        assert check_labels(cfg, "full") == [] and check_dataset(cfg, workers=1) == []
    assert "2 of 4 masks" in caplog.text and "no labelled pixel" in caplog.text


def test_quick_check_finds_a_bad_val_mask_before_training(maskfolder):
    from tasks.data import check_labels

    bad = _fill_masks(maskfolder / "masks" / "val", 9, count=1)[0]  # 9 >= num_classes=6
    cfg = _mask_cfg(maskfolder)
    problems = check_labels(cfg, "quick")
    assert len(problems) == 1 and str(bad) in problems[0] and "label values 9" in problems[0]


def test_segmentation_evaluator_without_labelled_pixels_is_a_one_line_error():
    from tasks.segmentation.evaluate import SegmentationEvaluator

    evaluator = SegmentationEvaluator(3)
    evaluator.update(torch.zeros(1, 3, 4, 4), torch.full((1, 4, 4), 255))
    with pytest.raises(EffdenseError, match="no labelled pixels") as error:
        evaluator.compute()
    assert "ignore_index=255" in _one_line(error) and "effdense data check" in str(error.value)


# ----------------------------------------------------------------------------------- check_labels levels


def test_check_labels_levels_on_clean_data(coco, maskfolder, tmp_path):
    from tasks.data import check_labels
    from tasks.data.synthetic.classification import write_classification

    folder = write_classification(tmp_path / "cls", num_classes=3, train_per_class=2, val_per_class=1)
    configs = [_coco_cfg(coco), _mask_cfg(maskfolder),
               tasks.config.load("demo/classification", [f"data.root={folder}", "model.num_classes=3",
                                                         "data.workers=0", "train.device=cpu"])]
    for cfg in configs:
        for level in ("off", "quick", "full"):
            assert check_labels(cfg, level) == [], (cfg.data.format, level)
    broken = _coco_cfg(coco)
    (coco / "annotations" / "instances_val.json").write_text("{")
    assert check_labels(broken, "off") == [] and len(check_labels(broken, "quick")) == 1
    with pytest.raises(ValueError, match="data.check='fast'.*full, quick, off"):
        check_labels(broken, "fast")


def test_every_format_has_a_label_check():
    from tasks.data import FORMATS
    from tasks.data.check import _CHECKS

    assert set(_CHECKS) == set(FORMATS)  # a new format row needs its quick/full checker in tasks.data.check
