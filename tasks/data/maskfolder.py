"""Mask folders, the generic format: ``images/{split}/*.jpg|png`` + ``masks/{split}/*.png`` with the same stem.

Masks, by ``model.segmentation.mode`` (smp's modes):

* ``multiclass``: index images (8-bit, 16-bit or palette PNG, read as indices): values
  ``0..num_classes-1``, ``ignore_index`` (255 by default) for unlabelled pixels.
* ``binary``: the same PNG holding 0 (background), 1 (the class) or ``ignore_index``.
* ``multilabel``: per image either one PNG per class, ``masks/{split}/<stem>_<class>.png`` (0/1/ignore
  each), where ``<class>`` is the class's name from ``data.class_names`` when given, else its index
  (``0001_0.png``, ``0001_1.png``...); or one ``masks/{split}/<stem>.npy`` -- a (C, H, W) bool or integer
  array of 0/1/ignore, channels in class order -- or a multi-page TIFF ``<stem>.tif``/``.tiff`` (one page
  per class; needs ``tifffile``).

Sub-folders are allowed; an image and its mask match by their path relative to the split folder,
without the extension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tasks.data.images import IMAGE_EXTENSIONS, reading_images
from tasks.data.seg_common import (STACK_EXTENSIONS, Pair, PairedSegmentationDataset, PairListing, PairReader,
                                   check_pairs)

__all__ = ["MaskFolderDataset", "list_maskfolder", "check_maskfolder", "class_tokens", "LAYOUT", "MULTILABEL_LAYOUT"]

LAYOUT = "<root>/images/<split>/*.jpg|png|tif + <root>/masks/<split>/*.png|tif (same stem)"
MULTILABEL_LAYOUT = ("<root>/images/<split>/<stem>.jpg|png + <root>/masks/<split>/<stem>_<class>.png for each class "
                     "(or <stem>.npy (C, H, W))")
MASK_EXTENSIONS = (".png", ".tif", ".tiff")  # index masks (a TIFF: one page, 8- or 16-bit)


def _files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """relative path without extension -> file, for the files under ``folder`` with those extensions."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in extensions and path.is_file() and not path.name.startswith("."):
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return found


def class_tokens(num_classes: int, class_names: Sequence[str] | None = None) -> list[str]:
    """The ``<class>`` part of multilabel per-class mask names: the class names when given, else the indices."""
    tokens = [str(name) for name in class_names] if class_names is not None else [str(i) for i in range(num_classes)]
    bad = [t for t in tokens if not t or "/" in t or "\\" in t]
    if bad:
        raise ValueError(f"class names {bad} cannot be part of a mask file name; expected names without '/' or '\\'")
    return tokens


def list_maskfolder(root: str | Path, split: str, mode: str = "multiclass",
                    tokens: Sequence[str] | None = None) -> PairListing:
    """The (image, mask) pairs of ``split`` and every layout problem (unpaired files, missing folders);
    multilabel pairs need ``tokens`` (:func:`class_tokens`)."""
    root, listing = Path(root), PairListing()
    images_dir, masks_dir = root / "images" / split, root / "masks" / split
    layout = MULTILABEL_LAYOUT if mode == "multilabel" else LAYOUT
    for folder in (root, images_dir, masks_dir):
        if not folder.is_dir():
            listing.fatal.append(f"data.root '{root}': folder '{folder}' not found; expected mask-folder layout {layout}")
            return listing
    images = _files(images_dir, IMAGE_EXTENSIONS)
    if mode == "multilabel":
        _pair_multilabel(listing, images, masks_dir, list(tokens or []))
    else:
        masks = _files(masks_dir, MASK_EXTENSIONS)
        for stem, image in images.items():
            if stem in masks:
                listing.pairs.append(Pair(image, masks[stem], stem))
            else:
                listing.problems.append(f"{image}: image without its mask; expected {masks_dir / stem}.png")
        for stem, mask in masks.items():
            if stem not in images:
                listing.problems.append(f"{mask}: mask without its image; expected {images_dir / stem}.jpg or .png")
    if not images:
        listing.fatal.append(f"'{images_dir}': no images (files ending in {', '.join(IMAGE_EXTENSIONS)}); "
                             f"expected mask-folder layout {layout}")
    return listing


