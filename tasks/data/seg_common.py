"""What the segmentation formats share: reading images and index masks, the paired-sample dataset, collate.

A sample is ``(uint8 image (3, H, W), target)`` with ``target = {"mask": int64 (H, W), "image_id": str,
"orig_size": (h, w)}`` (train ids / class indices, ``ignore_index`` = 255 by default). In smp's sigmoid
modes (``model.segmentation.mode``) the mask holds 0/1 (and ``ignore_index``): (H, W) in binary mode,
(C, H, W) -- one channel per class -- in multilabel mode. Batches: see
:func:`collate_segmentation` (train: ``{"masks"}``; eval: ``{"masks", "image_size", "orig_size",
"image_id"}``, the contract of ``tasks.segmentation_eval``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from tasks.data.errors import DataError
from tasks.data.images import UnreadableImageError, read_image
from tasks.data.imagefolder import ON_BAD_SAMPLE_CHOICES

log = logging.getLogger("effdense")

__all__ = ["MaskError", "Pair", "PairListing", "PairReader", "read_image", "read_mask", "read_mask_stack",
           "PairedSegmentationDataset", "collate_segmentation", "segmentation_collate", "check_pairs", "evenly_spaced",
           "SEGMENTATION_MODES", "STACK_EXTENSIONS"]

TABLE_IGNORE = 255  # what label tables (Cityscapes' 34 -> 19) map void ids to
MASK_MODES = ("L", "P", "1", "I;16", "I;16L", "I;16B", "I")
SEGMENTATION_MODES = ("multiclass", "binary", "multilabel")  # smp's modes (model.segmentation.mode)
STACK_EXTENSIONS = (".npy", ".tif", ".tiff")  # one file holding a (C, H, W) multilabel mask


class MaskError(DataError):
    """A mask that cannot be used: unreadable, not an index image, the wrong size, or labels outside the table."""


@dataclass(frozen=True)
class Pair:
    image: Path
    mask: Path  # the mask file (multilabel PNGs: the first class's file, named in messages)
    image_id: str
    masks: tuple[Path, ...] = ()  # multilabel, one PNG per class: every class's file, in class order


@dataclass
class PairListing:
    """The (image, mask) pairs of one split, and every layout problem found while listing (one line each)."""

    pairs: list[Pair] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    fatal: list[str] = field(default_factory=list)  # problems no skipping can get around (missing folders)


def read_mask(path: str | Path) -> torch.Tensor:
    """An index mask as int64 (H, W): 8-bit, 16-bit or palette PNG (palette indices, not colours), or a one-page
    8- or 16-bit TIFF (microscopy labels)."""
    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        return _read_tiff_mask(path)
    try:
        with Image.open(path) as image:
            mode = image.mode
            if mode not in MASK_MODES:
                raise MaskError(f"{path}: mask is a {mode} image; expected a single-channel index mask "
                                f"(8-bit, 16-bit or palette PNG whose values are class indices)")
            array = np.array(image)
    except MaskError:
        raise
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise MaskError(f"{path}: not a readable mask (corrupt or truncated?): {error}") from None
    return torch.from_numpy(array.astype(np.int64))


def _read_tiff_mask(path: Path) -> torch.Tensor:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as error:  # tifffile raises many kinds for a damaged file
        raise MaskError(f"{path}: not a readable TIFF mask (corrupt or truncated?): {error}") from None
    array = array.squeeze()
    if array.ndim != 2 or array.dtype.kind not in "ub":
        raise MaskError(f"{path}: mask is a {array.dtype} array of shape {list(array.shape)}; expected one page of "
                        f"integer class indices (H, W)")
    return torch.from_numpy(array.astype(np.int64))


def read_mask_stack(path: str | Path) -> torch.Tensor:
    """A multilabel mask in one file as int64 (C, H, W): ``.npy`` (bool or integer array) or a multi-page TIFF
    (one page per class; needs ``tifffile``)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
        else:
            try:
                import tifffile
            except ImportError:
                raise DataError(f"{path}: reading TIFF masks needs the tifffile package; install it "
                                f"(pip install tifffile) or save the masks as .npy (C, H, W)") from None
            array = tifffile.imread(path)
    except DataError:
        raise
    except (OSError, ValueError) as error:
        raise MaskError(f"{path}: not a readable mask (corrupt or truncated?): {error}") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or not (array.dtype == bool or np.issubdtype(array.dtype, np.integer)):
        raise MaskError(f"{path}: mask array is {array.dtype} of shape {tuple(array.shape)}; expected an integer or "
                        f"bool (C, H, W) array of 0/1, one channel per class")
    return torch.from_numpy(array.astype(np.int64))


def _few(values) -> str:
    values = [int(v) for v in values]
    return ", ".join(map(str, values[:8])) + (f" (+{len(values) - 8} more)" if len(values) > 8 else "")


