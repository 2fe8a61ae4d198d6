"""Pascal VOC and YOLO detection data: readers on hand-written files, the converter, equal mAP, bad input, training."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tasks.cli import main
from tasks.data.check import check_labels
from tasks.data.convert import ConvertedDetection, check_converted, convert, read_split
from tasks.data.errors import DataError
from tasks.data.synthetic.detection import write_coco
from tasks.detection.evaluate import CocoEvaluator, load_ground_truth

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo" / "detection.yaml")

VOC_XML = """<annotation>
  <folder>VOC2012</folder>
  <filename>{name}.jpg</filename>
  <size><width>40</width><height>30</height><depth>3</depth></size>
  <object>
    <name>dog</name>
    <difficult>0</difficult>
    <bndbox><xmin>5</xmin><ymin>6</ymin><xmax>20</xmax><ymax>25</ymax></bndbox>
  </object>
  <object>
    <name>cat</name>
    <difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>1</ymin><xmax>40</xmax><ymax>12.5</ymax></bndbox>
  </object>
</annotation>
"""


def _image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (width, height), (90, 40, 20)).save(path)


def _voc(root: Path, xml: str = VOC_XML, split: str = "train") -> Path:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "Annotations" / "2008_000001.xml").write_text(xml.format(name="2008_000001"))
    _image(root / "JPEGImages" / "2008_000001.jpg", 40, 30)
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("2008_000001\n")
    return root


def _yolo(root: Path, lines: str = "0 0.5 0.5 0.5 0.5\n1 0.25 0.75 0.5 0.5\n\n1 0.5 0.0 0.75 0.0 0.75 0.5\n") -> Path:
    _image(root / "images" / "train" / "a.png", 40, 20)
    _image(root / "images" / "train" / "b.png", 16, 16)  # no label file: an image without objects
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text(lines)
    (root / "data.yaml").write_text("names:\n  0: person\n  1: bike\n")
    return root


def _cfg(fmt: str, root: Path, *extra: str):
    from tasks.config import load

    return load(DEMO, [f"data.format={fmt}", f"data.root={root}", "data.train_split=train", "data.val_split=train",
                       *extra])


# ------------------------------------------------------------------------------------------ readers

def test_voc_reader_converts_1_based_corners_and_difficult_boxes(tmp_path):
    split = read_split("voc", _voc(tmp_path / "voc"), "train")
    assert split.classes == ["cat", "dog"] and split.problems == []  # sorted object names
    image, target = ConvertedDetection(split, "train")[0]
    assert image.shape == (3, 30, 40) and target["image_id"] == 1
    assert torch.equal(target["boxes"], torch.tensor([[4.0, 5.0, 20.0, 25.0], [0.0, 0.0, 40.0, 12.5]]))
    assert torch.equal(target["labels"], torch.tensor([1, 0])) and target["iscrowd"].tolist() == [False, True]
    coco = split.to_coco()
    assert coco["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert [a["bbox"] for a in coco["annotations"]] == [[4.0, 5.0, 16.0, 20.0], [0.0, 0.0, 40.0, 12.5]]
    # class_names fixes the label order
    named = read_split("voc", tmp_path / "voc", "train", ["dog", "cat"])
    assert [a["category_id"] for a in named.data["annotations"]] == [1, 2]


def test_voc_split_folder_layout(tmp_path):
    root = tmp_path / "voc"
    (root / "val").mkdir(parents=True)
    (root / "val" / "x.xml").write_text(VOC_XML.format(name="x"))
    _image(root / "val" / "x.jpg", 40, 30)
    split = read_split("voc", root, "val")
    assert split.image_dir == root / "val" and split.data["images"][0]["file_name"] == "x.jpg"
    assert len(split.data["annotations"]) == 2


def test_yolo_reader_denormalises_boxes_and_polygons(tmp_path):
    split = read_split("yolo", _yolo(tmp_path / "yolo"), "train")
    assert split.classes == ["person", "bike"] and split.problems == []
    dataset = ConvertedDetection(split, "train")
    _, target = dataset[0]
    assert torch.equal(target["boxes"], torch.tensor([[10.0, 5.0, 30.0, 15.0], [0.0, 10.0, 20.0, 20.0],
                                                      [20.0, 0.0, 30.0, 10.0]]))
    assert target["labels"].tolist() == [0, 1, 1] and not target["iscrowd"].any()
    _, empty = dataset[1]
    assert empty["boxes"].shape == (0, 4) and empty["image_id"] == 2
    assert [c["id"] for c in dataset.to_coco()["categories"]] == [1, 2]  # class index + 1


def test_yolo_class_names_from_config_or_list_yaml_and_roboflow_layout(tmp_path):
    root = tmp_path / "rf"
    _image(root / "train" / "images" / "a.jpg", 20, 20)
    (root / "train" / "labels").mkdir(parents=True)
    (root / "train" / "labels" / "a.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (root / "data.yaml").write_text("nc: 1\nnames: ['thing']\n")
    assert read_split("yolo", root, "train").classes == ["thing"]
    assert read_split("yolo", root, "train", ["other"]).classes == ["other"]
    (root / "data.yaml").unlink()
    with pytest.raises(DataError, match="data.yaml: not found and data.class_names is not set"):
        read_split("yolo", root, "train")


# ------------------------------------------------------------------------------------------ converter

@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco(tmp_path_factory.mktemp("src") / "coco", train_images=6, val_images=6, seed=5)


def _boxes(data: dict, crowd: bool = True) -> dict:
    """(file name, class name) -> sorted boxes, plus the images' and categories' ids."""
    files = {im["id"]: im["file_name"] for im in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    out: dict = {}
    for ann in data["annotations"]:
        if crowd or not ann["iscrowd"]:
            out.setdefault((files[ann["image_id"]], names[ann["category_id"]], ann["iscrowd"]), []).append(ann["bbox"])
    return {key: sorted(value) for key, value in out.items()}


def _same_boxes(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key, boxes in a.items():
        assert torch.allclose(torch.tensor(boxes), torch.tensor(b[key]), atol=0.5), key


@pytest.mark.parametrize("via", ["yolo", "voc"])
def test_convert_round_trip_keeps_boxes_ids_and_names(coco, tmp_path, via):
    convert("coco", coco, via, tmp_path / via)
    assert main(["data", "convert", via, str(tmp_path / via), "--to", "coco", "-o", str(tmp_path / "back")]) == 0
    for split in ("train", "val"):
        original = json.loads((coco / "annotations" / f"instances_{split}.json").read_text())
        back = json.loads((tmp_path / "back" / "annotations" / f"instances_{split}.json").read_text())
        assert [(c["id"], c["name"]) for c in back["categories"]] == [(c["id"], c["name"])
                                                                       for c in original["categories"]]
        assert [(i["id"], i["file_name"], i["width"], i["height"]) for i in back["images"]] == \
               [(i["id"], i["file_name"], i["width"], i["height"]) for i in original["images"]]
        _same_boxes(_boxes(back), _boxes(original, crowd=via == "voc"))  # YOLO has no ignore regions
        assert all((tmp_path / "back" / split / i["file_name"]).is_file() for i in back["images"])


def test_convert_never_writes_over_a_folder(coco, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["data", "convert", "coco", str(coco), "--to", "yolo", "-o", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taken: exists and is not empty" in err[0]
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging folder left behind


# ------------------------------------------------------------------------------------------ equal mAP

def _detections(data: dict, seed: int = 0) -> dict:
    """Deterministically perturbed non-crowd ground truth (+ a false positive per image), keyed by file name:
    [(class name, [x1, y1, x2, y2], score)]."""
    generator = torch.Generator().manual_seed(seed)
    files = {im["id"]: im for im in data["images"]}
    names = {c["id"]: c["name"] for c in data["categories"]}
    out = {im["file_name"]: [] for im in data["images"]}
    for ann in sorted(data["annotations"], key=lambda a: a["id"]):
        if ann["iscrowd"]:
            continue
        x, y, w, h = ann["bbox"]
        dx, dy, dw, dh = (0.3 * (torch.rand(4, generator=generator) - 0.5)).tolist()
        box = [x + dx * w, y + dy * h, x + w * (1 + dw), y + h * (1 + dh)]
        score = float(torch.rand((), generator=generator))
        out[files[ann["image_id"]]["file_name"]].append((names[ann["category_id"]], box, score))
    for rows in out.values():
        rows.append((sorted(names.values())[len(rows) % len(names)], [2.0, 3.0, 30.0, 41.0], 0.5))
    return out


def _score(truth: dict, detections: dict) -> dict:
    evaluator = CocoEvaluator(load_ground_truth(truth, name="test"))
    labels = {name: index for index, name in enumerate(
        c["name"] for c in sorted(truth["categories"], key=lambda c: c["id"]))}
    for image in truth["images"]:
        rows = detections[image["file_name"]]
        evaluator.update([{"boxes": torch.tensor([r[1] for r in rows]), "scores": torch.tensor([r[2] for r in rows]),
                           "labels": torch.tensor([labels[r[0]] for r in rows])}], [{"image_id": image["id"]}])
    return evaluator.compute()


def test_map_through_voc_and_yolo_equals_map_through_coco(coco, tmp_path):
    for to in ("voc", "yolo"):
        convert("coco", coco, to, tmp_path / to)
    (tmp_path / "voc" / "effdense_ids.json").unlink()  # the readers assign their own ids: scoring must not care
    original = json.loads((coco / "annotations" / "instances_val.json").read_text())
    detections = _detections(original)
    reference = _score(original, detections)
    assert 0.2 < reference["mAP"] < 0.95  # neither trivial nor perfect
    # difficult = crowd; equal up to the order of the sums over classes (VOC's are sorted by name)
    assert _score(read_split("voc", tmp_path / "voc", "val").to_coco(), detections) == pytest.approx(reference, abs=1e-12)
    no_crowd = dict(original, annotations=[a for a in original["annotations"] if not a["iscrowd"]])
    assert _score(read_split("yolo", tmp_path / "yolo", "val").to_coco(), detections) == \
           pytest.approx(_score(no_crowd, detections), abs=1e-12)


def test_ground_truth_from_a_dict_scores_like_the_file(coco):
    path = coco / "annotations" / "instances_val.json"
    detections = _detections(json.loads(path.read_text()), seed=1)
    from_file, from_dict = load_ground_truth(path), load_ground_truth(json.loads(path.read_text()), name="x")
    assert from_file.cat_ids == from_dict.cat_ids == [3, 7, 11]
    assert _score(json.loads(path.read_text()), detections)["mAP"] > 0


# ------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("lines, expected", [
    ("0 0.5 0.5 0.5\n", r"a\.txt:1: 4 values '0 0.5 0.5 0.5'; expected 'class cx cy w h'"),
    ("0 0.5 0.5 0.5 0.5\n1 0.5 1.2 0.5 0.5\n", r"a\.txt:2: value 1\.2 outside 0\.\.1; expected coordinates normalised"),
    ("2 0.5 0.5 0.5 0.5\n", r"a\.txt:1: class 2 is not a class index; expected an integer 0\.\.1"),
])
def test_bad_yolo_lines_are_one_line_errors_naming_the_file_and_line(tmp_path, lines, expected):
    root = _yolo(tmp_path / "yolo", lines)
    cfg = _cfg("yolo", root, "model.num_classes=2")
    with pytest.raises(DataError, match=expected) as error:
        ConvertedDetection(read_split("yolo", root, "train"), "train")
    assert "\n" not in str(error.value) and str(root / "labels" / "train" / "a.txt") in str(error.value)
    assert any(problem.startswith(str(root / "labels" / "train" / "a.txt")) for problem in check_converted(cfg))
    assert check_labels(cfg, "quick")  # before the first step


def test_bad_voc_boxes_and_names_are_one_line_errors(tmp_path):
    root = _voc(tmp_path / "voc", VOC_XML.replace("<xmax>20</xmax>", "<xmax>3</xmax>"))
    xml = root / "Annotations" / "2008_000001.xml"
    with pytest.raises(DataError, match=rf"{xml}:5: object 'dog' has xmin 5 ymin 6 xmax 3 ymax 25; expected "
                                        r"xmin <= xmax") as error:
        ConvertedDetection(read_split("voc", root, "train"), "train")
    assert "\n" not in str(error.value)
    root = _voc(tmp_path / "voc2")
    xml = root / "Annotations" / "2008_000001.xml"
    with pytest.raises(DataError, match=rf"{xml}:10: object name 'cat' is not in data.class_names \(dog, bird\)"):
        ConvertedDetection(read_split("voc", root, "train", ["dog", "bird"]), "train")
    xml.write_text("<annotation><object>")
    expected = f"{xml}: not valid XML (line 1 column 21: no element found); expected a Pascal VOC annotation"
    assert read_split("voc", root, "train").problems == [expected]


def test_layout_and_class_count_problems(tmp_path):
    with pytest.raises(DataError, match="no Pascal VOC split 'train'"):
        read_split("voc", tmp_path, "train")
    with pytest.raises(DataError, match="no YOLO split 'train'"):
        read_split("yolo", tmp_path, "train")
    root = _yolo(tmp_path / "yolo")
    problems = check_converted(_cfg("yolo", root))  # the demo preset has 3 classes, data.yaml 2
    assert any("model.num_classes=3 but" in p and "set model.num_classes=2" in p for p in problems)
    assert check_converted(_cfg("yolo", root, "model.num_classes=2")) == []


# ------------------------------------------------------------------------------------------ commands

def test_synth_check_and_train_on_yolo_and_voc(tmp_path, capsys):
    for fmt in ("yolo", "voc"):
        root = tmp_path / fmt
        assert main(["data", "synth", "detection", str(root), "--format", fmt]) == 0
        assert main(["data", "check", DEMO, "--set", f"data.format={fmt}", "--set", f"data.root={root}"]) == 0
    root = tmp_path / "small"
    convert("coco", write_coco(tmp_path / "small-coco", train_images=4, val_images=2, seed=2), "yolo", root)
    run = tmp_path / "run"
    args = ["--set", "data.format=yolo", "--set", f"data.root={root}", "--set", "train.max_steps=2", "--set",
            "data.workers=0", "--set", "train.progress=false", "--set", "data.batch_size=2", "--set",
            "train.epochs=1", "--set", "train.eval_every=1"]
    assert main(["train", DEMO, *args, "--output", str(run)]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "val/mAP" in record
    detections = json.loads((run / "detections.json").read_text())
    assert {d["category_id"] for d in detections} <= {1, 2, 3}  # class index + 1


def test_on_bad_sample_skip_leaves_bad_lines_out(tmp_path, caplog):
    root = _yolo(tmp_path / "yolo", "0 0.5 0.5 0.5 0.5\n0 0.5 0.5 0.5\n")
    dataset = ConvertedDetection(read_split("yolo", root, "train"), "train", on_bad_sample="skip")
    assert len(dataset[0][1]["boxes"]) == 1 and "a.txt:2: 4 values" in caplog.text


def test_data_yaml_names_must_be_the_indices(tmp_path):
    root = _yolo(tmp_path / "yolo")
    (root / "data.yaml").write_text("names:\n  0: person\n  2: bike\n")
    with pytest.raises(DataError, match=r"data.yaml: names has the keys 0, 2; expected the class indices 0..1"):
        read_split("yolo", root, "train")


def test_voc_model_scores_against_the_val_split_converted_in_memory(tmp_path):
    from tasks.data.formats import FORMATS
    from tasks.detection.model import build_model

    root = FORMATS["voc"].synth(tmp_path / "voc", train_images=4, val_images=3)
    cfg = _cfg("voc", root, "data.val_split=val")
    task = build_model(cfg)
    val = FORMATS["voc"].dataset(cfg, "val", False)
    truth = task.make_evaluator().gt
    assert task.cat_ids == truth.cat_ids == [1, 2, 3] and val.classes == ["circle", "square", "triangle"]
    assert sorted(truth.coco.getImgIds()) == [image["id"] for image in val.images] == [1, 2, 3]
    assert truth.path == f"{root} (voc, split val)"
