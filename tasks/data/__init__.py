"""Datasets, transforms and loaders. Decode and augment on CPU workers; batches travel as uint8 NCHW
(normalisation happens on the device).

>>> from tasks.data import build_loaders
>>> loaders = build_loaders(cfg)                    # {"train": DataLoader, "val": DataLoader}
>>> loaders = build_loaders(cfg, splits=("val",))   # only what evaluation needs
>>> images, targets = next(iter(loaders["train"]))  # uint8 (N, 3, H, W), the format's targets

Each on-disk format is one module (imagefolder, cityscapes, maskfolder, coco) and one row of
``tasks.data.formats.FORMATS``: its task, dataset builder, collate functions, checker and synthetic
writer.
"""

from __future__ import annotations

from backbones.errors import EffdenseError


class DataError(EffdenseError):
    """A bad dataset: a missing folder, an empty class, an unreadable image, a wrong label. One-line
    message naming the path, what was wrong and what was expected.

    Raised inside a DataLoader worker, torch re-raises it in the main process as the same class built
    from a multi-line "Caught ... in DataLoader worker process N ... Original Traceback" text; the
    constructor recovers the original one-line message from it, so every subclass, in every task,
    reaches the user as the line it was raised with.
    """

    def __init__(self, message: object = ""):
        super().__init__(_original_message(str(message)))


def _original_message(text: str) -> str:
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = text.rstrip().splitlines()[-1]  # "package.module.SomeDataError: <the original message>"
    name, sep, message = last.partition(": ")
    return message if sep and " " not in name else last


from .formats import FORMATS, DataFormat  # noqa: E402  (the submodules import DataError from here)
from .imagefolder import ImageFolderDataset  # noqa: E402
from .loaders import build_loaders  # noqa: E402

__all__ = ["DataError", "DataFormat", "FORMATS", "ImageFolderDataset", "build_loaders", "check_dataset"]


def check_dataset(cfg, workers: int = 4, progress: bool = False) -> list[str]:
    """Every problem of ``cfg``'s dataset (one line each; [] when clean), by its format's checker."""
    return FORMATS[cfg.data.format].check(cfg, workers=workers, progress=progress)