class PairReader:
    """Loads one (image, mask) pair and validates it: the decoded image and its mask as labels.

    ``label_map``: an int64 lookup table (raw mask value -> label; -1 = not allowed), or None for
    masks that already hold class indices (values must be < ``num_classes`` or ``ignore_index``).
    ``mode``: ``multiclass`` (class indices), ``binary`` (one 0/1 mask) or ``multilabel`` ((C, H, W) 0/1:
    ``pair.masks``, one index PNG per class, or one ``.npy`` / TIFF stack); 0/1 masks take no label map.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, label_map: torch.Tensor | None = None,
                 label_help: str = "", mode: str = "multiclass"):
        if mode not in SEGMENTATION_MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(SEGMENTATION_MODES)}")
        if mode != "multiclass" and ignore_index in (0, 1):
            raise ValueError(f"ignore_index={ignore_index} is a {mode} mask value; expected a value other than 0 "
                             f"and 1, e.g. 255")
        self.num_classes, self.ignore_index, self.mode = num_classes, ignore_index, mode
        self.label_map, self.label_help = label_map, label_help

    def table(self, mask_path: Path) -> tuple[torch.Tensor | None, str]:
        """The lookup table for this mask file and what its values should be (per file: Cityscapes)."""
        return self.label_map, self.label_help

    def read_labels(self, pair: Pair) -> torch.Tensor:
        """The pair's mask as validated labels: (H, W), or (C, H, W) in multilabel mode."""
        if self.mode != "multilabel":
            return self.to_labels(read_mask(pair.mask), pair.mask)
        if pair.masks:
            raws = [read_mask(path) for path in pair.masks]
            for path, raw in zip(pair.masks[1:], raws[1:]):
                if raw.shape != raws[0].shape:
                    raise MaskError(f"{path}: mask is {raw.shape[1]}x{raw.shape[0]} but {pair.masks[0].name} is "
                                    f"{raws[0].shape[1]}x{raws[0].shape[0]} (WxH); expected one size per image")
            return torch.stack([self.to_labels(raw, path) for raw, path in zip(raws, pair.masks)])
        raw = read_mask_stack(pair.mask)
        if raw.shape[0] != self.num_classes:
            raise MaskError(f"{pair.mask}: mask has {raw.shape[0]} channels; expected one per class "
                            f"(model.num_classes={self.num_classes}), shaped (C, H, W)")
        return self.to_labels(raw, pair.mask)

    # (path) -> image: read_image with the config's bands and scaling (a tasks.data.images.ImageReader, set by
    # the format table); None: read_image's defaults (8-bit RGB)
    image_reader: Callable | None = None

    def load(self, pair: Pair) -> tuple[torch.Tensor, torch.Tensor]:
        image, labels = (self.image_reader or read_image)(pair.image), self.read_labels(pair)
        if tuple(labels.shape[-2:]) != tuple(image.shape[-2:]):
            raise MaskError(f"{pair.mask}: mask is {labels.shape[-1]}x{labels.shape[-2]} but its image "
                            f"{pair.image.name} is {image.shape[-1]}x{image.shape[-2]} (WxH); expected the same size")
        return image, labels

    def expected(self) -> str:
        """What the mask values should be, for messages."""
        if self.mode == "multiclass":
            return f"class indices 0..{self.num_classes - 1} or ignore_index={self.ignore_index}"
        return f"0 (background) or 1 (the class) or ignore_index={self.ignore_index} (mode={self.mode})"

    def labelled(self, labels: torch.Tensor) -> bool:
        """Whether ``labels`` holds a pixel that counts (a class; 0 or 1 in the sigmoid modes)."""
        if self.mode != "multiclass":
            return bool(((labels == 0) | (labels == 1)).any())
        return bool(((labels >= 0) & (labels < self.num_classes)).any())

    def to_labels(self, raw: torch.Tensor, path: Path) -> torch.Tensor:
        label_map, label_help = self.table(path)
        if label_map is not None:
            inside = (raw >= 0) & (raw < len(label_map))
            labels = torch.full_like(raw, -1)
            labels[inside] = label_map[raw[inside]]
            bad = labels < 0
            if bad.any():
                raise MaskError(f"{path}: label values {_few(raw[bad].unique())} are not in the label table; "
                                f"expected {label_help}")
            if self.ignore_index != TABLE_IGNORE:  # the table's void is the configured ignore value
                labels[labels == TABLE_IGNORE] = self.ignore_index
            return labels
        top = self.num_classes if self.mode == "multiclass" else 2
        bad = ((raw < 0) | (raw >= top)) & (raw != self.ignore_index)
        if bad.any():
            what = (f"are neither a class (0..{self.num_classes - 1}) nor data.ignore_index ({self.ignore_index})"
                    if self.mode == "multiclass" else "are not 0/1")
            raise MaskError(f"{path}: label values {_few(raw[bad].unique())} {what}; expected {self.expected()}")
        return raw


