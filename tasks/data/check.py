"""Checking a dataset before a long run: :func:`check_labels` (every format, by level) and ImageFolder's checker.

``check_labels(cfg, level)`` runs before the first training step, so a bad label in either split
fails in seconds rather than at the first evaluation, an epoch later:

- ``"off"``: nothing ([]).
- ``"quick"``: the cheap checks of BOTH splits, bounded per split whatever the dataset's size: the
  layout (folders, every image/mask pair or every listed image exists), for COCO the whole json
  (parses, required keys, unique image/annotation/category ids, at least one box, every annotation),
  and :data:`QUICK_SAMPLE` (16) evenly spaced samples per split decoded as the loader decodes them
  (segmentation: image and mask, label values, the "no labelled pixel" rule, which reads further masks
  only while every one read so far is all ignore). Seconds on Cityscapes or COCO (the COCO json is
  parsed once more).
- ``"full"``: what ``effdense data check`` (:func:`tasks.data.check_dataset`) does: every file of
  both splits, with the same empty/duplicate rules.

ImageFolder's checker (:func:`check_imagefolder`, used by ``effdense data check`` through the format
table): layout problems (missing split folders, no or empty class folders, classes that differ between
splits) come first, then every image that does not decode.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.config import Config

from tasks.data.errors import DataError
from tasks.data.imagefolder import SplitListing, class_mismatch, list_split
from tasks.data.images import UnreadableImageError, read_rgb
from tasks.data.seg_common import evenly_spaced

__all__ = ["LEVELS", "QUICK_SAMPLE", "check_imagefolder", "check_labels"]

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
    return check(cfg, QUICK_SAMPLE if level == "quick" else None, workers, progress)


def _imagefolder(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    return check_imagefolder(cfg, workers=workers, progress=progress, sample=sample)


def _coco(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    from tasks.data.coco import annotation_paths, check_coco

    problems = []
    for split, train in ((cfg.data.train_split, True), (cfg.data.val_split, False)):
        annotation_file, image_dir = annotation_paths(cfg, split, train)
        problems += check_coco(cfg.data.root, split, annotation_file=annotation_file, image_dir=image_dir,
                               workers=workers, progress=progress, num_classes=cfg.model.num_classes,
                               label_map=cfg.data.label_map, sample=sample)
    return problems


def _cityscapes(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    from tasks.data.cityscapes import check_cityscapes

    return check_cityscapes(cfg.data.root, (cfg.data.train_split, cfg.data.val_split), workers, progress,
                            sample=sample)


def _maskfolder(cfg: Config, sample: int | None, workers: int, progress: bool) -> list[str]:
    from tasks.data.maskfolder import check_maskfolder

    return check_maskfolder(cfg.data.root, cfg.model.num_classes, cfg.data.ignore_index,
                            (cfg.data.train_split, cfg.data.val_split), workers, progress, sample=sample)


# One checker per format of ``tasks.data.formats.FORMATS`` (not imported: the format table imports this
# module); ``sample=None`` is the full check, the format table's own ``check`` call.
_CHECKS = {"imagefolder": _imagefolder, "coco": _coco, "cityscapes": _cityscapes, "maskfolder": _maskfolder}


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
    problems += _unreadable_images(paths, workers, progress)
    return problems


def _layout_problems(train: SplitListing, val: SplitListing) -> list[str]:
    problems = train.problems + [p for p in val.problems if p not in train.problems]  # a missing root once
    if train.classes and val.classes:
        mismatch = class_mismatch(train, val)
        if mismatch:
            problems.append(mismatch)
    return problems


def _unreadable_images(paths: list[Path], workers: int, progress: bool) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results: Iterator[str | None] = pool.map(_decode_problem, paths)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(paths), desc="checking images", unit="img")
        return [problem for problem in results if problem is not None]


def _decode_problem(path: Path) -> str | None:
    try:
        read_rgb(path)
    except UnreadableImageError as error:
        return str(error)
    return None
