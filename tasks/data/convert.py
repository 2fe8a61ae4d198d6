"""Detection formats side by side: any split read into memory as a COCO dict, and conversion between them.

:func:`read_split` reads a split of ``coco``, ``voc`` or ``yolo`` data as :class:`SplitAnnotations` (a COCO
dict + its image folder): the one entry the datasets, the checkers and the evaluator's ground truth go
through, so every format is scored by pycocotools on the same terms. :func:`convert` (``effdense data
convert``) writes the splits of one format into a new folder in another (``coco``, ``yolo`` or ``voc``),
images copied, and never into a folder that holds anything. Ids: VOC and YOLO have neither image nor
category ids; converting from COCO writes them to ``effdense_ids.json`` beside the converted data, and
converting back restores them (file name -> image id, class name -> category id), so COCO -> YOLO ->
COCO gives the original ids, names and (to 1e-6 of the image size) boxes. YOLO has no ignore regions:
crowd boxes are left out of YOLO output (their count is reported); VOC keeps them as ``difficult``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from tasks.data.coco import (CocoDetection, SplitAnnotations, annotation_problem, boxes_problem, coco_paths,
                             image_problems, read_annotation_file)
from tasks.data.coco_check import validate_annotations
from tasks.data.errors import DataError
from tasks.data.images import image_options

log = logging.getLogger("effdense")

__all__ = ["FORMATS", "TARGETS", "IDS_FILE", "read_split", "read_configured", "known_class_names", "convert",
           "ConvertedDetection", "converted_dataset", "classes_line", "check_converted", "split_ground_truth",
           "synth_converted"]

FORMATS = ("coco", "voc", "yolo")
TARGETS = ("coco", "yolo", "voc")
IDS_FILE = "effdense_ids.json"


def read_split(fmt: str, root: str | Path, split: str, class_names: Sequence[str] | None = None,
               name_splits: Sequence[str] = ()) -> SplitAnnotations:
    """One split of ``fmt`` data under ``root`` in memory; bad records are left out and listed in
    ``.problems``. ``class_names``: voc / yolo classes in label order; ``name_splits``: the splits whose
    VOC object names make the classes when ``class_names`` is None."""
    if fmt == "voc":
        from tasks.data.voc import read_voc

        return read_voc(root, split, class_names, name_splits)
    if fmt == "yolo":
        from tasks.data.yolo import read_yolo

        return read_yolo(root, split, class_names)
    if fmt != "coco":
        raise DataError(f"detection format {fmt!r} is not known; expected one of: {', '.join(FORMATS)}")
    annotation_file, image_dir = coco_paths(root, split)
    data = read_annotation_file(annotation_file)
    images = {image["id"]: image for image in data["images"]}
    cat_ids = {c["id"] for c in data["categories"]}
    problems, kept = [], []
    for ann in data["annotations"]:
        problem = annotation_problem(annotation_file, ann, images.get(ann["image_id"]), cat_ids)
        (problems.append(problem) if problem else kept.append(ann))
    data["annotations"] = kept
    return SplitAnnotations(data, image_dir, annotation_file, {}, problems)


def read_configured(cfg, split: str) -> SplitAnnotations:
    """``read_split`` of a detection config's ``data`` (``format``, ``root``, ``class_names``, both splits)."""
    data = cfg.data
    return read_split(data.format, data.root, split, data.class_names, (data.train_split, data.val_split))


def split_ground_truth(fmt: str, root: str, split: str, class_names=None, name_splits=()) -> dict:
    """The COCO dict of a split (what the evaluator scores against); picklable through functools.partial."""
    return read_split(fmt, root, split, class_names, name_splits).to_coco()


def known_class_names(fmt: str, root: str | Path, class_names: Sequence[str] | None) -> list[str] | None:
    """The class names known without reading the annotations: ``data.class_names``, else a YOLO
    ``data.yaml``'s (None when neither is there)."""
    if class_names is not None:
        return list(class_names)
    if fmt == "yolo":
        from tasks.data.yolo import read_data_yaml

        return read_data_yaml(root)
    return None


def _names_from(cfg) -> str:
    if cfg.data.class_names is not None:
        return "data.class_names"
    if cfg.data.format == "yolo":
        return f"{Path(cfg.data.root) / 'data.yaml'} names"
    return f"the object names of the {cfg.data.train_split}/{cfg.data.val_split} XML files under {cfg.data.root}"


def classes_line(cfg, classes: Sequence[str]) -> str | None:
    if len(classes) == cfg.model.num_classes:
        return None
    shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
    return (f"model.num_classes={cfg.model.num_classes} but {_names_from(cfg)} give {len(classes)} classes "
            f"({shown}); set model.num_classes={len(classes)}")


