"""COCO box evaluation with pycocotools, over every rank's detections.

``CocoEvaluator.update(detections, targets)`` maps each image's boxes back to the original image
(the target's ``scale``/``offset``/``orig_size``), converts labels to the json's category ids and keeps
compact rows ``[image_id, x, y, w, h, score, category_id]``. ``compute()`` gathers the rows (and the
ids of every image seen, detections or not) to rank 0 with ``gather_object``, runs
``COCOeval(gt, dt, "bbox")`` on exactly those rows, and broadcasts the 12 stats so every rank returns
the same dict (or raises the same one-line ``DataError`` when nothing can be scored: no image, or no
ground-truth box, where COCOeval would give a row of -1). ``save(dir)`` then writes ``detections.json``
(COCO results format) and ``coco_eval.json``.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tasks.data.coco import build_coco, category_maps, read_annotation_file
from tasks.data.coco_check import validate_annotations
from tasks.data.errors import DataError
from tasks.data.transforms.detection import unletterbox_boxes
from tasks.engine.distributed import broadcast_object, gather_objects

from .postprocess import PostProcess

log = logging.getLogger("effdense")

STAT_NAMES = ("mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large",
              "AR1", "AR10", "AR100", "AR_small", "AR_medium", "AR_large")
DETECTIONS_FILE = "detections.json"


@dataclass
class GroundTruth:
    """A split's annotation file loaded for evaluation: the pycocotools index and the label -> id map."""

    path: str
    coco: object  # pycocotools.coco.COCO
    cat_ids: list[int]
    label_map: str = "contiguous"


def load_ground_truth(path: str | os.PathLike | dict, label_map: str = "contiguous", name: str | None = None
                      ) -> GroundTruth:
    """Read ``path`` (one-line errors as the dataset's, duplicate annotation ids included: pycocotools would
    index only one of each and score perfect detections below 1) and fill the optional fields COCOeval needs
    (``area`` = w * h, ``iscrowd`` = 0) where a custom json omits them. ``label_map``: how the model's
    labels map to the json's category ids (``data.label_map``; see ``tasks.data.coco.category_maps``).

    ``path`` may also be a COCO dict in memory (another format converted, e.g. ``SplitAnnotations.to_coco()``
    of a VOC or YOLO split): checked by the same rules, then a copy is indexed; ``name`` names it in messages."""
    if isinstance(path, dict):
        source = name or "the in-memory annotations"
        data, path = validate_annotations(copy.deepcopy(path), source), source
    else:
        data = read_annotation_file(path)
    for ann in data["annotations"]:
        ann.setdefault("iscrowd", 0)
        if "area" not in ann:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    cat_ids, _, _ = category_maps(data["categories"], label_map, path)
    return GroundTruth(str(path), build_coco(data), cat_ids, label_map)


