"""COCO-format detection data: ``<root>/annotations/instances_<split>.json`` + ``<root>/<split>/`` images.

Any COCO-format json and image folder works (``annotation_file=``, ``image_dir=``); the class count
comes from the json's categories. Category ids need not be contiguous: labels are the indices of the
sorted category ids (``cat_ids[label]`` maps back, ``cat_to_label`` forward). Images without
annotations are kept (a warning gives their count), but a split without a single box is an error, as
are duplicate image, annotation or category ids (pycocotools would keep one per id); crowd boxes are
kept and flagged (``iscrowd``, ignore regions in training, ignored by COCOeval); boxes with w or h <= 0
after clipping to the image are dropped (count logged); at most ``max_instances`` boxes per image.
Bad records are one-line :class:`CocoFormatError` / :class:`BadAnnotationError` errors naming the
file and the record (``on_bad_sample="skip"`` drops the annotation, or skips the image, counts and
logs it instead). The rules the json must satisfy
(and their error classes, re-exported here) live in :mod:`tasks.data.coco_check`; :func:`check_coco`
applies them all to a split (``effdense data check``). Pascal VOC and YOLO splits are read into the same
COCO dicts (:class:`SplitAnnotations`, see :mod:`tasks.data.convert`) and served by this dataset.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from tasks.data.coco_check import (LAYOUT, REQUIRED, BadAnnotationError, CocoFormatError, annotation_problem,
                                   boxes_problem, classes_problem, finite_number, read_annotation_file)
from tasks.data.errors import DataError
from tasks.data.images import ImageReader, UnreadableImageError, read_image

log = logging.getLogger("effdense")

__all__ = ["LAYOUT", "REQUIRED", "LABEL_MAPS", "CocoFormatError", "BadAnnotationError", "MissingImageError",
           "CocoDetection", "coco_paths", "annotation_paths", "read_annotation_file", "category_maps",
           "classes_problem", "annotation_problem", "boxes_problem", "clipped_xyxy", "build_coco", "check_coco",
           "SplitAnnotations", "image_problems"]

ON_BAD_SAMPLE_CHOICES = ("error", "skip")


class MissingImageError(UnreadableImageError):
    """An image listed in the annotation file that is not on disk."""


def coco_paths(root: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) for ``split`` under ``root``: ``annotations/instances_<split>.json``
    and ``<split>/`` (or ``images/<split>/``)."""
    root = Path(root)
    image_dir = root / split
    if not image_dir.is_dir() and (root / "images" / split).is_dir():
        image_dir = root / "images" / split
    return root / "annotations" / f"instances_{split}.json", image_dir


def annotation_paths(cfg, split: str, train: bool):
    """(annotation json, image folder) of a split, as paths: ``data.{train,val}_annotations/_images``, else COCO's
    layout under ``data.root``."""
    default_ann, default_dir = coco_paths(cfg.data.root, split)
    ann = cfg.data.train_annotations if train else cfg.data.val_annotations
    images = cfg.data.train_images if train else cfg.data.val_images
    return (Path(ann) if ann else default_ann), (Path(images) if images else default_dir)


LABEL_MAPS = ("contiguous", "category_id")


def category_maps(categories: list[dict], label_map: str = "contiguous", path: str | Path | None = None
                  ) -> tuple[list[int], dict[int, int], list[str]]:
    """(``cat_ids``: label -> category id, ``cat_to_label``: id -> label, class names by label).

    ``label_map`` (``data.label_map``): ``"contiguous"`` numbers the sorted category ids 0..K-1 (80
    classes for COCO); ``"category_id"`` is label = id - 1 with max(id) classes, the layout of effdet's,
    TF's and automl's COCO checkpoints (90 classes; the ids COCO leaves unused are classes that never
    occur, named ``id-<k>``).
    """
    ordered = sorted(categories, key=lambda c: c["id"])
    if label_map == "contiguous":
        cat_ids = [int(c["id"]) for c in ordered]
        return cat_ids, {cid: label for label, cid in enumerate(cat_ids)}, [str(c["name"]) for c in ordered]
    if label_map != "category_id":
        raise ValueError(f"data.label_map={label_map!r} must be one of: {', '.join(LABEL_MAPS)}")
    names = {int(c["id"]): str(c["name"]) for c in ordered}
    if names and min(names) < 1:
        raise CocoFormatError(f"{path or 'the annotation file'}: category id {min(names)} < 1, but "
                              f"data.label_map=category_id uses label = id - 1; use data.label_map=contiguous")
    cat_ids = list(range(1, max(names, default=0) + 1))
    return cat_ids, {cid: cid - 1 for cid in names}, [names.get(cid, f"id-{cid}") for cid in cat_ids]


