"""Detection through the CLI and the engine: train, eval (12 COCO stats, detections.json), predict."""

import json
from pathlib import Path

import pytest

from tasks.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo" / "detection.yaml")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    from tasks.data.synthetic.detection import write_coco

    return write_coco(tmp_path_factory.mktemp("det") / "coco", train_images=8, val_images=4, min_size=128, max_size=160)


def _tiny(root):
    args = []
    for item in (f"data.root={root}", "data.image_size=128", "data.batch_size=4", "data.workers=0",
                 "train.epochs=1", "train.eval_every=1", "train.checkpoint_every=1", "train.progress=false"):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "det"
    assert main(["train", DEMO, *_tiny(shapes), "--output", str(run)]) == 0
    return run


def test_train_writes_detections_and_the_twelve_stats(trained):
    from tasks.detection.evaluate import STAT_NAMES

    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert all(f"val/{name}" in record for name in STAT_NAMES)
    detections = json.loads((trained / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {3, 7, 11}  # the json's own (non-contiguous) ids
    report = json.loads((trained / "coco_eval.json").read_text())
    assert report["stats"]["mAP"] == pytest.approx(record["val/mAP"]) and report["postprocess"]["nms"] == "hard"


def test_eval_output_writes_detections_json_that_pycocotools_scores_the_same(shapes, trained, tmp_path, capsys):
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    assert main(["eval", DEMO, *_tiny(shapes), "--weights", str(trained / "best.pt"), "--json",
                 "--output", str(tmp_path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(Path(shapes) / "annotations" / "instances_val.json"))
        evaluation = COCOeval(gt, gt.loadRes(str(tmp_path / "detections.json")), "bbox")
        evaluation.evaluate(), evaluation.accumulate(), evaluation.summarize()
    assert metrics["mAP"] == pytest.approx(evaluation.stats[0]) and metrics["mAP50"] == pytest.approx(evaluation.stats[1])


def test_predict_draws_boxes_without_the_dataset(shapes, trained, tmp_path, capsys):
    images = sorted((Path(shapes) / "val").glob("*.*"))[:2]
    assert main(["predict", DEMO, "--set", "data.root=/nonexistent", "--set", "data.image_size=128",
                 "--weights", str(trained / "model.safetensors"), *map(str, images), "--out", str(tmp_path),
                 "--score-threshold", "0.0"]) == 0
    for image in images:  # the drawn image beside, never in place of, the input
        assert (tmp_path / f"{image.stem}_boxes{'.jpg' if image.suffix.lower() in ('.jpg', '.jpeg') else '.png'}").is_file()
    rows = json.loads((tmp_path / "detections.json").read_text())
    assert rows and {r["category_id"] for r in rows} <= {3, 7, 11}  # ids from the weights' metadata


def test_data_synth_and_check_detection(tmp_path, capsys):
    root = tmp_path / "coco"
    assert main(["data", "synth", "detection", str(root)]) == 0
    assert main(["data", "check", DEMO, "--set", f"data.root={root}"]) == 0
    bad = json.loads((root / "annotations" / "instances_val.json").read_text())
    bad["annotations"][0]["category_id"] = 99
    (root / "annotations" / "instances_val.json").write_text(json.dumps(bad))
    assert main(["data", "check", DEMO, "--set", f"data.root={root}"]) == 1
    assert "99" in capsys.readouterr().out


@pytest.mark.slow
def test_detection_demo_reaches_05_map50(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "detection", "--output", str(tmp_path / "run"), "--set", "train.progress=false"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["mAP50"] >= 0.5


def test_eval_effdet_90_class_weights_with_the_category_id_map(shapes, tmp_path, capsys):
    """effdet's COCO checkpoints have 90 classes, label = category id - 1: with data.label_map=category_id
    they evaluate through the CLI as they are, and detections.json holds ids over the whole 1..90 range."""
    import shutil

    import effdet
    import torch

    root = tmp_path / "coco"
    shutil.copytree(shapes, root)
    for split in ("train", "val"):  # the synthetic ids are 3, 7, 11; COCO's last id is 90
        path = root / "annotations" / f"instances_{split}.json"
        data = json.loads(path.read_text())
        data["categories"].append({"id": 90, "name": "toothbrush"})
        path.write_text(json.dumps(data))
    theirs = effdet.create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False)
    weights = tmp_path / "tf_efficientdet_d0.pth"
    torch.save({"state_dict": theirs.state_dict()}, weights)
    sets = [*_tiny(root), "--set", "data.label_map=category_id", "--set", "model.num_classes=90",
            "--set", "model.padding=same", "--set", "model.norm_eps=0.001"]
    assert main(["eval", DEMO, *sets, "--weights", str(weights), "--output", str(tmp_path / "out"), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(metrics) >= {"mAP", "mAP50", "AR100"}
    ids = {r["category_id"] for r in json.loads((tmp_path / "out" / "detections.json").read_text())}
    assert ids <= set(range(1, 91)) and len(ids) > 11, sorted(ids)
    # The same weights with the default contiguous map: one line saying what to set.
    assert main(["eval", DEMO, *_tiny(root), "--set", "model.num_classes=90", "--weights", str(weights)]) == 2
    err = capsys.readouterr().err
    assert "has 4 categories; set model.num_classes=4 (or data.label_map=category_id" in err
