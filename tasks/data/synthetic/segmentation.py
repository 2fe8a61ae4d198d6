"""Small synthetic street scenes in the Cityscapes layout and in the mask-folder layout (demos, tests).

Each scene: sky, a skyline of buildings (with windows), trees at the horizon, a road narrowing to the
horizon with sidewalks beside it, a few cars on the road, and void regions (an ego-vehicle strip at
the bottom, small static objects on the sidewalks). Colours follow the Cityscapes class colours with
per-image and per-pixel variation, so a small U-Net learns them in a few CPU minutes. The same
arguments give the same bytes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tasks.data.synthetic.classification import MARKER

__all__ = ["SCENE_CLASSES", "draw_scene", "write_cityscapes", "write_maskfolder"]

# Scene classes with their Cityscapes label ids and the colour they are drawn in.
SCENE_CLASSES = {
    "sky": (23, (70, 130, 180)),
    "building": (11, (70, 70, 70)),
    "vegetation": (21, (107, 142, 35)),
    "road": (7, (128, 64, 128)),
    "sidewalk": (8, (244, 35, 232)),
    "car": (26, (0, 0, 142)),
    "ego vehicle": (1, (20, 20, 20)),  # void
    "static": (4, (140, 110, 60)),  # void
}
_INDEX = {name: i for i, name in enumerate(SCENE_CLASSES)}
TRAIN_CITIES, VAL_CITIES = ("aachen", "bremen"), ("frankfurt", "lindau")


def draw_scene(height: int, width: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One scene: uint8 RGB (3, H, W) and int64 scene-class indices (H, W) (keys of :data:`SCENE_CLASSES`)."""
    def uniform(low, high):
        return low + (high - low) * torch.rand((), generator=generator).item()

    yy = torch.arange(height).view(-1, 1).expand(height, width).float()
    xx = torch.arange(width).view(1, -1).expand(height, width).float()
    labels = torch.full((height, width), _INDEX["sky"], dtype=torch.int64)
    horizon = height * uniform(0.42, 0.55)
    x = 0.0
    while x < width:  # skyline
        right = x + width * uniform(0.08, 0.25)
        top = horizon - height * uniform(0.12, 0.38)
        labels[(xx >= x) & (xx < right) & (yy >= top) & (yy < horizon)] = _INDEX["building"]
        x = right
    for _ in range(int(uniform(1, 4))):  # trees in front of the buildings
        cx, rx, ry = width * uniform(0, 1), width * uniform(0.04, 0.1), height * uniform(0.06, 0.14)
        inside = ((xx - cx) / rx) ** 2 + ((yy - (horizon - 0.4 * ry)) / ry) ** 2 <= 1
        labels[inside & (yy < horizon + 2)] = _INDEX["vegetation"]
    below = yy >= horizon
    labels[below] = _INDEX["sidewalk"]
    centre = width * uniform(0.35, 0.65)
    half = width * uniform(0.02, 0.05) + (yy - horizon) * uniform(1.0, 1.8)
    labels[below & ((xx - centre).abs() <= half)] = _INDEX["road"]
    for _ in range(int(uniform(1, 4))):  # cars: bigger when nearer
        bottom = horizon + (height - horizon) * uniform(0.25, 0.9)
        car_h = (bottom - horizon) * uniform(0.45, 0.6)
        car_w = car_h * uniform(1.5, 2.2)
        spread = width * 0.02 + (bottom - horizon) * 1.2
        left = centre + uniform(-spread, spread) - car_w / 2
        labels[(yy >= bottom - car_h) & (yy < bottom) & (xx >= left) & (xx < left + car_w)] = _INDEX["car"]
    for _ in range(int(uniform(0, 3))):  # void objects on the sidewalk
        sx, sy = width * uniform(0, 1), horizon + (height - horizon) * uniform(0.1, 0.7)
        box = (xx - sx).abs() <= width * 0.015
        box &= (yy - sy).abs() <= height * 0.03
        labels[box & (labels == _INDEX["sidewalk"])] = _INDEX["static"]
    labels[yy >= height * (1 - uniform(0.04, 0.08))] = _INDEX["ego vehicle"]
    return _paint(labels, yy, xx, horizon, generator), labels


