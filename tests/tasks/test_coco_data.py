"""COCO-format data: the synthetic writer, the dataset and its transforms, the evaluator, bad input."""

import json
import logging
import shutil

import pytest
import torch

from tasks.data import DataError
from tasks.data.coco import BadAnnotationError, CocoDetection, CocoFormatError, MissingImageError, check_coco
from tasks.data.transforms.detection import (DetectionEvalTransform, DetectionTrainTransform, detection_collate, letterbox,
                                       unletterbox_boxes)
from tasks.data.synthetic.detection import write_coco
from tasks.detection.evaluate import STAT_NAMES, CocoEvaluator, load_ground_truth


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("coco") / "data", train_images=12, val_images=8, seed=3)


def _copy(synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    return root


def _edit(root, split, change):
    path = root / "annotations" / f"instances_{split}.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return path


def test_writer_is_deterministic_coco_layout(synth, tmp_path):
    again = write_coco(tmp_path / "again", train_images=12, val_images=8, seed=3)
    for name in ("annotations/instances_train.json", "annotations/instances_val.json", "train/train_00003.jpg"):
        assert (synth / name).read_bytes() == (again / name).read_bytes()
    data = json.loads((synth / "annotations/instances_val.json").read_text())
    assert [c["id"] for c in data["categories"]] == [3, 7, 11]  # not contiguous
    assert any(a["iscrowd"] for a in data["annotations"])
    with_objects = {a["image_id"] for a in data["annotations"]}
    assert any(im["id"] not in with_objects for im in data["images"])  # an image without objects
    assert check_coco(synth, "train") == [] and check_coco(synth, "val") == []


def test_dataset_maps_categories_and_keeps_empty_images_and_crowds(synth):
    dataset = CocoDetection(synth, "val")
    assert dataset.classes == ["square", "circle", "triangle"] and dataset.cat_ids == [3, 7, 11]
    assert dataset.cat_to_label == {3: 0, 7: 1, 11: 2} and len(dataset) == 8
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and len(target["boxes"]) == 0  # kept, no objects
    image, target = dataset[1]
    assert target["iscrowd"].any() and target["image_id"] == dataset.images[1]["id"]
    assert target["labels"].max() < 3 and (target["boxes"][:, 2:] > target["boxes"][:, :2]).all()


def test_degenerate_boxes_dropped_and_max_instances(synth, tmp_path, caplog):
    root = _copy(synth, tmp_path)

    def change(data):
        first = data["annotations"][0]
        image = next(im for im in data["images"] if im["id"] == first["image_id"])
        data["annotations"].append(dict(first, id=99999, bbox=[image["width"] - 0.5, 5, 0.0, 10]))  # w = 0

    _edit(root, "train", change)
    with caplog.at_level(logging.INFO, logger="effdense"):
        dataset = CocoDetection(root, "train", max_instances=1)
    assert dataset.degenerate_boxes == 1 and "dropped 1 degenerate boxes" in caplog.text
    assert max(len(dataset.target(i)["boxes"]) for i in range(len(dataset))) == 1 and dataset.capped_images > 0


def test_train_transform_output_and_eval_letterbox_inverse(synth):
    dataset = CocoDetection(synth, "train", DetectionTrainTransform(96))
    torch.manual_seed(0)
    images, targets = detection_collate([dataset[i] for i in range(4)])
    assert images.shape == (4, 3, 96, 96) and images.dtype == torch.uint8
    for target in targets:
        boxes = target["boxes"]
        assert ((boxes >= 0) & (boxes <= 96)).all() and len(boxes) == len(target["labels"]) == len(target["iscrowd"])
    raw = CocoDetection(synth, "val")
    image, target = raw[2]
    boxed, meta, moved = letterbox(image, 128, boxes=target["boxes"])
    assert boxed.shape == (3, 128, 128) and max(meta["scale"]) * max(image.shape[-2:]) == pytest.approx(128, abs=0.5)
    torch.testing.assert_close(unletterbox_boxes(moved, meta), target["boxes"], atol=1e-3, rtol=0)
    _, evaluated = CocoDetection(synth, "val", DetectionEvalTransform(128))[2]
    torch.testing.assert_close(evaluated["boxes"], moved)


def _ground_truth_detections(dataset):
    """The split's own non-crowd boxes as detections in input pixels (what a perfect model outputs)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=detection_collate)
    for _, targets in loader:
        detections = [{"boxes": t["boxes"][~t["iscrowd"]], "labels": t["labels"][~t["iscrowd"]],
                       "scores": torch.linspace(1.0, 0.5, int((~t["iscrowd"]).sum()))} for t in targets]
        yield detections, targets


def test_ground_truth_as_detections_scores_map_one(synth, tmp_path):
    dataset = CocoDetection(synth, "val", DetectionEvalTransform(160))
    evaluator = CocoEvaluator(dataset.annotation_file)
    for detections, targets in _ground_truth_detections(dataset):
        evaluator.update(detections, targets)
    metrics = evaluator.compute()
    evaluator.save(tmp_path)
    assert list(metrics) == list(STAT_NAMES)
    assert metrics["mAP"] == pytest.approx(1.0) and metrics["mAP50"] == pytest.approx(1.0)
    written = json.loads((tmp_path / "detections.json").read_text())
    assert {r["category_id"] for r in written} <= {3, 7, 11}
    assert {r["image_id"] for r in written} <= {im["id"] for im in dataset.images}


def test_reported_map_equals_pycocotools_on_the_written_json(synth, tmp_path):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    dataset = CocoDetection(synth, "val", DetectionEvalTransform(160))
    evaluator = CocoEvaluator(dataset.annotation_file)
    generator = torch.Generator().manual_seed(0)
    for detections, targets in _ground_truth_detections(dataset):
        for d in detections:  # perturbed, re-labelled and re-scored: a mediocre detector
            d["boxes"] = d["boxes"] + 6 * torch.randn(d["boxes"].shape, generator=generator)
            d["labels"] = torch.where(torch.rand(len(d["labels"]), generator=generator) < 0.2, 0, d["labels"])
            d["scores"] = torch.rand(len(d["labels"]), generator=generator)
        evaluator.update(detections, targets)
    ours = evaluator.compute()
    evaluator.save(tmp_path)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(dataset.annotation_file))
        reference = COCOeval(gt, gt.loadRes(str(tmp_path / "detections.json")), "bbox")
        reference.evaluate()
        reference.accumulate()
        reference.summarize()
    assert 0.05 < ours["mAP"] < 0.95
    assert [ours[name] for name in STAT_NAMES] == pytest.approx(list(reference.stats), abs=1e-12)


def test_empty_results_do_not_crash(synth):
    dataset = CocoDetection(synth, "val", DetectionEvalTransform(128))
    evaluator = CocoEvaluator(dataset.annotation_file)
    _, target = dataset[3]
    evaluator.update([{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0).long()}],
                     [target])
    assert evaluator.compute() == {name: 0.0 for name in STAT_NAMES}


# ------------------------------------------------------------------------------------------ bad input


def test_not_json_and_missing_keys_are_one_line_errors(synth, tmp_path):
    root = _copy(synth, tmp_path)
    path = root / "annotations" / "instances_train.json"
    path.write_text('{"images": [')
    with pytest.raises(CocoFormatError, match=r"instances_train.json: not valid JSON \(line 1 column 13"):
        CocoDetection(root, "train")
    path.write_text(json.dumps({"images": [], "categories": []}))
    with pytest.raises(CocoFormatError, match="missing top-level key 'annotations'") as error:
        CocoDetection(root, "train")
    assert "\n" not in str(error.value) and isinstance(error.value, DataError)
    path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [], "categories": []}))
    with pytest.raises(CocoFormatError, match="images record id 1 lacks 'width', 'height'") as error:
        CocoDetection(root, "train")
    assert check_coco(root, "train") == [str(error.value)]  # data check lists the same line


@pytest.mark.parametrize("bbox_change, message", [
    (lambda b, im: [b[0], b[1], im["width"], b[3]], r"extends \d+\.\d px outside the image"),
    (lambda b, im: [b[0], b[1], -4, b[3]], "has a negative size"),
])
def test_bad_boxes_name_the_file_and_record(synth, tmp_path, bbox_change, message):
    root = _copy(synth, tmp_path)

    def change(data):
        ann = next(a for a in data["annotations"] if not a["iscrowd"])
        image = next(im for im in data["images"] if im["id"] == ann["image_id"])
        ann["bbox"] = bbox_change(ann["bbox"], image)
        ann["id"] = 4242

    _edit(root, "train", change)
    with pytest.raises(BadAnnotationError, match=r"instances_train.json: annotation id 4242 \(image id \d+, "
                                                 r"'train_\d+.jpg' \d+x\d+\): bbox .*" + message):
        CocoDetection(root, "train")
    skipped = CocoDetection(root, "train", on_bad_sample="skip")
    assert skipped.dropped_annotations == 1
    assert any("annotation id 4242" in p for p in check_coco(root, "train"))


def test_unknown_category_and_xyxy_boxes(synth, tmp_path):
    root = _copy(synth, tmp_path)
    _edit(root, "train", lambda data: data["annotations"][0].update(category_id=5))
    with pytest.raises(BadAnnotationError, match=r"unknown category_id 5; expected one of the 3 category ids "
                                                 r"\(3..11\)"):
        CocoDetection(root, "train")

    def to_corners(data):
        for ann in data["annotations"]:
            x, y, w, h = ann["bbox"]
            ann["bbox"] = [x, y, x + w, y + h]
        data["annotations"][0]["category_id"] = 3

    _edit(root, "val", to_corners)
    problems = check_coco(root, "val")
    assert problems[0].endswith("COCO expects [x, y, width, height]") and "looks like [x1, y1, x2, y2]" in problems[0]


def test_missing_and_unreadable_images(synth, tmp_path):
    root = _copy(synth, tmp_path)
    (root / "val" / "val_00002.jpg").unlink()
    (root / "val" / "val_00004.jpg").write_bytes(b"not a jpeg")
    dataset = CocoDetection(root, "val")
    with pytest.raises(MissingImageError, match=r"val_00002.jpg: listed in .*instances_val.json \(image id \d+\) "
                                                r"but not found"):
        dataset[2]
    skipping = CocoDetection(root, "val", on_bad_sample="skip")
    _, target = skipping[2]
    assert target["image_id"] == skipping.images[3]["id"] and len(skipping.bad_samples) == 1
    problems = check_coco(root, "val")
    assert len(problems) == 2 and "not found" in problems[0] and "not a readable image" in problems[1]


def test_a_missing_split_names_the_splits_there(synth):
    """`effdense data synth detection` writes train/val; a COCO preset reads train2017: say so."""
    from tasks.data.coco import read_annotation_file

    with pytest.raises(CocoFormatError, match=r"instances_train2017.json: annotation file not found; .*"
                                              r"has the splits train, val: set data.train_split"):
        read_annotation_file(synth / "annotations" / "instances_train2017.json")


def test_category_id_label_map_is_effdets_layout(synth, tmp_path):
    """data.label_map=category_id: label = category id - 1 with max(id) classes (effdet's 90-class COCO
    layout); the synthetic ids are 3, 7, 11, so 11 classes, 8 of them never occurring."""
    from tasks.data.coco import category_maps, read_annotation_file

    dataset = CocoDetection(synth, "val", DetectionEvalTransform(160), label_map="category_id")
    contiguous = CocoDetection(synth, "val", DetectionEvalTransform(160))
    assert dataset.num_classes == 11 and dataset.cat_ids == list(range(1, 12))
    assert dataset.classes[2] == "square" and dataset.classes[6] == "circle" and dataset.classes[0] == "id-1"
    for index in range(len(dataset)):  # the same boxes, labels moved from 0..2 to id - 1
        (_, ours), (_, theirs) = dataset[index], contiguous[index]
        assert torch.equal(ours["boxes"], theirs["boxes"])
        assert ours["labels"].tolist() == [[3, 7, 11][k] - 1 for k in theirs["labels"].tolist()]
    evaluator = CocoEvaluator(load_ground_truth(dataset.annotation_file, "category_id"))
    for detections, targets in _ground_truth_detections(dataset):
        evaluator.update(detections, targets)
    assert evaluator.compute()["mAP"] == pytest.approx(1.0)
    evaluator.save(tmp_path)
    assert {r["category_id"] for r in json.loads((tmp_path / "detections.json").read_text())} == {3, 7, 11}
    with pytest.raises(CocoFormatError, match="category id 0 < 1, but data.label_map=category_id"):
        category_maps([{"id": 0, "name": "bg"}, {"id": 1, "name": "a"}], "category_id", "x.json")
    categories = read_annotation_file(dataset.annotation_file)["categories"]
    assert category_maps(categories)[0] == [3, 7, 11]


def test_label_map_in_the_config_sizes_the_model(synth):
    from tasks.config import load
    from tasks.data import build_loaders

    sets = [f"data.root={synth}", "data.workers=0", "train.device=cpu", "data.label_map=category_id"]
    with pytest.raises(DataError, match=r"has category ids up to 11 \(data.label_map=category_id.*model.num_classes=11"):
        build_loaders(load("configs/demo/detection.yaml", [*sets, "model.num_classes=3"]), splits=("val",))
    loader = build_loaders(load("configs/demo/detection.yaml", [*sets, "model.num_classes=11"]), splits=("val",))
    assert loader["val"].dataset.num_classes == 11
    from tasks import registry

    task = registry.build_model(load("configs/demo/detection.yaml", [*sets, "model.num_classes=11"]))
    assert task.cat_ids == list(range(1, 12)) and task.make_evaluator().gt.cat_ids == list(range(1, 12))
