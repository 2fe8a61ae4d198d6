"""``effdense predict`` output files (issue 15, items 2 and 10).

Never write over an input or over a file already in ``--out``; two inputs with one base name get two
outputs, and the json points each input at its own file. A score threshold that hides detections says
so; labels are drawn on a filled background that stays inside the image.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image, ImageDraw, ImageFont

from tasks.config import load
from tasks.detection import DetectionTask, build_detector, draw_detections, predict_paths
from tasks.segmentation import SegmentationTask, build_segmenter
from tasks.segmentation.predict import predict as segment_files

SEG_DEMO = "configs/demo/segmentation.yaml"
CLS_DEMO = "configs/demo/classification.yaml"


def _photo(path: Path, size=(64, 64), seed: int = 0) -> Path:
    """A small random RGB image file (PNG or JPEG by the suffix)."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=g).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _fake_detector(scores=(0.9, 0.6), names=("cat", "dog", "bird")):
    """A stand-in with DetectionTask's predict interface: the same fixed boxes on every image."""
    n = len(scores)
    boxes = torch.tensor([[4.0 + i, 6.0, 30.0 + i, 40.0] for i in range(n)]).reshape(n, 4)
    detection = {"boxes": boxes, "scores": torch.tensor(scores, dtype=torch.float32).reshape(n),
                 "labels": torch.arange(n) % len(names)}
    return SimpleNamespace(class_names=list(names), cat_ids=None,
                           detect=lambda images, size=None: [{k: v.clone() for k, v in detection.items()}
                                                             for _ in images])


def _segmenter():
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 19, decoder_channels=(16, 8, 8, 8, 8))
    return SegmentationTask(net, class_names=[f"c{i}" for i in range(19)]).eval()


def _seg_cfg():
    return load(SEG_DEMO, ["train.device=cpu", "data.image_size=[64,64]", "data.root=/nonexistent"])


# ----------------------------------------------------------------------------- never write over an input

def test_detection_out_equal_to_the_input_folder_keeps_the_photo(tmp_path, capsys):
    folder = tmp_path / "photos"
    photos = [_photo(folder / "street.jpg", seed=1), _photo(folder / "yard.png", seed=2)]
    before = [p.read_bytes() for p in photos]
    task = DetectionTask(build_detector("efficientdet-d0", num_classes=3, max_detections=5)).eval()
    with torch.no_grad():
        results = predict_paths(task, [str(p) for p in photos], out=str(folder), size=(64, 64),
                                score_threshold=0.0)
    assert [p.read_bytes() for p in photos] == before
    drawn = [Path(r["drawn"]) for r in results]
    assert [p.name for p in drawn] == ["street_boxes.jpg", "yard_boxes.png"]
    assert all(p.is_file() for p in drawn)
    rows = json.loads((folder / "detections.json").read_text())
    assert {(r["file_name"], r["drawn"]) for r in rows} == {(str(p), str(d)) for p, d in zip(photos, drawn)}


def test_segmentation_out_equal_to_the_input_folder_keeps_every_input(tmp_path, capsys):
    # A second run over a folder that holds the first run's outputs: scene.png's overlay name is an input.
    folder = tmp_path / "scenes"
    inputs = [_photo(folder / "scene.png", seed=3), _photo(folder / "scene_overlay.png", seed=4)]
    before = [p.read_bytes() for p in inputs]
    with torch.no_grad():
        results = segment_files(_seg_cfg(), _segmenter(), [str(p) for p in inputs], out=str(folder))
    assert [p.read_bytes() for p in inputs] == before
    written = [Path(f) for r in results for f in r["files"].values()]
    assert len(set(written)) == len(written) == 6 and all(p.is_file() for p in written)
    assert not {p.resolve() for p in written} & {p.resolve() for p in inputs}


# ------------------------------------------------------------------------- one base name, two folders