class PairedSegmentationDataset(Dataset):
    """Map-style dataset over ``(image, mask)`` file pairs listed by a format module.

    ``transform(image, target) -> (image, target)`` (``tasks.data.seg_transforms``).
    ``use_tiles(size, overlap)`` (``data.tile``): one sample per tile of each image instead, the transform
    running on the crop (``target["tile"]`` = its window (x1, y1, x2, y2) in the image).
    ``on_bad_sample="skip"``: unpaired files are left out at listing time, unreadable or invalid samples
    are replaced by the next good one; each is logged (``unpaired``, ``bad_samples``).
    """

    def __init__(self, listing: PairListing, split_dir: Path, reader: PairReader, transform: Callable | None = None,
                 on_bad_sample: str = "error"):
        if on_bad_sample not in ON_BAD_SAMPLE_CHOICES:
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r} must be one of: {', '.join(ON_BAD_SAMPLE_CHOICES)}")
        problems = listing.fatal + ([] if on_bad_sample == "skip" else listing.problems)
        if problems:
            more = len(problems) - 1
            raise DataError(problems[0] + (f" (and {more} more problems; run `effdense data check`)" if more else ""))
        if listing.problems:
            log.warning("%s: skipping %d unpaired files (data.on_bad_sample=skip), e.g. %s", split_dir,
                        len(listing.problems), listing.problems[0])
        if not listing.pairs:
            raise DataError(f"'{split_dir}': no image with a mask left in this split; expected at least one pair")
        self.pairs, self.split_dir, self.reader, self.transform = listing.pairs, split_dir, reader, transform
        self.num_classes, self.ignore_index = reader.num_classes, reader.ignore_index
        self.on_bad_sample = on_bad_sample
        self.bad_samples: list[Path] = []  # samples skipped while loading (per process)
        self.unpaired: list[str] = list(listing.problems)  # files left out at listing time (skip mode)

    # data.tile: (pair index, window) per sample (tasks.data.tiles); None: one sample per whole image
    tiles: list | None = None

    def use_tiles(self, size: int, overlap: float = 0.2, workers: int = 8) -> None:
        """One sample per tile of every image (``tasks.data.tiles``: the image's and its mask's crop, then
        ``transform``); the image sizes are read from the files' headers once, here."""
        from tasks.data.tiles import describe_tiles, image_sizes, tile_index

        self.tiles = tile_index(image_sizes([pair.image for pair in self.pairs], workers), size, overlap)
        describe_tiles(str(self.split_dir), len(self.pairs), len(self.tiles), size, overlap)

    def __len__(self) -> int:
        return len(self.tiles) if self.tiles is not None else len(self.pairs)

    def __getitem__(self, index: int):
        window = None
        if self.tiles is not None:
            index, window = self.tiles[index]
        for offset in range(len(self.pairs)):
            pair = self.pairs[(index + offset) % len(self.pairs)]
            if pair.image in self.bad_samples:
                continue
            try:
                image, mask = self.reader.load(pair)
                break
            except (UnreadableImageError, MaskError) as error:
                if self.on_bad_sample == "error":
                    raise
                self.bad_samples.append(pair.image)
                log.warning("skipping %s (data.on_bad_sample=skip)", error)
        else:
            raise DataError(f"'{self.split_dir}': none of the {len(self.pairs)} samples is usable")
        target = {"mask": mask, "image_id": pair.image_id, "orig_size": tuple(mask.shape[-2:])}
        if self.tiles is not None:  # the tile's crop of the image and the mask, in step
            from tasks.data.tiles import crop_image, fit_window

            window = fit_window(window, *mask.shape[-2:])  # a replacement (skip) of another size: moved inside
            image, mask = crop_image(image, window), crop_image(mask, window)
            target.update(mask=mask, orig_size=tuple(mask.shape[-2:]), tile=window)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target


