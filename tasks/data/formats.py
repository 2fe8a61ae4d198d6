"""The format table: one row per on-disk dataset format, read by ``build_loaders``, ``effdense data
check`` and ``effdense data synth``. Adding a format is one row here and one module beside this one.

A row gives the task the format feeds, ``dataset(cfg, split, train)`` (a map-style dataset of
``(uint8 image (3, H, W), target)`` samples), the ``collate(train)`` function for its batches (None:
torch's default stacking), ``check(cfg, workers=, progress=)`` (every problem, one line each) and
``synth(root, seed=, **options)`` (a small dataset in exactly this layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.config import Config, resolve_image_size

from . import DataError
from .imagefolder import ImageFolderDataset, class_mismatch, list_split
from .transforms import classification_eval_transform, classification_train_transform


@dataclass(frozen=True)
class DataFormat:
    name: str
    task: str
    layout: str  # the on-disk layout, for help texts and errors
    dataset: Callable  # (cfg, split name, train: bool) -> Dataset
    check: Callable  # (cfg, workers=4, progress=False) -> list[str]
    synth: Callable  # (root, seed=0, **options) -> Path
    collate: Callable = lambda train: None  # (train: bool) -> collate_fn or None (default stacking)


# -- imagefolder (classification) -------------------------------------------------------------------


def _imagefolder_dataset(cfg: Config, split: str, train: bool) -> ImageFolderDataset:
    size = resolve_image_size(cfg)
    augment = cfg.data.augment
    transform = classification_train_transform(augment, size) if train else classification_eval_transform(augment, size)
    dataset = ImageFolderDataset(cfg.data.root, split, transform, cfg.data.on_bad_sample)
    if train:  # the label of a class is its index among the sorted folder names: both splits must agree
        mismatch = class_mismatch(dataset.listing, list_split(cfg.data.root, cfg.data.val_split))
        if mismatch:
            raise DataError(f"data.root '{cfg.data.root}': {mismatch}")
    if dataset.num_classes != cfg.model.num_classes:
        raise DataError(num_classes_problem(cfg, dataset.classes, split))
    return dataset


def num_classes_problem(cfg: Config, classes: list[str], split: str) -> str:
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return (f"model.num_classes={cfg.model.num_classes} but data.root '{cfg.data.root}' has {len(classes)} class "
            f"folders in '{split}' ({shown}); set model.num_classes={len(classes)}")


def _imagefolder_check(cfg: Config, workers: int = 4, progress: bool = False) -> list[str]:
    from .check import check_imagefolder

    return check_imagefolder(cfg, workers=workers, progress=progress)


def _imagefolder_synth(root: str | Path, seed: int = 0, classes: int = 4, **options) -> Path:
    from .synthetic import write_classification

    return write_classification(root, num_classes=classes, seed=seed, **options)


FORMATS: dict[str, DataFormat] = {}


def _add(row: DataFormat) -> None:
    if row.name in FORMATS:
        raise ValueError(f"duplicate data format {row.name!r}")
    FORMATS[row.name] = row


_add(DataFormat(name="imagefolder", task="classification", layout="<root>/<split>/<class>/*.jpg",
                dataset=_imagefolder_dataset, check=_imagefolder_check, synth=_imagefolder_synth))


def formats_for(task: str) -> list[str]:
    """The format names that feed ``task``."""
    return [name for name, row in FORMATS.items() if row.task == task]
