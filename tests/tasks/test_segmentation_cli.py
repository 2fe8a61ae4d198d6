"""Segmentation through the CLI and the engine: train, eval (per-class table), predict (Cityscapes files)."""

import json
from pathlib import Path

import pytest

from tasks.cli import main

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo" / "segmentation.yaml")


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    from tasks.data.synthetic.segmentation import write_cityscapes

    return write_cityscapes(tmp_path_factory.mktemp("seg") / "city", train_per_city=2, val_per_city=1, size=(64, 128))


def _tiny(root):
    args = []
    for item in (f"data.root={root}", "data.image_size=64", "data.batch_size=2", "data.workers=0",
                 "train.epochs=1", "train.eval_every=1", "train.checkpoint_every=1", "train.progress=false",
                 "model.backbone=efficientnet-lite0"):
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained(scenes, tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "seg"
    assert main(["train", DEMO, *_tiny(scenes), "--output", str(run)]) == 0
    return run


def test_train_writes_the_per_class_table(trained):
    for name in ("last.pt", "best.pt", "model.safetensors", "metrics.jsonl", "per_class_iou.txt", "per_class_iou.csv"):
        assert (trained / name).is_file(), name
    header, *rows = (trained / "per_class_iou.csv").read_text().splitlines()
    assert header == "class,iou,pixel_share" and len(rows) == 19 and rows[0].startswith("road,")
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["val/mIoU"] <= 1 and "val/iou/road" in record and "val/mIoU_category" in record


def test_eval_json_holds_the_per_class_ious_and_output_writes_files(scenes, trained, tmp_path, capsys):
    assert main(["eval", DEMO, *_tiny(scenes), "--weights", str(trained / "best.pt"), "--json",
                 "--output", str(tmp_path)]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "mIoU" in metrics and "iou/road" in metrics and "pixel_acc" in metrics
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert metrics["mIoU"] == pytest.approx(record["val/mIoU"])
    assert (tmp_path / "per_class_iou.txt").is_file() and json.loads((tmp_path / "metrics.json").read_text()) == metrics


def test_predict_writes_cityscapes_label_id_pngs_at_the_original_size(scenes, trained, tmp_path):
    from PIL import Image

    images = sorted((Path(scenes) / "leftImg8bit" / "val").glob("*/*_leftImg8bit.png"))
    assert main(["predict", DEMO, *_tiny(scenes), "--weights", str(trained / "model.safetensors"),
                 *map(str, images), "--out", str(tmp_path)]) == 0
    for image in images:
        stem = image.name[: -len("_leftImg8bit.png")]
        for suffix in ("_labelIds.png", "_trainIds.png", "_overlay.png"):
            written = tmp_path / f"{stem}{suffix}"
            assert written.is_file() and Image.open(written).size == Image.open(image).size
        label_ids = set(Image.open(tmp_path / f"{stem}_labelIds.png").getdata())
        assert label_ids <= {7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33}  # eval ids only


def test_cityscapes_trainids_command(scenes, tmp_path, capsys):
    import shutil

    copy = tmp_path / "city"
    shutil.copytree(scenes, copy)
    assert main(["data", "cityscapes-trainids", str(copy)]) == 0
    written = sorted(copy.glob("gtFine/*/*/*_gtFine_labelTrainIds.png"))
    assert len(written) == len(list(copy.glob("gtFine/*/*/*_gtFine_labelIds.png"))) > 0
    assert f"wrote {len(written)}" in capsys.readouterr().out


def test_data_synth_and_check_segmentation(tmp_path, capsys):
    assert main(["data", "synth", "segmentation", str(tmp_path / "city")]) == 0
    assert main(["data", "check", DEMO, "--set", f"data.root={tmp_path / 'city'}"]) == 0
    assert "no problems found" in capsys.readouterr().out
    assert main(["data", "synth", "segmentation", str(tmp_path / "masks"), "--format", "maskfolder"]) == 0
    folder = str(REPO / "configs" / "segmentation" / "unet_efficientnet_folder.yaml")
    assert main(["data", "check", folder, "--set", f"data.root={tmp_path / 'masks'}", "--set", "model.num_classes=6"]) == 0


@pytest.mark.slow
def test_segmentation_demo_reaches_07_miou(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "segmentation", "--output", str(tmp_path / "run"), "--set", "train.progress=false"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["mIoU"] >= 0.7