def _paint(labels: torch.Tensor, yy, xx, horizon: float, generator: torch.Generator) -> torch.Tensor:
    colours = torch.tensor([colour for _, colour in SCENE_CLASSES.values()], dtype=torch.float32)
    colours = colours + 12.0 * torch.randn(colours.shape, generator=generator)  # per-image tint per class
    image = colours[labels].permute(2, 0, 1)
    windows = (labels == _INDEX["building"]) & ((xx % 9) < 4) & ((yy % 11) < 5)
    image = image + 25.0 * windows
    light = 0.85 + 0.3 * torch.rand((), generator=generator)  # overall brightness and a vertical gradient
    image = image * (light + 0.1 * (yy / yy.max() - 0.5))
    image = image + 7.0 * torch.randn(image.shape, generator=generator)
    return image.round().clamp(0, 255).to(torch.uint8)


def _prepare(root: Path, params: dict, folders: Sequence[str]) -> Path:
    marker = root / MARKER
    if root.exists() and any(root.iterdir()) and not marker.is_file():
        raise ValueError(f"refusing to write synthetic data into '{root}': the folder is not empty and was not "
                         f"written by effdense (no {MARKER})")
    for folder in folders:
        shutil.rmtree(root / folder, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(params, sort_keys=True) + "\n")
    return root


def _save_rgb(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path, **({"compress_level": 1} if path.suffix == ".png"
                                                                  else {"quality": 92}))