class ConvertedDetection(CocoDetection):
    """A :class:`CocoDetection` over a split of another format (``annotations``); ``to_coco()`` is its dict."""

    def __init__(self, annotations: SplitAnnotations, split: str, transform=None, *, max_instances: int = 100,
                 on_bad_sample: str = "error", image_options: dict | None = None):
        problems = annotations.problems
        if problems and on_bad_sample == "error":
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise DataError(f"{problems[0]}{more}; data.on_bad_sample=skip leaves such records out")
        for problem in problems:
            log.warning("skipping %s (data.on_bad_sample=skip)", problem)
        self.annotations = annotations
        super().__init__(split=split, transform=transform, annotation_file=annotations.path,
                         image_dir=annotations.image_dir, max_instances=max_instances, on_bad_sample=on_bad_sample,
                         data=annotations.data, sources=annotations.sources, image_options=image_options)

    def to_coco(self) -> dict:
        return self.annotations.to_coco()


def converted_dataset(cfg, split: str, transform) -> ConvertedDetection:
    """The dataset of a voc / yolo config's ``split`` (the format table's rows)."""
    annotations = read_configured(cfg, split)
    problem = classes_line(cfg, annotations.classes)
    if problem:
        raise DataError(problem)
    return ConvertedDetection(annotations, split, transform, max_instances=cfg.data.max_instances,
                              on_bad_sample=cfg.data.on_bad_sample, image_options=image_options(cfg))


def check_converted(cfg, sample: int | None = None, workers: int = 4, progress: bool = False) -> list[str]:
    """Every problem of a voc / yolo config's two splits, one line each: the layout, each bad record, a class
    count other than ``model.num_classes``, a split without a box, images missing, unreadable or of
    another size than their record says (``sample=k``: an evenly spaced ``k`` decoded per split)."""
    from tasks.data.seg_common import evenly_spaced

    problems: list[str] = []
    for split in dict.fromkeys((cfg.data.train_split, cfg.data.val_split)):
        try:
            annotations = read_configured(cfg, split)
        except DataError as error:
            problems.append(str(error))
            continue
        problems += annotations.problems
        problems.append(classes_line(cfg, annotations.classes) or "")
        data = annotations.data
        boxes = {image["id"]: 0 for image in data["images"]}
        for ann in data["annotations"]:
            boxes[ann["image_id"]] += not ann["iscrowd"] and ann["bbox"][2] > 0 and ann["bbox"][3] > 0
        problems.append(boxes_problem(annotations.path, len(boxes), len(data["annotations"]), list(boxes.values()),
                                      len(annotations.problems)) or "")
        decoded = {id(record) for record in evenly_spaced(data["images"], sample)}
        problems += image_problems(annotations.path, annotations.image_dir, data["images"], True, workers, progress,
                                   decoded, annotations.sources, image_options=image_options(cfg))
    return [p for p in dict.fromkeys(problems) if p]


# ------------------------------------------------------------------------------------------ conversion

def _splits_of(fmt: str, root: Path) -> list[str]:
    if fmt == "coco":
        return sorted(p.name[len("instances_"):-len(".json")] for p in (root / "annotations").glob("instances_*.json"))
    if fmt == "voc":
        from tasks.data.voc import voc_splits

        return voc_splits(root)
    from tasks.data.yolo import yolo_splits

    return yolo_splits(root)


def _restore_ids(split: SplitAnnotations, ids: dict, name: str) -> None:
    """Give ``split`` the image and category ids an earlier conversion from COCO recorded (``ids``)."""
    data = split.data
    by_name = {c["name"]: int(c["id"]) for c in ids.get("categories", [])}
    if set(by_name) == {c["name"] for c in data["categories"]}:
        new = {c["id"]: by_name[c["name"]] for c in data["categories"]}
        for record in data["categories"]:
            record["id"] = new[record["id"]]
        data["categories"].sort(key=lambda c: c["id"])
        for ann in data["annotations"]:
            ann["category_id"] = new[ann["category_id"]]
    recorded = ids.get("images", {}).get(name, {})
    if recorded:
        top = max(recorded.values(), default=0)
        new = {}
        for image in data["images"]:
            if image["file_name"] not in recorded:
                top += 1
            new[image["id"]] = recorded.get(image["file_name"], top)
            image["id"] = new[image["id"]]
        for ann in data["annotations"]:
            ann["image_id"] = new[ann["image_id"]]
        split.sources = {new[key]: value for key, value in split.sources.items()}