def test_detection_same_base_name_in_two_folders_gives_two_drawn_files(tmp_path, capsys):
    inputs = [_photo(tmp_path / "a" / "img.png", seed=5), _photo(tmp_path / "b" / "img.png", seed=6)]
    out = tmp_path / "out"
    results = predict_paths(_fake_detector(), [str(p) for p in inputs], out=str(out), score_threshold=0.3)
    drawn = [Path(r["drawn"]) for r in results]
    assert [p.name for p in drawn] == ["a_img_boxes.png", "b_img_boxes.png"] and all(p.is_file() for p in drawn)
    rows = json.loads((out / "detections.json").read_text())
    pointers = {r["image_id"]: r["drawn"] for r in rows}
    assert pointers == {0: str(drawn[0]), 1: str(drawn[1])}
    assert "a_img_boxes.png" in capsys.readouterr().out  # the summary says where the renamed image went


def test_segmentation_same_base_name_in_two_folders_gives_two_sets_of_files(tmp_path, capsys):
    inputs = [_photo(tmp_path / "a" / "img.png", seed=7), _photo(tmp_path / "b" / "img.png", seed=8)]
    out = tmp_path / "out"
    with torch.no_grad():
        segment_files(_seg_cfg(), _segmenter(), [str(p) for p in inputs], out=str(out))
    entries = json.loads((out / "predictions.json").read_text())
    overlays = [Path(e["files"]["overlay"]) for e in entries]
    assert [e["image"] for e in entries] == [str(p) for p in inputs]
    assert [p.name for p in overlays] == ["a_img_overlay.png", "b_img_overlay.png"]
    files = [Path(f) for e in entries for f in e["files"].values()]
    assert len(set(files)) == len(files) == 6 and all(p.is_file() for p in files)


def test_cityscapes_stems_are_kept_when_they_do_not_clash(tmp_path, capsys):
    inputs = [_photo(tmp_path / "aachen" / "aachen_000000_000019_leftImg8bit.png", seed=9),
              _photo(tmp_path / "bonn" / "bonn_000001_000019_leftImg8bit.png", seed=10)]
    with torch.no_grad():
        results = segment_files(_seg_cfg(), _segmenter(), [str(p) for p in inputs], out=str(tmp_path / "o"))
    assert [Path(r["files"]["label_ids"]).name for r in results] == ["aachen_000000_000019_labelIds.png",
                                                                     "bonn_000001_000019_labelIds.png"]


# ------------------------------------------------------------------ files already in --out stay untouched

def test_detection_existing_files_in_out_are_not_overwritten(tmp_path, capsys):
    photo = _photo(tmp_path / "in" / "img.png")
    out = tmp_path / "out"
    out.mkdir()
    sentinels = {name: f"not ours: {name}".encode() for name in ("img.png", "img_boxes.png", "detections.json")}
    for name, data in sentinels.items():
        (out / name).write_bytes(data)
    results = predict_paths(_fake_detector(), [str(photo)], out=str(out), score_threshold=0.3)
    assert {name: (out / name).read_bytes() for name in sentinels} == sentinels
    assert Path(results[0]["drawn"]) == out / "img-1_boxes.png" and (out / "img-1_boxes.png").is_file()
    rows = json.loads((out / "detections-1.json").read_text())
    assert rows and rows[0]["drawn"] == str(out / "img-1_boxes.png")
    printed = capsys.readouterr().out
    assert str(out / "detections-1.json") in printed and "img-1_boxes.png" in printed


def test_segmentation_existing_files_in_out_are_not_overwritten(tmp_path, capsys):
    photo = _photo(tmp_path / "in" / "img.png")
    out = tmp_path / "out"
    out.mkdir()
    sentinels = {name: f"not ours: {name}".encode()
                 for name in ("img_overlay.png", "img_trainIds.png", "predictions.json")}
    for name, data in sentinels.items():
        (out / name).write_bytes(data)
    with torch.no_grad():
        results = segment_files(_seg_cfg(), _segmenter(), [str(photo)], out=str(out))
    assert {name: (out / name).read_bytes() for name in sentinels} == sentinels
    assert Path(results[0]["files"]["overlay"]).name == "img-1_overlay.png"
    assert json.loads((out / "predictions-1.json").read_text())[0]["files"] == results[0]["files"]
    assert str(out / "predictions-1.json") in capsys.readouterr().out


