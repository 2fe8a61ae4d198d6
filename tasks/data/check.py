"""ImageFolder's checker: scan every file before a long run and list each problem in one line.

Used by ``effdense data check`` (through the format table). Layout problems (missing split folders, no
or empty class folders, classes that differ between splits) come first, then every image that does
not decode.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.config import Config

from tasks.data.images import UnreadableImageError, read_rgb
from tasks.data.imagefolder import SplitListing, class_mismatch, list_split


def check_imagefolder(source: Config | str | Path, train_split: str = "train", val_split: str = "val",
                      workers: int = 4, progress: bool = False) -> list[str]:
    """Problems found in the dataset at ``source`` (a ``Config`` or an ImageFolder root); [] when clean.

    With a ``Config``, its ``data.root``/splits are scanned and ``model.num_classes`` is compared with
    the class folders. ``workers`` threads decode the images; ``progress`` shows a tqdm bar.
    """
    cfg = source if isinstance(source, Config) else None
    if cfg is not None:
        source, train_split, val_split = cfg.data.root, cfg.data.train_split, cfg.data.val_split
    train, val = list_split(source, train_split), list_split(source, val_split)
    problems = _layout_problems(train, val)
    if cfg is not None and train.classes and len(train.classes) != cfg.model.num_classes:
        from tasks.data.imagefolder import num_classes_problem

        problems.append(num_classes_problem(cfg, train.classes, train_split))
    paths = [path for listing in (train, val) for path, _ in listing.samples]
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
