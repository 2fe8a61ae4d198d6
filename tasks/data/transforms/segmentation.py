"""Segmentation augmentation with torchvision.transforms.v2: image and mask move together.

Each transform is called as ``transform(image, target) -> (image, target)`` on a sample of
``tasks.data.seg_common`` and returns a uint8 (3, H, W) image and an int64 (H, W) ``target["mask"]``
((C, H, W) in multilabel mode: every channel moves, is padded and resized like an (H, W) mask).
Masks are ``tv_tensors.Mask`` inside, so every geometric step moves them with the image; resizing
uses nearest neighbours (``nearest-exact``: the same pixel centres as the image's bilinear resize).

Train (the Cityscapes recipe): random scale (0.5-2.0 of the image, or of ``base_size``), random crop
padded with 0 (image) and ``ignore_index`` (mask), horizontal flip, photometric jitter.
Eval: ``full`` leaves the image as it is; ``resize`` resizes the image only -- the mask stays at the
original resolution, since predictions are compared at the label's resolution.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from tasks.data.images import EightBitOnly, workable  # 16-bit -> float32 of the same values; 8-bit-only photometrics

__all__ = ["RandomScale", "PairTransform", "segmentation_train_transform", "segmentation_eval_transform", "eval_transform_for",
           "EVAL_MODES"]

EVAL_MODES = ("full", "resize")


def _size_of(inputs) -> tuple[int, int]:
    for item in inputs:
        if isinstance(item, (tv_tensors.Image, tv_tensors.Mask)):
            return tuple(item.shape[-2:])
    raise TypeError("RandomScale needs a tv_tensors.Image or Mask among its inputs")


class RandomScale(v2.Transform):
    """Resize by a factor drawn uniformly from ``scale_range`` (of the input, or of ``base_size`` (h, w)
    keeping the aspect ratio, as mmseg's ``RandomResize(scale=base, ratio_range=...)``)."""

    def __init__(self, scale_range: Sequence[float] = (0.5, 2.0), base_size: Sequence[int] | None = None):
        super().__init__()
        low, high = (float(v) for v in scale_range)
        if not 0 < low <= high:
            raise ValueError(f"scale_range={list(scale_range)} must be 0 < low <= high")
        self.scale_range, self.base_size = (low, high), tuple(base_size) if base_size is not None else None

    def make_params(self, flat_inputs) -> dict:
        height, width = _size_of(flat_inputs)
        low, high = self.scale_range
        factor = low + (high - low) * torch.rand(()).item()  # torch's RNG, as v2 (seeded per worker)
        if self.base_size is not None:
            factor *= min(self.base_size[0] / height, self.base_size[1] / width)
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt, params: dict):
        # Masks: nearest-exact (pixel centres aligned with the bilinear image, unlike legacy nearest).
        mode = InterpolationMode.NEAREST_EXACT if isinstance(inpt, tv_tensors.Mask) else InterpolationMode.BILINEAR
        return self._call_kernel(F.resize, inpt, params["size"], interpolation=mode, antialias=True)


class PairTransform:
    """Runs a v2 pipeline on ``(image, target)`` with the mask as ``tv_tensors.Mask``; plain tensors out."""

    def __init__(self, pipeline: v2.Transform | None):
        self.pipeline = pipeline

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        if self.pipeline is None:
            return image, target
        out_image, out_mask = self.pipeline(tv_tensors.Image(workable(image)), tv_tensors.Mask(target["mask"]))
        return out_image.as_subclass(torch.Tensor), {**target, "mask": out_mask.as_subclass(torch.Tensor).long()}

    def __repr__(self) -> str:
        return f"PairTransform({self.pipeline!r})"


class _ImageOnly:
    """Eval resize: the image alone (the mask keeps the original resolution)."""

    def __init__(self, size):
        self.resize = v2.Resize(size, antialias=True)

    def __call__(self, image: torch.Tensor, target: dict) -> tuple[torch.Tensor, dict]:
        return self.resize(tv_tensors.Image(workable(image))).as_subclass(torch.Tensor), target


def segmentation_train_transform(crop_size: Sequence[int] | int | None, scale_range: Sequence[float] | None = (0.5, 2.0),
                                 hflip: float = 0.5, photometric: bool = True, ignore_index: int = 255,
                                 base_size: Sequence[int] | None = None) -> PairTransform:
    """Random scale -> random crop ``crop_size`` (h, w), padded when smaller -> flip -> photometric jitter.

    ``photometric``: brightness +-32/255, contrast and saturation 0.5-1.5, hue +-0.05 (mmseg's
    PhotoMetricDistortion ranges), each draw applied with probability 0.5.
    """
    steps: list[v2.Transform] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range, base_size))
    if crop_size is not None:
        steps.append(v2.RandomCrop(crop_size, pad_if_needed=True,
                                   fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    if photometric:
        steps.append(EightBitOnly(v2.RandomApply([v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5,
                                                                 hue=0.05)], p=0.5)))
    return PairTransform(v2.Compose(steps) if steps else None)


def segmentation_eval_transform(mode: str = "full", size: Sequence[int] | int | None = None):
    """``full``: unchanged. ``resize``: the image to ``size`` ((h, w), or an int for the short side)."""
    if mode not in EVAL_MODES:
        raise ValueError(f"eval mode {mode!r} is not one of {', '.join(EVAL_MODES)}")
    if mode == "full":
        return PairTransform(None)
    if size is None:
        raise ValueError("eval mode 'resize' needs a size ((h, w) or the short side)")
    return _ImageOnly(list(size) if not isinstance(size, int) else size)


def eval_transform_for(cfg):
    """The eval transform of a segmentation config: ``data.eval.mode: resize`` resizes the image to
    ``data.image_size``; ``full`` and ``slide`` keep each image at its own size."""
    from tasks.config import resolve_image_size

    if cfg.data.eval.mode == "resize":
        return segmentation_eval_transform("resize", resolve_image_size(cfg))
    return segmentation_eval_transform("full")
