"""Segmentation data: Cityscapes table vs cityscapesScripts, datasets, bad input, transforms, collate."""

import hashlib
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from tasks.data import DataError
from tasks.data.cityscapes import (CATEGORIES, CLASS_NAMES, LABEL_TO_TRAIN_ID, LABELS, TRAIN_TO_LABEL_ID,
                                   CityscapesDataset, check_cityscapes, write_train_ids)
from tasks.data.maskfolder import MaskFolderDataset, check_maskfolder
from tasks.data.seg_common import MaskError, collate_segmentation, segmentation_collate
from tasks.data.transforms.segmentation import segmentation_eval_transform, segmentation_train_transform
from tasks.data.synthetic.segmentation import write_cityscapes, write_maskfolder

cs_labels = pytest.importorskip("cityscapesscripts.helpers.labels")


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("cs"), train_per_city=3, val_per_city=2, size=(64, 128))


def _copy_tree(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------ the official table

def test_label_table_equals_cityscapes_scripts():
    theirs = {label.name: label for label in cs_labels.labels}
    assert [label.name for label in LABELS] == [label.name for label in cs_labels.labels]
    for ours in LABELS:
        ref = theirs[ours.name]
        assert (ours.id, ours.train_id, ours.category, ours.category_id, ours.has_instances, ours.ignore_in_eval,
                ours.color) == (ref.id, ref.trainId, ref.category, ref.categoryId, ref.hasInstances,
                                ref.ignoreInEval, ref.color)


def test_34_to_19_mapping_against_cityscapes_scripts():
    for label_id in range(34):
        expected = cs_labels.id2label[label_id].trainId
        assert LABEL_TO_TRAIN_ID[label_id].item() == (255 if expected in (255, -1) else expected)
    assert (LABEL_TO_TRAIN_ID[34:] == -1).all()  # not label ids: rejected when read
    for train_id in range(19):
        assert cs_labels.id2label[TRAIN_TO_LABEL_ID[train_id].item()].trainId == train_id
        assert cs_labels.trainId2label[train_id].name == CLASS_NAMES[train_id]
    assert TRAIN_TO_LABEL_ID[255].item() == 0
    evaluated = {c: sorted(l.trainId for l in ls if not l.ignoreInEval) for c, ls in cs_labels.category2labels.items()}
    assert {name: sorted(ids) for name, ids in CATEGORIES} == {c: ids for c, ids in evaluated.items() if ids}
    assert len(CATEGORIES) == 7


# -------------------------------------------------------------------------------------- cityscapes

def test_cityscapes_samples_and_train_ids(cityscapes, tmp_path):
    dataset = CityscapesDataset(cityscapes, "train")
    assert len(dataset) == 6 and len(CityscapesDataset(cityscapes, "val")) == 4
    image, target = dataset[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 64, 128)
    raw = np.array(Image.open(dataset.pairs[0].mask))
    expected = np.vectorize(lambda i: cs_labels.id2label[int(i)].trainId)(raw)  # independent mapping
    expected[expected < 0] = 255
    assert torch.equal(target["mask"], torch.from_numpy(expected.astype(np.int64)))
    assert target["image_id"] == dataset.pairs[0].image.name[: -len("_leftImg8bit.png")]
    assert set(target["mask"].unique().tolist()) <= {0, 1, 2, 8, 10, 13, 255}
    # write_train_ids writes what the table says; the dataset then reads those files
    root = _copy_tree(cityscapes, tmp_path / "cs")
    assert write_train_ids(root, progress=False) == 10
    assert write_train_ids(root, progress=False) == 0  # kept unless overwrite
    again = CityscapesDataset(root, "train")
    assert again.pairs[0].mask.name.endswith("_gtFine_labelTrainIds.png")
    written = np.array(Image.open(again.pairs[0].mask))
    assert np.array_equal(written, expected.astype(np.uint8))
    assert torch.equal(again[0][1]["mask"], target["mask"])


def _first(root, split, pattern):
    return sorted((root / split).glob(pattern))[0]


def test_cityscapes_bad_input(cityscapes, tmp_path, caplog):
    root = _copy_tree(cityscapes, tmp_path / "bad")
    mask = _first(root / "gtFine", "train", "*/*_labelIds.png")
    values = np.array(Image.open(mask))
    values[0, :3] = 40  # not a label id
    Image.fromarray(values).save(mask)
    dataset = CityscapesDataset(root, "train")
    index = [p.mask for p in dataset.pairs].index(mask)
    with pytest.raises(MaskError, match=rf"{mask.name}: label values 40 are not in the label table"):
        dataset[index]
    small = _first(root / "gtFine", "train", "*/*_labelIds.png").parent
    other = sorted(small.glob("*_labelIds.png"))[1]
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(other)
    with pytest.raises(MaskError, match=rf"{other.name}: mask is 10x10 but its image .* is 128x64"):
        dataset[[p.mask for p in dataset.pairs].index(other)]
    # skip: the two bad samples are replaced by the next good ones, counted and logged
    skipping = CityscapesDataset(root, "train", on_bad_sample="skip")
    with caplog.at_level(logging.WARNING, logger="effdense"):
        ids = [skipping[i][1]["image_id"] for i in range(len(skipping))]
    assert len(skipping.bad_samples) == 2 and "skipping" in caplog.text and len(ids) == 6
    # unpaired files and empty splits
    image = _first(root / "leftImg8bit", "val", "*/*.png")
    orphan_mask = root / "gtFine" / "val" / image.parent.name / image.name.replace("_leftImg8bit", "_gtFine_labelIds")
    orphan_mask.rename(orphan_mask.with_name("zz_000000_000000_gtFine_labelIds.png"))
    with pytest.raises(DataError, match=rf"{image.name}: image without its mask"):
        CityscapesDataset(root, "val")
    assert len(CityscapesDataset(root, "val", on_bad_sample="skip")) == 3
    problems = check_cityscapes(root)
    assert any("label values 40" in p for p in problems) and any("mask is 10x10" in p for p in problems)
    assert any("image without its mask" in p for p in problems) and any("mask without its image" in p for p in problems)
    assert all("\n" not in p for p in problems)
    (root / "leftImg8bit" / "test").mkdir()
    (root / "gtFine" / "test").mkdir()
    with pytest.raises(DataError, match="no images"):
        CityscapesDataset(root, "test")
    with pytest.raises(DataError, match="not found; expected Cityscapes layout"):
        CityscapesDataset(tmp_path / "missing", "train")
    assert check_cityscapes(cityscapes) == []


# -------------------------------------------------------------------------------------- mask folder

@pytest.mark.parametrize("mask_mode", ["L", "P", "I;16"])
def test_maskfolder_mask_formats(tmp_path, mask_mode):
    reference = write_maskfolder(tmp_path / "ref", train=2, val=1, mask_mode="L")
    root = write_maskfolder(tmp_path / mask_mode, train=2, val=1, mask_mode=mask_mode)
    assert Image.open(root / "masks" / "train" / "0000.png").mode == mask_mode
    ours = MaskFolderDataset(root, "train", num_classes=6)[0][1]["mask"]
    truth = torch.from_numpy(np.array(Image.open(reference / "masks" / "train" / "0000.png")).astype(np.int64))
    assert torch.equal(ours, truth) and (truth == 255).any()


def test_maskfolder_image_kinds_and_bad_input(tmp_path):
    root = write_maskfolder(tmp_path / "mf", train=4, val=1)
    images = sorted((root / "images" / "train").glob("*.png"))
    rgb = np.array(Image.open(images[0]))
    Image.fromarray(rgb.mean(2).astype(np.uint8)).save(images[0])  # grayscale
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 128, np.uint8)])).save(images[1])  # RGBA
    Image.fromarray((rgb[..., 0].astype(np.uint16) * 257)).save(images[2])  # 16-bit grayscale
    dataset = MaskFolderDataset(root, "train", num_classes=6, class_names=["a", "b", "c", "d", "e", "f"])
    for i in range(2):
        image = dataset[i][0]
        assert image.dtype == torch.uint8 and image.shape == (3, 64, 96)
    assert torch.equal(dataset[1][0].permute(1, 2, 0), torch.from_numpy(rgb))  # alpha dropped
    # 16 bits are never truncated (issue 16): without data.input_range a 16-bit image is a one-line error
    with pytest.raises(DataError, match=r"0002.png: is a 16-bit image .* set data.input_range"):
        dataset[2]
    Image.fromarray(rgb[..., 0]).save(images[2])  # back to 8-bit for the checks below
    with pytest.raises(MaskError, match=r"0003.png: label values 5 are neither a class \(0..4\) nor data.ignore_index \(255\)"):
        MaskFolderDataset(root, "train", num_classes=5)[3]
    rgb_mask = root / "masks" / "train" / "0003.png"
    Image.fromarray(np.zeros((64, 96, 3), np.uint8)).save(rgb_mask)
    with pytest.raises(MaskError, match="0003.png: mask is a RGB image; expected a single-channel index mask"):
        dataset[3]
    (root / "images" / "train" / "extra.jpg").write_bytes((root / "images" / "val" / "0000.png").read_bytes())
    with pytest.raises(DataError, match="extra.jpg: image without its mask"):
        MaskFolderDataset(root, "train", num_classes=6)
    problems = check_maskfolder(root, num_classes=6)
    assert len(problems) == 2 and "image without its mask" in problems[0] and "RGB image" in problems[1]
    with pytest.raises(ValueError, match="ignore_index=3 is a class index"):
        MaskFolderDataset(root, "val", num_classes=6, ignore_index=3)