def clipped_xyxy(bbox, width: float, height: float) -> tuple[float, float, float, float]:
    x, y, w, h = (float(v) for v in bbox)
    return max(0.0, x), max(0.0, y), min(width, x + w), min(height, y + h)


def build_coco(data: dict):
    """A pycocotools ``COCO`` over an in-memory annotation dict (its index prints are silenced)."""
    from pycocotools.coco import COCO

    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


@dataclass
class SplitAnnotations:
    """One split of another format (Pascal VOC, YOLO) read into memory as a COCO dict.

    ``data``: COCO's ``images`` (``id``, ``file_name`` relative to ``image_dir``, ``width``, ``height``),
    ``annotations`` (``bbox`` [x, y, w, h] in 0-based pixels, ``area``, ``iscrowd``) and ``categories``
    (``id`` = class index + 1, ``name``); ``path`` names the split in messages (an ImageSets file, a labels
    folder); ``sources`` maps an image id to the file that describes it (its XML, its label txt);
    ``problems``: one line per bad record, already left out of ``data``.
    """

    data: dict
    image_dir: Path
    path: Path
    sources: dict = field(default_factory=dict)
    problems: list = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        return [c["name"] for c in sorted(self.data["categories"], key=lambda c: c["id"])]

    def to_coco(self) -> dict:
        """A copy of the COCO dict (for pycocotools, a json, the converter)."""
        return copy.deepcopy(self.data)


