"""Datasets, transforms and loaders. Decode and augment on CPU workers; batches travel as uint8 NCHW
(normalisation happens on the device).

>>> from tasks.data import build_loaders
>>> loaders = build_loaders(cfg)            # {"train": DataLoader, "val": DataLoader}
>>> images, labels = next(iter(loaders["train"]))   # uint8 (N, 3, H, W), int64 (N,)
"""

from __future__ import annotations


class DataError(ValueError):
    """A bad dataset: a missing folder, an empty class, an unreadable image. One-line message naming the path."""


from .check import check_dataset  # noqa: E402  (the submodules import DataError from here)
from .imagefolder import ImageFolderDataset  # noqa: E402
from .loaders import build_loaders  # noqa: E402
from .synthetic import write_classification  # noqa: E402

__all__ = ["DataError", "ImageFolderDataset", "build_loaders", "check_dataset", "write_classification"]
