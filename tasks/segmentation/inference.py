"""Segmentation inference beyond one forward pass: sliding windows and test-time augmentation (flip, scales)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.nn import functional as F

__all__ = ["INFERENCE_MODES", "slide_logits", "tta_logits", "inference_options", "pair"]

INFERENCE_MODES = ("whole", "slide")


def slide_logits(run, images: torch.Tensor, window: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Sliding-window logits: ``run`` on each window, overlaps averaged with a count map.

    Windows start every ``stride`` pixels; the last row/column is moved back to end at the border; an
    image smaller than the window is one window (the network takes any size). The grid is
    ``tasks.data.tiles.tile_grid``'s, the one training tiles (``data.tile``) and detection slices use.
    """
    from tasks.data.tiles import tile_grid

    height, width = images.shape[-2:]
    total = counts = None
    for x1, y1, x2, y2 in tile_grid(height, width, tuple(window), step=tuple(stride)):
        logits = run(images[..., y1:y2, x1:x2]).float()
        if total is None:
            total = logits.new_zeros(images.shape[0], logits.shape[1], height, width)
            counts = logits.new_zeros(1, 1, height, width)
        total[..., y1:y2, x1:x2] += logits
        counts[..., y1:y2, x1:x2] += 1
    return total / counts


def tta_logits(run: Callable, x: torch.Tensor, scales: Sequence[float] = (1.0,), flip: bool = False) -> torch.Tensor:
    """The mean of ``run``'s float logits over every scale factor in ``scales`` (the input resized, the logits
    resized back) and, with ``flip``, the horizontally flipped input too; logits on ``x``'s canvas."""
    size = x.shape[-2:]
    total, passes = None, 0
    for scale in scales:
        scaled = x if scale == 1.0 else F.interpolate(
            x, size=[max(1, round(s * scale)) for s in size], mode="bilinear", align_corners=False)
        for flipped in (False, True) if flip else (False,):
            logits = run(scaled.flip(-1) if flipped else scaled)
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != size:
                logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
            total = logits if total is None else total + logits
            passes += 1
    return total if passes == 1 else total / passes


def pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{name}={value!r} must be a positive int or (h, w)")
    return int(pair[0]), int(pair[1])


def inference_options(cfg) -> dict:
    """``SegmentationTask``'s inference options for ``data.eval``: TTA, and the windows of ``mode: slide``.

    Slide windows: ``data.eval.window``, else the training tile (``data.tile.size``) with the step of
    ``data.tile.overlap`` (the grid the model was trained on), else ``data.image_size`` with a step of 2/3 of
    the window; ``data.eval.stride`` overrides the step."""
    from tasks.config import resolve_image_size
    from tasks.data.tiles import tile_step

    ev, size = cfg.data.eval, resolve_image_size(cfg)
    tile = getattr(cfg.data, "tile", None)
    options = {"flip": ev.flip, "scales": tuple(ev.scales)}
    if ev.mode == "slide":
        if ev.window is None and tile is not None and tile.size is not None:
            window = (int(tile.size), int(tile.size))
            step = (tile_step(window[0], tile.overlap),) * 2
        else:
            window = tuple(ev.window or size)
            step = (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3))
        options.update(inference="slide", window=window, stride=tuple(ev.stride or step))
    return options
