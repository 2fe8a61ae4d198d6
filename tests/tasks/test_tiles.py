"""Large images: the tile grid, training on tiles (boxes clipped, the 50% rule, masks in step), segmentation's
slide windows from data.tile, and sliced detection (SAHI) with a stub detector that is honest about resolution."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.ops import box_iou

from tasks.data.coco import CocoDetection
from tasks.data.maskfolder import MaskFolderDataset
from tasks.data.tiles import crop_boxes, crop_detection_target, fit_window, grid_starts, tile_grid, tile_step
from tasks.data.transforms.detection import letterbox, unletterbox_boxes
from tasks.detection.slicing import SlicedDetection, merge_detections, slice_detect

REPO = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------------------ the grid

def test_grid_covers_every_pixel_with_the_last_tile_at_the_border():
    assert tile_step(512, 0.2) == 410 and tile_step(512, 0.0) == 512
    assert grid_starts(2048, 512, 410) == [0, 410, 820, 1230, 1536]
    assert grid_starts(300, 512, 410) == [0] and grid_starts(512, 512, 410) == [0]
    tiles = tile_grid(300, 700, 512, 0.2)  # shorter than a tile in height: the whole height
    assert tiles == [(0, 0, 512, 300), (188, 0, 700, 300)]
    assert tile_grid(100, 80, 512) == [(0, 0, 80, 100)]  # smaller than a tile: one tile, the image
    covered = torch.zeros(1000, 1300, dtype=torch.int32)
    for x1, y1, x2, y2 in tile_grid(1000, 1300, 256, 0.25):
        assert (x2 - x1, y2 - y1) == (256, 256)
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    assert fit_window((900, 0, 1412, 512), 600, 1000) == (488, 0, 1000, 512)  # a replacement image: moved inside
    with pytest.raises(ValueError, match="overlap"):
        tile_step(512, 1.0)


# ------------------------------------------------------------------------------------------ training tiles

def test_boxes_clipped_and_kept_when_half_inside():
    window = (100, 100, 200, 200)
    boxes = torch.tensor([[120.0, 120.0, 140.0, 150.0],   # inside: kept as it is, shifted
                          [60.0, 120.0, 110.0, 130.0],    # 10 of 50 px wide inside (20%): dropped
                          [76.0, 150.0, 116.0, 160.0],    # 40% inside: dropped
                          [184.0, 150.0, 224.0, 160.0],   # 40% inside (right edge): dropped
                          [176.0, 150.0, 216.0, 160.0],   # 60% inside: kept, clipped
                          [150.0, 84.0, 160.0, 109.0],    # 9 of 25 px high (36%): dropped
                          [300.0, 300.0, 310.0, 310.0]])  # outside
    kept, keep = crop_boxes(boxes, window)
    assert keep.tolist() == [True, False, False, False, True, False, False]
    assert torch.equal(kept, torch.tensor([[20.0, 20.0, 40.0, 50.0], [76.0, 50.0, 100.0, 60.0]]))
    crowd = torch.tensor([False, True, False, False, False, False, True])  # ignore regions: kept when any part is in
    target = {"boxes": boxes, "labels": torch.arange(7), "iscrowd": crowd, "image_id": 5}
    out = crop_detection_target(target, window)
    assert out["labels"].tolist() == [0, 1, 4] and out["iscrowd"].tolist() == [False, True, False]
    assert torch.equal(out["boxes"][1], torch.tensor([0.0, 20.0, 10.0, 30.0])) and out["tile"] == window
    assert out["image_id"] == 5


def _write_coco(root: Path, image: np.ndarray, boxes: list, crowd=()) -> Path:
    (root / "annotations").mkdir(parents=True)
    (root / "train").mkdir()
    Image.fromarray(image).save(root / "train" / "big.png")
    height, width = image.shape[:2]
    annotations = [{"id": i + 1, "image_id": 1, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1), "iscrowd": int(i in crowd)}
                   for i, (x1, y1, x2, y2) in enumerate(boxes)]
    data = {"images": [{"id": 1, "file_name": "big.png", "width": width, "height": height}],
            "annotations": annotations, "categories": [{"id": 1, "name": "square"}]}
    (root / "annotations" / "instances_train.json").write_text(json.dumps(data))
    return root


def test_detection_dataset_serves_every_tile_of_every_image(tmp_path):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (600, 1000, 3), dtype=np.uint8)
    boxes = [[10, 10, 50, 40], [480, 100, 540, 140], [700, 500, 760, 560]]
    dataset = CocoDetection(_write_coco(tmp_path / "coco", image, boxes), "train")
    whole = torch.from_numpy(image).permute(2, 0, 1)
    dataset.use_tiles(512, 0.2)
    windows = tile_grid(600, 1000, 512, 0.2)
    assert len(dataset) == len(windows) == 2 * 3 and [w for _, w in dataset.tiles] == windows
    for k, (x1, y1, x2, y2) in enumerate(windows):
        crop, target = dataset[k]
        assert torch.equal(crop, whole[:, y1:y2, x1:x2]) and target["tile"] == (x1, y1, x2, y2)
        expected, _ = crop_boxes(torch.tensor(boxes, dtype=torch.float32), (x1, y1, x2, y2))
        assert torch.equal(target["boxes"], expected) and target["orig_size"] == (512, 512)
    # the box at x 480..540 is 32/60 inside the first tile (x < 512): kept there, clipped
    assert dataset[0][1]["boxes"].tolist() == [[10.0, 10.0, 50.0, 40.0], [480.0, 100.0, 512.0, 140.0]]


def test_train_transform_runs_on_the_tile(tmp_path):
    from tasks.data.transforms.detection import DetectionTrainTransform

    image = np.zeros((700, 1400, 3), dtype=np.uint8)
    dataset = CocoDetection(_write_coco(tmp_path / "coco", image, [[600, 300, 616, 316]]), "train",
                            DetectionTrainTransform(256, (1.0, 1.0), hflip=0.0))
    dataset.use_tiles(256, 0.0)
    assert len(dataset) == 3 * 6
    sizes = {tuple(dataset[k][0].shape) for k in range(len(dataset))}
    assert sizes == {(3, 256, 256)}
    # the tile holding the 16 px box at native scale (scale 1): the box is 16 px in the input too
    k = next(k for k, (_, w) in enumerate(dataset.tiles) if w[0] <= 600 < w[2] and w[1] <= 300 < w[3])
    _, target = dataset[k]
    sides = (target["boxes"][:, 2:] - target["boxes"][:, :2]).tolist()
    assert target["scale"] == (1.0, 1.0) and sides == [[16.0, 16.0]]


def test_segmentation_masks_cropped_in_step_with_images(tmp_path):
    root = tmp_path / "folder"
    for folder in ("images/train", "masks/train"):
        (root / folder).mkdir(parents=True)
    rng = np.random.default_rng(1)
    sizes = {"a": (500, 700), "b": (200, 250)}
    for stem, (h, w) in sizes.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images/train" / f"{stem}.png")
        mask = (np.arange(h)[:, None] // 10 + np.arange(w)[None] // 10) % 3  # position-dependent labels
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks/train" / f"{stem}.png")
    dataset = MaskFolderDataset(root, "train", num_classes=3)
    dataset.use_tiles(256, 0.25)
    expected = [(i, w) for i, stem in enumerate(sizes) for w in tile_grid(*sizes[stem], 256, 0.25)]
    assert dataset.tiles == expected and len(dataset) == 12 + 1  # a: 3 rows x 4 cols; b: smaller, one tile
    for k, (i, (x1, y1, x2, y2)) in enumerate(expected):
        image, target = dataset[k]
        whole_image, whole_mask = dataset.reader.load(dataset.pairs[i])
        assert torch.equal(image, whole_image[:, y1:y2, x1:x2])
        assert torch.equal(target["mask"], whole_mask[y1:y2, x1:x2])
        assert target["tile"] == (x1, y1, x2, y2) and target["orig_size"] == (y2 - y1, x2 - x1)


def _det_cfg(root, *extra):
    from tasks.config import load

    return load(str(REPO / "configs" / "demo" / "detection.yaml"),
                [f"data.root={root}", "data.train_split=train", "data.val_split=train", "model.num_classes=1",
                 *extra])


def test_config_tiles_the_training_split_only(tmp_path):
    from tasks.data.formats import FORMATS

    root = _write_coco(tmp_path / "coco", np.zeros((600, 1000, 3), dtype=np.uint8), [[10, 10, 50, 40]])
    cfg = _det_cfg(root, "data.tile.size=256", "data.tile.overlap=0.2", "data.image_size=[256,256]")
    train, val = (FORMATS["coco"].dataset(cfg, "train", train) for train in (True, False))
    assert len(train) == len(tile_grid(600, 1000, 256, 0.2)) and len(val) == 1 and val.tiles is None
    assert FORMATS["coco"].dataset(_det_cfg(root), "train", True).tiles is None


def test_segmentation_slide_windows_follow_the_tiles():
    from tasks.config import load
    from tasks.segmentation.inference import inference_options, slide_logits

    cfg = load("demo/segmentation", ["data.eval.mode=slide", "data.tile.size=512", "data.tile.overlap=0.25"])
    options = inference_options(cfg)
    assert options["window"] == (512, 512) and options["stride"] == (384, 384)
    cfg = load("demo/segmentation", ["data.eval.mode=slide", "data.tile.size=512", "data.eval.window=[64,64]"])
    assert inference_options(cfg)["window"] == (64, 64) and inference_options(cfg)["stride"] == (42, 42)
    seen = []
    logits = slide_logits(lambda x: seen.append(tuple(x.shape[-2:])) or x[:, :1].float(),
                          torch.arange(2 * 100 * 130.0).reshape(1, 2, 100, 130), (64, 64), (42, 42))
    assert set(seen) == {(64, 64)} and len(seen) == 2 * 3
    assert torch.allclose(logits[0, 0], torch.arange(100 * 130.0).reshape(100, 130))


# ------------------------------------------------------------------------------------------ sliced detection

class SquareSpotter:
    """A stub DetectionTask: finds bright squares in its letterboxed input, but only those at least
    ``min_side`` px wide and high *there* (a fixed receptive field, as a trained detector's smallest anchor);
    scores 0.9, or 0.45 for a box touching the edge of the input (a cut-off object looks less sure)."""

    def __init__(self, input_size: int = 512, min_side: int = 8):
        self.input_size, self.min_side, self.passes = input_size, min_side, 0

    def detect(self, images, size=None):
        out = []
        for image in images:
            self.passes += 1
            boxed, meta = letterbox(image, size or self.input_size)
            boxes = _components(boxed[0] > 127, self.min_side)
            valid_w, valid_h = (round(s * v) for s, v in zip(meta["scale"], reversed(meta["orig_size"])))
            edge = ((boxes[:, 0] <= 0) | (boxes[:, 1] <= 0) | (boxes[:, 2] >= valid_w) | (boxes[:, 3] >= valid_h))
            out.append({"boxes": unletterbox_boxes(boxes, meta), "scores": torch.where(edge, 0.45, 0.9),
                        "labels": torch.zeros(len(boxes), dtype=torch.int64)})
        return out


def _components(mask: torch.Tensor, min_side: int) -> torch.Tensor:
    """Bounding boxes (xyxy, exclusive) of the blobs of ``mask`` at least ``min_side`` px wide and high,
    found by recursive cuts along empty rows and columns (exact for separated axis-aligned squares)."""
    found: list[list[int]] = []

    def runs(flags: np.ndarray) -> list[tuple[int, int]]:
        edges = np.flatnonzero(np.diff(np.concatenate([[0], flags.astype(np.int8), [0]])))
        return list(zip(edges[::2].tolist(), edges[1::2].tolist()))

    def cut(block: np.ndarray, x0: int, y0: int) -> None:
        columns, rows = runs(block.any(0)), runs(block.any(1))
        if len(columns) == 1 and len(rows) == 1:
            (x1, x2), (y1, y2) = columns[0], rows[0]
            if x2 - x1 >= min_side and y2 - y1 >= min_side:
                found.append([x0 + x1, y0 + y1, x0 + x2, y0 + y2])
            return
        for x1, x2 in columns:
            for y1, y2 in rows:
                if block[y1:y2, x1:x2].any():
                    cut(block[y1:y2, x1:x2], x0 + x1, y0 + y1)

    cut(mask.numpy(), 0, 0)
    return torch.tensor(found, dtype=torch.float32).reshape(-1, 4)


def _scene(seed: int = 0, size: int = 2048):
    """A dark 2048 px image with 40 bright squares of 12-20 px at random places (24 px apart at least),
    plus squares placed on purpose: in the overlap of two tiles (seen whole twice), cut by a tile's edge
    (a 9 px piece in one tile: IoU 0.45 with the whole box, IoS 1), and one 700 px square larger than
    any tile (last)."""
    rng = np.random.default_rng(seed)
    boxes = [[420, 100, 440, 120], [503, 600, 523, 620], [1000, 1200, 1700, 1900]]
    while len(boxes) < 43:
        side = int(rng.integers(12, 21))
        x, y = (int(v) for v in rng.integers(0, size - side, 2))
        box = [x, y, x + side, y + side]
        if all(box[2] + 24 < b[0] or b[2] + 24 < box[0] or box[3] + 24 < b[1] or b[3] + 24 < box[1] for b in boxes):
            boxes.append(box)
    boxes = boxes[:2] + boxes[3:] + boxes[2:3]  # the large square last
    image = torch.zeros(3, size, size, dtype=torch.uint8)
    for x1, y1, x2, y2 in boxes:
        image[:, y1:y2, x1:x2] = 255
    return image, torch.tensor(boxes, dtype=torch.float32)


def _recall(found: torch.Tensor, truth: torch.Tensor, iou: float = 0.5) -> float:
    if not len(found):
        return 0.0
    return float((box_iou(truth, found).max(dim=1).values >= iou).float().mean())


def test_sliced_inference_finds_small_objects_whole_image_inference_misses():
    image, truth = _scene()
    small = truth[:-1]
    spotter = SquareSpotter()
    whole = spotter.detect([image])[0]
    sliced = slice_detect(spotter, image, 512, 0.2, max_detections=None)
    assert spotter.passes == 1 + 25 + 1  # the whole image once, then 5 x 5 tiles + the whole image
    recall_whole, recall_sliced = _recall(whole["boxes"], small), _recall(sliced["boxes"], small)
    print(f"\nrecall of 42 squares of 12-20 px in a 2048 px image: whole image at 512 px {recall_whole:.2f}, "
          f"512 px tiles (overlap 0.2) + whole image {recall_sliced:.2f}")
    assert recall_whole == 0.0 and recall_sliced == 1.0
    # mapped back exactly (native scale in the tiles); one box per object: duplicates merged across tiles
    assert len(sliced["boxes"]) == len(truth)
    assert torch.equal(box_iou(small, sliced["boxes"]).max(dim=1).values, torch.ones(len(small)))
    # the 700 px square no tile holds whole: from the whole-image pass (scale 1/4), its cut pieces suppressed
    big = box_iou(truth[-1:], sliced["boxes"])[0]
    assert big.max() > 0.98 and (big > 0).sum() == 1 and whole["boxes"].shape == (1, 4)
    assert (sliced["scores"][:-1] >= sliced["scores"][1:]).all()


def test_merge_removes_border_duplicates_that_iou_keeps():
    image, truth = _scene()
    spotter = SquareSpotter()
    cut = truth[1:2]  # x 503..523: the tile ending at x 512 sees a 9 px piece, the tile from 410 the whole
    raw = slice_detect(spotter, image, 512, 0.2, merge="iou", threshold=1.0, full_image=False, max_detections=None)
    assert (box_iou(truth[:1], raw["boxes"])[0] > 0.99).sum() == 2  # in the overlap of two tiles: seen twice
    pieces = raw["boxes"][box_iou(cut, raw["boxes"])[0] > 0]
    assert sorted(pieces[:, 2] - pieces[:, 0]) == [9.0, 20.0]
    by_iou = slice_detect(spotter, image, 512, 0.2, merge="iou", full_image=False, max_detections=None)
    by_ios = slice_detect(spotter, image, 512, 0.2, full_image=False, max_detections=None)
    assert (box_iou(cut, by_iou["boxes"])[0] > 0).sum() == 2  # IoU 0.45 < 0.5: the piece stays
    assert (box_iou(cut, by_ios["boxes"])[0] > 0).sum() == 1  # IoS 1: one box, the whole one
    assert (box_iou(truth[:1], by_iou["boxes"])[0] > 0).sum() == 1  # exact duplicates go with either metric


def test_merge_is_class_wise_and_capped():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 10.0], [2.0, 2.0, 6.0, 6.0], [50.0, 50, 60, 60]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 1, 0, 0])
    merged = merge_detections(boxes, scores, labels)
    assert merged["scores"].tolist() == pytest.approx([0.9, 0.8, 0.6])  # the box inside the first: IoS 1
    assert merged["labels"].tolist() == [0, 1, 0]
    assert merge_detections(boxes, scores, labels, "iou")["scores"].tolist() == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert len(merge_detections(boxes, scores, labels, max_detections=2)["boxes"]) == 2
    assert len(merge_detections(boxes[:0], scores[:0], labels[:0])["boxes"]) == 0
    with pytest.raises(ValueError, match="ios, iou"):
        merge_detections(boxes, scores, labels, "giou")


class _Whole(torch.nn.Module):
    """The stub on whole images (the unsliced path), with the task protocol."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, images):
        return self.task.detect(list(images))

    def make_evaluator(self):
        return self.task.make_evaluator()


def test_sliced_coco_evaluation_on_original_images(tmp_path):
    from torch.utils.data import DataLoader

    from tasks.data.transforms.detection import detection_collate
    from tasks.detection.evaluate import CocoEvaluator
    from tasks.engine.evaluate import run_evaluation

    image, truth = _scene()
    root = _write_coco(tmp_path / "coco", image.permute(1, 2, 0).numpy(), truth.tolist())
    spotter = SquareSpotter()
    spotter.make_evaluator = lambda: CocoEvaluator(str(root / "annotations" / "instances_train.json"))
    dataset = CocoDetection(root, "train")  # no transform: original images, scale 1, offset 0
    loader = DataLoader(dataset, batch_size=1, collate_fn=detection_collate)
    sliced = SlicedDetection(spotter, 512, 0.2)
    with_tiles, evaluator = run_evaluation(sliced, loader, torch.device("cpu"))
    without, _ = run_evaluation(_Whole(spotter), loader, torch.device("cpu"))
    print(f"\nCOCO on the 2048 px scene: mAP {without['mAP']:.3f} -> {with_tiles['mAP']:.3f} with 512 px slices, "
          f"AR_small {without['AR_small']:.3f} -> {with_tiles['AR_small']:.3f}")
    assert with_tiles["AR_small"] == pytest.approx(1.0) and without["AR_small"] == 0.0
    assert with_tiles["mAP"] > 0.95 and without["mAP"] < 0.05
    assert evaluator.describe()["slicing"]["slice"] == 512


def test_cli_slice_flags(tmp_path):
    from tasks.cli import _slice_options, build_parser
    from tasks.config import ConfigError

    parser = build_parser()
    for command in (["eval", "cfg.yaml", "--weights", "w.pt"], ["predict", "cfg.yaml", "--weights", "w.pt", "a.png"]):
        args = parser.parse_args([*command, "--slice", "512", "--slice-overlap", "0.25"])
        assert (args.slice, args.slice_overlap) == (512, 0.25)
        assert parser.parse_args(command).slice is None
    cfg = _det_cfg(tmp_path)
    args = parser.parse_args(["eval", "cfg.yaml", "--weights", "w.pt", "--slice", "512"])
    with pytest.raises(ConfigError, match="no sliced inference"):
        _slice_options(cfg, SquareSpotter(), args)
    spotter = SquareSpotter()
    spotter.sliced = lambda *a, **k: None
    assert _slice_options(cfg, spotter, args) == {"slice": 512, "slice_overlap": 0.2}
    args.slice_overlap = 1.5
    with pytest.raises(ConfigError, match="overlap in"):
        _slice_options(cfg, spotter, args)


def test_eval_and_predict_slice_through_the_cli_with_a_real_detector(tmp_path, capsys):
    """Wiring: an untrained EfficientDet-D0 saved as model.safetensors, evaluated and run with --slice (the
    numbers are an untrained model's; what counts is that the sliced path runs end to end)."""
    from tasks.cli import main
    from tasks.data.synthetic.detection import write_coco
    from tasks.engine.checkpoint import meta_to_strings, save_safetensors
    from tasks.registry import build_model

    root = write_coco(tmp_path / "coco", train_images=2, val_images=2, min_size=160, max_size=200)
    overrides = [f"data.root={root}", "data.image_size=128", "data.workers=0", "train.device=cpu"]
    model = build_model(_det_cfg(root, "model.num_classes=3", *overrides[1:]))
    weights = save_safetensors(tmp_path / "model.safetensors", model.net.state_dict(),
                               metadata=meta_to_strings({"task": "detection"}))
    sets = [a for item in ["model.num_classes=3", *overrides, "data.val_split=val"] for a in ("--set", item)]
    config = str(REPO / "configs" / "demo" / "detection.yaml")
    assert main(["eval", config, *sets, "--weights", str(weights), "--slice", "128", "--json",
                 "--output", str(tmp_path / "eval")]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "mAP" in metrics
    report = json.loads((tmp_path / "eval" / "coco_eval.json").read_text())
    assert report["postprocess"]["slicing"] == {"slice": 128, "slice_overlap": 0.2, "full_image": True,
                                                "merge": "class-wise NMS ios > 0.5"}
    image = next((Path(root) / "val").iterdir())
    assert main(["predict", config, *sets, "--weights", str(weights), str(image), "--slice", "128",
                 "--score-threshold", "0.0", "--out", str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "detections.json").read_text())
