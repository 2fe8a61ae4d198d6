"""The rules a COCO annotation file must satisfy, each broken rule one line naming the file and the record.

:func:`read_annotation_file` (JSON, top-level keys, record fields, unique image/annotation/category
ids: pycocotools indexes each by id and would silently keep one; :func:`validate_annotations` applies
the same rules to a dict already in memory), :func:`annotation_problem` (one
annotation's image, category and box), :func:`boxes_problem` (a split needs at least one usable box;
some images without boxes only warn, with their count) and :func:`classes_problem`.
:mod:`tasks.data.coco` re-exports these names; its dataset (:class:`~tasks.data.coco.CocoDetection`)
and checker (:func:`~tasks.data.coco.check_coco`) and the evaluator (``tasks.detection.evaluate``) all
apply them.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from tasks.data.errors import DataError

log = logging.getLogger("effdense")

__all__ = ["LAYOUT", "REQUIRED", "CocoFormatError", "BadAnnotationError", "read_annotation_file", "annotation_problem",
           "boxes_problem", "classes_problem", "finite_number", "validate_annotations"]

LAYOUT = "<root>/annotations/instances_<split>.json + <root>/<split>/*.jpg"
KINDS = {"image": "images", "annotation": "annotations", "category": "categories"}
REQUIRED = {"images": ("id", "file_name", "width", "height"), "annotations": ("id", "image_id", "category_id", "bbox"),
            "categories": ("id", "name")}


class CocoFormatError(DataError):
    """The annotation file is not JSON, lacks a top-level key, a record lacks a field, or records share an id."""


class BadAnnotationError(DataError):
    """An annotation whose box or category cannot be right (outside the image, negative size, unknown id)."""


def read_annotation_file(path: str | Path) -> dict:
    """The json's content, checked for COCO's top-level keys, record fields and unique image, annotation and
    category ids (one-line :class:`CocoFormatError`). An empty ``annotations`` list is not refused here
    (a json may list categories for prediction only): the dataset and the checkers apply :func:`boxes_problem`."""
    path = Path(path)
    if not path.is_file():
        others = sorted(p.name for p in path.parent.glob("instances_*.json")) if path.parent.is_dir() else []
        hint = ""
        if others:  # e.g. `effdense data synth detection` writes train/val, the COCO presets read train2017/val2017
            splits = ", ".join(name[len("instances_"):-len(".json")] for name in others)
            hint = (f"; {path.parent} has the splits {splits}: set data.train_split / data.val_split "
                    f"(or data.train_annotations / data.val_annotations)")
        raise CocoFormatError(f"{path}: annotation file not found; expected COCO layout {LAYOUT}{hint}")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise CocoFormatError(f"{path}: not valid JSON (line {error.lineno} column {error.colno}: {error.msg}); "
                              f"expected a COCO annotation file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise CocoFormatError(f"{path}: cannot read the annotation file ({error}); expected a COCO json") from None
    return validate_annotations(data, path)


def validate_annotations(data, path: str | Path) -> dict:
    """``data`` (a json's content, or a COCO dict built in memory) checked for COCO's top-level keys, record
    fields and unique image, annotation and category ids; ``path`` names it in the one-line
    :class:`CocoFormatError`. Returns ``data``."""
    if not isinstance(data, dict):
        raise CocoFormatError(f"{path}: holds a JSON {type(data).__name__}, expected an object with images, "
                              f"annotations and categories")
    for key, fields in REQUIRED.items():
        if key not in data:
            raise CocoFormatError(f"{path}: missing top-level key '{key}' (has: {', '.join(sorted(data)) or 'none'}); "
                                  f"expected COCO's images, annotations and categories")
        if not isinstance(data[key], list):
            raise CocoFormatError(f"{path}: '{key}' is a {type(data[key]).__name__}, expected a list of records")
        for index, record in enumerate(data[key]):
            missing = [f for f in fields if not isinstance(record, dict) or f not in record]
            if missing:
                ident = f"id {record['id']}" if isinstance(record, dict) and "id" in record else f"#{index}"
                raise CocoFormatError(f"{path}: {key} record {ident} lacks {', '.join(repr(m) for m in missing)}; "
                                      f"expected fields {', '.join(fields)}")
    for key, kind in (("images", "image"), ("annotations", "annotation"), ("categories", "category")):
        _check_unique(path, data[key], kind)
    return data


def _check_unique(path: Path, records: list, kind: str) -> None:
    """One line naming every id that more than one record of ``kind`` holds (pycocotools keeps one per id)."""
    counts: dict = {}
    for record in records:
        key = record["id"] if isinstance(record["id"], (int, float, str)) else repr(record["id"])
        counts[key] = counts.get(key, 0) + 1
    duplicates = [key for key, count in counts.items() if count > 1]
    if duplicates:
        shown = ", ".join(map(str, duplicates[:8])) + (f" (+{len(duplicates) - 8} more)" if len(duplicates) > 8 else "")
        raise CocoFormatError(f"{path}: duplicate {kind} ids {shown} (each held by more than one record); "
                              f"expected unique {kind} ids (pycocotools indexes {KINDS[kind]} by id: all but one "
                              f"record of each id would be lost from evaluation)")


def classes_problem(annotation_file, count: int, num_classes: int, label_map: str) -> str:
    """The one line for a model whose class count is not the annotation file's (``count`` classes)."""
    if label_map == "category_id":
        return (f"model.num_classes={num_classes} but {annotation_file} has category ids up to {count} "
                f"(data.label_map=category_id: one class per id); set model.num_classes={count}")
    return (f"model.num_classes={num_classes} but {annotation_file} has {count} categories; set "
            f"model.num_classes={count} (or data.label_map=category_id for checkpoints with one class per "
            f"category id, e.g. effdet's 90-class COCO weights)")


def annotation_problem(path: Path, ann: dict, image: dict | None, cat_to_label: dict) -> str | None:
    """A one-line description of what is wrong with ``ann`` (None when it is usable)."""
    where = f"{path}: annotation id {ann['id']}"
    if image is None:
        return f"{where}: image_id {ann['image_id']} is not among the images; expected an id from 'images'"
    where += f" (image id {image['id']}, '{image['file_name']}' {image['width']}x{image['height']})"
    if ann["category_id"] not in cat_to_label:
        return (f"{where}: unknown category_id {ann['category_id']}; expected one of the {len(cat_to_label)} "
                f"category ids ({_id_range(cat_to_label)})")
    bbox = ann["bbox"]
    if not (isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(finite_number(v) for v in bbox)):
        return f"{where}: bbox {bbox!r} is not 4 finite numbers; expected [x, y, width, height]"
    x, y, w, h = (float(v) for v in bbox)
    if w < 0 or h < 0:
        return f"{where}: bbox {_fmt(bbox)} has a negative size; expected [x, y, width, height] with width, height >= 0"
    width, height = float(image["width"]), float(image["height"])
    outside = max(-x, -y, x + w - width, y + h - height)
    if outside > max(2.0, 0.01 * max(width, height)):
        hint = (" (it fits as [x1, y1, x2, y2]: COCO wants [x, y, width, height])"
                if w > x and h > y and w <= width and h <= height else "")
        return (f"{where}: bbox {_fmt(bbox)} extends {outside:.1f} px outside the image{hint}; expected "
                f"[x, y, width, height] within {image['width']}x{image['height']}")
    return None


def finite_number(value) -> bool:
    """A real, finite JSON number (not a bool, not NaN or infinity)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(bbox) -> str:
    return "[" + ", ".join(f"{float(v):g}" for v in bbox) + "]"


def _id_range(cat_to_label: dict) -> str:
    ids = sorted(cat_to_label)
    return f"{ids[0]}..{ids[-1]}" if ids else "none"


def boxes_problem(path: Path, images: int, annotations: int, boxes_per_image: list[int], unusable: int = 0
                  ) -> str | None:
    """The one line for a split without a single usable box, else None (and a warning giving the count of
    images without boxes when there are some: legitimate, they train as background).

    ``boxes_per_image``: the non-crowd boxes of positive size kept for each image; ``unusable``: how many
    annotations were bad (dropped or listed as problems)."""
    if not images:
        return f"{path}: 'images' is empty; expected the split's images and their boxes"
    empty = sum(count == 0 for count in boxes_per_image)
    if empty < images:
        if empty:
            log.warning("%s: %d of %d images have no boxes (kept: they train as background)", path, empty, images)
        return None
    if not annotations:
        reason = "'annotations' is empty"
    elif unusable:
        reason = (f"none of its {annotations} annotations is usable: {unusable} bad, the rest crowd regions or "
                  f"boxes of zero size")
    else:
        reason = f"its {annotations} annotations are all crowd regions or boxes of zero size"
    return (f"{path}: no boxes in the {images} images of this split ({reason}); expected at least one "
            f"non-crowd annotation with a box of positive size (a detector cannot train or be evaluated on "
            f"a split without objects)")
