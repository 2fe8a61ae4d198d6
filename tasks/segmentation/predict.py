"""Segmentation predictions as files: per image at its original resolution, flat in one folder.

``<name>_trainIds.png`` (class indices, 8-bit; 16-bit above 255 classes), ``<name>_overlay.png`` (the
image blended with the class colours) and, given a train-id -> label-id table (Cityscapes:
``tasks.data.cityscapes.TRAIN_TO_LABEL_ID``), ``<name>_labelIds.png`` -- what cityscapesScripts'
evaluator reads, matched to the ground truth by the ``city_seq_frame`` stem.

``<name>`` follows ``tasks.data.outputs``: the input's stem (the ``city_seq_frame`` part for Cityscapes),
inputs sharing it told apart by their folders (``a_img``, ``b_img``), and ``-1``, ``-2``... appended when
a planned file already exists in ``out`` -- an input or an earlier run's file is never written over.

Binary and multilabel mode (``model.segmentation.mode``) write, per class, the probability map
``<name>_prob.png`` (binary) / ``<name>_<class>_prob.png`` (multilabel: the class's name, as in the
per-class input masks) as a 16-bit PNG holding ``round(p * 65535)`` (``p = png / 65535``), and the mask
thresholded at ``data.eval.threshold`` (``sigmoid > threshold``) ``<name>_mask.png`` /
``<name>_<class>_mask.png`` (8-bit, 0/1: the input mask format), plus one ``<name>_overlay.png`` (each
pixel tinted with the mean colour of its classes).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.data.images import display_rgb, read_image
from tasks.data.outputs import output_folder, plan_output_stems, renamed_note, unique_path, write_new

from .evaluate import labels_at_original, logits_at_original

__all__ = ["prediction_name", "default_palette", "predict_labels", "predict_probabilities", "output_suffixes",
           "write_prediction", "write_probabilities", "predict_paths", "predict"]

_CITYSCAPES_IMAGE = "_leftImg8bit"


def prediction_name(path: str | Path) -> str:
    """The output stem for an input image: ``aachen_000000_000019`` for a Cityscapes image, else its stem."""
    stem = Path(path).stem
    return stem[: -len(_CITYSCAPES_IMAGE)] if stem.endswith(_CITYSCAPES_IMAGE) else stem


def default_palette(num_classes: int, seed: int = 0) -> list[tuple[int, int, int]]:
    """Distinct-enough colours for ``num_classes`` classes (fixed by ``seed``)."""
    g = torch.Generator().manual_seed(seed)
    return [tuple(int(c) for c in row) for row in torch.randint(40, 256, (num_classes, 3), generator=g).tolist()]


@torch.no_grad()
def predict_labels(task, image: torch.Tensor, transform: Callable | None = None) -> torch.Tensor:
    """uint8 (3, H, W) -> int64 (H, W) labels at the image's own resolution.

    ``transform(image, target)``: the eval transform (``tasks.data.seg_transforms``); a resize is undone
    on the logits, never on labels.
    """
    task.eval()
    device = task.pixel_mean.device
    height, width = image.shape[-2:]
    if transform is not None:
        image, _ = transform(image, {"mask": torch.zeros(height, width, dtype=torch.int64), "image_id": "",
                                     "orig_size": (height, width)})
    logits = task(image.unsqueeze(0).to(device))[0]
    return labels_at_original(logits, None, (height, width)).cpu()


@torch.no_grad()
def predict_probabilities(task, image: torch.Tensor, transform: Callable | None = None) -> torch.Tensor:
    """Binary / multilabel: uint8 (3, H, W) -> float sigmoid probabilities (C, H, W) at the image's resolution
    (the logits resized, then the sigmoid)."""
    task.eval()
    height, width = image.shape[-2:]
    if transform is not None:
        image, _ = transform(image, {"mask": torch.zeros(height, width, dtype=torch.int64), "image_id": "",
                                     "orig_size": (height, width)})
    logits = task(image.unsqueeze(0).to(task.pixel_mean.device))[0]
    return logits_at_original(logits, None, (height, width)).float().sigmoid().cpu()


def _class_parts(mode: str, class_names: Sequence[str]) -> list[str]:
    """The per-class part of the sigmoid modes' file names: "" (binary) or ``_<class>`` (multilabel)."""
    if mode == "binary":
        return [""]
    return ["_" + str(name).replace("/", "_").replace("\\", "_") for name in class_names]


