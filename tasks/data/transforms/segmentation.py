"""Segmentation augmentation with torchvision.transforms.v2: image and mask move together.

Each transform is called as ``transform(image, target) -> (image, target)`` on a sample of
``tasks.data.seg_common`` and returns a uint8 (3, H, W) image and an int64 (H, W) ``target["mask"]``
((C, H, W) in multilabel mode: every channel moves, is padded and resized like an (H, W) mask).
Masks are ``tv_tensors.Mask`` inside, so every geometric step moves them with the image; resizing
uses nearest neighbours (``nearest-exact``: the same pixel centres as the image's bilinear resize).

Train (mmseg's Cityscapes pipeline): random scale (0.5-2.0 of the image, or of ``base_size``), random crop
padded with 0 (image) and ``ignore_index`` (mask) -- re-drawn, as mmseg's ``RandomCrop(cat_max_ratio=...)``,
while one class covers too much of it (:class:`CatMaxRatioCrop`) --, horizontal flip, and mmseg's
``PhotoMetricDistortion`` (:class:`PhotoMetricDistortion`) on 8-bit images.
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

__all__ = ["RandomScale", "CatMaxRatioCrop", "PhotoMetricDistortion", "PairTransform", "crop_accepted",
           "photometric_distortion", "segmentation_train_transform", "segmentation_eval_transform",
           "train_transform_for", "eval_transform_for", "EVAL_MODES"]

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


def crop_accepted(crop: torch.Tensor, cat_max_ratio: float, ignore_index: int = 255) -> bool:
    """mmseg ``RandomCrop``'s test of a mask crop: the labels other than ``ignore_index`` are counted; the
    crop passes when there are at least two of them and the most frequent covers less than
    ``cat_max_ratio`` of the counted pixels (an all-ignored or one-class crop never passes)."""
    values = crop[crop != ignore_index]
    if values.numel() == 0:
        return False
    if values.min() >= 0:  # bincount: linear time on the usual non-negative class indices
        counts = torch.bincount(values)
        counts = counts[counts > 0]
    else:
        counts = torch.unique(values, return_counts=True)[1]
    return counts.numel() > 1 and counts.max().item() / counts.sum().item() < cat_max_ratio


class CatMaxRatioCrop(v2.RandomCrop):
    """``v2.RandomCrop(size, pad_if_needed=True)`` (image padded with 0, mask with ``ignore_index``) whose
    window is re-drawn as mmseg's ``RandomCrop(cat_max_ratio=...)`` re-draws it.

    With ``cat_max_ratio < 1``: draw a window; up to ``tries`` (10) times, stop if :func:`crop_accepted`
    passes its (H, W) mask crop, else draw again -- after ten refusals the eleventh window is taken
    unchecked. Padded pixels count as ignored. ``cat_max_ratio=1.0`` takes the first window, as
    ``v2.RandomCrop`` does (the same draws). Masks with a channel axis (multilabel) take the first window.
    """

    def __init__(self, size, cat_max_ratio: float = 1.0, ignore_index: int = 255, tries: int = 10):
        super().__init__(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index})
        if not 0.0 < cat_max_ratio <= 1.0:
            raise ValueError(f"cat_max_ratio={cat_max_ratio} must be in (0, 1] (1.0: off)")
        self.cat_max_ratio, self.ignore_index, self.tries = float(cat_max_ratio), ignore_index, tries

    def make_params(self, flat_inputs) -> dict:
        params = super().make_params(flat_inputs)
        mask = next((item for item in flat_inputs if isinstance(item, tv_tensors.Mask)), None)
        if self.cat_max_ratio >= 1.0 or mask is None or mask.ndim != 2:
            return params
        for _ in range(self.tries):
            if crop_accepted(self.window(mask, params), self.cat_max_ratio, self.ignore_index):
                break
            params = super().make_params(flat_inputs)
        return params

    @staticmethod
    def window(mask: torch.Tensor, params: dict) -> torch.Tensor:
        """The part of (H, W) ``mask`` inside the window of ``params`` (its padding left out)."""
        pad_left, pad_top = params["padding"][:2]
        top, left = params["top"] - pad_top, params["left"] - pad_left
        return mask[max(top, 0):max(top + params["height"], 0), max(left, 0):max(left + params["width"], 0)]


def _add(image: torch.Tensor, delta: float) -> torch.Tensor:
    """``image + delta`` clipped to 0..255, truncated to uint8 (mmseg's ``convert(beta=delta)``)."""
    return image.float().add(delta).clamp_(0, 255).to(torch.uint8)


def _scale_saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    """HSV saturation times ``factor``, clipped at 1, hue and value kept (mmseg scales OpenCV's S channel).

    With V = max and S = (V - min) / V, an RGB channel is V - V * S * k (k from the hue alone), so scaling S
    to S' = min(S * factor, 1) moves every channel to V - (V - c) * S' / S; no HSV round trip needed."""
    x = image.float()
    value = x.amax(dim=-3, keepdim=True)
    chroma = value - x.amin(dim=-3, keepdim=True)
    ratio = (value / chroma.clamp(min=1.0)).clamp(max=factor)  # S' / S = min(factor, 1 / S); grey pixels stay
    return (value - (value - x) * ratio).round_().clamp_(0, 255).to(torch.uint8)


def photometric_distortion(image: torch.Tensor, brightness: float | None = None, contrast: float | None = None,
                           saturation: float | None = None, hue: int | None = None,
                           contrast_first: bool = True) -> torch.Tensor:
    """mmseg's ``PhotoMetricDistortion`` ops with their drawn values on a uint8 (..., 1 or 3, H, W) image;
    ``None`` skips an op. In order: brightness (``+ brightness``), contrast here if ``contrast_first``
    (``* contrast``: mmseg's contrast scales the values, i.e. ``F.adjust_brightness``), saturation (HSV S
    ``* saturation``), hue (``+ hue`` of OpenCV's 180 steps, i.e. ``F.adjust_hue(hue / 180)``), contrast
    here otherwise. Each result is clipped to 0..255 (grey images: saturation and hue change nothing)."""
    if image.dtype != torch.uint8:
        raise TypeError(f"photometric_distortion takes uint8 images, got {image.dtype}")
    if brightness is not None:
        image = _add(image, brightness)
    if contrast is not None and contrast_first:
        image = F.adjust_brightness(image, contrast)
    if saturation is not None:
        image = _scale_saturation(image, saturation)
    if hue is not None:
        image = F.adjust_hue(image, hue / 180)
    if contrast is not None and not contrast_first:
        image = F.adjust_brightness(image, contrast)
    return image


class PhotoMetricDistortion(v2.Transform):
    """mmseg's ``PhotoMetricDistortion`` on the image (masks pass untouched): each op with probability
    ``p`` (0.5): brightness ``+ U(-32, 32)``; contrast ``* U(0.5, 1.5)``, before or after saturation and hue
    (probability 0.5 each); saturation ``* U(0.5, 1.5)``; hue ``+ d`` of 180 steps with d an integer drawn
    as numpy's ``randint(-18, 18)`` does: -18..17 (up to 0.1 of a turn, torchvision's hue scale). Draws use
    torch's RNG, as v2 (seeded per worker). See :func:`photometric_distortion` for the ops."""

    def __init__(self, brightness_delta: float = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18, p: float = 0.5):
        super().__init__()
        self.brightness_delta, self.hue_delta, self.p = float(brightness_delta), int(hue_delta), float(p)
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    def make_params(self, flat_inputs) -> dict:
        def happens() -> bool:
            return torch.rand(()).item() < self.p

        def uniform(low: float, high: float) -> float:
            return low + (high - low) * torch.rand(()).item()

        delta = self.brightness_delta
        return {"brightness": uniform(-delta, delta) if happens() else None,
                "contrast_first": happens(),
                "contrast": uniform(*self.contrast_range) if happens() else None,
                "saturation": uniform(*self.saturation_range) if happens() else None,
                "hue": int(torch.randint(-self.hue_delta, self.hue_delta, ())) if happens() else None}

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, tv_tensors.Image) and type(inpt) is not torch.Tensor:
            return inpt  # masks (and boxes) keep their values
        out = photometric_distortion(inpt.as_subclass(torch.Tensor), **params)
        return tv_tensors.wrap(out, like=inpt) if isinstance(inpt, tv_tensors.Image) else out


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
                                 base_size: Sequence[int] | None = None, cat_max_ratio: float = 1.0) -> PairTransform:
    """Random scale -> random crop ``crop_size`` (h, w), padded when smaller, re-drawn while one class
    covers ``cat_max_ratio`` or more of it (:class:`CatMaxRatioCrop`; 1.0: off) -> flip -> ``photometric``:
    mmseg's PhotoMetricDistortion (:class:`PhotoMetricDistortion`), on 8-bit images of 1 or 3 bands only.
    """
    steps: list[v2.Transform] = []
    if scale_range is not None:
        steps.append(RandomScale(scale_range, base_size))
    if crop_size is not None:
        steps.append(CatMaxRatioCrop(crop_size, cat_max_ratio, ignore_index))
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=hflip))
    if photometric:
        steps.append(EightBitOnly(PhotoMetricDistortion()))
    return PairTransform(v2.Compose(steps) if steps else None)


def train_transform_for(cfg, crop_size: Sequence[int] | None = None) -> PairTransform:
    """The training transform of a segmentation config: ``data.augment`` with the crop ``crop_size``
    (None: ``data.image_size``) and ``data.ignore_index``."""
    from tasks.config import resolve_image_size

    augment = cfg.data.augment
    return segmentation_train_transform(crop_size if crop_size is not None else resolve_image_size(cfg),
                                        (augment.scale_min, augment.scale_max), hflip=augment.hflip,
                                        photometric=augment.photometric, ignore_index=cfg.data.ignore_index,
                                        cat_max_ratio=augment.cat_max_ratio)


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
