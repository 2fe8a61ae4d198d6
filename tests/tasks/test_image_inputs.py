"""Inputs as they come (issue 16): 8/16-bit PNG and TIFF, 1..N bands, explicit input scaling, one depth per dataset."""

from __future__ import annotations

import inspect
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from tasks import config as C
from tasks import registry
from tasks.cli import main as effdense
from tasks.data import DataError, build_loaders, check_labels
from tasks.data.check import image_census
from tasks.data.images import ImageFormatError, read_image
from tasks.data.transforms.detection import (
    DetectionTrainTransform,
    detection_collate,
    letterbox,
    mean_fill,
)
from tasks.engine.normalize import PixelNormalization, percentile_scale, pixel_options

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def one_line(error_type, action) -> str:
    with pytest.raises(error_type) as caught:
        action()
    assert "\n" not in str(caught.value)
    return str(caught.value)


# -- a tiny ImageFolder dataset written three times: 8-bit PNG (v), 12-bit TIFF (16 v + k), 12-bit TIFF (16 v) ----


def _pictures(seed: int = 0):
    """(split, class, name, uint8 (32, 32, 3)): two classes (a bright left or right half), 4 images per class."""
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        for label, name in enumerate(("left", "right")):
            for i in range(4):
                image = rng.integers(0, 90, (32, 32, 3))
                image[:, label * 16:(label + 1) * 16] += 160
                yield split, name, f"{i:02d}", image.astype(np.uint8)


