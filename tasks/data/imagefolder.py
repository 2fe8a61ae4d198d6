"""ImageFolder classification data: ``<root>/<split>/<class>/*.jpg``, classes = sorted folder names."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from tasks.data.errors import DataError
from tasks.data.images import IMAGE_EXTENSIONS, ImageReader, UnreadableImageError

log = logging.getLogger("effdense")

LAYOUT = "<root>/<split>/<class>/*.jpg"
ON_BAD_SAMPLE_CHOICES = ("error", "skip")


@dataclass
class SplitListing:
    """What one split folder holds: sorted class names, (path, label) samples, and layout problems."""

    split_dir: Path
    classes: list[str] = field(default_factory=list)
    samples: list[tuple[Path, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def list_split(root: str | Path, split: str) -> SplitListing:
    """Scan ``root/split`` without decoding; every layout problem becomes one line in ``problems``."""
    root = Path(root)
    listing = SplitListing(split_dir=root / split)
    if not root.is_dir():
        listing.problems.append(f"data.root '{root}' not found; expected ImageFolder layout {LAYOUT}")
        return listing
    if not listing.split_dir.is_dir():
        listing.problems.append(f"data.root '{root}': split folder '{listing.split_dir}' not found; "
                                f"expected ImageFolder layout {LAYOUT}")
        return listing
    listing.classes = sorted(p.name for p in listing.split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not listing.classes:
        listing.problems.append(f"data.root '{root}': split folder '{listing.split_dir}' has no class folders; "
                                f"expected ImageFolder layout {LAYOUT}")
    for label, name in enumerate(listing.classes):
        images = list_images(listing.split_dir / name)
        if not images:
            listing.problems.append(f"class folder '{listing.split_dir / name}' has no images "
                                    f"(expected files ending in {', '.join(IMAGE_EXTENSIONS)})")
        listing.samples += [(path, label) for path in images]
    return listing


def list_images(class_dir: Path) -> list[Path]:
    """Image files directly inside ``class_dir`` (extension case-insensitive), sorted by name."""
    return sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def class_mismatch(train: SplitListing, val: SplitListing) -> str | None:
    """One line naming the classes found in only one of the two splits, or None when they agree."""
    if train.classes == val.classes:
        return None
    only_train = sorted(set(train.classes) - set(val.classes))
    only_val = sorted(set(val.classes) - set(train.classes))
    return (f"class folders differ between '{train.split_dir}' ({len(train.classes)}) and '{val.split_dir}' "
            f"({len(val.classes)}): missing in {val.split_dir.name}: {_few(only_train)}; "
            f"missing in {train.split_dir.name}: {_few(only_val)}")


def _few(names: list[str], limit: int = 5) -> str:
    if not names:
        return "none"
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


class ImageFolderDataset(Dataset):
    """Samples ``(image tensor (C, H, W), int label)`` from ``root/split/<class>/*``.

    ``image_options``: :func:`tasks.data.images.read_image`'s ``bands``/``scaled`` (from a config:
    :func:`tasks.data.images.image_options`); default 8-bit RGB. Images keep their file's dtype (uint8 for
    8-bit files); an image of another dtype than the split's first one is an error naming both.

    ``on_bad_sample="skip"`` replaces an unreadable image by the next readable one (wrapping around),
    logs a warning naming the file, and records it in ``bad_samples`` (per process: each DataLoader
    worker keeps its own list; ``tasks.data.check_dataset`` is the full scan).
    """

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, on_bad_sample: str = "error",
                 image_options: dict | None = None):
        if on_bad_sample not in ON_BAD_SAMPLE_CHOICES:
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r} must be one of: {', '.join(ON_BAD_SAMPLE_CHOICES)}")
        listing = list_split(root, split)
        if listing.problems:
            more = len(listing.problems) - 1
            raise DataError(listing.problems[0] + (f" (and {more} more problems; run `effdense data check`)" if more else ""))
        self.root, self.split, self.split_dir = Path(root), split, listing.split_dir
        self.listing = listing
        self.classes = listing.classes
        self.class_to_index = {name: index for index, name in enumerate(self.classes)}
        self.samples = listing.samples
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.bad_samples: list[Path] = []
        self.read = ImageReader(**(image_options or {}), reference=self.samples[0][0] if self.samples else None)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image, label = self._load(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, label

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            if path in self.bad_samples:
                continue
            try:
                return self.read(path), label
            except UnreadableImageError as error:
                if self.on_bad_sample == "error":
                    raise
                self.bad_samples.append(path)
                log.warning("skipping %s (data.on_bad_sample=skip)", error)
        raise DataError(f"'{self.split_dir}': none of the {len(self.samples)} images is readable")


def num_classes_problem(cfg, classes: list[str], split: str) -> str:
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return (f"model.num_classes={cfg.model.num_classes} but data.root '{cfg.data.root}' has {len(classes)} class "
            f"folders in '{split}' ({shown}); set model.num_classes={len(classes)}")
