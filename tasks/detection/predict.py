"""Detection predictions: boxes on image files, printed, drawn and written as a COCO results json."""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["predict_paths", "draw_detections", "predict"]


def predict_paths(task, paths: Sequence[str], out: str | None = None,
                  size: int | Sequence[int] | None = None, score_threshold: float = 0.3) -> list[dict]:
    """Detect on image files; print one line per image. With ``out``: each image drawn with its boxes
    scoring above ``score_threshold`` (``<out>/<name>``, PNG or JPEG as the input) and every detection
    in ``<out>/detections.json`` (COCO results format plus ``file_name``; ``image_id`` = position in
    ``paths``; ``category_id`` = the json's id when ``task.cat_ids`` is known, else the label)."""
    import json
    from pathlib import Path

    from torchvision.io import encode_jpeg, encode_png

    from tasks.data.images import read_rgb

    folder = Path(out) if out else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    names, cat_ids = task.class_names, task.cat_ids
    results, rows = [], []
    for index, path in enumerate(paths):
        image = read_rgb(path)
        detection = {k: v.cpu() for k, v in task.detect([image], size)[0].items()}
        keep = detection["scores"] > score_threshold
        shown = [f"{names[int(c)] if names else int(c)} {float(s):.2f}"
                 for c, s in zip(detection["labels"][keep], detection["scores"][keep])]
        line = f"{path}: {int(keep.sum())} detections above {score_threshold:g}"
        print(line + (": " + ", ".join(shown) if shown else ""))
        for box, score, label in zip(detection["boxes"].tolist(), detection["scores"].tolist(),
                                     detection["labels"].tolist()):
            rows.append({"image_id": index, "file_name": str(path), "score": round(score, 5),
                         "category_id": cat_ids[label] if cat_ids else label,
                         "bbox": [round(box[0], 2), round(box[1], 2), round(box[2] - box[0], 2),
                                  round(box[3] - box[1], 2)]})
        if folder is not None:
            drawn = draw_detections(image, detection, names, score_threshold)
            target = folder / Path(path).name
            if target.suffix.lower() in (".jpg", ".jpeg"):
                target.write_bytes(encode_jpeg(drawn, quality=92).numpy().tobytes())
            else:
                target = target.with_suffix(".png")
                target.write_bytes(encode_png(drawn).numpy().tobytes())
        results.append({"image": str(path), **detection})
    if folder is not None:
        (folder / "detections.json").write_text(json.dumps(rows))
        print(f"wrote {folder / 'detections.json'} and {len(paths)} drawn images")
    return results


def draw_detections(image: torch.Tensor, detection: dict[str, torch.Tensor], class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.0, width: int = 2) -> torch.Tensor:
    """``image`` (uint8 (3, H, W)) with the boxes scoring above ``score_threshold`` drawn, each labelled
    with its class name (or index) and score."""
    from torchvision.utils import draw_bounding_boxes

    keep = detection["scores"] > score_threshold
    boxes, scores, labels = (detection[k][keep].cpu() for k in ("boxes", "scores", "labels"))
    names = [f"{class_names[int(c)] if class_names else int(c)} {float(s):.2f}" for c, s in zip(labels, scores)]
    palette = [(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
               (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212)]
    colors = [palette[int(c) % len(palette)] for c in labels]
    if not len(boxes):
        return image.clone()
    return draw_bounding_boxes(image.cpu(), boxes, labels=names, colors=colors, width=width)


def predict(cfg, model, paths, out=None, score_threshold: float = 0.3, **_options) -> list[dict]:
    """Boxes, class names and scores drawn on each image (``out``), plus a COCO results json."""
    from tasks.config import resolve_image_size

    return predict_paths(model, paths, out, size=resolve_image_size(cfg), score_threshold=score_threshold)
