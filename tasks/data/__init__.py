"""Datasets, transforms and loaders. Decode and augment on CPU workers; batches travel as uint8 NCHW
(normalisation happens on the device).

>>> from tasks.data import build_loaders
>>> loaders = build_loaders(cfg)                    # {"train": DataLoader, "val": DataLoader}
>>> loaders = build_loaders(cfg, splits=("val",))   # only what evaluation needs
>>> images, targets = next(iter(loaders["train"]))  # uint8 (N, 3, H, W), the format's targets

Each on-disk format is one module (imagefolder, cityscapes, maskfolder, coco) and one row of
``tasks.data.formats.FORMATS``: its task, dataset builder, collate functions, checker and synthetic
writer. ``check_dataset(cfg)`` lists every problem of every file (``effdense data check``);
``check_labels(cfg, "quick"|"full"|"off")`` is the check run before the first training step.
"""

from __future__ import annotations

from tasks.data.check import check_labels
from tasks.data.errors import DataError
from tasks.data.formats import FORMATS, DataFormat
from tasks.data.imagefolder import ImageFolderDataset
from tasks.data.loaders import build_loaders

__all__ = ["DataError", "DataFormat", "FORMATS", "ImageFolderDataset", "build_loaders", "check_dataset",
           "check_labels"]


def check_dataset(cfg, workers: int = 4, progress: bool = False) -> list[str]:
    """Every problem of ``cfg``'s dataset (one line each; [] when clean), by its format's checker."""
    return FORMATS[cfg.data.format].check(cfg, workers=workers, progress=progress)
