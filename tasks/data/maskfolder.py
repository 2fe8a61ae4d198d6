"""Mask folders, the generic format: ``images/{split}/*.jpg|png`` + ``masks/{split}/*.png`` with the same stem.

Masks are index images (8-bit, 16-bit or palette PNG, read as indices): values ``0..num_classes-1``,
``ignore_index`` (255 by default) for unlabelled pixels. Sub-folders are allowed; an image and its
mask match by their path relative to the split folder, without the extension.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from tasks.data.images import IMAGE_EXTENSIONS
from tasks.data.seg_common import Pair, PairedSegmentationDataset, PairListing, PairReader, check_pairs

__all__ = ["MaskFolderDataset", "list_maskfolder", "check_maskfolder", "LAYOUT"]

LAYOUT = "<root>/images/<split>/*.jpg|png + <root>/masks/<split>/*.png (same stem)"
MASK_EXTENSIONS = (".png",)


def _files(folder: Path, extensions: Sequence[str]) -> dict[str, Path]:
    """relative path without extension -> file, for the files under ``folder`` with those extensions."""
    found = {}
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in extensions and path.is_file() and not path.name.startswith("."):
            found.setdefault(path.relative_to(folder).with_suffix("").as_posix(), path)
    return found


def list_maskfolder(root: str | Path, split: str) -> PairListing:
    """The (image, mask) pairs of ``split`` and every layout problem (unpaired files, missing folders)."""
    root, listing = Path(root), PairListing()
    images_dir, masks_dir = root / "images" / split, root / "masks" / split
    for folder in (root, images_dir, masks_dir):
        if not folder.is_dir():
            listing.fatal.append(f"data.root '{root}': folder '{folder}' not found; expected mask-folder layout {LAYOUT}")
            return listing
    images, masks = _files(images_dir, IMAGE_EXTENSIONS), _files(masks_dir, MASK_EXTENSIONS)
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
                             f"expected mask-folder layout {LAYOUT}")
    return listing


class MaskFolderDataset(PairedSegmentationDataset):
    """Index-mask segmentation data; ``classes`` are the given names (or "0", "1", ...)."""

    def __init__(self, root: str | Path, split: str, num_classes: int, transform: Callable | None = None,
                 on_bad_sample: str = "error", ignore_index: int = 255, class_names: Sequence[str] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names has {len(class_names)} names; expected num_classes={num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index={ignore_index} is a class index (num_classes={num_classes}); "
                             f"expected a value outside 0..{num_classes - 1}, e.g. 255")
        self.root, self.split = Path(root), split
        self.classes = tuple(class_names) if class_names is not None else tuple(str(i) for i in range(num_classes))
        super().__init__(list_maskfolder(root, split), self.root / "images" / split,
                         PairReader(num_classes, ignore_index), transform, on_bad_sample)


def check_maskfolder(root: str | Path, num_classes: int, ignore_index: int = 255,
                     splits: Sequence[str] = ("train", "val"), workers: int = 4, progress: bool = False,
                     sample: int | None = None) -> list[str]:
    """Every problem of a mask-folder dataset: layout, unpaired files, unreadable files, sizes, label values,
    a split without a labelled pixel. ``sample=k`` loads an evenly spaced ``k`` pairs per split (quick
    check, see :func:`tasks.data.seg_common.check_pairs`), else every pair."""
    problems = []
    for split in splits:
        problems += check_pairs(PairReader(num_classes, ignore_index), list_maskfolder(root, split), workers,
                                progress, desc=f"checking {split}", sample=sample,
                                where=Path(root) / "masks" / split)
    return list(dict.fromkeys(problems))
