"""YOLO detection data (the ultralytics layout): label text files read into a COCO dict (:class:`SplitAnnotations`).

Layouts, the first that exists for the split wins:

1. ``<root>/images/<split>/**/*.jpg`` + ``<root>/labels/<split>/**/<same path>.txt`` (ultralytics);
2. ``<root>/<split>/images/`` + ``<root>/<split>/labels/`` (Roboflow's export).

A label line is ``class cx cy w h``: ``class`` a 0-based index, the four others the box centre and size
normalised by the image's width and height (each within 0..1); a line ``class x1 y1 x2 y2 x3 y3 ...`` (a
segment polygon, 3 points or more) gives the polygon's bounding box. An image without a label file, or
with an empty one, has no objects; blank lines are ignored; boxes are clipped to the image and those of
zero width or height dropped. Classes: ``class_names`` (``data.class_names``) in label order, else the
``names`` of ``<root>/data.yaml`` (a list, or a ``{index: name}`` mapping of the indices 0..K-1). Image
ids are 1..N in the sorted order of the images' paths, annotation ids 1..M, category id = class + 1.
"""

from __future__ import annotations

import logging
import math
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tasks.data.coco import SplitAnnotations
from tasks.data.images import header_size
from tasks.data.errors import DataError
from tasks.data.images import IMAGE_EXTENSIONS

log = logging.getLogger("effdense")

__all__ = ["LAYOUT", "yolo_dirs", "yolo_splits", "read_data_yaml", "yolo_class_names", "parse_label_file",
           "read_yolo", "write_yolo", "write_data_yaml"]

LAYOUT = ("<root>/images/<split>/*.jpg + <root>/labels/<split>/*.txt ('class cx cy w h' per line, normalised) "
          "+ <root>/data.yaml names (or <root>/<split>/images + <root>/<split>/labels)")


def yolo_dirs(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, label folder) of ``split``; a one-line :class:`DataError` when neither layout has it."""
    root = Path(root)
    for images, labels in ((root / "images" / split, root / "labels" / split),
                           (root / split / "images", root / split / "labels")):
        if images.is_dir():
            if not labels.is_dir():
                raise DataError(f"{labels}: label folder not found (for the images in {images}); expected YOLO "
                                f"layout {LAYOUT}")
            return images, labels
    raise DataError(f"{root}: no YOLO split '{split}' ({root / 'images' / split} not found, nor "
                    f"{root / split / 'images'}); expected YOLO layout {LAYOUT}")


def yolo_splits(root: str | Path) -> list[str]:
    """The splits under ``root``: the folders in ``images/``, else the folders holding ``images/``."""
    root = Path(root)
    if (root / "images").is_dir():
        return sorted(p.name for p in (root / "images").iterdir() if p.is_dir())
    return sorted(p.name for p in root.iterdir() if (p / "images").is_dir()) if root.is_dir() else []


def read_data_yaml(root: str | Path) -> list[str] | None:
    """The class names of ``<root>/data.yaml`` (None when there is no such file)."""
    import yaml

    path = Path(root) / "data.yaml"
    if not path.is_file():
        return None
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        line = getattr(getattr(error, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise DataError(f"{where}: cannot read the YAML ({str(error).splitlines()[0]}); expected a data.yaml "
                        f"with names") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict):
        keys = sorted(names, key=str)
        if sorted(k for k in names if isinstance(k, int)) != list(range(len(names))):
            raise DataError(f"{path}: names has the keys {', '.join(map(str, keys))}; expected the class indices "
                            f"0..{len(names) - 1}, each once")
        names = [names[index] for index in range(len(names))]
    if not isinstance(names, list) or not names or not all(isinstance(n, (str, int, float)) for n in names):
        raise DataError(f"{path}: 'names' is {names!r}; expected the class names, a list or {{index: name}}")
    names = [str(n) for n in names]
    count = data.get("nc")
    if count is not None and count != len(names):
        raise DataError(f"{path}: nc is {count} but names lists {len(names)} classes; expected them to agree")
    return names


def yolo_class_names(root: str | Path, class_names: Sequence[str] | None = None) -> tuple[list[str], str]:
    """(the class names, where they come from): ``class_names`` when given, else ``<root>/data.yaml``'s."""
    if class_names is not None:
        return list(class_names), "data.class_names"
    names = read_data_yaml(root)
    if names is None:
        raise DataError(f"{Path(root) / 'data.yaml'}: not found and data.class_names is not set; expected the "
                        f"class names in one of them (data.yaml: names: [name0, name1, ...])")
    return names, f"{Path(root) / 'data.yaml'} names"