def write_cityscapes(root: str | Path, seed: int = 0, train_per_city: int = 20, val_per_city: int = 5,
                     size: Sequence[int] = (128, 256)) -> Path:
    """Write ``leftImg8bit/{train,val}/{city}/*_leftImg8bit.png`` + ``gtFine/.../*_gtFine_labelIds.png``.

    Two train cities and two val cities (real Cityscapes city names), ``size`` = (h, w); masks hold real
    label ids (road 7, sidewalk 8, building 11, vegetation 21, sky 23, car 26, void: ego vehicle 1,
    static 4). ``root`` must be empty, missing, or written by effdense before (then it is rewritten).
    """
    height, width = (int(s) for s in size)
    if height < 32 or width < 32:
        raise ValueError(f"size={list(size)} must be at least 32x32")
    root = _prepare(Path(root), dict(kind="cityscapes", seed=seed, size=[height, width], train_per_city=train_per_city,
                                     val_per_city=val_per_city), ("leftImg8bit", "gtFine"))
    to_label_id = torch.tensor([label_id for label_id, _ in SCENE_CLASSES.values()], dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed)
    for split, cities, count in (("train", TRAIN_CITIES, train_per_city), ("val", VAL_CITIES, val_per_city)):
        for city in cities:
            for index in range(count):
                stem = f"{city}_{index:06d}_000019"
                image, labels = draw_scene(height, width, generator)
                _save_rgb(image, root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
                mask_dir = root / "gtFine" / split / city
                mask_dir.mkdir(parents=True, exist_ok=True)
                Image.fromarray(to_label_id[labels].numpy().astype(np.uint8)).save(
                    mask_dir / f"{stem}_gtFine_labelIds.png", compress_level=1)
    return root


MASK_MODES = ("L", "P", "I;16")
FOLDER_CLASSES = ("sky", "building", "vegetation", "road", "sidewalk", "car")  # indices 0..5; void -> ignore
# smp's modes: binary marks the road (1) against every other scene class (0); multilabel has three
# overlapping channels, channel k made of the scene classes listed (paved = road or sidewalk). Void: ignore.
BINARY_CLASS = "road"
MULTILABEL_CLASSES = {"road": ("road",), "car": ("car",), "paved": ("road", "sidewalk")}
SEGMENTATION_MODES = ("multiclass", "binary", "multilabel")
VOID = ("ego vehicle", "static")


def _binary_masks(labels: torch.Tensor, mode: str, ignore_index: int) -> np.ndarray:
    """Scene indices (H, W) -> binary (H, W) or multilabel (C, H, W) 0/1 masks, void as ``ignore_index``."""
    names = list(SCENE_CLASSES)
    groups = [(BINARY_CLASS,)] if mode == "binary" else list(MULTILABEL_CLASSES.values())
    void = torch.isin(labels, torch.tensor([names.index(n) for n in VOID]))
    channels = [torch.isin(labels, torch.tensor([names.index(n) for n in group])).long() for group in groups]
    masks = torch.stack(channels).masked_fill(void, ignore_index).numpy().astype(np.uint8)
    return masks[0] if mode == "binary" else masks


def write_maskfolder(root: str | Path, seed: int = 0, train: int = 24, val: int = 8, size: Sequence[int] = (64, 96),
                     mask_mode: str = "L", image_format: str = "png", ignore_index: int = 255,
                     mode: str = "multiclass", stack: bool = False) -> Path:
    """Write ``images/{train,val}/NNNN.<png|jpg>`` + ``masks/{train,val}/NNNN.png`` (classes
    :data:`FOLDER_CLASSES` as 0..5, void as ``ignore_index``); ``mask_mode`` L (8-bit), P (palette) or
    I;16 (16-bit). Returns ``root``; ``root/classes.json`` lists the class names.

    ``mode`` (smp's, ``model.segmentation.mode``): ``binary`` writes 0/1 masks of :data:`BINARY_CLASS`
    (``model.num_classes=1``); ``multilabel`` the channels of :data:`MULTILABEL_CLASSES`
    (``model.num_classes=3``) as ``masks/<split>/NNNN_<k>.png`` per class index k, or with ``stack`` one
    ``NNNN.npy`` (3, H, W) uint8 per image (``mask_mode`` applies to the multiclass and binary PNGs)."""
    if mask_mode not in MASK_MODES:
        raise ValueError(f"mask_mode={mask_mode!r} is not one of {', '.join(MASK_MODES)}")
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format={image_format!r} must be 'png' or 'jpg'")
    if mode not in SEGMENTATION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(SEGMENTATION_MODES)}")
    height, width = (int(s) for s in size)
    params = dict(kind="maskfolder", seed=seed, size=[height, width], train=train, val=val, mask_mode=mask_mode,
                  image_format=image_format)
    if mode != "multiclass":
        params.update(mode=mode, stack=stack)
    root = _prepare(Path(root), params, ("images", "masks"))
    to_index = torch.tensor([FOLDER_CLASSES.index(n) if n in FOLDER_CLASSES else ignore_index for n in SCENE_CLASSES])
    generator = torch.Generator().manual_seed(seed)
    for split, count in (("train", train), ("val", val)):
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            image, labels = draw_scene(height, width, generator)
            _save_rgb(image, root / "images" / split / f"{index:04d}.{image_format}")
            if mode == "multilabel":
                _save_multilabel(_binary_masks(labels, mode, ignore_index), root / "masks" / split, f"{index:04d}", stack)
                continue
            values = to_index[labels].numpy() if mode == "multiclass" else _binary_masks(labels, mode, ignore_index)
            if mask_mode == "I;16":
                mask = Image.fromarray(values.astype(np.uint16))
            elif mask_mode == "P":  # palette indices are the class indices
                mask = Image.frombytes("P", (width, height), values.astype(np.uint8).tobytes())
                palette = [c for name in FOLDER_CLASSES for c in SCENE_CLASSES[name][1]]
                mask.putpalette(palette + [255] * (768 - len(palette)))  # all 256 entries: PIL keeps 8 bits
            else:
                mask = Image.fromarray(values.astype(np.uint8))
            mask.save(root / "masks" / split / f"{index:04d}.png", compress_level=1)
    names = {"multiclass": list(FOLDER_CLASSES), "binary": [BINARY_CLASS], "multilabel": list(MULTILABEL_CLASSES)}
    (root / "classes.json").write_text(json.dumps(names[mode]) + "\n")
    return root


def _save_multilabel(masks: np.ndarray, folder: Path, stem: str, stack: bool) -> None:
    if stack:
        np.save(folder / f"{stem}.npy", masks)
        return
    for k, channel in enumerate(masks):
        Image.fromarray(channel).save(folder / f"{stem}_{k}.png", compress_level=1)
