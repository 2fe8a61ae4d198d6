"""The small-data detection recipe (issue 22): mosaic, mixup, close_mosaic, HSV gains, random affine.

Expected values are worked out by hand from the geometry (quadrants around the mosaic centre, zoom about the
centre), from colorsys (HSV) and from the blend formula, not read back from the code.
"""

from __future__ import annotations

import colorsys
import random
from types import SimpleNamespace

import pytest
import torch

from tasks.config import load
from tasks.data import DataError, build_loaders
from tasks.data.coco import CocoDetection
from tasks.data.mosaic import MosaicDetection
from tasks.data.transforms.detection import DetectionTrainTransform, unletterbox_boxes
from tasks.data.transforms.detection_recipe import as_boxes, blend, hsv_jitter, keep_boxes, mosaic, zoom_shift
from tasks.detection.augment import CloseMosaic, epoch_callbacks

pytestmark = pytest.mark.usefixtures("one_thread")

FILL = (124, 116, 104)
RED, GREEN, BLUE, YELLOW = (200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)
RECIPE = ["data.augment.mosaic=1.0", "data.augment.mixup=0.5", "data.augment.hsv_h=0.015",
          "data.augment.hsv_s=0.7", "data.augment.hsv_v=0.4", "data.augment.translate=0.1",
          "data.augment.affine_scale=0.5"]


def solid(colour, height, width, dtype=torch.uint8):
    return torch.tensor(colour, dtype=dtype).view(-1, 1, 1).expand(-1, height, width).clone()


def sample(colour, height, width, boxes, labels, image_id):
    target = {"boxes": torch.tensor(boxes, dtype=torch.float32), "labels": torch.tensor(labels),
              "iscrowd": torch.zeros(len(labels), dtype=torch.bool), "image_id": image_id}
    return solid(colour, height, width), target


def four_samples():
    return [sample(RED, 64, 64, [[40, 20, 60, 60]], [0], 10),
            sample(GREEN, 64, 64, [[4, 40, 30, 60]], [1], 11),
            sample(BLUE, 32, 64, [[50, 4, 62, 20]], [2], 12),  # wide: fits 64 x 64 at ratio 1
            sample(YELLOW, 64, 64, [[0, 0, 10, 3], [30, 14, 60, 40]], [3, 4], 13)]


def pixel(image, x, y):
    return tuple(image[:, y, x].tolist())


def test_mosaic_puts_each_image_in_its_quadrant():
    # centre (48, 80) on the 128 x 128 canvas of a 64 x 64 mosaic; zoom 1: corner at (32 + 48 - 64, 32 + 80 - 64)
    image, target, areas = mosaic(four_samples(), (64, 64), centre=(48, 80), fill=FILL)
    kept = keep_boxes(target, target["boxes"], areas)
    # red: its bottom-right at (16, 48), i.e. shifted by (-48, -16): [-8, 4, 12, 44] -> clipped, 60% left
    # green: top-left at (16, -16); blue (32 x 64): top-right at (16, 48), shift (-48, 48), cut at y = 64
    # yellow: top-left at (16, 48): [16, 48, 26, 51] (3 px high: kept); [46, 62, 76, 88] -> 36 of 780 px: dropped
    assert kept["boxes"].tolist() == [[0, 4, 12, 44], [20, 24, 46, 44], [2, 52, 14, 64], [16, 48, 26, 51]]
    assert kept["labels"].tolist() == [0, 1, 2, 3] and kept["source"].tolist() == [0, 1, 2, 3]
    assert kept["iscrowd"].tolist() == [False] * 4
    assert target["image_id"] == 10 and target["mosaic"] == (10, 11, 12, 13)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8
    assert pixel(image, 5, 10) == RED and pixel(image, 15, 47) == RED and pixel(image, 16, 47) == GREEN
    assert pixel(image, 63, 0) == GREEN and pixel(image, 5, 55) == BLUE and pixel(image, 30, 55) == YELLOW
    for box, colour in zip(kept["boxes"].long().tolist(), (RED, GREEN, BLUE, YELLOW)):
        x1, y1, x2, y2 = box
        assert (image[:, y1:y2, x1:x2] == torch.tensor(colour).view(3, 1, 1)).all()  # each box on its own image