def test_synthetic_writers_are_deterministic(tmp_path):
    def digest(root):
        return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(root.rglob("*.png")))).hexdigest()

    a = write_cityscapes(tmp_path / "a", seed=3, train_per_city=1, val_per_city=1, size=(32, 64))
    b = write_cityscapes(tmp_path / "b", seed=3, train_per_city=1, val_per_city=1, size=(32, 64))
    assert digest(a) == digest(b)
    assert digest(write_cityscapes(a, seed=4, train_per_city=1, val_per_city=1, size=(32, 64))) != digest(b)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="refusing"):
        write_maskfolder(tmp_path / "c")


# ---------------------------------------------------------------------------- transforms, collate

PALETTE = torch.tensor([[200, 30, 30], [30, 200, 30], [30, 30, 200], [220, 220, 40]], dtype=torch.float32)


def _pattern(height=60, width=90):
    # A known geometric pattern: 15-pixel blocks of 4 classes, the image colour-coded by class.
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    mask = ((yy // 15) + 2 * (xx // 15)) % 4
    mask[:15, :15] = 255  # an ignored corner
    image = torch.where(mask.unsqueeze(0) == 255, torch.full((3, height, width), 128.0),
                        PALETTE[mask.clamp(max=3)].permute(2, 0, 1))
    return image.to(torch.uint8), {"mask": mask, "image_id": "p", "orig_size": (height, width)}


def _decode(image):
    """Class of each pixel from its colour, and whether the colour is pure (not a blurred block edge)."""
    distance = (image.float().permute(1, 2, 0).unsqueeze(2) - PALETTE).abs().sum(-1)
    nearest = distance.min(-1)
    return nearest.indices, nearest.values < 20


def test_masks_stay_aligned_through_every_transform():
    torch.manual_seed(0)
    transform = segmentation_train_transform((48, 64), scale_range=(0.5, 2.0), hflip=0.5, photometric=False)
    for _ in range(25):
        image, target = transform(*_pattern())
        mask = target["mask"]
        assert image.dtype == torch.uint8 and mask.dtype == torch.int64
        assert image.shape == (3, 48, 64) and mask.shape == (48, 64)
        padded = (image == 0).all(0)  # crop padding: image 0 exactly where the mask is 255 (or ignored)
        assert (mask[padded] == 255).all()
        decoded, pure = _decode(image)
        checked = (mask != 255) & pure  # bilinear resizing blurs the image at block edges: skip those pixels
        assert checked.sum() > 200
        agreement = (decoded[checked] == mask[checked]).float().mean().item()
        assert agreement == 1.0, agreement  # a flipped, shifted or half-pixel-offset mask scores lower
    # photometric jitter changes the image only
    image, target = segmentation_train_transform(None, scale_range=None, hflip=0.0)(*_pattern())
    assert torch.equal(target["mask"], _pattern()[1]["mask"])


def test_eval_transform_keeps_the_mask():
    image, target = segmentation_eval_transform("resize", (30, 45))(*_pattern())
    assert image.shape == (3, 30, 45) and target["mask"].shape == (60, 90)
    image, target = segmentation_eval_transform("full")(*_pattern())
    assert image.shape == (3, 60, 90)
    with pytest.raises(ValueError, match="eval mode"):
        segmentation_eval_transform("slide")


def test_collate_train_and_eval():
    a, b = _pattern(60, 90), _pattern(40, 100)
    images, targets = collate_segmentation([a, b], train=False)
    assert images.shape == (2, 3, 60, 100) and targets["masks"].shape == (2, 60, 100)
    assert targets["image_size"].tolist() == [[60, 90], [40, 100]] == targets["orig_size"].tolist()
    assert targets["image_id"] == ["p", "p"]
    assert (images[1, :, 40:] == 0).all() and (targets["masks"][1, 40:] == 255).all()
    images, targets = segmentation_collate(True)([a, a])
    assert set(targets) == {"masks"} and torch.equal(targets["masks"][0], a[1]["mask"])