def parse_label_file(path: Path, num_classes: int, names_from: str = "the class names"
                     ) -> tuple[list[tuple[int, float, float, float, float]], list[str]]:
    """([(class, cx, cy, w, h) normalised], one line per bad line, left out) of one label file."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        return [], [f"{path}: cannot read the label file ({error}); expected text lines 'class cx cy w h'"]
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{path}:{number}"
        if len(parts) != 5 and (len(parts) < 7 or len(parts) % 2 == 0):
            problems.append(f"{where}: {len(parts)} values '{line.strip()}'; expected 'class cx cy w h' (5 values) "
                            f"or a polygon 'class x1 y1 x2 y2 x3 y3 ...'")
            continue
        try:
            label, values = float(parts[0]), [float(v) for v in parts[1:]]
        except ValueError:
            problems.append(f"{where}: '{line.strip()}' holds something other than numbers; expected "
                            f"'class cx cy w h'")
            continue
        if not (label.is_integer() and 0 <= label < num_classes):
            problems.append(f"{where}: class {parts[0]} is not a class index; expected an integer 0..{num_classes - 1} "
                            f"({num_classes} classes in {names_from})")
            continue
        bad = next((v for v in values if not (math.isfinite(v) and 0.0 <= v <= 1.0)), None)
        if bad is not None:
            problems.append(f"{where}: value {bad:g} outside 0..1; expected coordinates normalised by the image's "
                            f"width and height")
            continue
        if len(values) == 4:
            rows.append((int(label), *values))
        else:
            xs, ys = values[0::2], values[1::2]
            rows.append((int(label), (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs),
                         max(ys) - min(ys)))
    return rows, problems


def _image_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file())


def read_yolo(root: str | Path, split: str, class_names: Sequence[str] | None = None,
              workers: int = 8) -> SplitAnnotations:
    """``split`` as a COCO dict (see the module doc); image sizes come from the image headers (``workers``
    threads read them)."""
    images_dir, labels_dir = yolo_dirs(root, split)
    names, names_from = yolo_class_names(root, class_names)
    files = _image_files(images_dir)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        sizes = list(pool.map(lambda name: header_size(images_dir / name), files))
    images, annotations, sources, problems = [], [], {}, []
    degenerate = 0
    for file_name, size in zip(files, sizes):
        label_file = labels_dir / Path(file_name).with_suffix(".txt")
        if size is None:
            problems.append(f"{images_dir / file_name} is not a readable image (its size cannot be read); "
                            f"expected an image for {label_file}")
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        sources[image_id] = label_file
        if not label_file.is_file():
            continue
        rows, bad = parse_label_file(label_file, len(names), names_from)
        problems += bad
        width, height = size
        for label, cx, cy, w, h in rows:
            x1, y1 = max(0.0, (cx - w / 2) * width), max(0.0, (cy - h / 2) * height)
            x2, y2 = min(float(width), (cx + w / 2) * width), min(float(height), (cy + h / 2) * height)
            if x2 <= x1 or y2 <= y1:
                degenerate += 1
                continue
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    if degenerate:
        log.info("%s: dropped %d boxes of zero width or height", labels_dir, degenerate)
    if labels_dir.is_dir():
        stems = {Path(f).with_suffix("").as_posix() for f in files}
        orphans = [p for p in labels_dir.rglob("*.txt") if p.relative_to(labels_dir).with_suffix("").as_posix()
                   not in stems]
        if orphans:
            log.warning("%s: %d label files have no image in %s (ignored), e.g. %s", labels_dir, len(orphans),
                        images_dir, orphans[0].name)
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    return SplitAnnotations(data, images_dir, labels_dir, sources, problems)


def write_yolo(split: SplitAnnotations, destination: str | Path, name: str) -> tuple[int, int]:
    """Write ``split`` as ``images/<name>/`` (images copied) + ``labels/<name>/*.txt`` under ``destination``;
    class = the category's index among the sorted category ids. YOLO has no ignore regions: crowd boxes are
    left out. Returns (boxes written, crowd boxes left out)."""
    destination = Path(destination)
    labels = {c["id"]: index for index, c in enumerate(sorted(split.data["categories"], key=lambda c: c["id"]))}
    per_image: dict = {}
    for ann in split.data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    written = crowd = 0
    for image in split.data["images"]:
        width, height = float(image["width"]), float(image["height"])
        lines = []
        for ann in per_image.get(image["id"], ()):
            if ann.get("iscrowd", 0):
                crowd += 1
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(width, x + w), min(height, y + h)
            if x2 <= x1 or y2 <= y1:
                continue
            lines.append(f"{labels[ann['category_id']]} {(x1 + x2) / 2 / width:.6f} {(y1 + y2) / 2 / height:.6f} "
                         f"{(x2 - x1) / width:.6f} {(y2 - y1) / height:.6f}\n")
        target = destination / "images" / name / image["file_name"]
        label_file = destination / "labels" / name / Path(image["file_name"]).with_suffix(".txt")
        for folder in (target.parent, label_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(split.image_dir / image["file_name"], target)
        label_file.write_text("".join(lines))
        written += len(lines)
    return written, crowd


def write_data_yaml(destination: str | Path, names: Sequence[str], splits: Sequence[str]) -> Path:
    """``<destination>/data.yaml``: a key per split (``images/<split>``), ``nc`` and ``names`` {index: name}."""
    import yaml

    content = {split: f"images/{split}" for split in splits}
    content.update(nc=len(names), names=dict(enumerate(names)))
    path = Path(destination) / "data.yaml"
    path.write_text(yaml.safe_dump(content, sort_keys=False, allow_unicode=True))
    return path