def _save_png(array: np.ndarray, path: Path, exclusive: bool) -> None:
    if not exclusive:
        Image.fromarray(array).save(path)
        return
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    write_new(path, buffer.getvalue())


def output_suffixes(label_ids: torch.Tensor | None = None, mode: str = "multiclass",
                    class_names: Sequence[str] = ()) -> list[str]:
    """The endings of the files ``write_prediction`` (``write_probabilities`` in the sigmoid modes) writes per
    image (with the image and colours)."""
    if mode != "multiclass":
        parts = _class_parts(mode, class_names)
        return [*(f"{p}_prob.png" for p in parts), *(f"{p}_mask.png" for p in parts), "_overlay.png"]
    return ["_trainIds.png", "_overlay.png", *(["_labelIds.png"] if label_ids is not None else [])]


def write_probabilities(out_dir: str | Path, name: str, probabilities: torch.Tensor, threshold: float = 0.5,
                        mode: str = "binary", class_names: Sequence[str] = ("foreground",),
                        image: torch.Tensor | None = None, colors: Sequence[Sequence[int]] | None = None,
                        alpha: float = 0.5, exclusive: bool = False) -> dict[str, Path]:
    """Binary / multilabel: the PNGs for one prediction (see the module docstring) from sigmoid
    ``probabilities`` (C, H, W); returns ``{kind: path}`` (``prob/<class>``, ``mask/<class>``, ``overlay``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probabilities = probabilities.cpu().float()
    masks = probabilities > threshold
    paths = {}
    for k, part in enumerate(_class_parts(mode, class_names)):
        key = str(class_names[k])
        paths[f"prob/{key}"] = out / f"{name}{part}_prob.png"
        _save_png((probabilities[k] * 65535).round().clamp(0, 65535).numpy().astype(np.uint16), paths[f"prob/{key}"],
                  exclusive)
        paths[f"mask/{key}"] = out / f"{name}{part}_mask.png"
        _save_png(masks[k].numpy().astype(np.uint8), paths[f"mask/{key}"], exclusive)
    if image is not None:
        palette = torch.tensor(colors if colors is not None else default_palette(len(masks)), dtype=torch.float32)
        on = masks.float()
        count = on.sum(0, keepdim=True)
        colour = torch.einsum("chw,cd->dhw", on, palette[: len(masks)]) / count.clamp(min=1)
        blended = torch.where(count > 0, (1 - alpha) * image.cpu().float() + alpha * colour, image.cpu().float())
        paths["overlay"] = out / f"{name}_overlay.png"
        _save_png(blended.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy(), paths["overlay"], exclusive)
    return paths


def write_prediction(out_dir: str | Path, name: str, labels: torch.Tensor, image: torch.Tensor | None = None,
                     colors: Sequence[Sequence[int]] | None = None, label_ids: torch.Tensor | None = None,
                     alpha: float = 0.5, exclusive: bool = False) -> dict[str, Path]:
    """Write the PNGs for one prediction (see the module docstring); returns ``{kind: path}``.
    ``exclusive``: a file that already exists is refused (``tasks.data.outputs.OutputError``), not replaced."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    array = labels.cpu().numpy()
    paths = {"train_ids": out / f"{name}_trainIds.png"}
    _save_png(array.astype(np.uint16 if array.max(initial=0) > 255 else np.uint8), paths["train_ids"], exclusive)
    if label_ids is not None:
        paths["label_ids"] = out / f"{name}_labelIds.png"
        _save_png(label_ids[labels.cpu()].numpy().astype(np.uint8), paths["label_ids"], exclusive)
    if image is not None:
        palette = torch.tensor(colors if colors is not None else default_palette(int(array.max(initial=0)) + 1),
                               dtype=torch.float32)
        colour = palette[labels.cpu().clamp(0, len(palette) - 1)].permute(2, 0, 1)
        blended = (1 - alpha) * image.cpu().float() + alpha * colour
        paths["overlay"] = out / f"{name}_overlay.png"
        _save_png(blended.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy(), paths["overlay"], exclusive)
    return paths


