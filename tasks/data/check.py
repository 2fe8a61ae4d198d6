"""Checking a dataset before a long run: :func:`check_labels` (every format, by level) and ImageFolder's checker.

``check_labels(cfg, level)`` runs before the first training step, so a bad label in either split
fails in seconds rather than at the first evaluation, an epoch later:

- ``"off"``: nothing ([]).
- ``"quick"``: the cheap checks of BOTH splits, bounded per split whatever the dataset's size: the
  layout (folders, every image/mask pair or every listed image exists), for COCO the whole json
  (parses, required keys, unique image/annotation/category ids, at least one box, every annotation),
  for VOC / YOLO every XML or label file (YOLO: every image header, for the sizes),
  and :data:`QUICK_SAMPLE` (16) evenly spaced samples per split decoded as the loader decodes them
  (segmentation: image and mask, label values, the "no labelled pixel" rule, which reads further masks
  only while every one read so far is all ignore). Seconds on Cityscapes or COCO (the COCO json is
  parsed once more).
- ``"full"``: what ``effdense data check`` (:func:`tasks.data.check_dataset`) does: every file of
  both splits, with the same empty/duplicate rules.

ImageFolder's checker (:func:`check_imagefolder`, used by ``effdense data check`` through the format
table): layout problems (missing split folders, no or empty class folders, classes that differ between
splits) come first, then every image that does not decode.

The image census (:func:`image_census`; every level but ``off``, and ``effdense data check``, which
prints its lines): per split, the dtype, band count and value range of the images read (the quick
level's sample, or all), and a one-line problem when the images of the dataset do not share one depth
(one 16-bit file among 8-bit ones), when a depth other than 8-bit has no ``data.input_range``, or when
an image has another band count than ``model.in_channels``. Census problems come first.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tasks.config import Config

from tasks.data.errors import DataError
from tasks.data.imagefolder import SplitListing, class_mismatch, list_split
from tasks.data.images import (IMAGE_EXTENSIONS, UnreadableImageError, depth_problem, describe_dtype, image_options,
                               read_image, value_range)
from tasks.data.seg_common import evenly_spaced

__all__ = ["LEVELS", "QUICK_SAMPLE", "ImageCensus", "SplitImages", "check_imagefolder", "check_labels", "image_census"]

LEVELS = ("full", "quick", "off")
QUICK_SAMPLE = 16  # samples decoded per split by the quick level


def check_labels(cfg: Config, level: str, workers: int = 4, progress: bool = False) -> list[str]:
    """The problems of ``cfg``'s dataset at ``level`` (``data.check``: full, quick or off; see the module
    doc), one line each, [] when clean. Legitimate oddities (some images without boxes, some masks
    without a labelled pixel) are logged as warnings with their count, not returned.

    ``"full"`` runs the same checkers, with the same arguments, as ``effdense data check``. The caller
    refuses to train on any problem, e.g. ``raise DataError(problems[0] + " (and N more ...)")``.
    """
    if level not in LEVELS:
        raise ValueError(f"data.check={level!r} is not a check level; expected one of: {', '.join(LEVELS)}")
    if level == "off":
        return []
    check = _CHECKS.get(cfg.data.format)
    if check is None:
        raise DataError(f"data.format={cfg.data.format!r} is not a known format; expected one of: "
                        f"{', '.join(_CHECKS)}")
    sample = QUICK_SAMPLE if level == "quick" else None
    census = image_census(cfg, sample, workers)
    return list(dict.fromkeys(census.problems + check(cfg, sample, workers, progress)))


def _imagefolder(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    return check_imagefolder(cfg, workers=workers, progress=progress, sample=sample)


def _coco(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    from tasks.data.coco import annotation_paths, check_coco

    problems = []
    for split, train in ((cfg.data.train_split, True), (cfg.data.val_split, False)):
        annotation_file, image_dir = annotation_paths(cfg, split, train)
        problems += check_coco(cfg.data.root, split, annotation_file=annotation_file, image_dir=image_dir,
                               workers=workers, progress=progress, num_classes=cfg.model.num_classes,
                               label_map=cfg.data.label_map, sample=sample, image_options=image_options(cfg))
    return problems


def _cityscapes(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    from tasks.data.cityscapes import check_cityscapes

    return check_cityscapes(cfg.data.root, (cfg.data.train_split, cfg.data.val_split), workers, progress,
                            sample=sample, image_options=image_options(cfg))


def _maskfolder(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    from tasks.data.maskfolder import check_maskfolder

    return check_maskfolder(cfg.data.root, cfg.model.num_classes, cfg.data.ignore_index,
                            (cfg.data.train_split, cfg.data.val_split), workers, progress, sample=sample,
                            mode=cfg.model.segmentation.mode, class_names=cfg.data.class_names,
                            image_options=image_options(cfg))


def _converted(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    from tasks.data.convert import check_converted

    return check_converted(cfg, sample=sample, workers=workers, progress=progress)


# One checker per format of ``tasks.data.formats.FORMATS`` (not imported: the format table imports this
# module); ``sample=None`` is the full check, the format table's own ``check`` call.
_CHECKS = {"imagefolder": _imagefolder, "coco": _coco, "cityscapes": _cityscapes, "maskfolder": _maskfolder,
           "voc": _converted, "yolo": _converted}


def check_imagefolder(source: Config | str | Path, train_split: str = "train", val_split: str = "val",
                      workers: int = 4, progress: bool = False, sample: int | None = None) -> list[str]:
    """Problems found in the dataset at ``source`` (a ``Config`` or an ImageFolder root); [] when clean.

    With a ``Config``, its ``data.root``/splits are scanned and ``model.num_classes`` is compared with
    the class folders. ``workers`` threads decode the images (``sample=k``: an evenly spaced ``k`` per
    split, else all); ``progress`` shows a tqdm bar.
    """
    cfg = source if isinstance(source, Config) else None
    if cfg is not None:
        source, train_split, val_split = cfg.data.root, cfg.data.train_split, cfg.data.val_split
    train, val = list_split(source, train_split), list_split(source, val_split)
    problems = _layout_problems(train, val)
    if cfg is not None and train.classes and len(train.classes) != cfg.model.num_classes:
        from tasks.data.imagefolder import num_classes_problem

        problems.append(num_classes_problem(cfg, train.classes, train_split))
    paths = [path for listing in (train, val) for path, _ in evenly_spaced(listing.samples, sample)]
    problems += _unreadable_images(paths, workers, progress, image_options(cfg) if cfg is not None else {})
    return problems


def _layout_problems(train: SplitListing, val: SplitListing) -> list[str]:
    problems = train.problems + [p for p in val.problems if p not in train.problems]  # a missing root once
    if train.classes and val.classes:
        mismatch = class_mismatch(train, val)
        if mismatch:
            problems.append(mismatch)
    return problems


def _unreadable_images(paths: list[Path], workers: int, progress: bool, options: dict) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results: Iterator[str | None] = pool.map(lambda path: _decode_problem(path, options), paths)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc="checking images", unit="img")
        return [problem for problem in results if problem is not None]


def _decode_problem(path: Path, options: dict) -> str | None:
    try:
        read_image(path, **options)
    except UnreadableImageError as error:
        return str(error)
    return None


# -- the image census: dtype, bands and values per split; one depth per dataset ----------------------


@dataclass
class SplitImages:
    """What the images read from one split hold: ``kinds`` maps (dtype, bands) to [count, first file]."""

    split: str
    listed: int = 0
    read: int = 0
    kinds: dict = field(default_factory=dict)
    low: float | None = None
    high: float | None = None

    def add(self, path: Path, image: torch.Tensor) -> None:
        kind = self.kinds.setdefault((image.dtype, int(image.shape[0])), [0, path])
        kind[0] += 1
        low, high = value_range(image)
        self.low = low if self.low is None else min(self.low, low)
        self.high = high if self.high is None else max(self.high, high)

    def line(self, input_range=None) -> str:
        read = "" if self.read == self.listed else f", {self.read} read"
        if not self.kinds:
            return f"{self.split}: {self.listed} images{read}: none readable"
        kinds = [f"{describe_dtype(dtype)}, {bands} band{'s' if bands != 1 else ''}"
                 + (f" ({count})" if len(self.kinds) > 1 else "") for (dtype, bands), (count, _) in self.kinds.items()]
        line = f"{self.split}: {self.listed} images{read}: {'; '.join(kinds)}; values {self.low:g}..{self.high:g}"
        if input_range is not None and (self.low < input_range[0] or self.high > input_range[1]):
            line += f" (beyond data.input_range [{input_range[0]:g}, {input_range[1]:g}])"
        return line


@dataclass
class ImageCensus:
    """:func:`image_census`'s answer: one :class:`SplitImages` per split, the problems (one line each), and
    ``lines()``, what ``effdense data check`` prints."""

    splits: list[SplitImages] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    input_range: tuple[float, float] | None = None

    def lines(self) -> list[str]:
        return [split.line(self.input_range) for split in self.splits]


def image_census(cfg: Config, sample: int | None = None, workers: int = 4, progress: bool = False) -> ImageCensus:
    """Read the images of both splits (``sample=k``: an evenly spaced ``k`` per split) as the loader reads
    them (``model.in_channels`` bands), and report their dtypes, band counts and values. Problems: images
    that do not read or have another band count (the reader's line), images of more than one depth in the
    dataset, a depth other than 8-bit without ``data.input_range`` or ``data.normalize=percentile``."""
    options = image_options(cfg)
    census = ImageCensus(input_range=tuple(cfg.data.input_range) if options["scaled"] and cfg.data.input_range
                         and cfg.data.normalize == "range" else None)
    splits = [(cfg.data.train_split, True)]
    if cfg.data.val_split != cfg.data.train_split:
        splits.append((cfg.data.val_split, False))
    for split, train in splits:
        paths = _split_images(cfg, split, train)
        if paths is None:  # a format without an image listing here, or a layout its checker reports
            continue
        chosen = evenly_spaced(paths, sample)
        found = SplitImages(split, listed=len(paths), read=len(chosen))

        def read(path: Path) -> torch.Tensor | str:
            try:
                return read_image(path, options["bands"], scaled=True)
            except UnreadableImageError as error:
                return str(error)

        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = pool.map(read, chosen)
            if progress:
                from tqdm import tqdm

                results = tqdm(results, total=len(chosen), desc=f"reading {split} images", unit="img")
            for path, result in zip(chosen, results):
                if isinstance(result, str):
                    census.problems.append(result)
                else:
                    found.add(path, result)
        census.splits.append(found)
    sampled = any(split.read < split.listed for split in census.splits)
    census.problems += _depth_problems(cfg, census, options["scaled"], sampled)
    return census


def _depth_problems(cfg: Config, census: ImageCensus, scaled: bool, sampled: bool) -> list[str]:
    depths: dict[torch.dtype, list] = {}  # dtype -> [count, first file]
    for split in census.splits:
        for (dtype, _), (count, path) in split.kinds.items():
            depths.setdefault(dtype, [0, path])[0] += count
    if len(depths) > 1:
        found = " and ".join(f"{count} {describe_dtype(dtype)} (e.g. {path})"
                             for dtype, (count, path) in sorted(depths.items(), key=lambda item: -item[1][0]))
        among = " among the images read (an evenly spaced sample)" if sampled else ""
        return [(f"data.root '{cfg.data.root}': images of {len(depths)} depths{among}: {found}; expected one depth "
                 f"for every image of a dataset, which one data.input_range scales (convert the odd ones)")]
    if len(depths) == 1 and not scaled:
        dtype, (_, path) = next(iter(depths.items()))
        problem = depth_problem(path, dtype)
        return [problem] if problem else []
    return []


def _split_images(cfg: Config, split: str, train: bool) -> list[Path] | None:
    """Every image file of ``split`` as the format lists it, or None (left to the format's checker)."""
    root, fmt = Path(cfg.data.root), cfg.data.format
    if fmt == "imagefolder":
        return [path for path, _ in list_split(root, split).samples]
    if fmt == "maskfolder":
        folder = root / "images" / split
        return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                      and not p.name.startswith(".")) if folder.is_dir() else None
    if fmt == "cityscapes":
        from tasks.data.cityscapes import IMAGE_SUFFIX

        folder = root / "leftImg8bit" / split
        return sorted(folder.glob(f"*/*{IMAGE_SUFFIX}")) if folder.is_dir() else None
    try:
        if fmt == "coco":
            from tasks.data.coco import annotation_paths, read_annotation_file

            annotation_file, image_dir = annotation_paths(cfg, split, train)
            records = read_annotation_file(annotation_file)["images"]
        elif fmt in ("voc", "yolo"):
            from tasks.data.convert import read_configured

            annotations = read_configured(cfg, split)
            records, image_dir = annotations.data["images"], annotations.image_dir
        else:
            return None
    except (DataError, KeyError, TypeError):  # the format's checker names what is wrong with the annotations
        return None
    paths = (Path(image_dir) / str(record.get("file_name", "")) for record in records if isinstance(record, dict))
    return sorted(path for path in paths if path.is_file())