def test_classification_existing_predictions_json_is_not_overwritten(tmp_path, capsys):
    from tasks import registry
    from tasks.classification.predict import predict

    cfg = load(CLS_DEMO, ["train.device=cpu", "data.image_size=32", "data.root=/nonexistent"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.json").write_text("not ours")
    with torch.no_grad():
        predict(cfg, registry.build_model(cfg).eval(), [str(_photo(tmp_path / "img.png", (32, 32)))],
                out=str(out), topk=2)
    assert (out / "predictions.json").read_text() == "not ours"
    assert len(json.loads((out / "predictions-1.json").read_text())[0]["top"]) == 2
    assert str(out / "predictions-1.json") in capsys.readouterr().out


# ----------------------------------------------------------------------------------------- the naming rule

def test_output_stems_rule(tmp_path):
    from tasks.data.outputs import plan_output_stems

    stems = plan_output_stems([tmp_path / "a" / "img.png", tmp_path / "b" / "IMG.jpg", tmp_path / "c" / "x.png",
                               tmp_path / "c" / "x.png", tmp_path / "d" / "x.png"], tmp_path / "out", ["_boxes.png"])
    # case-insensitive clash -> parent folders; the same file twice -> a numeric suffix as the last resort
    assert stems == ["a_img", "b_IMG", "c_x", "c_x-1", "d_x"]


# ------------------------------------------------------------------------------ item 10: hidden detections

def test_hidden_detections_are_counted_per_image_and_in_total(tmp_path, capsys):
    scores = tuple(0.01 + 0.0065 * i for i in range(12))  # best 0.0815
    inputs = [str(_photo(tmp_path / "img.png")), str(_photo(tmp_path / "other.png", seed=1))]
    task = DetectionTask(build_detector("efficientdet-d0", num_classes=3, max_detections=5))
    task.detect = _fake_detector(scores).detect
    predict_paths(task, inputs, out=None, score_threshold=0.3)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{inputs[0]}: 0 detections above 0.3")
    assert "12 below it" in lines[0] and "0.08" in lines[0] and "--score-threshold" in lines[0]
    assert any("24" in line and "hidden" in line for line in lines[2:]), lines


def test_shown_detections_say_how_many_were_hidden(tmp_path, capsys):
    predict_paths(_fake_detector((0.9, 0.2, 0.1)), [str(_photo(tmp_path / "img.png"))], score_threshold=0.3)
    line = capsys.readouterr().out.splitlines()[0]
    assert ": 1 detections above 0.3" in line and "cat 0.90" in line and "2 below it" in line


# --------------------------------------------------------------------------------- item 10: label drawing

@pytest.mark.parametrize("corner", ["top_left", "bottom_right"])
def test_label_has_a_filled_background_inside_the_image(corner):
    height, width = 64, 96
    image = torch.full((3, height, width), 128, dtype=torch.uint8)
    box = [0.0, 0.0, 5.0, 5.0] if corner == "top_left" else [width - 6.0, height - 6.0, width - 1.0, height - 1.0]
    detection = {"boxes": torch.tensor([box]), "scores": torch.tensor([0.9]), "labels": torch.tensor([0])}
    drawn = draw_detections(image, detection, ["cat"], score_threshold=0.3)
    assert drawn.shape == image.shape and drawn.dtype == torch.uint8
    left, top, right, bottom = ImageDraw.Draw(Image.new("RGB", (8, 8))).textbbox(
        (0, 0), "cat 0.90", font=ImageFont.load_default())
    text_w, text_h = right - left, bottom - top
    changed = (drawn != image).any(0)
    ys, xs = changed.nonzero(as_tuple=True)
    # The whole label is visible: the changed region spans the text, and the background fills it.
    assert int(xs.max() - xs.min()) + 1 >= text_w and int(ys.max() - ys.min()) + 1 >= text_h
    assert int(changed.sum()) >= text_w * text_h