def _write_coco(split: SplitAnnotations, destination: Path, name: str) -> int:
    (destination / "annotations").mkdir(parents=True, exist_ok=True)
    (destination / "annotations" / f"instances_{name}.json").write_text(json.dumps(split.to_coco()))
    for image in split.data["images"]:
        target = destination / name / image["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(split.image_dir / image["file_name"], target)
    return len(split.data["annotations"])


def convert(fmt: str, source: str | Path, to: str, destination: str | Path, splits: Sequence[str] | None = None,
            class_names: Sequence[str] | None = None) -> list[str]:
    """Write the ``splits`` (default: all found) of the ``fmt`` dataset at ``source`` as ``to`` into
    ``destination`` (new or empty: never written over); returns one summary line per split. A bad record
    refuses the whole conversion (one line naming the file) before anything is written."""
    source, destination = Path(source), Path(destination)
    if fmt not in FORMATS or to not in TARGETS:
        raise DataError(f"cannot convert {fmt!r} to {to!r}; expected a source format in {', '.join(FORMATS)} and a "
                        f"target in {', '.join(TARGETS)}")
    if destination.exists() and (not destination.is_dir() or any(destination.iterdir())):
        raise DataError(f"{destination}: exists and is not empty; expected a new or empty folder (convert never "
                        f"writes over existing data)")
    if not source.is_dir():
        raise DataError(f"{source}: dataset folder not found; expected a {fmt} dataset")
    splits = list(splits or _splits_of(fmt, source))
    if not splits:
        raise DataError(f"{source}: no {fmt} splits found; expected a {fmt} dataset (see `effdense data synth "
                        f"detection --format {fmt}`)")
    ids_file = source / IDS_FILE
    ids = json.loads(ids_file.read_text()) if fmt != "coco" and ids_file.is_file() else {}
    if fmt == "voc" and class_names is None:  # one class list for every split: all their object names
        from tasks.data.voc import voc_class_names

        class_names = voc_class_names(source, splits)
    read = {}
    for name in splits:
        split = read_split(fmt, source, name, class_names, splits)
        if split.problems:
            more = f" (and {len(split.problems) - 1} more)" if len(split.problems) > 1 else ""
            raise DataError(f"{split.problems[0]}{more}; nothing converted (`effdense data check` lists them all)")
        _restore_ids(split, ids, name)
        validate_annotations(split.data, split.path)
        read[name] = split
    categories = [[(c["id"], c["name"]) for c in sorted(s.data["categories"], key=lambda c: c["id"])]
                  for s in read.values()]
    if to != "coco" and any(c != categories[0] for c in categories):
        raise DataError(f"{source}: the splits {', '.join(splits)} have different categories; expected the same "
                        f"classes in every split ({to} has one class list)")
    destination.parent.mkdir(parents=True, exist_ok=True)  # staged beside it, then renamed into place
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", dir=destination.parent))
    try:
        lines = []
        for name, split in read.items():
            images = len(split.data["images"])
            if to == "coco":
                lines.append(f"{name}: {images} images, {_write_coco(split, staging, name)} boxes")
            elif to == "voc":
                from tasks.data.voc import write_voc

                lines.append(f"{name}: {images} images, {write_voc(split, staging, name)} boxes")
            else:
                from tasks.data.yolo import write_yolo

                boxes, crowd = write_yolo(split, staging, name)
                dropped = f" ({crowd} crowd boxes left out: YOLO has no ignore regions)" if crowd else ""
                lines.append(f"{name}: {images} images, {boxes} boxes{dropped}")
        first = next(iter(read.values())).data
        if to == "yolo":
            from tasks.data.yolo import write_data_yaml

            write_data_yaml(staging, [name for _, name in categories[0]], splits)
        if to != "coco":
            record = {"categories": [{"id": c["id"], "name": c["name"]} for c in first["categories"]],
                      "images": {name: {im["file_name"]: im["id"] for im in s.data["images"]}
                                 for name, s in read.items()}}
            (staging / IDS_FILE).write_text(json.dumps(record))
        if destination.exists():
            destination.rmdir()  # empty (checked above)
        os.replace(staging, destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return lines


def synth_converted(to: str, root: str | Path, seed: int = 0, **options) -> Path:
    """The synthetic COCO dataset (``tasks.data.synthetic.detection.write_coco``) converted to ``to`` in ``root``
    (empty, missing, or written by this function before)."""
    from tasks.data.synthetic.detection import MARKER, write_coco

    root = Path(root)
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise ValueError(f"refusing to write synthetic data into '{root}': the folder is not empty and was not "
                             f"written by effdense's synthetic writers (no {MARKER})")
        for entry in ("Annotations", "JPEGImages", "ImageSets", "images", "labels", "data.yaml", IDS_FILE, MARKER):
            path = root / entry
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        write_coco(Path(temporary) / "coco", seed=seed, **options)
        convert("coco", Path(temporary) / "coco", to, root)
    (root / MARKER).write_text(json.dumps(dict(kind=to, seed=seed, **options), sort_keys=True) + "\n")
    return root
