"""Pascal VOC detection data: one XML file per image, read into a COCO dict (:class:`SplitAnnotations`).

Layouts, the first that exists for the split wins:

1. VOCdevkit (``<root>`` is e.g. ``VOCdevkit/VOC2012``): ``<root>/ImageSets/Main/<split>.txt`` lists the
   split's ids (one per line; only the first word is read), ``<root>/Annotations/<id>.xml`` holds the
   boxes and ``<root>/JPEGImages/`` the images.
2. Split folders: ``<root>/<split>/*.xml`` with the images beside them (ids: the XML names, sorted).

An image is the XML's ``<filename>`` in the image folder, else ``<id>`` with an image extension; its
size is the XML's ``<size>`` (else read from the image header). VOC corners are 1-based pixel indices,
both ends inclusive: the 0-based xyxy box is ``(xmin - 1, ymin - 1, xmax, ymax)`` (as detectron2 and
mmdetection read them; a box's width is ``xmax - xmin + 1``) and :func:`write_voc` adds the 1 back.
``<difficult>1</difficult>`` objects become ignore regions (``iscrowd`` = 1: not matched in training,
ignored by COCOeval, as COCO's crowd boxes). Classes: ``class_names`` in label order, else the sorted
names of every object in the splits read (for VOC's own 20 classes the usual order, aeroplane ..
tvmonitor). Image ids are 1..N in listing order, annotation ids 1..M, category id = label + 1.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from xml.parsers import expat
from xml.sax.saxutils import escape

from tasks.data.coco import SplitAnnotations
from tasks.data.images import header_size
from tasks.data.errors import DataError
from tasks.data.images import IMAGE_EXTENSIONS

__all__ = ["LAYOUT", "voc_split_files", "parse_voc_xml", "read_voc", "voc_class_names", "write_voc", "voc_splits"]

LAYOUT = ("<root>/ImageSets/Main/<split>.txt + <root>/Annotations/<id>.xml + <root>/JPEGImages/<id>.jpg "
          "(or <root>/<split>/*.xml beside the images)")
CORNERS = ("xmin", "ymin", "xmax", "ymax")


@dataclass
class _Node:
    tag: str
    line: int
    children: list = field(default_factory=list)
    parts: list = field(default_factory=list)

    def find(self, tag: str):
        return next((c for c in self.children if c.tag == tag), None)

    def text(self, tag: str) -> str | None:
        node = self.find(tag)
        return "".join(node.parts).strip() if node is not None else None


@dataclass
class VocObject:
    name: str
    line: int
    difficult: bool
    box: tuple[float, float, float, float]  # 0-based xyxy


@dataclass
class VocRecord:
    xml: Path
    filename: str | None
    size: tuple[int, int] | None  # (width, height) from <size>, None when absent or zero
    objects: list[VocObject]


def _parse_tree(path: Path) -> _Node:
    """The XML as nodes that know their line; one-line :class:`DataError` when it is not well formed."""
    parser = expat.ParserCreate()
    stack: list[_Node] = []
    top: list[_Node] = []

    def start(tag, _attrs):
        node = _Node(tag, parser.CurrentLineNumber)
        (stack[-1].children if stack else top).append(node)
        stack.append(node)

    parser.StartElementHandler = start
    parser.EndElementHandler = lambda _tag: stack.pop()
    parser.CharacterDataHandler = lambda data: stack[-1].parts.append(data) if stack else None
    try:
        parser.Parse(path.read_bytes(), True)
    except expat.ExpatError as error:
        raise DataError(f"{path}: not valid XML (line {error.lineno} column {error.offset + 1}: "
                        f"{expat.ErrorString(error.code)}); expected a Pascal VOC annotation") from None
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error}); expected a Pascal VOC "
                        f"annotation") from None
    return top[0]


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def parse_voc_xml(path: str | Path) -> tuple[VocRecord | None, list[str]]:
    """(the record, one line per bad object, left out of it); (None, [the line]) when the file is unusable."""
    path = Path(path)
    try:
        root = _parse_tree(path)
    except DataError as error:
        return None, [str(error)]
    if root.tag != "annotation":
        return None, [f"{path}:{root.line}: root element <{root.tag}>, expected <annotation> (Pascal VOC)"]
    size_node, size = root.find("size"), None
    if size_node is not None:
        width, height = _number(size_node.text("width")), _number(size_node.text("height"))
        if width and height and width > 0 and height > 0:
            size = (int(width), int(height))
    objects, problems = [], []
    for node in (c for c in root.children if c.tag == "object"):
        name, where = node.text("name"), f"{path}:{node.line}"
        if not name:
            problems.append(f"{where}: <object> without a <name>; expected the class name")
            continue
        box = node.find("bndbox")
        values = [_number(box.text(k)) if box is not None else None for k in CORNERS]
        if None in values:
            missing = [k for k, v in zip(CORNERS, values) if v is None]
            problems.append(f"{where}: object '{name}' has no number in <bndbox> {', '.join(missing)}; expected "
                            f"<bndbox> with numeric xmin, ymin, xmax, ymax")
            continue
        xmin, ymin, xmax, ymax = values
        if xmax < xmin or ymax < ymin:
            problems.append(f"{where}: object '{name}' has xmin {xmin:g} ymin {ymin:g} xmax {xmax:g} ymax {ymax:g}; "
                            f"expected xmin <= xmax and ymin <= ymax (1-based pixel corners)")
            continue
        if size is not None:
            outside = max(1 - xmin, 1 - ymin, xmax - size[0], ymax - size[1])
            if outside > max(2.0, 0.01 * max(size)):
                problems.append(f"{where}: object '{name}' box ({xmin:g}, {ymin:g}, {xmax:g}, {ymax:g}) extends "
                                f"{outside:g} px outside the {size[0]}x{size[1]} image; expected corners within "
                                f"1..{size[0]}, 1..{size[1]}")
                continue
        difficult = _number(node.text("difficult"))
        objects.append(VocObject(name, node.line, bool(difficult), (xmin - 1, ymin - 1, xmax, ymax)))
    return VocRecord(path, root.text("filename"), size, objects), problems


def voc_split_files(root: str | Path, split: str) -> tuple[list[tuple[str, Path]], Path, Path, list[str]]:
    """([(id, XML path)], image folder, what names the split, problems) for ``split`` under ``root``; a
    one-line :class:`DataError` when neither layout has the split."""
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if listing.is_file():
        for folder in (root / "Annotations", root / "JPEGImages"):
            if not folder.is_dir():
                raise DataError(f"{folder}: folder not found (for {listing}); expected VOC layout {LAYOUT}")
        ids, problems, seen = [], [], set()
        for number, line in enumerate(listing.read_text(errors="replace").splitlines(), 1):
            words = line.split()
            if not words:
                continue
            if words[0] in seen:
                problems.append(f"{listing}:{number}: id '{words[0]}' is listed twice; expected each id once")
                continue
            seen.add(words[0])
            ids.append((words[0], root / "Annotations" / f"{words[0]}.xml"))
        return ids, root / "JPEGImages", listing, problems
    folder = root / split
    if folder.is_dir() and any(folder.glob("*.xml")):
        return [(p.stem, p) for p in sorted(folder.glob("*.xml"))], folder, folder, []
    hint = ""
    nested = sorted(p.name for p in root.glob("VOC*") if (p / "Annotations").is_dir()) if root.is_dir() else []
    if nested:
        hint = f" ({root} holds {', '.join(nested)}: set data.root to one of them)"
    raise DataError(f"{root}: no Pascal VOC split '{split}' ({listing} not found, nor XML files in {folder}){hint}; "
                    f"expected VOC layout {LAYOUT}")


def voc_splits(root: str | Path) -> list[str]:
    """The splits under ``root``: ImageSets/Main's ``<split>.txt`` (not the per-class ``<class>_<split>.txt``),
    else the sub-folders holding XML files."""
    root = Path(root)
    main = root / "ImageSets" / "Main"
    if main.is_dir():
        stems = {p.stem for p in main.glob("*.txt")}
        return sorted(s for s in stems if not any(s.endswith("_" + other) for other in stems))
    return sorted(p.name for p in root.iterdir() if p.is_dir() and any(p.glob("*.xml"))) if root.is_dir() else []


def _image_name(image_dir: Path, ident: str, record: VocRecord) -> str:
    if record.filename and (image_dir / record.filename).is_file():
        return record.filename
    for extension in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        if (image_dir / f"{ident}{extension}").is_file():
            return f"{ident}{extension}"
    return record.filename or f"{ident}.jpg"


def _read_records(root, split):
    ids, image_dir, where, problems = voc_split_files(root, split)
    records = []
    for ident, xml in ids:
        if not xml.is_file():
            problems.append(f"{xml}: annotation not found (id '{ident}' is listed in {where}); expected "
                            f"an XML file per listed id")
            continue
        record, bad = parse_voc_xml(xml)
        problems += bad
        if record is not None:
            records.append((ident, record))
    return records, image_dir, where, problems


def voc_class_names(root: str | Path, splits: Sequence[str]) -> list[str]:
    """The sorted object names of ``splits`` (the class names when ``data.class_names`` is not given)."""
    names = set()
    for split in dict.fromkeys(splits):
        records, *_ = _read_records(root, split)
        names.update(o.name for _, record in records for o in record.objects)
    return sorted(names)


def read_voc(root: str | Path, split: str, class_names: Sequence[str] | None = None,
             name_splits: Sequence[str] = ()) -> SplitAnnotations:
    """``split`` as a COCO dict (see the module doc). Without ``class_names`` the classes are the sorted
    object names of ``split`` and ``name_splits`` (give both training splits so they agree)."""
    records, image_dir, where, problems = _read_records(root, split)
    if class_names is None:
        others = voc_class_names(root, [s for s in name_splits if s != split])
        names = sorted({o.name for _, r in records for o in r.objects} | set(others))
        given = False
    else:
        names, given = list(class_names), True
    labels = {name: index for index, name in enumerate(names)}
    images, annotations, sources = [], [], {}
    for ident, record in records:
        file_name = _image_name(image_dir, ident, record)
        size = record.size or header_size(image_dir / file_name)
        if size is None:
            problems.append(f"{record.xml}: no <size> and the image '{image_dir / file_name}' cannot be read for "
                            f"it; expected <size><width>..</width><height>..</height></size> or the image")
            continue
        image_id = len(images) + 1
        images.append({"id": image_id, "file_name": file_name, "width": size[0], "height": size[1]})
        sources[image_id] = record.xml
        for obj in record.objects:
            if obj.name not in labels:
                source = "data.class_names" if given else "the classes"
                problems.append(f"{record.xml}:{obj.line}: object name '{obj.name}' is not in {source} "
                                f"({', '.join(names)}); expected one of them")
                continue
            x1, y1, x2, y2 = (max(0.0, obj.box[0]), max(0.0, obj.box[1]), min(float(size[0]), obj.box[2]),
                              min(float(size[1]), obj.box[3]))
            w, h = max(0.0, x2 - x1), max(0.0, y2 - y1)
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": labels[obj.name] + 1,
                                "bbox": [x1, y1, w, h], "area": w * h, "iscrowd": int(obj.difficult)})
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    data = {"images": images, "annotations": annotations, "categories": categories}
    return SplitAnnotations(data, image_dir, where, sources, problems)


def _fmt(value: float) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")


def write_voc(split: SplitAnnotations, destination: str | Path, name: str) -> int:
    """Write ``split`` into the VOCdevkit layout under ``destination`` (``ImageSets/Main/<name>.txt``,
    ``Annotations/``, ``JPEGImages/``, images copied); crowd boxes become ``difficult`` objects. Returns the
    number of boxes written."""
    destination = Path(destination)
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (destination / folder).mkdir(parents=True, exist_ok=True)
    names = {c["id"]: c["name"] for c in split.data["categories"]}
    per_image: dict = {}
    for ann in split.data["annotations"]:
        per_image.setdefault(ann["image_id"], []).append(ann)
    ids = []
    for image in split.data["images"]:
        ident = Path(image["file_name"]).with_suffix("").as_posix()
        xml = destination / "Annotations" / f"{ident}.xml"
        objects = []
        for ann in per_image.get(image["id"], ()):
            x, y, w, h = (float(v) for v in ann["bbox"])
            corners = "".join(f"<{k}>{_fmt(v)}</{k}>" for k, v in zip(CORNERS, (x + 1, y + 1, x + w, y + h)))
            objects.append(f"  <object>\n    <name>{escape(names[ann['category_id']])}</name>\n"
                           f"    <pose>Unspecified</pose>\n    <truncated>0</truncated>\n"
                           f"    <difficult>{int(bool(ann.get('iscrowd', 0)))}</difficult>\n"
                           f"    <bndbox>{corners}</bndbox>\n  </object>\n")
        text = (f"<annotation>\n  <folder>JPEGImages</folder>\n  <filename>{escape(image['file_name'])}</filename>\n"
                f"  <size><width>{image['width']}</width><height>{image['height']}</height><depth>3</depth></size>\n"
                f"  <segmented>0</segmented>\n{''.join(objects)}</annotation>\n")
        ids.append(ident)
        if xml.exists():  # VOC's ids are shared by the splits: the same image may be in two (train, trainval)
            if xml.read_text() != text:
                raise DataError(f"{xml}: two different images have the VOC id '{ident}' (file "
                                f"'{image['file_name']}' of split '{name}'); expected unique file names")
            continue
        xml.parent.mkdir(parents=True, exist_ok=True)
        xml.write_text(text)
        target = destination / "JPEGImages" / image["file_name"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(split.image_dir / image["file_name"], target)
    (destination / "ImageSets" / "Main" / f"{name}.txt").write_text("".join(f"{i}\n" for i in ids))
    return len(split.data["annotations"])