class CocoDetection(Dataset):
    """Samples ``(image (C, H, W) in its file's dtype, target)`` (``image_options``: ``read_image``'s
    ``bands``/``scaled``, :func:`tasks.data.images.image_options` of a config; default 8-bit RGB);
    ``target`` = ``boxes`` (n, 4) float32 xyxy, ``labels``
    (n,) int64 in 0..C-1, ``iscrowd`` (n,) bool, ``image_id`` (the json's id), and after ``transform``
    (``(image, target) -> (image, target)``) also ``orig_size``, ``scale``, ``offset`` in input pixels.

    ``data``: the annotation dict already in memory (another format converted, see
    :class:`SplitAnnotations`); ``annotation_file`` then only names it in messages, and ``sources``
    (image id -> file) names the file each image comes from. ``use_tiles(size, overlap)`` (``data.tile``):
    one sample per tile of each image instead (``target["tile"]``: its window (x1, y1, x2, y2) in the image).
    """

    def __init__(self, root: str | Path | None = None, split: str = "train", transform=None, *,
                 annotation_file: str | Path | None = None, image_dir: str | Path | None = None,
                 max_instances: int = 100, on_bad_sample: str = "error", label_map: str = "contiguous",
                 data: dict | None = None, sources: dict | None = None, image_options: dict | None = None):
        if on_bad_sample not in ON_BAD_SAMPLE_CHOICES:
            raise ValueError(f"data.on_bad_sample={on_bad_sample!r} must be one of: {', '.join(ON_BAD_SAMPLE_CHOICES)}")
        if annotation_file is None or image_dir is None:
            if root is None:
                raise ValueError("CocoDetection needs root (+ split) or annotation_file and image_dir")
            default_ann, default_dir = coco_paths(root, split)
            annotation_file, image_dir = annotation_file or default_ann, image_dir or default_dir
        self.annotation_file, self.image_dir = Path(annotation_file), Path(image_dir)
        self.split, self.transform, self.on_bad_sample = split, transform, on_bad_sample
        self.max_instances = int(max_instances)
        data = read_annotation_file(self.annotation_file) if data is None else data
        self.sources = dict(sources or {})
        if not self.image_dir.is_dir():
            raise DataError(f"{self.image_dir}: image folder not found (for {self.annotation_file}); expected COCO "
                            f"layout {LAYOUT}")
        self.label_map = label_map
        self.cat_ids, self.cat_to_label, self.classes = category_maps(data["categories"], label_map,
                                                                      self.annotation_file)
        self.images = sorted(data["images"], key=lambda im: im["id"])
        first = self.image_dir / self.images[0]["file_name"] if self.images else None
        self.read = ImageReader(**(image_options or {}), reference=first)
        self._index_annotations(data)
        self.bad_samples: list[Path] = []

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def _index_annotations(self, data: dict) -> None:
        images = {im["id"]: im for im in self.images}
        per_image: dict = {im["id"]: [] for im in self.images}
        dropped = degenerate = capped = 0
        for ann in data["annotations"]:
            image = images.get(ann["image_id"])
            problem = annotation_problem(self.annotation_file, ann, image, self.cat_to_label)
            if problem:
                if self.on_bad_sample == "error":
                    raise BadAnnotationError(problem + " (data.on_bad_sample=skip drops such annotations)")
                dropped += 1
                log.warning("dropping %s (data.on_bad_sample=skip)", problem)
                continue
            box = clipped_xyxy(ann["bbox"], image["width"], image["height"])
            if box[2] <= box[0] or box[3] <= box[1]:
                degenerate += 1
                continue
            per_image[image["id"]].append((box, self.cat_to_label[ann["category_id"]], bool(ann.get("iscrowd", 0))))
        self._boxes, self._labels, self._crowd = [], [], []
        for image in self.images:
            rows = per_image[image["id"]]
            if len(rows) > self.max_instances:
                capped += 1
                rows = rows[: self.max_instances]
            self._boxes.append(np.array([r[0] for r in rows], dtype=np.float32).reshape(-1, 4))
            self._labels.append(np.array([r[1] for r in rows], dtype=np.int64))
            self._crowd.append(np.array([r[2] for r in rows], dtype=bool))
        self.dropped_annotations, self.degenerate_boxes, self.capped_images = dropped, degenerate, capped
        problem = boxes_problem(self.annotation_file, len(self.images), len(data["annotations"]),
                                [int((~crowd).sum()) for crowd in self._crowd], dropped)
        if problem:
            raise DataError(problem)
        if degenerate:
            log.info("%s: dropped %d degenerate boxes (w or h <= 0 after clipping to the image)",
                     self.annotation_file, degenerate)
        if dropped:
            log.warning("%s: dropped %d bad annotations (data.on_bad_sample=skip)", self.annotation_file, dropped)
        if capped:
            log.info("%s: %d images had more than max_instances=%d boxes (the rest ignored)", self.annotation_file,
                     capped, self.max_instances)

    # data.tile: (image index, window) per sample (tasks.data.tiles); None: one sample per whole image
    tiles: list | None = None

    def use_tiles(self, size: int, overlap: float = 0.2) -> None:
        """One sample per tile of every image (``tasks.data.tiles``: the image's crop and its boxes clipped,
        a box kept when >= 50% of it is inside, then ``transform``); sizes from the annotation records."""
        from tasks.data.tiles import describe_tiles, tile_index

        sizes = [(int(record["height"]), int(record["width"])) for record in self.images]
        self.tiles = tile_index(sizes, size, overlap)
        describe_tiles(str(self.annotation_file), len(self.images), len(self.tiles), size, overlap)

    def __len__(self) -> int:
        return len(self.tiles) if self.tiles is not None else len(self.images)

    def target(self, index: int) -> dict:
        """The untransformed target of image ``index`` (boxes in original pixels)."""
        return {"boxes": torch.from_numpy(self._boxes[index].copy()),
                "labels": torch.from_numpy(self._labels[index].copy()),
                "iscrowd": torch.from_numpy(self._crowd[index].copy()), "image_id": int(self.images[index]["id"])}

    def __getitem__(self, index: int):
        window = None
        if self.tiles is not None:
            index, window = self.tiles[index]
        for offset in range(len(self.images)):
            i = (index + offset) % len(self.images)
            path = self.image_dir / self.images[i]["file_name"]
            if path in self.bad_samples:
                continue
            try:
                image = self._read(i, path)
            except UnreadableImageError as error:
                if self.on_bad_sample == "error":
                    raise
                self.bad_samples.append(path)
                log.warning("skipping %s (data.on_bad_sample=skip)", error)
                continue
            target = self.target(i)
            if self.tiles is not None:  # the tile's crop; boxes clipped to it (tasks.data.tiles)
                from tasks.data.tiles import crop_detection_target, crop_image, fit_window

                window = fit_window(window, *image.shape[-2:])  # a replacement (skip) of another size: moved inside
                image, target = crop_image(image, window), crop_detection_target(target, window)
            if self.transform is not None:
                return self.transform(image, target)
            target.update(orig_size=tuple(image.shape[-2:]), scale=(1.0, 1.0), offset=(0.0, 0.0))
            return image, target
        raise DataError(f"{self.image_dir}: none of the {len(self.images)} images is readable")

    def _read(self, index: int, path: Path) -> torch.Tensor:
        record = self.images[index]
        listed_in = self.sources.get(record["id"], self.annotation_file)
        if not path.is_file():
            raise MissingImageError(f"{path}: listed in {listed_in} (image id {record['id']}) but not "
                                    f"found; expected the image under {self.image_dir}")
        image = self.read(path)
        if tuple(image.shape[-2:]) != (int(record["height"]), int(record["width"])):
            raise UnreadableImageError(f"{path}: is {image.shape[-1]}x{image.shape[-2]} but {listed_in} "
                                       f"(image id {record['id']}) says {record['width']}x{record['height']}; "
                                       f"expected the annotated size")
        return image