def test_mosaic_with_zoom_and_shift():
    # zoom 0.5, shift (4, -2): corner (32 + 0.5 (48 - 64) + 4, 32 + 0.5 (80 - 64) - 2) = (28, 38); images halved
    image, target, areas = mosaic(four_samples(), (64, 64), centre=(48, 80), zoom=0.5, shift=(4, -2), fill=FILL)
    kept = keep_boxes(target, target["boxes"], areas)
    # red 32 x 32 at (-4, 6): [20, 10, 30, 30] + (-4, 6); green at (28, 6): [2, 20, 15, 30] + (28, 6);
    # blue 16 x 32 at (-4, 38): [25, 2, 31, 10] + (-4, 38); yellow at (28, 38): [28, 38, 33, 39.5] is 1.5 px high
    # the yellow's second box [15, 7, 30, 20] + (28, 38) is whole this time
    assert kept["boxes"].tolist() == [[16, 16, 26, 36], [30, 26, 43, 36], [21, 40, 27, 48], [43, 45, 58, 58]]
    assert kept["labels"].tolist() == [0, 1, 2, 4]
    assert pixel(image, 0, 10) == RED and pixel(image, 27, 37) == RED and pixel(image, 59, 6) == GREEN
    assert pixel(image, 62, 2) == FILL and pixel(image, 0, 0) == FILL and pixel(image, 27, 53) == BLUE
    assert pixel(image, 27, 54) == FILL and pixel(image, 59, 63) == YELLOW and pixel(image, 60, 63) == FILL


def test_zoom_shift_moves_boxes_and_the_meta_inverts_it():
    image = torch.zeros(3, 48, 64, dtype=torch.uint8)
    image[:, 20:40, 10:30] = 255
    boxes = as_boxes(torch.tensor([[10.0, 20.0, 30.0, 40.0]]), (48, 64))
    # zoom 1.5 -> 72 x 96 placed at ((64 - 96) / 2 + 5, (48 - 72) / 2 - 3) = (-11, -15): the box x 1.5 + (-11, -15)
    out, moved, areas, ratio, corner = zoom_shift(image, boxes, 1.5, (5.0, -3.0), FILL)
    assert moved.tolist() == [[4, 15, 34, 45]] and areas.tolist() == [900] and ratio == (1.5, 1.5)
    assert corner == (-11, -15)
    assert out[:, 16:44, 5:33].eq(255).all() and pixel(out, 1, 30) == (0, 0, 0)
    # zoom 0.5 -> 24 x 32 at (16 + 2, 12 + 1); the rest is fill
    out, moved, _, _, _ = zoom_shift(image, boxes, 0.5, (2.0, 1.0), FILL)
    assert moved.tolist() == [[23, 23, 33, 33]] and pixel(out, 0, 0) == FILL and pixel(out, 28, 28) == (255,) * 3
    # through the train transform (no jitter, no flip): input = original * scale + offset, so the meta maps back
    transform = DetectionTrainTransform(64, (1.0, 1.0), hflip=0.0, fill=FILL, translate=0.2, affine_scale=0.3)
    square = torch.zeros(3, 64, 64, dtype=torch.uint8)
    target = {"boxes": torch.tensor([[24.0, 24.0, 40.0, 40.0]]), "labels": torch.tensor([1])}
    for seed in range(5):
        random.seed(seed)
        _, result = transform(square, target)
        assert result["boxes"].shape == (1, 4)
        torch.testing.assert_close(unletterbox_boxes(result["boxes"], result), target["boxes"], atol=1e-4, rtol=0)