def check_pairs(reader: PairReader, listing: PairListing, workers: int = 4, progress: bool = False,
                desc: str = "checking samples", sample: int | None = None,
                where: str | Path | None = None) -> list[str]:
    """Layout problems of ``listing``, then every pair that does not load, then a split whose masks hold no
    labelled pixel at all (one line each, naming ``where``: the split's mask folder).

    ``sample=k`` loads only an evenly spaced ``k`` pairs (the quick check); when none of them holds a
    labelled pixel, the other masks are read (masks only) until one does, so the "no labelled pixel"
    verdict is about the whole split. Some all-ignore masks are legitimate: a warning gives their count.
    """
    problems = listing.fatal + listing.problems
    if listing.fatal or not listing.pairs:
        return problems
    chosen = evenly_spaced(listing.pairs, sample)

    def load(pair: Pair) -> tuple[str | None, bool | None]:
        try:
            _, labels = reader.load(pair)
        except (UnreadableImageError, MaskError) as error:
            return str(error), None
        return None, reader.labelled(labels)

    results = _map(load, chosen, workers, progress, desc)
    problems += [problem for problem, _ in results if problem is not None]
    flags = [flag for _, flag in results if flag is not None]
    where = where or _mask_folder(listing.pairs)
    if flags and not any(flags):
        read = set(chosen)
        found, more = _find_labelled(reader, [pair for pair in listing.pairs if pair not in read], workers)
        problems += more
        if not found:
            return problems + [_no_labels_problem(reader, listing.pairs, where)]
    if not all(flags):
        sampled = f" (an evenly spaced sample of {len(listing.pairs)})" if len(chosen) < len(listing.pairs) else ""
        log.warning("%s: %d of %d masks%s have no labelled pixel (all ignore_index=%d); kept, they add nothing "
                    "to the loss", where, flags.count(False), len(flags), sampled, reader.ignore_index)
    return problems


def evenly_spaced(items: list, count: int | None) -> list:
    """``count`` items spread evenly over ``items``, first and last included (all of them when ``count`` is
    None or not smaller): the checkers' bounded samples."""
    if count is None or len(items) <= count:
        return list(items)
    if count <= 1:
        return list(items[:count])
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def _map(function: Callable, items: list, workers: int, progress: bool = False, desc: str = "") -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(function, items)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(items), desc=desc, unit="img")
        return list(results)


def _find_labelled(reader: PairReader, pairs: list[Pair], workers: int) -> tuple[bool, list[str]]:
    """(whether some mask of ``pairs`` holds a labelled pixel, the masks found unusable on the way), reading
    masks in chunks and stopping at the first chunk with a labelled pixel."""

    def read(pair: Pair) -> tuple[str | None, bool]:
        try:
            return None, reader.labelled(reader.read_labels(pair))
        except MaskError as error:
            return str(error), False

    chunk, problems = max(1, workers) * 4, []
    for start in range(0, len(pairs), chunk):
        results = _map(read, pairs[start:start + chunk], workers)
        problems += [problem for problem, _ in results if problem is not None]
        if any(flag for _, flag in results):
            return True, problems
    return False, problems


def _mask_folder(pairs: list[Pair]) -> Path:
    import os

    return Path(os.path.commonpath([str(pair.mask.parent) for pair in pairs]))


def _no_labels_problem(reader: PairReader, pairs: list[Pair], where: str | Path) -> str:
    table = " after the label table" if reader.table(pairs[0].mask)[0] is not None else ""
    return (f"'{where}': no labelled pixel in any of its {len(pairs)} masks (every pixel is "
            f"ignore_index={reader.ignore_index}{table}); expected {reader.expected().split(' or ignore')[0]} in "
            f"at least some pixels: training would learn nothing (loss 0) and evaluation would have nothing to score")


def collate_segmentation(batch: Sequence[tuple[torch.Tensor, dict]], train: bool = True, ignore_index: int = 255):
    """Stack a batch, padding images (0) and masks (``ignore_index``) bottom/right to the largest size.

    Train: ``(images uint8 (N, 3, H, W), {"masks": int64 (N, H, W)})`` (multilabel: (N, C, H, W)). Eval: the masks (at original
    resolution) plus ``image_size`` (valid h, w of each image on the canvas), ``orig_size`` and ``image_id``.
    """
    images = [image for image, _ in batch]
    masks = [target["mask"] for _, target in batch]
    height, width = max(i.shape[-2] for i in images), max(i.shape[-1] for i in images)
    canvas = images[0].new_zeros(len(images), images[0].shape[0], height, width)
    for i, image in enumerate(images):
        canvas[i, :, : image.shape[-2], : image.shape[-1]] = image
    mh, mw = max(m.shape[-2] for m in masks), max(m.shape[-1] for m in masks)
    stacked = torch.full((len(masks), *masks[0].shape[:-2], mh, mw), ignore_index, dtype=torch.int64)
    for i, mask in enumerate(masks):
        stacked[i, ..., : mask.shape[-2], : mask.shape[-1]] = mask
    if train:
        return canvas, {"masks": stacked}
    return canvas, {
        "masks": stacked,
        "image_size": torch.tensor([list(i.shape[-2:]) for i in images], dtype=torch.int64),
        "orig_size": torch.tensor([list(t["orig_size"]) for _, t in batch], dtype=torch.int64),
        "image_id": [t["image_id"] for _, t in batch],
    }


def segmentation_collate(train: bool, ignore_index: int = 255) -> Callable:
    """The collate function for train or eval batches (picklable, for DataLoader workers)."""
    return partial(collate_segmentation, train=train, ignore_index=ignore_index)
