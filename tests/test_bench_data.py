"""bench/shapes_data.py (the side-by-side benchmark's data) and the benchmark's COCO scoring, on 4 images.

Neither imports ultralytics: only bench/detector_vs_ultralytics.py's child processes do, at run time.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes_data = _module("shapes_data")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-data")
    coco = shapes_data.write_shapes_coco(root / "coco", train_images=3, val_images=1, size=128, seed=5)
    data_yaml = shapes_data.coco_to_yolo(coco, root / "yolo")
    return coco, root / "yolo", data_yaml


def _json(coco: Path, split: str) -> dict:
    return json.loads((coco / "annotations" / f"instances_{split}.json").read_text())


def test_the_writer_is_deterministic_and_lays_out_coco(dataset, tmp_path):
    coco, _, _ = dataset
    again = shapes_data.write_shapes_coco(tmp_path / "again", train_images=3, val_images=1, size=128, seed=5)
    for split in ("train", "val"):
        assert _json(again, split) == _json(coco, split)
        names = sorted(p.name for p in (coco / split).iterdir())
        assert names == sorted(p.name for p in (again / split).iterdir())
        assert all((coco / split / n).read_bytes() == (again / split / n).read_bytes() for n in names)
    data = _json(coco, "train")
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert len(data["images"]) == 3 and len(_json(coco, "val")["images"]) == 1
    for ann in data["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 23 <= w <= 81 and 23 <= h <= 81 and x >= 0 and y >= 0 and x + w <= 128 and y + h <= 128
    counts = {image["id"]: 0 for image in data["images"]}
    for ann in data["annotations"]:
        counts[ann["image_id"]] += 1
    assert min(counts.values()) == 0 and all(n <= 6 for n in counts.values())  # image 1 has no object


def test_the_writer_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing"):
        shapes_data.write_shapes_coco(tmp_path, 2, 1)


def test_yolo_labels_are_the_coco_boxes_normalised(dataset):
    coco, yolo, data_yaml = dataset
    spec = yaml.safe_load(data_yaml.read_text())
    assert Path(spec["path"]) == yolo.resolve() and spec["train"] == "images/train" and spec["val"] == "images/val"
    assert spec["names"] == {0: "square", 1: "circle", 2: "triangle"}
    empty = 0
    for split in ("train", "val"):
        data = _json(coco, split)
        for image in data["images"]:
            stem = Path(image["file_name"]).stem
            assert (yolo / "images" / split / image["file_name"]).read_bytes() == \
                (coco / split / image["file_name"]).read_bytes()
            lines = (yolo / "labels" / split / f"{stem}.txt").read_text().splitlines()
            anns = [a for a in data["annotations"] if a["image_id"] == image["id"]]
            assert len(lines) == len(anns)
            empty += not lines
            W, H = image["width"], image["height"]
            for line, ann in zip(lines, anns):
                fields = line.split()
                x, y, w, h = ann["bbox"]
                assert int(fields[0]) == {1: 0, 2: 1, 3: 2}[ann["category_id"]]
                assert [float(v) for v in fields[1:]] == pytest.approx(
                    [(x + w / 2) / W, (y + h / 2) / H, w / W, h / H], abs=1e-6)
    assert empty >= 1  # the image without objects has an empty label file


def test_the_benchmark_scores_detections_with_cocoeval(dataset):
    coco, _, _ = dataset
    bench = _module("detector_vs_ultralytics")
    val = coco / "annotations" / "instances_train.json"
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0}
               for a in _json(coco, "train")["annotations"]]
    assert bench.coco_score(val, perfect)["mAP"] == pytest.approx(1.0)
    assert bench.coco_score(val, perfect)["mAP50"] == pytest.approx(1.0)
    wrong_class = [dict(d, category_id=d["category_id"] % 3 + 1) for d in perfect]
    assert bench.coco_score(val, wrong_class)["mAP50"] == 0.0
    assert bench.coco_score(val, [])["mAP"] == 0.0
    assert "ultralytics" not in sys.modules