def test_hsv_value_gain_by_hand_and_hue_saturation_against_colorsys():
    image = torch.tensor([[100, 250, 0], [50, 100, 0], [20, 0, 0]], dtype=torch.uint8).view(3, 1, 3)
    out = hsv_jitter(image, value=1.2)
    # value x 1.2, clipped at 255: (250, 100, 0) has V 250 -> 255, so every band x 255 / 250
    assert out[:, 0].T.tolist() == [[120, 60, 24], [255, 102, 0], [0, 0, 0]]
    assert hsv_jitter(image, value=0.5)[:, 0].T.tolist() == [[50, 25, 10], [125, 50, 0], [0, 0, 0]]
    generator = torch.Generator().manual_seed(0)
    colours = torch.randint(0, 256, (3, 4, 5), generator=generator, dtype=torch.uint8)
    for hue, saturation, value in ((0.1, 1.0, 1.0), (-0.3, 0.6, 1.3), (0.015, 1.7, 0.6)):
        out = hsv_jitter(colours, hue, saturation, value)
        for y in range(4):
            for x in range(5):
                h, s, v = colorsys.rgb_to_hsv(*(colours[:, y, x].double() / 255).tolist())
                rgb = colorsys.hsv_to_rgb((h + hue) % 1.0, min(s * saturation, 1.0), min(v * value, 1.0))
                expected = [round(c * 255) for c in rgb]
                assert max(abs(a - b) for a, b in zip(out[:, y, x].tolist(), expected)) <= 1, (hue, x, y)
    # 16-bit values as float: the same colours x 16, value clipped at the range's top
    wide = hsv_jitter(colours.float() * 16, 0.1, 1.0, 1.5, top=4095.0)
    assert wide.dtype == torch.float32 and wide.max() <= 4095
    torch.testing.assert_close(wide / 16, hsv_jitter(colours.float(), 0.1, 1.0, 1.5, top=4095 / 16))


def test_hsv_with_other_band_counts_value_only():
    gray = torch.tensor([[[10, 100, 240]]], dtype=torch.uint8)
    assert hsv_jitter(gray, value=1.5).tolist() == [[[15, 150, 255]]]
    four = torch.tensor([10, 20, 30, 200], dtype=torch.uint8).view(4, 1, 1)
    assert hsv_jitter(four, value=2.0).flatten().tolist() == [13, 26, 38, 255]  # x 255 / 200: V = max band
    with pytest.raises(ValueError, match="3 bands"):
        hsv_jitter(gray, hue=0.1)


def test_hue_on_other_band_counts_is_a_one_line_config_error(tmp_path):
    from tasks.data.synthetic.detection import write_coco

    root = write_coco(tmp_path / "coco", train_images=2, val_images=2, min_size=64, max_size=64)
    cfg = load("demo/detection", [f"data.root={root}", "model.in_channels=4", "data.mean=[0.5,0.5,0.5,0.5]",
                                  "data.std=[0.2,0.2,0.2,0.2]", "data.augment.hsv_h=0.015", "data.workers=0"])
    with pytest.raises(DataError, match=r"data.augment.hsv_h=0.015 .* model.in_channels=4") as error:
        build_loaders(cfg, splits=("train",))
    assert "\n" not in str(error.value)


def test_mixup_blends_pixels_and_keeps_both_box_sets():
    a = sample(RED, 8, 8, [[0, 0, 4, 4]], [0], 1)
    b = sample(BLUE, 8, 8, [[2, 2, 8, 8], [1, 1, 3, 3]], [2, 1], 2)
    image, target = blend(a, b, 0.3)
    assert pixel(image, 5, 5) == tuple(round(0.3 * p + 0.7 * q) for p, q in zip(RED, BLUE))  # (81, 30, 200)
    assert target["boxes"].tolist() == [[0, 0, 4, 4], [2, 2, 8, 8], [1, 1, 3, 3]]
    assert target["labels"].tolist() == [0, 2, 1] and target["iscrowd"].tolist() == [False] * 3
    assert target["image_id"] == 1 and target["mixup"] == (0.3, 2)
    floats = blend((a[0].float() * 16, a[1]), (b[0].float() * 16, b[1]), 0.25)[0]
    assert floats.dtype == torch.float32 and floats[0, 0, 0].item() == pytest.approx(16 * (0.25 * 200 + 0.75 * 30))