def check_coco(root: str | Path | None = None, split: str = "train", *, annotation_file: str | Path | None = None,
               image_dir: str | Path | None = None, decode: bool = True, workers: int = 4,
               progress: bool = False, num_classes: int | None = None, label_map: str = "contiguous",
               sample: int | None = None, image_options: dict | None = None) -> list[str]:
    """Every problem in one COCO split, one line each ([] when clean): the json (not json, missing keys,
    duplicate ids), a class count other than ``num_classes`` (when given, under ``label_map``), each bad
    annotation (outside the image, negative size, unknown category or image id), boxes given as
    [x1, y1, x2, y2] when that is obvious, a split without a single usable box (some images without
    boxes only log a warning with their count), images listed but missing, unreadable or of another
    size. ``decode=False`` only checks that the images exist; ``sample=k`` decodes an evenly spaced
    ``k`` of them (all are still checked to exist); ``workers`` threads decode (``image_options``: as
    :class:`CocoDetection`'s), ``progress`` shows a bar."""
    if annotation_file is None or image_dir is None:
        default_ann, default_dir = coco_paths(root, split)
        annotation_file, image_dir = annotation_file or default_ann, image_dir or default_dir
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    try:
        data = read_annotation_file(annotation_file)
        cat_ids, cat_to_label, _ = category_maps(data["categories"], label_map, annotation_file)
    except CocoFormatError as error:
        return [str(error)]
    problems, outside, fits_xyxy, corners, bad = [], 0, 0, 0, 0
    if num_classes is not None and len(cat_ids) != num_classes:
        problems.append(classes_problem(annotation_file, len(cat_ids), num_classes, label_map))
    images = {im["id"]: im for im in data["images"]}
    boxes = dict.fromkeys(images, 0)  # usable (non-crowd, positive-size) boxes per image
    for ann in data["annotations"]:
        image = images.get(ann["image_id"])
        problem = annotation_problem(annotation_file, ann, image, cat_to_label)
        if problem:
            problems.append(problem)
            bad += 1
            outside += "outside the image" in problem
            fits_xyxy += "it fits as [x1, y1, x2, y2]" in problem
        elif not ann.get("iscrowd", 0):
            x1, y1, x2, y2 = clipped_xyxy(ann["bbox"], image["width"], image["height"])
            boxes[image["id"]] += x2 > x1 and y2 > y1
        bbox = ann["bbox"]
        if isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(finite_number(v) for v in bbox):
            corners += bbox[2] > bbox[0] and bbox[3] > bbox[1]
    if outside and fits_xyxy == outside and corners == len(data["annotations"]):
        problems.insert(0, f"{annotation_file}: bbox looks like [x1, y1, x2, y2]: {outside} boxes extend outside "
                           f"their image as [x, y, width, height] but every box fits as corners; COCO expects "
                           f"[x, y, width, height]")
    empty = boxes_problem(annotation_file, len(images), len(data["annotations"]), list(boxes.values()), bad)
    if empty:
        problems.append(empty)
    if not image_dir.is_dir():
        return problems + [f"{image_dir}: image folder not found (for {annotation_file}); expected COCO layout "
                           f"{LAYOUT}"]
    decoded = None
    if decode and sample is not None:
        from tasks.data.seg_common import evenly_spaced

        decoded = {id(record) for record in evenly_spaced(data["images"], sample)}
    problems += image_problems(annotation_file, image_dir, data["images"], decode, workers, progress, decoded,
                               image_options=image_options)
    return problems


def image_problems(annotation_file: Path, image_dir: Path, records: list, decode: bool, workers: int,
                   progress: bool, decoded: set | None = None, sources: dict | None = None, *,
                   image_options: dict | None = None) -> list[str]:
    """Each listed image that is missing, or (when ``decode``; only those in ``decoded``, a set of
    ``id(record)``, when given) unreadable or of another size than its record says. ``sources``: image id
    -> the file that lists it (else ``annotation_file``); ``image_options``: ``read_image``'s ``bands``/``scaled``."""
    from concurrent.futures import ThreadPoolExecutor

    sources = sources or {}

    def problem(record: dict) -> str | None:
        path = image_dir / record["file_name"]
        listed_in = sources.get(record["id"], annotation_file)
        if not path.is_file():
            return (f"{path}: listed in {listed_in} (image id {record['id']}) but not found; expected the "
                    f"image under {image_dir}")
        if not decode or (decoded is not None and id(record) not in decoded):
            return None
        try:
            image = read_image(path, **(image_options or {}))
        except UnreadableImageError as error:
            return str(error)
        if tuple(image.shape[-2:]) != (int(record["height"]), int(record["width"])):
            return (f"{path}: is {image.shape[-1]}x{image.shape[-2]} but {listed_in} "
                    f"(image id {record['id']}) says {record['width']}x{record['height']}")
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = pool.map(problem, records)
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=len(records), desc=f"checking {image_dir.name}", unit="img")
        return [p for p in results if p is not None]