def predict_paths(task, paths: Sequence[str | Path], out: str | Path | None = None, transform: Callable | None = None,
                  colors: Sequence[Sequence[int]] | None = None, label_ids: torch.Tensor | None = None,
                  class_names: Sequence[str] | None = None, image_options: dict | None = None) -> list[dict]:
    """Predict each image file; with ``out``, write its PNGs there under names chosen before anything is
    written (``tasks.data.outputs``: never an input, never an existing file). Returns per-image
    summaries (``image``, ``files``: ``{kind: path written}``, ``classes``: fraction of pixels per
    predicted class name; binary / multilabel: per class, the fraction above ``task.threshold``).
    ``image_options``: how to read the files (``tasks.data.images.image_options(cfg)``: bands, 16-bit scaling);
    overlays show other depths stretched to 8 bits."""
    mode = getattr(task, "mode", "multiclass")
    if mode != "multiclass":
        class_names = list(class_names or task.class_names or [str(i) for i in range(task.num_classes)])
    stems: list[str | None] = [None] * len(paths)
    if out is not None:
        out = output_folder(out)
        stems = plan_output_stems(paths, out, output_suffixes(label_ids, mode, class_names or ()), stem=prediction_name)
    results = []
    for path, stem in zip(paths, stems):
        image = read_image(path, **(image_options or {}))
        shown = display_rgb(image)
        if mode != "multiclass":
            probabilities = predict_probabilities(task, image, transform)
            shares = {name: round((probabilities[k] > task.threshold).float().mean().item(), 5)
                      for k, name in enumerate(class_names)}
            files = {} if out is None else write_probabilities(out, stem, probabilities, task.threshold, mode,
                                                               class_names, shown, colors, exclusive=True)
            results.append({"image": str(path), "files": {k: str(v) for k, v in files.items()}, "classes": shares})
            continue
        labels = predict_labels(task, image, transform)
        counts = torch.bincount(labels.reshape(-1))
        names = class_names or [str(i) for i in range(len(counts))]
        shares = {names[i]: round(c / labels.numel(), 5) for i, c in enumerate(counts.tolist()) if c}
        files = {} if out is None else write_prediction(out, stem, labels, shown, colors, label_ids, exclusive=True)
        results.append({"image": str(path), "files": {k: str(v) for k, v in files.items()}, "classes": shares})
    return results


def predict(cfg, model, paths, out=None, **_options) -> list[dict]:
    """Per image, at its original resolution: a colour overlay, a trainId PNG and, for Cityscapes, a
    ``<city_seq_frame>_labelIds.png`` (what cityscapesScripts' evaluator reads) -- binary / multilabel:
    per class a 16-bit probability PNG and a 0/1 mask, and the overlay -- flat in ``out``, plus
    ``predictions.json`` pointing each input at its files (``predictions-1.json``... when that name is
    taken: an existing file is never overwritten; the printed summary names the one written)."""
    from tasks.data.transforms.segmentation import eval_transform_for

    colors = label_ids = None
    if cfg.data.format == "cityscapes":
        from tasks.data.cityscapes import TRAIN_ID_COLORS, TRAIN_TO_LABEL_ID

        colors, label_ids = TRAIN_ID_COLORS, TRAIN_TO_LABEL_ID
    from .build import dataset_classes

    names = model.class_names or dataset_classes(cfg)[0]
    from tasks.data.images import image_options

    results = predict_paths(model, paths, out, eval_transform_for(cfg), colors=colors, label_ids=label_ids,
                            image_options=image_options(cfg),
                            class_names=names)
    for result in results:
        top = sorted(result["classes"].items(), key=lambda item: -item[1])[:4]
        print(f"{result['image']}: " + ", ".join(f"{name} {share:.0%}" for name, share in top))
    if out:
        import json

        json_path = unique_path(Path(out) / "predictions.json")
        write_new(json_path, json.dumps(results, indent=1).encode())
        print(f"wrote {len(results)} predictions to {out} (index: {json_path})")
        stems = [Path(r["files"]["overlay"]).name.removesuffix("_overlay.png") for r in results]
        note = renamed_note(paths, stems, [str(Path(out) / f"{stem}_*.png") for stem in stems], stem=prediction_name)
        if note:
            print(note)
    return results