class CocoEvaluator:
    """The 12 COCO box stats (``mAP`` .. ``AR_large``) of a whole split; see the module doc."""

    primary_metric = "mAP"
    higher_is_better = True

    def __init__(self, ground_truth: GroundTruth | str | os.PathLike | dict, post: PostProcess | None = None):
        self.gt = ground_truth if isinstance(ground_truth, GroundTruth) else load_ground_truth(ground_truth)
        self.post = post
        # The last compute() on rank 0 (what save() writes): the detection rows, the stats, the image count.
        self._last_rows: np.ndarray | None = None
        self._last_stats: dict[str, float] | None = None
        self._last_images = 0
        self.reset()

    def reset(self) -> None:
        self._rows: list[np.ndarray] = []
        self._seen: list[int] = []

    def describe(self) -> dict:
        """What produced the detections (NMS settings), recorded next to every mAP."""
        return self.post.describe() if self.post is not None else {}

    def update(self, detections: list[dict[str, torch.Tensor]], targets: list[dict]) -> None:
        """One batch: ``detections`` in input pixels (the model's eval output), ``targets`` the batch's
        target dicts (``image_id``, ``orig_size``, ``scale``, ``offset``)."""
        cat_ids = np.asarray(self.gt.cat_ids, dtype=np.float64)
        for detection, target in zip(detections, targets):
            image_id = int(target["image_id"])
            self._seen.append(image_id)
            boxes = detection["boxes"].detach().float().cpu()
            if not len(boxes):
                continue
            if "scale" in target:
                boxes = unletterbox_boxes(boxes, target)
            boxes = boxes.numpy().astype(np.float64)
            scores = detection["scores"].detach().float().cpu().numpy().astype(np.float64)
            labels = detection["labels"].detach().cpu().numpy().astype(np.int64)
            rows = np.empty((len(boxes), 7), dtype=np.float64)
            rows[:, 0] = image_id
            rows[:, 1:3] = boxes[:, :2]
            rows[:, 3:5] = boxes[:, 2:] - boxes[:, :2]
            rows[:, 5] = scores
            rows[:, 6] = cat_ids[labels]
            # What detections.json holds (boxes to 0.01 px, scores to 1e-5) is exactly what is evaluated.
            rows[:, 1:5] = rows[:, 1:5].round(2)
            rows[:, 5] = rows[:, 5].round(5)
            self._rows.append(rows)

    def compute(self) -> dict[str, float]:
        rows = np.concatenate(self._rows) if self._rows else np.zeros((0, 7))
        seen = sorted(set(self._seen))
        gathered = gather_objects((rows, seen))  # [(rows, seen)] in one process
        result = None
        if gathered is not None:  # the main process evaluates
            rows = np.concatenate([r for r, _ in gathered])
            seen = sorted({i for _, ids in gathered for i in ids})
            result = self._evaluate_or_error(rows, seen)
        result = broadcast_object(result)  # every rank returns (or raises) the same
        if isinstance(result, str):
            raise DataError(result)
        return result

    def _evaluate_or_error(self, rows: np.ndarray, seen: list[int]) -> dict[str, float] | str:
        """The stats, or the one line saying why there are none (no images, no ground-truth box: COCOeval
        would return a row of -1)."""
        if not seen:
            return (f"{self.gt.path}: no images were evaluated (empty validation split?); expected the images "
                    f"of data.val_split in the loader")
        index = self.gt.coco.imgToAnns
        if not any(not ann.get("iscrowd", 0) for image_id in seen for ann in index.get(image_id, ())):
            if not any(not ann.get("iscrowd", 0) for ann in self.gt.coco.dataset["annotations"]):
                why = "the file has no non-crowd annotation"
            else:
                why = f"none of the {len(seen)} evaluated images has one (a json of another split?)"
            return (f"{self.gt.path}: no ground-truth boxes to evaluate against ({why}), so every COCO stat would "
                    f"be -1; expected a validation json with annotated objects for the evaluated images "
                    f"(`effdense data check` lists the problems)")
        return self._evaluate(rows, seen)

    def _evaluate(self, rows: np.ndarray, seen: list[int]) -> dict[str, float]:
        self._last_rows, self._last_images = rows, len(seen)
        if not len(rows):
            log.warning("no detections on the %d evaluated images: every COCO stat is 0", len(seen))
            self._last_stats = {name: 0.0 for name in STAT_NAMES}
            return dict(self._last_stats)
        from pycocotools.cocoeval import COCOeval

        with contextlib.redirect_stdout(io.StringIO()):
            results = self.gt.coco.loadRes(rows)
            evaluation = COCOeval(self.gt.coco, results, "bbox")
            evaluation.params.imgIds = seen
            evaluation.evaluate()
            evaluation.accumulate()
            evaluation.summarize()
        self._last_stats = {name: float(value) for name, value in zip(STAT_NAMES, evaluation.stats)}
        return dict(self._last_stats)

    def save(self, directory: str | os.PathLike) -> None:
        """``detections.json`` (COCO results: original image and category ids) and ``coco_eval.json`` (the
        12 stats with the NMS that produced them) of the last ``compute()``, into ``directory`` (rank 0)."""
        if self._last_rows is None:  # other ranks: rank 0 holds the gathered detections
            return
        folder = Path(directory)
        self.write(self._last_rows, folder / DETECTIONS_FILE)
        (folder / "coco_eval.json").write_text(json.dumps({"stats": self._last_stats, "postprocess": self.describe(),
                                                           "images": self._last_images}, indent=1))

    @staticmethod
    def write(rows: np.ndarray, path: str | os.PathLike) -> Path:
        """Write ``rows`` as COCO results json (``image_id``, ``category_id``, ``bbox`` xywh, ``score``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        results = [{"image_id": int(r[0]), "category_id": int(r[6]), "bbox": [float(v) for v in r[1:5]],
                    "score": float(r[5])} for r in rows]
        temporary = path.with_name(path.name + ".tmp")
        with open(temporary, "w") as f:
            json.dump(results, f)
        os.replace(temporary, path)
        return path
