"""Detection predictions: boxes on image files, printed, drawn and written as a COCO results json.

Output files follow ``tasks.data.outputs``: each image is drawn as ``<out>/<stem>_boxes.<png|jpg>`` (a
name that is never the input's own, so ``--out`` equal to the input folder cannot replace a photo),
inputs sharing a stem are told apart by their folders, and nothing already in ``--out`` is written over
(a taken name gets ``-1``, ``-2``...; ``detections.json`` too: the printed summary names what was written).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["predict_paths", "draw_detections", "predict", "drawn_suffixes"]

PALETTE = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
           (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]


def drawn_suffixes(path: Path) -> list[str]:
    """The drawn image's ending for an input: ``_boxes.jpg`` for a JPEG input, else ``_boxes.png``."""
    return ["_boxes.jpg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "_boxes.png"]


def _score(value: float) -> str:
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def _image_line(path, detection: dict, keep: torch.Tensor, names, score_threshold: float) -> str:
    """``img.jpg: 2 detections above 0.3: cat 0.91, dog 0.45 (98 below it)``; with none shown, the
    hidden count, the best hidden score and the remedy."""
    shown = [f"{names[int(c)] if names else int(c)} {float(s):.2f}"
             for c, s in zip(detection["labels"][keep], detection["scores"][keep])]
    line = f"{path}: {int(keep.sum())} detections above {score_threshold:g}" + (": " + ", ".join(shown) if shown else "")
    hidden = int((~keep).sum())
    if hidden and shown:
        line += f" ({hidden} below it)"
    elif hidden:
        best = float(detection["scores"][~keep].max())
        line += f" ({hidden} below it, the best {_score(best)}; lower --score-threshold to see them)"
    return line


def predict_paths(task, paths: Sequence[str], out: str | None = None,
                  size: int | Sequence[int] | None = None, score_threshold: float = 0.3,
                  image_options: dict | None = None, slice_size: int | None = None,
                  slice_overlap: float = 0.2) -> list[dict]:
    """Detect on image files; print one line per image (with how many detections the threshold hid)
    and, when some were hidden, a total.

    With ``out``: each image drawn with its boxes scoring above ``score_threshold`` as
    ``<out>/<stem>_boxes.<png|jpg>`` (named by ``tasks.data.outputs``: never an input, never a file
    already there), and every detection in ``<out>/detections.json`` (``detections-1.json``... when that
    name is taken; never overwritten): COCO results format plus ``file_name`` (the input) and ``drawn``
    (the image written for it); ``image_id`` = position in ``paths``; ``category_id`` = the json's id
    when ``task.cat_ids`` is known, else the label. Returns per image ``image``, ``drawn`` (None without
    ``out``) and the detection tensors. ``slice_size``: sliced inference (``tasks.detection.slicing``: tiles of
    that many px sharing ``slice_overlap`` of the side, plus the whole image, merged by class-wise NMS).
    """
    import json

    from torchvision.io import encode_jpeg, encode_png

    from tasks.data.images import display_rgb, read_image
    from tasks.data.outputs import output_folder, plan_output_stems, renamed_note, unique_path, write_new

    folder = output_folder(out) if out else None
    targets: list[Path | None] = [None] * len(paths)
    if folder is not None:  # every name is chosen before anything is written
        stems = plan_output_stems(paths, folder, drawn_suffixes)
        targets = [folder / (stem + drawn_suffixes(Path(p))[0]) for p, stem in zip(paths, stems)]
        json_path = unique_path(folder / "detections.json", targets)
    names, cat_ids = task.class_names, task.cat_ids
    results, rows = [], []
    hidden_total, hidden_images, hidden_best, shown_total = 0, 0, 0.0, 0
    for index, (path, target) in enumerate(zip(paths, targets)):
        image = read_image(path, **(image_options or {}))  # the config's bands and bit depth
        if slice_size is not None:
            from .slicing import slice_detect

            found = slice_detect(task, image, slice_size, slice_overlap, size=size)
        else:
            found = task.detect([image], size)[0]
        detection = {k: v.cpu() for k, v in found.items()}
        keep = detection["scores"] > score_threshold
        print(_image_line(path, detection, keep, names, score_threshold))
        hidden = int((~keep).sum())
        shown_total += int(keep.sum())
        if hidden:
            hidden_total, hidden_images = hidden_total + hidden, hidden_images + 1
            hidden_best = max(hidden_best, float(detection["scores"][~keep].max()))
        for box, score, label in zip(detection["boxes"].tolist(), detection["scores"].tolist(),
                                     detection["labels"].tolist()):
            row = {"image_id": index, "file_name": str(path), "score": round(score, 5),
                   "category_id": cat_ids[label] if cat_ids else label,
                   "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2), round(box[3] - box[1], 2)]}
            if target is not None:
                row["drawn"] = str(target)
            rows.append(row)
        if target is not None:
            drawn = draw_detections(display_rgb(image), detection, names, score_threshold)
            encoded = encode_jpeg(drawn, quality=92) if target.suffix == ".jpg" else encode_png(drawn)
            write_new(target, encoded.numpy().tobytes())
        results.append({"image": str(path), "drawn": str(target) if target is not None else None, **detection})
    if hidden_total:
        remedy = "; lower --score-threshold to see them" if not shown_total else ""
        print(f"{hidden_total} detections on {hidden_images} of {len(paths)} images hidden by --score-threshold "
              f"{score_threshold:g} (the best of them {_score(hidden_best)}){remedy}")
    if folder is not None:
        write_new(json_path, json.dumps(rows).encode())
        print(f"wrote {json_path} and {len(paths)} drawn images (<name>_boxes.png|jpg) to {folder}")
        note = renamed_note(paths, stems, targets)
        if note:
            print(note)
    return results


def _label_colors(background: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light backgrounds, white on dark ones."""
    red, green, blue = background
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


def draw_detections(image: torch.Tensor, detection: dict[str, torch.Tensor], class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.0, width: int = 2) -> torch.Tensor:
    """``image`` (uint8 (3, H, W)) with the boxes scoring above ``score_threshold`` drawn, each labelled
    with its class name (or index) and score.

    Each label is text on a filled box of the box's colour, placed just above the box (inside it at the
    image's top edge) and shifted to lie wholly inside the image, which keeps its size. Drawn with PIL:
    torchvision's ``draw_bounding_boxes(fill_labels=True)`` fills a background too, but starts it at the
    box's corner, so a box near the right or bottom edge gets its label cut off. Default font.
    """
    import numpy as np
    from PIL import Image, ImageDraw, ImageFont
    from torchvision.utils import draw_bounding_boxes

    keep = detection["scores"] > score_threshold
    boxes, scores, labels = (detection[k][keep].cpu() for k in ("boxes", "scores", "labels"))
    if not len(boxes):
        return image.clone()
    texts = [f"{class_names[int(c)] if class_names else int(c)} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in labels]
    boxed = draw_bounding_boxes(image.cpu(), boxes, colors=colors, width=width)
    canvas = Image.fromarray(boxed.permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    img_w, img_h = canvas.size
    pad = 1
    for box, text, color in zip(boxes.tolist(), texts, colors):
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        label_w, label_h = right - left + 2 * pad, bottom - top + 2 * pad
        x0, y0 = int(box[0]), int(box[1]) - label_h
        if y0 < 0:  # no room above the box: inside its top edge
            y0 = int(box[1])
        x0 = max(0, min(x0, img_w - label_w))
        y0 = max(0, min(y0, img_h - label_h))
        draw.rectangle((x0, y0, x0 + label_w - 1, y0 + label_h - 1), fill=color)
        draw.text((x0 + pad - left, y0 + pad - top), text, fill=_label_colors(color), font=font)
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).contiguous()


def predict(cfg, model, paths, out=None, score_threshold: float = 0.3, slice: int | None = None,
            slice_overlap: float = 0.2, **_options) -> list[dict]:
    """Boxes, class names and scores drawn on each image (``out``), plus a COCO results json; see
    ``predict_paths`` for the file names (never an input's, never over an existing file). ``slice``: sliced
    inference on tiles of that many px (``slice_overlap`` of the side shared), see ``tasks.detection.slicing``."""
    from tasks.config import resolve_image_size

    from tasks.data.images import image_options

    return predict_paths(model, paths, out, size=resolve_image_size(cfg), score_threshold=score_threshold,
                         image_options=image_options(cfg), slice_size=slice, slice_overlap=slice_overlap)