@pytest.fixture(scope="module")
def twins(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(8-bit root, 12-bit root, exact 12-bit root): the same pictures as v (PNG), 16 v + k with k random in
    0..15 (16-bit TIFF, values 0..4095), and 16 v (16-bit TIFF, values 0..4080: v / 255 = 16 v / 4080)."""
    base = tmp_path_factory.mktemp("twins")
    rng = np.random.default_rng(1)
    roots = base / "u8", base / "u12", base / "u12exact"
    for split, name, stem, image in _pictures():
        for root in roots:
            (root / split / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(roots[0] / split / name / f"{stem}.png")
        wide = image.astype(np.uint16) * 16
        tifffile.imwrite(roots[1] / split / name / f"{stem}.tif", wide + rng.integers(0, 16, image.shape, np.uint16),
                         photometric="rgb")
        tifffile.imwrite(roots[2] / split / name / f"{stem}.tif", wide, photometric="rgb")
    return roots


def classification_config(root: Path, *overrides: str) -> C.Config:
    return C.load("configs/demo/classification.yaml",
                  [f"data.root={root}", "data.workers=0", "data.batch_size=4", "data.eval_batch_size=4",
                   "data.image_size=32", "model.num_classes=2", "data.augment.eval_crop_pct=1.0", "train.device=cpu",
                   *overrides])


def short_training(cfg: C.Config, steps: int = 3, split: str = "train") -> tuple[list[float], torch.Tensor]:
    """(losses of ``steps`` SGD steps from a fixed seed on ``split``'s batches, the model inputs of the first
    val batch)."""
    torch.manual_seed(0)
    model = registry.build_model(cfg)
    loaders = build_loaders(cfg, splits=tuple(dict.fromkeys(("val", split))))
    images, _ = next(iter(loaders["val"]))
    inputs = model.normalize(images)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    model.train()
    torch.manual_seed(1)
    losses = []
    while len(losses) < steps:
        for images, labels in loaders[split]:
            loss = sum(model(images, labels).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if len(losses) == steps:
                break
    return losses, inputs


def test_12_bit_images_reach_the_model_as_the_same_images_in_8_bit(twins):
    u8, u12, _ = twins
    eight, twelve = classification_config(u8), classification_config(u12, "data.input_range=[0,4095]")
    norm8, norm12 = (PixelNormalization(**pixel_options(cfg)) for cfg in (eight, twelve))
    for split in ("train", "val"):
        torch.manual_seed(0)  # the same random crops and flips for both
        batch8, labels8 = next(iter(build_loaders(eight, splits=(split,))[split]))
        torch.manual_seed(0)
        batch12, labels12 = next(iter(build_loaders(twelve, splits=(split,))[split]))
        assert batch8.dtype == torch.uint8  # the 8-bit fast path: uint8 travels
        assert batch12.dtype == torch.float32 and batch12.max() > 255  # resized: float32 of the file's values, not /255
        assert torch.equal(labels8, labels12)
        # v / 255 and (16 v + k) / 4095 differ by less than 1/255 on the 0..1 scale; a resized uint8 image is
        # also rounded to integers by torchvision's fixed-point uint8 kernel (up to a level more)
        tolerance = (1.0 if split == "val" else 2.0) / 255 / min(STD)
        assert (norm8.normalize(batch8) - norm12.normalize(batch12)).abs().max() < tolerance


def test_12_bit_images_train_like_the_same_images_in_8_bit(twins):
    """Losses of a few steps on the same batches (the val split: no resampling, whose uint8 rounding a
    randomly initialised network in train mode amplifies: at 32 px, +-0.3/255 of noise moves its first loss
    by 20%) are equal to float rounding."""
    u8, _, exact = twins
    losses8, inputs8 = short_training(classification_config(u8, "data.eval_batch_size=8"), steps=2, split="val")
    exact12 = classification_config(exact, "data.eval_batch_size=8", "data.input_range=[0,4080]")
    losses12, inputs12 = short_training(exact12, steps=2, split="val")
    torch.testing.assert_close(inputs8, inputs12, rtol=0, atol=1e-5)
    assert losses8 == pytest.approx(losses12, rel=1e-3)
    assert losses8[-1] < losses8[0]


def test_16_bit_without_input_range_is_a_one_line_error_naming_the_file(twins):
    cfg = classification_config(twins[1])
    loader = build_loaders(cfg, splits=("val",))["val"]
    message = one_line(DataError, lambda: next(iter(loader)))
    assert ".tif: is a 16-bit image" in message and "data.input_range" in message
    assert "[0, 4095] for 12-bit" in message and "data.normalize=percentile" in message


def test_percentile_mode_trains_without_a_range(twins):
    cfg = classification_config(twins[1], "data.normalize=percentile", "data.percentiles=[1,99]")
    losses, inputs = short_training(cfg, steps=1)
    assert np.isfinite(losses).all() and torch.isfinite(inputs).all()


# -- normalisation on the device -------------------------------------------------------------------


def test_8_bit_normalisation_is_bit_for_bit_the_old_formula():
    images = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)
    old = (images.float() - torch.tensor(MEAN).view(1, -1, 1, 1) * 255).mul_(
        1.0 / (torch.tensor(STD).view(1, -1, 1, 1) * 255))
    assert torch.equal(PixelNormalization(MEAN, STD).normalize(images), old)
    assert torch.equal(PixelNormalization(MEAN, STD, input_range=(0, 255)).normalize(images), old)


def test_input_range_and_percentiles_per_band():
    values = torch.randint(0, 4096, (2, 3, 16, 16)).to(torch.uint16)
    ranged = PixelNormalization(MEAN, STD, input_range=(0, 4095)).normalize(values)
    expected = (values.float() / 4095 - torch.tensor(MEAN).view(1, -1, 1, 1)) / torch.tensor(STD).view(1, -1, 1, 1)
    torch.testing.assert_close(ranged, expected)
    scaled = percentile_scale(values.float(), (1.0, 99.8))
    array = values.to(torch.int32).numpy()
    for n in range(2):
        for c in range(3):
            lo, hi = np.percentile(array[n, c], [1.0, 99.8])  # stardist's normalize (numpy's linear percentiles)
            np.testing.assert_allclose(scaled[n, c].numpy(), (array[n, c] - lo) / (hi - lo), rtol=1e-5, atol=1e-5)


def test_pixel_options_carry_the_new_keys_only_when_set():
    cfg = classification_config("unused")
    assert pixel_options(cfg) == {"mean": MEAN, "std": STD}
    cfg.data.input_range = [0, 4095]
    assert pixel_options(cfg)["input_range"] == (0.0, 4095.0)
    cfg.data.input_range = [10, 10]
    assert "data.input_range=[10, 10]" in one_line(C.ConfigError, lambda: pixel_options(cfg))
    cfg.data.normalize = "percentile"
    assert pixel_options(cfg)["percentiles"] == (1.0, 99.8) and "input_range" not in pixel_options(cfg)


# -- bands -----------------------------------------------------------------------------------------


def test_a_four_band_tiff_trains(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 4), ("val", 2)):
        for label, name in enumerate(("dry", "wet")):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                bands = rng.integers(0, 20000, (4, 32, 32)).astype(np.uint16)
                bands[3] += np.uint16(30000 * label)  # the near-infrared band tells the classes apart
                tifffile.imwrite(tmp_path / split / name / f"{i}.tif", bands)  # (C, H, W) pages
    cfg = classification_config(tmp_path, "model.in_channels=4", "data.mean=[0.5,0.5,0.5,0.5]",
                                "data.std=[0.25,0.25,0.25,0.25]", "data.input_range=[0,65535]")
    losses, inputs = short_training(cfg, steps=2)
    assert inputs.shape[1] == 4 and np.isfinite(losses).all()


def test_a_band_count_other_than_in_channels_is_a_one_line_error_naming_the_file(tmp_path):
    four = tmp_path / "four.tif"
    tifffile.imwrite(four, np.zeros((4, 8, 8), np.uint16))
    message = one_line(ImageFormatError, lambda: read_image(four, bands=3, scaled=True))
    assert message.startswith(str(four)) and "has 4 bands but model.in_channels=3" in message
    rgb = tmp_path / "rgb.png"
    Image.new("RGB", (8, 8)).save(rgb)
    assert "has 3 bands but model.in_channels=1" in one_line(ImageFormatError, lambda: read_image(rgb, bands=1))
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.arange(64, dtype=np.uint16).reshape(8, 8))
    assert read_image(gray, bands=3, scaled=True).shape == (3, 8, 8)  # a gray file repeats into RGB, as before


def test_16_bit_png_and_tiff_keep_every_bit(tmp_path):
    values = np.arange(0, 65536, 257, dtype=np.uint16)[:240].reshape(12, 20)
    cv2.imwrite(str(tmp_path / "gray16.png"), values)
    tifffile.imwrite(tmp_path / "big_endian.tif", values.astype(">u2"))
    tifffile.imwrite(tmp_path / "float.tif", values.astype(np.float32) / 65535)
    for name in ("gray16.png", "big_endian.tif"):
        image = read_image(tmp_path / name, bands=1, scaled=True)
        assert image.dtype == torch.uint16 and np.array_equal(image[0].numpy(), values)
    assert read_image(tmp_path / "float.tif", bands=1, scaled=True).dtype == torch.float32
    assert "float32 image" in one_line(ImageFormatError, lambda: read_image(tmp_path / "float.tif", bands=1))


# -- one depth per dataset -------------------------------------------------------------------------


@pytest.fixture
def mixed(twins, tmp_path) -> Path:
    """The 8-bit twin with one train image replaced by a 16-bit PNG of the same picture."""
    root = Path(shutil.copytree(twins[0], tmp_path / "mixed"))
    odd = root / "train" / "left" / "01.png"
    picture = np.array(Image.open(odd)).astype(np.uint16) * 257
    cv2.imwrite(str(odd), picture[..., ::-1])  # OpenCV writes BGR
    return root


def test_mixed_bit_depth_is_one_line_from_data_check(mixed, capsys):
    code = effdense(["data", "check", "configs/demo/classification.yaml", "--set", f"data.root={mixed}",
                     "--set", "model.num_classes=2", "--set", "train.device=cpu"])
    out = capsys.readouterr().out
    assert code == 1
    assert re.search(r"train: 8 images: 8-bit, 3 bands \(7\); 16-bit, 3 bands \(1\); values 0\.\.\d{5}\n", out)
    assert re.search(r"val: 8 images: 8-bit, 3 bands; values 0\.\.2\d\d\n", out)
    assert "images of 2 depths: 15 8-bit" in out and "1 16-bit (e.g. " in out and "01.png)" in out


@pytest.mark.parametrize("scaling", [[], ["--set", "data.input_range=[0,65535]"]])
def test_mixed_bit_depth_stops_train_before_the_first_step(mixed, tmp_path, capsys, scaling):
    code = effdense(["train", "configs/demo/classification.yaml", "--set", f"data.root={mixed}", "--set",
                     "model.num_classes=2", "--set", "train.device=cpu", "--set", "data.workers=0", "--set",
                     "data.batch_size=4", "--set",
                     f"train.output_dir={tmp_path}", *scaling])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "images of 2 depths" in err[0] and not (tmp_path / "demo-classification").exists()


def test_mixed_bit_depth_in_the_loader_names_both_files(mixed):
    cfg = classification_config(mixed, "data.input_range=[0,255]")
    assert any("images of 2 depths" in p for p in check_labels(cfg, "quick"))
    loader = build_loaders(cfg, splits=("train",))["train"]
    message = one_line(DataError, lambda: [batch for batch in loader])
    assert "01.png: is a 16-bit image but" in message and "00.png (the dataset's first image) is 8-bit" in message


# -- transforms, detection and segmentation data paths ---------------------------------------------


def test_photometric_augmentation_is_8_bit_only_and_16_bit_keeps_its_values(caplog):
    from tasks.config.schema import ClassificationAugmentConfig
    from tasks.data.transforms.classification import classification_train_transform

    transform = classification_train_transform(ClassificationAugmentConfig(randaugment=True), (16, 16))
    wide = torch.randint(1000, 4096, (4, 24, 24)).to(torch.uint16)
    out = transform(wide)
    assert out.dtype == torch.float32 and out.shape == (4, 16, 16) and out.min() >= 1000  # not clamped to 0..1
    assert "RandAugment skipped for float32 images of 4 bands" in caplog.text
    assert transform(torch.randint(0, 256, (1, 24, 24), dtype=torch.uint8)).dtype == torch.uint8




def test_detection_transforms_keep_16_bit_values_and_pad_with_the_mean():
    cfg = C.load("configs/demo/detection.yaml", ["data.input_range=[0,4095]"])
    fill = mean_fill(cfg)
    image = torch.full((3, 40, 60), 4000).to(torch.uint16)
    out, _ = letterbox(image, 64, fill)
    assert out.dtype == torch.float32 and out[:, 0, 0].tolist() == [4000.0] * 3
    torch.testing.assert_close(out[:, -1, 0], torch.tensor(fill))  # the padding normalises to 0
    target = {"boxes": torch.tensor([[5.0, 5.0, 30.0, 30.0]]), "labels": torch.tensor([0])}
    crop, _ = DetectionTrainTransform(64, fill=fill)(image, target)
    # the values stay 16-bit (an antialiased resize of a flat 4000 may round to 4000.001 in float32)
    assert crop.dtype == torch.float32 and 3999.5 <= crop.max() <= 4000.5
    eight, _ = letterbox(torch.zeros(3, 40, 60, dtype=torch.uint8), 64)
    assert eight.dtype == torch.uint8
    mixed = [(eight, {"image_id": 1}), (out, {"image_id": 2})]
    assert "mixes image depths" in one_line(DataError, lambda: detection_collate(mixed))


def test_one_16_bit_png_among_8_bit_coco_images_is_one_line_not_a_promotion_traceback(tmp_path):
    from tasks.data.synthetic.detection import write_coco

    root = write_coco(tmp_path / "coco", train_images=4, val_images=2, min_size=64, max_size=96)
    odd = sorted((root / "train").iterdir())[1]  # a JPEG, rewritten as a 16-bit PNG under the name the json lists
    odd.write_bytes(cv2.imencode(".png", cv2.imread(str(odd)).astype(np.uint16) * 257)[1].tobytes())

    def config(*overrides):
        return C.load("configs/demo/detection.yaml", [f"data.root={root}", "data.workers=0", "train.device=cpu",
                                                      "data.batch_size=4", *overrides])

    loader = build_loaders(config(), splits=("train",))["train"]
    message = one_line(DataError, lambda: [batch for batch in loader])
    assert f"{odd}: is a 16-bit image" in message and "data.input_range" in message
    problems = check_labels(config("data.input_range=[0,255]"), "quick")
    assert "images of 2 depths: 5 8-bit" in problems[0] and f"1 16-bit (e.g. {odd})" in problems[0]
    loader = build_loaders(config("data.input_range=[0,255]"), splits=("train",))["train"]
    assert f"{odd}: is a 16-bit image but " in one_line(DataError, lambda: [batch for batch in loader])


def test_mask_folder_reads_16_bit_tiff_nuclei(tmp_path):
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("val", 1)):
        (tmp_path / "images" / split).mkdir(parents=True)
        (tmp_path / "masks" / split).mkdir(parents=True)
        for i in range(count):
            mask = np.zeros((48, 48), np.uint8)
            mask[10:30, 12:28] = 1
            image = (rng.integers(0, 20, mask.shape) + 216 * mask).astype(np.uint16)  # values 0..235, as reported
            tifffile.imwrite(tmp_path / "images" / split / f"{i}.tif", image)
            Image.fromarray(mask).save(tmp_path / "masks" / split / f"{i}.png")
    cfg = C.load("configs/demo/segmentation.yaml",
                 ["data.format=maskfolder", f"data.root={tmp_path}", "model.num_classes=2", "model.in_channels=1",
                  "data.mean=[0.5]", "data.std=[0.25]", "data.workers=0", "data.batch_size=2",
                  "data.image_size=32", "data.normalize=percentile", "train.device=cpu"])
    assert check_labels(cfg, "quick") == []
    lines = image_census(cfg).lines()
    assert re.fullmatch(r"train: 2 images: 16-bit, 1 band; values 0\.\.23\d", lines[0])
    assert re.fullmatch(r"val: 1 images: 16-bit, 1 band; values 0\.\.23\d", lines[1])
    loaders = build_loaders(cfg)
    images, _ = next(iter(loaders["train"]))
    assert images.shape == (2, 1, 32, 32) and images.dtype == torch.float32
    val_images, _ = next(iter(loaders["val"]))
    assert val_images.dtype == torch.uint16  # no augmentation: the file's dtype travels
    inputs = PixelNormalization(**pixel_options(cfg)).normalize(val_images)
    assert inputs.shape == (1, 1, 48, 48) and 1.5 < float(inputs.max()) < 3  # (1 - 0.5) / 0.25 at the 99.8th percentile
    from tasks.segmentation.model import SegmentationTask

    if not any(p.kind is p.VAR_KEYWORD for p in inspect.signature(SegmentationTask.__init__).parameters.values()):
        pytest.skip("tasks/segmentation/model.py: SegmentationTask does not pass input_range/percentiles on yet")
    losses, _ = short_training(cfg, steps=1)
    assert np.isfinite(losses).all()