def test_small_thin_and_mostly_clipped_boxes_are_dropped_with_their_labels():
    target = {"labels": torch.tensor([0, 1, 2, 3, 4]), "iscrowd": torch.tensor([False, True, False, True, False]),
              "source": torch.tensor([0, 1, 2, 3, 0])}
    boxes = torch.tensor([[0, 0, 10, 10], [0, 0, 1.5, 10], [0, 0, 20, 10], [0, 0, 300, 2.5], [0, 0, 40, 2]])
    areas = torch.tensor([100.0, 15.0, 2100.0, 750.0, 80.0])  # the third: 200 of 2100 px left (< 10%)
    kept = keep_boxes(target, boxes, areas)
    # 1.5 px wide: too thin; 300 x 2.5: aspect 120 > 100; 40 x 2 (2 px): kept
    assert kept["boxes"].tolist() == [[0, 0, 10, 10], [0, 0, 40, 2]]
    assert kept["labels"].tolist() == [0, 4] and kept["iscrowd"].tolist() == [False, False]
    assert kept["source"].tolist() == [0, 0]


class Frames(torch.utils.data.Dataset):
    """``n`` solid 64 x 64 images of ``bands`` bands (value 10 (i + 1) x ``scale``), one ``box`` each, in ``dtype``."""

    def __init__(self, n=6, bands=3, dtype=torch.uint8, scale=1, transform=None, box=(8.0, 8.0, 56.0, 56.0)):
        self.n, self.bands, self.dtype, self.scale, self.transform = n, bands, dtype, scale, transform
        self.box = box

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        image = solid([10 * (index + 1) * self.scale] * self.bands, 64, 64, self.dtype)
        target = {"boxes": torch.tensor([self.box]), "labels": torch.tensor([index % 3]),
                  "image_id": index}
        return self.transform(image, target) if self.transform is not None else (image, target)


def test_all_off_is_the_previous_transform_and_no_wrapper(tmp_path):
    from tasks.data.formats import FORMATS
    from tasks.data.synthetic.detection import write_coco

    root = write_coco(tmp_path / "coco", train_images=3, val_images=2, min_size=64, max_size=96)
    cfg = load("demo/detection", [f"data.root={root}"])
    dataset = FORMATS["coco"].dataset(cfg, "train", True)
    assert type(dataset) is CocoDetection  # mosaic = mixup = 0: not wrapped
    augment = cfg.data.augment
    previous = DetectionTrainTransform(128, (augment.scale_min, augment.scale_max), augment.hflip, FILL)
    image, target = CocoDetection(root, "train")[2]
    for seed in range(4):
        random.seed(seed)
        ours = dataset.transform(image, target)
        after = random.random()
        random.seed(seed)
        theirs = previous(image, target)
        assert random.random() == after  # no extra draws
        assert torch.equal(ours[0], theirs[0]) and ours[1]["boxes"].equal(theirs[1]["boxes"])
        assert {k: v for k, v in ours[1].items() if k not in ("boxes", "labels", "iscrowd")} == \
               {k: v for k, v in theirs[1].items() if k not in ("boxes", "labels", "iscrowd")}
    # jitter 1, no flip, an image of the input size: the identity
    random.seed(0)
    same, out = DetectionTrainTransform(64, (1.0, 1.0), 0.0, FILL)(*Frames()[1])
    assert same.eq(20).all() and out["boxes"].tolist() == [[8, 8, 56, 56]] and out["scale"] == (1.0, 1.0)


