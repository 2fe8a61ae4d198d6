"""Data path: synthetic ImageFolder writer, dataset, bad-input errors, transforms, loaders, check."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy
import pytest
import torch
from PIL import Image

from tasks import config as C
from tasks.data import DataError, ImageFolderDataset, build_loaders
from tasks.data.check import check_imagefolder as check_dataset
from tasks.data.synthetic.classification import write_classification
from tasks.data.loaders import EpochShuffleSampler
from tasks.config.schema import ClassificationAugmentConfig
from tasks.data.transforms.classification import classification_eval_transform, classification_train_transform

SHAPES = ["circle", "square", "stripes", "triangle"]  # sorted: the label order


@pytest.fixture(scope="module")
def clean_root(tmp_path_factory) -> Path:
    return write_classification(tmp_path_factory.mktemp("synthetic") / "shapes", train_per_class=6, val_per_class=3)


@pytest.fixture
def root(clean_root, tmp_path) -> Path:
    """A private copy of the synthetic dataset that a test may damage."""
    return Path(shutil.copytree(clean_root, tmp_path / "shapes"))


def demo_config(root: Path, *overrides: str) -> C.Config:
    return C.load("configs/demo/classification.yaml",
                  [f"data.root={root}", "data.workers=0", "data.batch_size=4", "data.image_size=32", *overrides])


def single_line_error(error_type, action) -> str:
    with pytest.raises(error_type) as caught:
        action()
    assert "\n" not in str(caught.value)
    return str(caught.value)


def write_png(path: Path, rgb: tuple[int, int, int], size=(5, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


# -- synthetic writer ------------------------------------------------------------------------------


def test_synthetic_writer_makes_an_imagefolder_tree_of_real_jpegs(clean_root):
    for split, count in (("train", 6), ("val", 3)):
        assert sorted(p.name for p in (clean_root / split).iterdir()) == SHAPES
        for shape in SHAPES:
            files = sorted((clean_root / split / shape).iterdir())
            assert len(files) == count and all(f.suffix == ".jpg" for f in files)
    first = clean_root / "train" / "circle" / "circle_0000.jpg"
    assert first.read_bytes()[:3] == b"\xff\xd8\xff"  # JPEG SOI marker
    with Image.open(first) as image:  # an independent decoder
        assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 64))


def test_synthetic_writer_is_deterministic_per_seed(tmp_path):
    def files(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}

    first = files(write_classification(tmp_path / "a", train_per_class=2, val_per_class=1, seed=3))
    again = files(write_classification(tmp_path / "b", train_per_class=2, val_per_class=1, seed=3))
    other = files(write_classification(tmp_path / "c", train_per_class=2, val_per_class=1, seed=4))
    assert first == again and first.keys() == other.keys() and first != other


def test_synthetic_writer_rewrites_its_own_folder_but_refuses_a_foreign_one(tmp_path):
    root = write_classification(tmp_path / "own", num_classes=3, train_per_class=2, val_per_class=1)
    write_classification(root, num_classes=2, train_per_class=1, val_per_class=1)
    assert sorted(p.name for p in (root / "train").iterdir()) == ["circle", "square"]
    (tmp_path / "foreign" / "photos").mkdir(parents=True)
    with pytest.raises(ValueError, match="refusing to write"):
        write_classification(tmp_path / "foreign")


def test_synthetic_writer_is_fast(tmp_path):
    import time

    start = time.process_time()  # CPU time: robust to other jobs sharing the machine
    write_classification(tmp_path / "timed", train_per_class=80, val_per_class=20)  # 400 images
    assert time.process_time() - start < 5.0


# -- dataset ---------------------------------------------------------------------------------------


def test_labels_follow_sorted_class_folder_names(tmp_path):
    write_png(tmp_path / "train" / "zebra" / "z.PNG", (0, 0, 255))
    write_png(tmp_path / "train" / "apple" / "a.png", (255, 0, 0))
    write_png(tmp_path / "train" / "Mango" / "m.png", (0, 255, 0))
    (tmp_path / "train" / "apple" / "notes.txt").write_text("not an image")
    dataset = ImageFolderDataset(tmp_path, "train")
    assert dataset.classes == ["Mango", "apple", "zebra"]  # code-point order: upper case first
    assert [(path.name, label) for path, label in dataset.samples] == [("m.png", 0), ("a.png", 1), ("z.PNG", 2)]
    image, label = dataset[2]
    assert label == 2 and image.dtype == torch.uint8 and image.shape == (3, 3, 5)  # (C, H, W) of a 5x3 image
    assert image[:, 0, 0].tolist() == [0, 0, 255]


@pytest.mark.parametrize("extension, save_as", [(".png", "PNG"), (".bmp", "BMP"), (".webp", "WEBP"), (".jpeg", "JPEG")])
def test_decoded_pixels_match_pillow(tmp_path, extension, save_as):
    pixels = torch.randint(0, 256, (7, 9, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "train" / "only" / f"x{extension}"
    path.parent.mkdir(parents=True)
    options = {"lossless": True} if save_as == "WEBP" else {"quality": 95} if save_as == "JPEG" else {}
    Image.fromarray(pixels.numpy()).save(path, save_as, **options)
    with Image.open(path) as reference:
        expected = torch.tensor(numpy.array(reference.convert("RGB"))).permute(2, 0, 1)
    image, _ = ImageFolderDataset(tmp_path, "train")[0]
    tolerance = 2 if save_as == "JPEG" else 0  # two JPEG decoders may round the IDCT differently
    assert image.shape == (3, 7, 9) and (image.int() - expected.int()).abs().max() <= tolerance


def test_grayscale_images_become_three_channel(tmp_path):
    path = tmp_path / "train" / "gray" / "g.png"
    path.parent.mkdir(parents=True)
    Image.new("L", (4, 4), 77).save(path)
    image, _ = ImageFolderDataset(tmp_path, "train")[0]
    assert image.shape == (3, 4, 4) and image.unique().tolist() == [77]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_an_unreadable_image_is_a_one_line_error_naming_the_file(root, damage):
    victim = root / "train" / "square" / "square_0002.jpg"
    data = victim.read_bytes()
    victim.write_bytes({"garbage": b"this is not a jpeg" * 20, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    dataset = ImageFolderDataset(root, "train")
    index = [path for path, _ in dataset.samples].index(victim)
    message = single_line_error(DataError, lambda: dataset[index])
    assert message.startswith(f"{victim} is not a readable image (corrupt or truncated?)")
    assert ".cpp" not in message


def test_skip_mode_returns_the_next_good_sample_counts_and_logs(root, caplog):
    victim = root / "train" / "square" / "square_0005.jpg"  # the last square: the next sample is a stripes one
    victim.write_bytes(b"\x00" * 100)
    dataset = ImageFolderDataset(root, "train", on_bad_sample="skip")
    index = [path for path, _ in dataset.samples].index(victim)
    with caplog.at_level(logging.WARNING, logger="effdense"):
        image, label = dataset[index]
        dataset[index]  # a known bad file is skipped without a second warning
    next_image, next_label = dataset[index + 1]
    assert label == next_label == SHAPES.index("stripes") and torch.equal(image, next_image)
    assert dataset.bad_samples == [victim]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(victim) in warnings[0].getMessage()


def test_skip_mode_wraps_around_from_the_last_sample(root):
    dataset = ImageFolderDataset(root, "train", on_bad_sample="skip")
    last_path, _ = dataset.samples[-1]
    last_path.write_bytes(b"junk")
    _, label = dataset[len(dataset) - 1]
    assert label == 0 and dataset.bad_samples == [last_path]


def test_an_empty_class_folder_is_named(root):
    (root / "train" / "hexagon").mkdir()
    message = single_line_error(DataError, lambda: ImageFolderDataset(root, "train"))
    assert f"class folder '{root / 'train' / 'hexagon'}' has no images" in message


def test_a_missing_split_folder_is_named(root):
    shutil.rmtree(root / "val")
    message = single_line_error(DataError, lambda: ImageFolderDataset(root, "val"))
    assert message == (f"data.root '{root}': split folder '{root / 'val'}' not found; "
                       f"expected ImageFolder layout <root>/<split>/<class>/*.jpg")
    empty_split = root / "test"
    empty_split.mkdir()
    assert "has no class folders" in single_line_error(DataError, lambda: ImageFolderDataset(root, "test"))
    assert "not found" in single_line_error(DataError, lambda: ImageFolderDataset(root / "nowhere", "train"))


# -- transforms ------------------------------------------------------------------------------------


@pytest.mark.parametrize("randaugment", [False, True])
def test_train_transform_keeps_uint8_and_outputs_the_size(randaugment):
    augment = ClassificationAugmentConfig(randaugment=randaugment)
    image = torch.randint(0, 256, (3, 50, 80), dtype=torch.uint8)
    out = classification_train_transform(augment, (40, 40))(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 40, 40)


def test_eval_transform_resizes_by_crop_pct_then_centre_crops():
    # 100 x 200 image, left half black, right half white; size 64, crop_pct 0.875:
    # resize short side to int(64 / 0.875) = 73 -> 73 x 146, centre crop 64 x 64 -> the edge sits mid-crop.
    image = torch.zeros(3, 100, 200, dtype=torch.uint8)
    image[:, :, 100:] = 255
    transform = classification_eval_transform(ClassificationAugmentConfig(eval_crop_pct=0.875), (64, 64))
    assert transform.transforms[0].size == [73]
    out = transform(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    assert out[:, :, :31].max() == 0 and out[:, :, 33:].min() == 255


# -- loaders ---------------------------------------------------------------------------------------


def test_loaders_yield_uint8_nchw_batches_and_int64_labels(clean_root):
    loaders = build_loaders(demo_config(clean_root, "data.eval_batch_size=5"))
    images, labels = next(iter(loaders["train"]))
    assert images.dtype == torch.uint8 and images.shape == (4, 3, 32, 32)
    assert labels.dtype == torch.int64 and labels.shape == (4,)
    assert len(loaders["train"]) == 24 // 4  # drop_last on train
    assert [len(labels) for _, labels in loaders["val"]] == [5, 5, 2]  # 12 val images, nothing dropped
    assert loaders["train"].dataset.classes == SHAPES
    val_labels = torch.cat([labels for _, labels in loaders["val"]]).tolist()
    assert val_labels == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]  # val keeps the file order


def test_the_same_seed_gives_the_same_batches(clean_root):
    def first_batch(seed: int):
        loader = build_loaders(demo_config(clean_root, "data.workers=1", f"train.seed={seed}"))["train"]
        return next(iter(loader))

    (images_a, labels_a), (images_b, labels_b) = first_batch(0), first_batch(0)
    images_c, labels_c = first_batch(1)
    assert torch.equal(images_a, images_b) and torch.equal(labels_a, labels_b)
    assert not torch.equal(images_a, images_c)


def test_the_train_sampler_draws_a_new_order_each_epoch_reproducibly():
    sampler = EpochShuffleSampler(10, seed=5)
    epoch0, epoch1 = list(sampler), list(sampler)  # advances by itself
    sampler.set_epoch(0)
    assert list(sampler) == epoch0 and epoch0 != epoch1 and sorted(epoch0) == list(range(10))
    sampler.set_epoch(1)
    assert list(sampler) == epoch1


def test_classes_that_differ_between_splits_are_named(root):
    shutil.move(root / "val" / "triangle", root / "val" / "hexagon")
    message = single_line_error(DataError, lambda: build_loaders(demo_config(root)))
    assert "missing in val: triangle" in message and "missing in train: hexagon" in message


def test_loader_config_mismatches_are_one_line_errors(clean_root):
    wrong_count = single_line_error(DataError, lambda: build_loaders(demo_config(clean_root, "model.num_classes=10")))
    assert "model.num_classes=10" in wrong_count and "set model.num_classes=4" in wrong_count
    too_big = single_line_error(DataError, lambda: build_loaders(demo_config(clean_root, "data.batch_size=64")))
    assert "data.batch_size=64" in too_big and "24 training images" in too_big
    cfg = demo_config(clean_root)
    cfg.data.format = "coco"  # a config built in code, past the schema's choices: the format table says no
    with pytest.raises(DataError, match="data.format='coco' does not feed model.task='classification'"):
        build_loaders(cfg)


def test_build_loaders_builds_only_the_splits_asked_for(clean_root):

    cfg = demo_config(clean_root)
    assert list(build_loaders(cfg, splits=("val",))) == ["val"]
    assert list(build_loaders(cfg)) == ["train", "val"]


# -- check -----------------------------------------------------------------------------------------


def test_check_finds_nothing_in_a_clean_dataset(clean_root):
    assert check_dataset(clean_root) == []
    assert check_dataset(demo_config(clean_root)) == []


def test_check_lists_every_planted_problem(root):
    corrupt = root / "train" / "circle" / "circle_0001.jpg"
    corrupt.write_bytes(b"GIF89a but not really")
    truncated = root / "val" / "stripes" / "stripes_0000.jpg"
    truncated.write_bytes(truncated.read_bytes()[:200])
    (root / "train" / "extra").mkdir()
    write_png(root / "train" / "extra" / "e.png", (1, 2, 3))
    for path in (root / "val" / "square").iterdir():
        path.unlink()
    problems = check_dataset(root, workers=2)
    assert len(problems) == 4, problems
    assert all("\n" not in problem for problem in problems)
    assert any(f"class folder '{root / 'val' / 'square'}' has no images" in p for p in problems)
    assert any("missing in val: extra" in p for p in problems)
    assert any(p.startswith(f"{corrupt} is not a readable image") for p in problems)
    assert any(p.startswith(f"{truncated} is not a readable image") for p in problems)


def test_check_reports_missing_splits_and_class_count(root):
    shutil.rmtree(root / "val")
    problems = check_dataset(demo_config(root, "model.num_classes=3"))
    assert len(problems) == 2
    assert "split folder" in problems[0] and "model.num_classes=3" in problems[1]
    assert check_dataset(root / "nowhere") == [f"data.root '{root / 'nowhere'}' not found; "
                                               f"expected ImageFolder layout <root>/<split>/<class>/*.jpg"]
