"""Cityscapes: ``leftImg8bit/{split}/{city}/*_leftImg8bit.png`` + ``gtFine/{split}/{city}/*_gtFine_labelIds.png``.

The 34 label ids map to the 19 train ids (255 = ignore) through the official table
(cityscapesScripts ``helpers/labels.py``), held here as data: :data:`LABELS`. A
``*_gtFine_labelTrainIds.png`` next to the labelIds file is used when present (already train ids);
:func:`write_train_ids` writes them once. :data:`TRAIN_TO_LABEL_ID` maps predictions back to label
ids, which the official evaluator reads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.data.images import reading_images
from tasks.data.seg_common import MaskError, Pair, PairedSegmentationDataset, PairListing, PairReader, check_pairs, read_mask

__all__ = ["CityscapesLabel", "LABELS", "CLASS_NAMES", "CATEGORIES", "TRAIN_ID_COLORS", "LABEL_TO_TRAIN_ID",
           "TRAIN_TO_LABEL_ID", "CityscapesDataset", "CityscapesReader", "list_cityscapes", "check_cityscapes", "write_train_ids",
           "IMAGE_SUFFIX", "LABEL_IDS_SUFFIX", "TRAIN_IDS_SUFFIX"]

LAYOUT = "leftImg8bit/{split}/{city}/*_leftImg8bit.png + gtFine/{split}/{city}/*_gtFine_labelIds.png"
IMAGE_SUFFIX, LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX = "_leftImg8bit.png", "_gtFine_labelIds.png", "_gtFine_labelTrainIds.png"
IGNORE = 255


@dataclass(frozen=True)
class CityscapesLabel:
    name: str
    id: int
    train_id: int  # 255: not one of the 19 evaluated classes (-1 for the license plate, as official)
    category: str
    category_id: int
    has_instances: bool
    ignore_in_eval: bool
    color: tuple[int, int, int]


def _row(name, id, train_id, category, category_id, has_instances, ignore_in_eval, color):
    return CityscapesLabel(name, id, train_id, category, category_id, has_instances, ignore_in_eval, color)


LABELS: tuple[CityscapesLabel, ...] = (
    #    name                    id  trainId category      catId instances ignore  colour
    _row("unlabeled",             0, 255, "void",         0, False, True, (0, 0, 0)),
    _row("ego vehicle",           1, 255, "void",         0, False, True, (0, 0, 0)),
    _row("rectification border",  2, 255, "void",         0, False, True, (0, 0, 0)),
    _row("out of roi",            3, 255, "void",         0, False, True, (0, 0, 0)),
    _row("static",                4, 255, "void",         0, False, True, (0, 0, 0)),
    _row("dynamic",               5, 255, "void",         0, False, True, (111, 74, 0)),
    _row("ground",                6, 255, "void",         0, False, True, (81, 0, 81)),
    _row("road",                  7,   0, "flat",         1, False, False, (128, 64, 128)),
    _row("sidewalk",              8,   1, "flat",         1, False, False, (244, 35, 232)),
    _row("parking",               9, 255, "flat",         1, False, True, (250, 170, 160)),
    _row("rail track",           10, 255, "flat",         1, False, True, (230, 150, 140)),
    _row("building",             11,   2, "construction", 2, False, False, (70, 70, 70)),
    _row("wall",                 12,   3, "construction", 2, False, False, (102, 102, 156)),
    _row("fence",                13,   4, "construction", 2, False, False, (190, 153, 153)),
    _row("guard rail",           14, 255, "construction", 2, False, True, (180, 165, 180)),
    _row("bridge",               15, 255, "construction", 2, False, True, (150, 100, 100)),
    _row("tunnel",               16, 255, "construction", 2, False, True, (150, 120, 90)),
    _row("pole",                 17,   5, "object",       3, False, False, (153, 153, 153)),
    _row("polegroup",            18, 255, "object",       3, False, True, (153, 153, 153)),
    _row("traffic light",        19,   6, "object",       3, False, False, (250, 170, 30)),
    _row("traffic sign",         20,   7, "object",       3, False, False, (220, 220, 0)),
    _row("vegetation",           21,   8, "nature",       4, False, False, (107, 142, 35)),
    _row("terrain",              22,   9, "nature",       4, False, False, (152, 251, 152)),
    _row("sky",                  23,  10, "sky",          5, False, False, (70, 130, 180)),
    _row("person",               24,  11, "human",        6, True, False, (220, 20, 60)),
    _row("rider",                25,  12, "human",        6, True, False, (255, 0, 0)),
    _row("car",                  26,  13, "vehicle",      7, True, False, (0, 0, 142)),
    _row("truck",                27,  14, "vehicle",      7, True, False, (0, 0, 70)),
    _row("bus",                  28,  15, "vehicle",      7, True, False, (0, 60, 100)),
    _row("caravan",              29, 255, "vehicle",      7, True, True, (0, 0, 90)),
    _row("trailer",              30, 255, "vehicle",      7, True, True, (0, 0, 110)),
    _row("train",                31,  16, "vehicle",      7, True, False, (0, 80, 100)),
    _row("motorcycle",           32,  17, "vehicle",      7, True, False, (0, 0, 230)),
    _row("bicycle",              33,  18, "vehicle",      7, True, False, (119, 11, 32)),
    _row("license plate",        -1,  -1, "vehicle",      7, False, True, (0, 0, 142)),
)

_TRAIN = sorted((label for label in LABELS if 0 <= label.train_id < IGNORE), key=lambda label: label.train_id)
NUM_CLASSES = len(_TRAIN)  # 19
CLASS_NAMES: tuple[str, ...] = tuple(label.name for label in _TRAIN)
TRAIN_ID_COLORS: tuple[tuple[int, int, int], ...] = tuple(label.color for label in _TRAIN)
# The 7 categories of the evaluated classes (void has none): [(name, [train ids])].
CATEGORIES: tuple[tuple[str, tuple[int, ...]], ...] = tuple(
    (name, tuple(label.train_id for label in _TRAIN if label.category == name))
    for name in dict.fromkeys(label.category for label in _TRAIN))


def _lookup_tables() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # On the CPU whatever default device the importer has set (a model built under torch.device("meta")
    # may import this module first).
    cpu = torch.device("cpu")
    label_to_train = torch.full((256,), -1, dtype=torch.int64, device=cpu)  # -1: not a label id
    for label in LABELS:
        if label.id >= 0:
            label_to_train[label.id] = label.train_id if label.train_id >= 0 else IGNORE
    train_to_label = torch.zeros(256, dtype=torch.int64, device=cpu)  # ignore -> 0 (unlabeled)
    for label in _TRAIN:
        train_to_label[label.train_id] = label.id
    train_ids = torch.full((256,), -1, dtype=torch.int64, device=cpu)  # valid values of a labelTrainIds file
    train_ids[:NUM_CLASSES] = torch.arange(NUM_CLASSES, device=cpu)
    train_ids[IGNORE] = IGNORE
    return label_to_train, train_to_label, train_ids


LABEL_TO_TRAIN_ID, TRAIN_TO_LABEL_ID, _TRAIN_ID_IDENTITY = _lookup_tables()
_LABEL_HELP = "Cityscapes label ids 0..33 (gtFine *_labelIds.png)"
_TRAIN_HELP = f"train ids 0..{NUM_CLASSES - 1} or {IGNORE} (gtFine *_labelTrainIds.png)"


def list_cityscapes(root: str | Path, split: str) -> PairListing:
    """The (image, mask) pairs of a split; a labelTrainIds mask is preferred over labelIds when present."""
    root, listing = Path(root), PairListing()
    images_dir, labels_dir = root / "leftImg8bit" / split, root / "gtFine" / split
    for folder in (root, images_dir, labels_dir):
        if not folder.is_dir():
            listing.fatal.append(f"data.root '{root}': folder '{folder}' not found; expected Cityscapes layout {LAYOUT}")
            return listing
    stems = set()
    for image in sorted(images_dir.glob(f"*/*{IMAGE_SUFFIX}")):
        stem = image.name[: -len(IMAGE_SUFFIX)]
        stems.add((image.parent.name, stem))
        train_ids = labels_dir / image.parent.name / f"{stem}{TRAIN_IDS_SUFFIX}"
        label_ids = labels_dir / image.parent.name / f"{stem}{LABEL_IDS_SUFFIX}"
        mask = train_ids if train_ids.is_file() else label_ids
        if mask.is_file():
            listing.pairs.append(Pair(image, mask, stem))
        else:
            listing.problems.append(f"{image}: image without its mask; expected {label_ids}")
    for suffix in (LABEL_IDS_SUFFIX, TRAIN_IDS_SUFFIX):
        for mask in sorted(labels_dir.glob(f"*/*{suffix}")):
            if (mask.parent.name, mask.name[: -len(suffix)]) not in stems:
                image = images_dir / mask.parent.name / (mask.name[: -len(suffix)] + IMAGE_SUFFIX)
                listing.problems.append(f"{mask}: mask without its image; expected {image}")
    if not stems:
        listing.fatal.append(f"'{images_dir}': no images (*/*{IMAGE_SUFFIX}); expected Cityscapes layout {LAYOUT}")
    return listing


class CityscapesReader(PairReader):
    """Per mask file: labelIds through the official table, labelTrainIds as they are (validated); the tables'
    void (255) becomes ``ignore_index`` (``data.ignore_index``)."""

    def __init__(self, ignore_index: int = IGNORE):
        super().__init__(NUM_CLASSES, ignore_index)

    def table(self, mask_path: Path) -> tuple[torch.Tensor, str]:
        if mask_path.name.endswith(TRAIN_IDS_SUFFIX):
            return _TRAIN_ID_IDENTITY, _TRAIN_HELP
        return LABEL_TO_TRAIN_ID, _LABEL_HELP


class CityscapesDataset(PairedSegmentationDataset):
    """Cityscapes fine annotations as 19 train ids (255 ignore); samples as ``tasks.data.seg_common`` says."""

    classes = CLASS_NAMES
    categories = CATEGORIES
    colors = TRAIN_ID_COLORS

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, on_bad_sample: str = "error",
                 ignore_index: int = IGNORE):
        self.root, self.split = Path(root), split
        super().__init__(list_cityscapes(root, split), self.root / "leftImg8bit" / split, CityscapesReader(ignore_index),
                         transform, on_bad_sample)


def check_cityscapes(root: str | Path, splits: Sequence[str] = ("train", "val"), workers: int = 4,
                     progress: bool = False, sample: int | None = None, image_options: dict | None = None) -> list[str]:
    """Every problem of a Cityscapes tree (missing folders, unpaired files, unreadable or invalid masks, a
    split whose masks hold no train id). ``sample=k`` loads an evenly spaced ``k`` pairs per split (quick
    check, see :func:`tasks.data.seg_common.check_pairs`), else every pair. ``image_options``: how the
    images are read (``bands``/``scaled``, :func:`tasks.data.images.image_options`; default 8-bit RGB)."""
    problems = []
    for split in splits:
        problems += check_pairs(reading_images(CityscapesReader(), image_options), list_cityscapes(root, split),
                                workers, progress,
                                desc=f"checking {split}", sample=sample, where=Path(root) / "gtFine" / split)
    return list(dict.fromkeys(problems))  # a missing root is reported once


def write_train_ids(root: str | Path, splits: Sequence[str] | None = None, overwrite: bool = False,
                    progress: bool = True) -> int:
    """Write ``*_gtFine_labelTrainIds.png`` beside every ``*_gtFine_labelIds.png`` (8-bit, 255 = ignore).

    What cityscapesScripts' ``createTrainIdLabelImgs`` produces, computed from the labelIds PNGs
    through :data:`LABELS` (not from the polygons). ``splits``: default every split under ``gtFine``.
    Existing files are kept unless ``overwrite``. Returns the number of files written.
    """
    gt = Path(root) / "gtFine"
    if not gt.is_dir():
        raise MaskError(f"data.root '{root}': folder '{gt}' not found; expected Cityscapes layout {LAYOUT}")
    splits = list(splits) if splits is not None else sorted(p.name for p in gt.iterdir() if p.is_dir())
    sources = [p for split in splits for p in sorted((gt / split).glob(f"*/*{LABEL_IDS_SUFFIX}"))]
    if progress:
        from tqdm import tqdm

        sources = tqdm(sources, desc="writing labelTrainIds", unit="img")
    written = 0
    for source in sources:
        target = source.with_name(source.name[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX)
        if target.exists() and not overwrite:
            continue
        raw = read_mask(source)
        inside = (raw >= 0) & (raw < 256)
        train = torch.full_like(raw, -1)
        train[inside] = LABEL_TO_TRAIN_ID[raw[inside]]
        if (train < 0).any():
            bad = ", ".join(str(int(v)) for v in raw[train < 0].unique()[:8])
            raise MaskError(f"{source}: label values {bad} are not in the label table; expected {_LABEL_HELP}")
        Image.fromarray(train.numpy().astype(np.uint8), mode="L").save(target)
        written += 1
    return written