@pytest.mark.parametrize("bands, dtype, scale", [(3, torch.uint8, 1), (1, torch.float32, 16), (4, torch.uint16, 16)])
def test_wrapper_serves_mosaics_and_mixups_of_any_depth_and_band_count(bands, dtype, scale):
    transform = DetectionTrainTransform(64, (1.0, 1.0), 0.5, None, hsv=(0.0, 0.0, 0.3))
    hsv = (0.015, 0.7, 0.4) if bands == 3 else (0.0, 0.0, 0.4)
    dataset = MosaicDetection(Frames(bands=bands, dtype=dtype, scale=scale, transform=transform), 64, mosaic=0.5,
                              mixup=0.5, hsv=hsv, translate=0.1, affine_scale=0.5,
                              value_top=255.0 * scale if dtype != torch.uint8 else None)
    assert dataset.transform is transform and dataset.dataset.transform is None and dataset.n == 6
    random.seed(1)
    kinds = set()
    for index in range(24):
        image, target = dataset[index % 6]
        assert image.shape == (bands, 64, 64)
        assert image.dtype == (torch.uint8 if dtype == torch.uint8 else torch.float32)
        assert len(target["boxes"]) == len(target["labels"]) and (target["boxes"] >= 0).all()
        assert (target["boxes"] <= 64).all()
        kinds.add(("mosaic" in target, "mixup" in target))
    assert kinds == {(False, False), (True, False), (False, True), (True, True)}
    dataset.set_mixing(False)
    assert not dataset.mixing and all("mosaic" not in dataset[i][1] and "mixup" not in dataset[i][1] for i in range(6))
    dataset.set_mixing(True)
    assert (dataset.mosaic, dataset.mixup) == (0.5, 0.5)


def test_mosaic_meta_maps_the_input_to_the_canvas():
    """Frames are 64 x 64 with a box at [24, 24, 40, 40]: on the 128 x 128 canvas the images meet at the
    centre C, so the box is at C + (-40, -40) in the first, C + (24, -40) in the second, C + (-40, 24) in
    the third and C + (24, 24) in the fourth; mapped back by the meta, every whole box gives the same C."""
    dataset = MosaicDetection(Frames(box=(24.0, 24.0, 40.0, 40.0)), 64, mosaic=1.0, hflip=0.0, affine_scale=0.5,
                              fill=FILL)
    checked = 0
    for seed in range(40):
        random.seed(seed)
        _, target = dataset[seed % 6]
        assert target["orig_size"] == (128, 128) and target["hflip"] is False and len(target["mosaic"]) == 4
        zoom = target["scale"][0]
        centres = []
        for box, k in zip(target["boxes"], target["source"].tolist()):
            if ((box[2:] - box[:2]) - 16 * zoom).abs().max() > 1:
                continue  # clipped by the output's border
            x1, y1, x2, y2 = unletterbox_boxes(box[None], target)[0].tolist()
            assert x2 - x1 == pytest.approx(16, abs=1.5) and y2 - y1 == pytest.approx(16, abs=1.5)
            centres.append((x1 - (24 if k in (1, 3) else -40), y1 - (24 if k in (2, 3) else -40)))
        for cx, cy in centres:
            assert 31 <= cx <= 97 and 31 <= cy <= 97
            assert cx == pytest.approx(centres[0][0], abs=2) and cy == pytest.approx(centres[0][1], abs=2)
        checked += len(centres) > 1
    assert checked >= 5