def _pair_multilabel(listing: PairListing, images: dict[str, Path], masks_dir: Path, tokens: list[str]) -> None:
    """Multilabel pairs: each image's per-class PNGs or its one (C, H, W) stack file."""
    files = {}
    for path in sorted(masks_dir.rglob("*")):
        suffix = path.suffix.lower()
        if suffix in MASK_EXTENSIONS + STACK_EXTENSIONS and path.is_file() and not path.name.startswith("."):
            files.setdefault(path.relative_to(masks_dir).with_suffix(suffix).as_posix(), path)
    used = set()
    for stem, image in images.items():
        per_class = [files.get(f"{stem}_{token}.png") for token in tokens]
        stacks = [files[f"{stem}{ext}"] for ext in STACK_EXTENSIONS if f"{stem}{ext}" in files]
        found = [path for path in per_class if path is not None]
        used.update(found + stacks)
        if len(stacks) + bool(found) > 1:
            listing.problems.append(f"{image}: more than one mask ({', '.join(p.name for p in (stacks + found)[:3])}); "
                                    f"expected one PNG per class or one (C, H, W) .npy/.tif")
        elif stacks:
            listing.pairs.append(Pair(image, stacks[0], stem))
        elif len(found) == len(tokens):
            listing.pairs.append(Pair(image, found[0], stem, tuple(found)))
        elif found:
            missing = [f"{stem}_{token}.png" for token, path in zip(tokens, per_class) if path is None]
            listing.problems.append(f"{image}: per-class masks missing: {', '.join(missing[:4])}"
                                    f"{' ...' if len(missing) > 4 else ''} in {masks_dir}; expected one per class")
        else:
            listing.problems.append(f"{image}: image without its mask; expected {masks_dir / stem}_<class>.png for "
                                    f"each class ({', '.join(tokens[:4])}{' ...' if len(tokens) > 4 else ''}) or "
                                    f"{masks_dir / stem}.npy")
    for path in files.values():
        if path not in used:
            listing.problems.append(f"{path}: mask without its image, or not named <image stem>_<class>.png with a "
                                    f"class of {', '.join(tokens[:6])}{' ...' if len(tokens) > 6 else ''}, nor "
                                    f"<image stem>.npy|.tif")


class MaskFolderDataset(PairedSegmentationDataset):
    """Mask-folder segmentation data in ``mode`` (see the module docstring); ``classes`` are the given names
    (or "0", "1", ...; binary: "foreground")."""

    def __init__(self, root: str | Path, split: str, num_classes: int, transform: Callable | None = None,
                 on_bad_sample: str = "error", ignore_index: int = 255, class_names: Sequence[str] | None = None,
                 mode: str = "multiclass"):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        if mode == "binary" and num_classes != 1:
            raise ValueError(f"mode='binary' reads one 0/1 mask per image; expected num_classes=1, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names; expected num_classes={num_classes}")
        if mode == "multiclass" and 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class index (num_classes={num_classes}); "
                             f"expected a value outside 0..{num_classes - 1}, e.g. 255")
        self.root, self.split, self.mode = Path(root), split, mode
        default = ("foreground",) if mode == "binary" else tuple(str(i) for i in range(num_classes))
        self.classes = tuple(class_names) if class_names is not None else default
        tokens = class_tokens(num_classes, class_names) if mode == "multilabel" else None
        super().__init__(list_maskfolder(root, split, mode, tokens), self.root / "images" / split,
                         PairReader(num_classes, ignore_index, mode=mode), transform, on_bad_sample)


def check_maskfolder(root: str | Path, num_classes: int, ignore_index: int = 255,
                     splits: Sequence[str] = ("train", "val"), workers: int = 4, progress: bool = False,
                     sample: int | None = None, mode: str = "multiclass",
                     class_names: Sequence[str] | None = None, image_options: dict | None = None) -> list[str]:
    """Every problem of a mask-folder dataset: layout, unpaired files, unreadable files, sizes, label values,
    a split without a labelled pixel. ``sample=k`` loads an evenly spaced ``k`` pairs per split (quick
    check, see :func:`tasks.data.seg_common.check_pairs`), else every pair."""
    if mode == "binary" and num_classes != 1:
        return [f"model.segmentation.mode=binary reads one 0/1 mask per image; expected model.num_classes=1, "
                f"got {num_classes}"]
    tokens = class_tokens(num_classes, class_names) if mode == "multilabel" else None
    problems = []
    for split in splits:
        problems += check_pairs(reading_images(PairReader(num_classes, ignore_index, mode=mode), image_options),
                                list_maskfolder(root, split, mode, tokens), workers, progress,
                                desc=f"checking {split}", sample=sample, where=Path(root) / "masks" / split)
    return list(dict.fromkeys(problems))