def test_tiles_and_persistent_workers_then_close_mosaic(tmp_path):
    from tasks.data.synthetic.detection import write_coco

    root = write_coco(tmp_path / "coco", train_images=4, val_images=2, min_size=160, max_size=192)
    cfg = load("demo/detection", [f"data.root={root}", "data.tile.size=128", "data.batch_size=2",
                                  "data.workers=2", "data.persistent_workers=true", "train.epochs=3",
                                  "data.augment.close_mosaic=1", *RECIPE[:1]])
    loaders = build_loaders(cfg, splits=("train",))
    dataset = loaders["train"].dataset
    assert isinstance(dataset, MosaicDetection) and dataset.tiles is not None and len(dataset) == len(dataset.tiles)
    trainer = SimpleNamespace(loaders=loaders, train_cfg=cfg.train, is_main=True)
    (hook,) = epoch_callbacks(cfg)
    hook(trainer, 0)
    first = trainer.loaders["train"]
    for _ in range(2):  # two epochs of the same persistent workers: mosaics
        assert all("mosaic" in target for _, targets in first for target in targets)
    hook(trainer, 1)
    assert trainer.loaders["train"] is first and hook.switches == []
    hook(trainer, 2)  # the last epoch (3 - close_mosaic 1): off, in new workers
    assert hook.switches == [(2, False)] and trainer.loaders["train"] is not first
    assert len(trainer.loaders["train"]) == len(first)
    assert all("mosaic" not in target for _, targets in trainer.loaders["train"] for target in targets)
    assert all("mosaic" in target for _, targets in first for target in targets)  # old workers: their own copy
    trainer.epochs = 5  # a refit run (train.time_limit): epoch 2 of 5 mixes again
    hook(trainer, 2)
    assert hook.switches == [(2, False), (2, True)] and trainer.loaders["train"].dataset is dataset and dataset.mixing
    assert all("mosaic" in target for _, targets in trainer.loaders["train"] for target in targets)


def test_close_mosaic_needs_the_wrapper_and_is_off_without_mosaic():
    assert epoch_callbacks(load("demo/detection", ["data.augment.close_mosaic=10"])) == []
    assert len(epoch_callbacks(load("demo/detection", ["data.augment.close_mosaic=10", "data.augment.mixup=0.1"]))) == 1
    trainer = SimpleNamespace(loaders={"train": SimpleNamespace(dataset=Frames())},
                              train_cfg=SimpleNamespace(epochs=3))
    with pytest.raises(TypeError, match="MosaicDetection"):
        CloseMosaic(1)(trainer, 0)


def test_short_training_run_with_the_recipe(tmp_path):
    from tasks.data.synthetic.detection import write_coco
    from tasks.engine import Trainer
    from tasks.registry import build_model, get

    root = write_coco(tmp_path / "coco", train_images=2, val_images=2, min_size=64, max_size=80)
    cfg = load("demo/detection", [f"data.root={root}", "data.batch_size=2", "data.workers=0", "data.eval_batch_size=2",
                                  "train.epochs=2", "train.eval_every=2", "train.device=cpu", "train.progress=false",
                                  "data.augment.close_mosaic=1", f"train.output_dir={tmp_path}", "train.run_name=r",
                                  *RECIPE])
    callbacks = get("detection").epoch_callbacks(cfg)
    seen = []
    model = build_model(cfg)
    trainer = Trainer(model, build_loaders(cfg), cfg,
                      epoch_callbacks=[*callbacks, lambda t, e: seen.append(t.loaders["train"].dataset.mixing)])
    metrics = trainer.fit()
    assert "mAP" in metrics and seen == [True, False] and callbacks[0].switches == [(1, False)]


@pytest.mark.parametrize("fmt", ["voc", "yolo"])
def test_every_detection_format_gets_mosaic(fmt, tmp_path):
    from tasks.data.formats import FORMATS

    root = FORMATS[fmt].synth(tmp_path / fmt, train_images=3, val_images=2, min_size=64, max_size=96)
    cfg = load("demo/detection", [f"data.root={root}", f"data.format={fmt}", *RECIPE])
    dataset = FORMATS[fmt].dataset(cfg, "train", True)
    assert isinstance(dataset, MosaicDetection) and len(dataset.classes) == 3  # the wrapped dataset's
    random.seed(0)
    image, target = dataset[0]
    assert image.shape == (3, 128, 128) and "mosaic" in target and len(target["boxes"]) == len(target["labels"])
    assert type(FORMATS[fmt].dataset(cfg, "val", False)).__name__ != "MosaicDetection"
