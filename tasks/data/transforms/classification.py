"""Classification augmentation with torchvision.transforms.v2 on (C, H, W) image tensors.

8-bit images stay uint8 (the fast path: uint8 travels); others (16-bit) become float32 of the same values
first (:func:`tasks.data.images.workable`), since torchvision's transforms take uint8 or float only.
RandAugment / AutoAugment are 8-bit only (:class:`tasks.data.images.EightBitOnly`); both are TF's (the
EfficientNet papers' code, :mod:`tasks.data.transforms.autoaugment`), with magnitudes on TF's 0..10 scale.
Resizing is ``data.augment.interpolation`` (bicubic by default, as the EfficientNet reference) in training
and evaluation alike; float images (16-bit files) are resized as torchvision's uint8 kernel (PIL's) resizes
8-bit ones: two passes, each clipped to the image's range (:func:`_float_resize`), never outside it.
Random erasing (timm's ``reprob`` with ``remode=pixel``) fills the erased box with
per-pixel noise that normalises to N(0, 1), since normalisation (range, mean/std) happens on the device,
after the batch has travelled. Mixup / CutMix mix whole batches on the device (``tasks.classification.mixup``).
Sizes are (h, w) pairs (``tasks.config.resolve_image_size``).
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from tasks.config.schema import IMAGENET_MEAN, IMAGENET_STD, ClassificationAugmentConfig
from tasks.data.images import EightBitOnly, workable
from tasks.data.transforms.autoaugment import AutoAugment, RandAugment

__all__ = ["Compose", "RandomResizedCrop", "Resize", "RandomErasing", "classification_train_transform",
           "classification_eval_transform", "train_transform_for", "eval_transform_for", "value_range_of",
           "interpolation_mode"]

INTERPOLATION = {"bicubic": v2.InterpolationMode.BICUBIC, "bilinear": v2.InterpolationMode.BILINEAR}


def interpolation_mode(name: str) -> v2.InterpolationMode:
    if name not in INTERPOLATION:
        raise ValueError(f"data.augment.interpolation={name!r} must be one of: {', '.join(INTERPOLATION)}")
    return INTERPOLATION[name]


class Compose(v2.Compose):
    """``v2.Compose`` that first makes the image one torchvision takes (:func:`tasks.data.images.workable`:
    uint8 as it is, 16-bit as float32 of the same values)."""

    def forward(self, *inputs):
        return super().forward(*(workable(item) if isinstance(item, torch.Tensor) else item for item in inputs))


def _float_resize(image: torch.Tensor, size: tuple[int, int], interpolation,
                  value_range: tuple[float, float] | None = None) -> torch.Tensor:
    """Resize a float image as torchvision's uint8 kernel (PIL's) resizes 8-bit ones: width first, then height,
    each pass clipped to ``value_range`` (``data.input_range``, what uint8's 0..255 is to 8-bit files) widened to
    the image's own min..max (values beyond the range are the file's, kept), or to the image's own range without
    one. So a 16-bit file reaches the model as its 8-bit twin would (one float pass differs by up to ~13 of 255
    levels where bicubic overshoots) and bicubic never invents values outside the data's range."""
    low, high = float(image.min()), float(image.max())
    if value_range is not None:
        low, high = min(low, value_range[0]), max(high, value_range[1])
    height, width = image.shape[-2:]
    out = image
    if size[1] != width:
        out = F.resize(out, [height, size[1]], interpolation=interpolation, antialias=True).clamp_(low, high)
    if size[0] != height:
        out = F.resize(out, [size[0], size[1]], interpolation=interpolation, antialias=True).clamp_(low, high)
    return out


def _is_float_image(inpt) -> bool:
    return isinstance(inpt, torch.Tensor) and inpt.is_floating_point() and inpt.numel() > 0


class RandomResizedCrop(v2.RandomResizedCrop):
    """``v2.RandomResizedCrop`` whose float images (16-bit files) are resized by :func:`_float_resize`."""

    def __init__(self, *args, value_range: tuple[float, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.value_range = value_range

    def transform(self, inpt, params):
        if not _is_float_image(inpt):
            return super().transform(inpt, params)
        crop = F.crop(inpt, params["top"], params["left"], params["height"], params["width"])
        return _float_resize(crop, tuple(self.size), self.interpolation, self.value_range)


class Resize(v2.Resize):
    """``v2.Resize(short side)`` whose float images (16-bit files) are resized by :func:`_float_resize`."""

    def __init__(self, *args, value_range: tuple[float, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.value_range = value_range

    def transform(self, inpt, params):
        if not _is_float_image(inpt) or len(self.size) != 1 or self.max_size is not None:
            return super().transform(inpt, params)
        height, width = inpt.shape[-2:]
        short, long = (height, width) if height <= width else (width, height)
        new_short, new_long = self.size[0], int(self.size[0] * long / short)
        size = (new_short, new_long) if height <= width else (new_long, new_short)
        return inpt if size == (height, width) else _float_resize(inpt, size, self.interpolation, self.value_range)


class RandomErasing(v2.RandomErasing):
    """Random erasing (Zhong et al. 2020) with timm's defaults (area 2%..1/3, aspect 0.3..3.3) in timm's
    ``pixel`` mode: each erased pixel is ``mean + std * N(0, 1)`` of the image's value range, i.e. N(0, 1) once
    normalised on the device. ``mean``/``std`` per band (``data.mean``/``data.std``); ``value_range``: what
    0..1 of the normalisation is in the image's units (``data.input_range``; None: 0..255 for uint8 images,
    else the image's own min..max, as per-image percentile normalisation roughly does).
    """

    def __init__(self, p: float, mean=IMAGENET_MEAN, std=IMAGENET_STD, value_range: tuple[float, float] | None = None):
        super().__init__(p=p, scale=(0.02, 1 / 3), ratio=(0.3, 3.3), value="random")
        self.mean, self.std = [float(m) for m in mean], [float(s) for s in std]
        self.value_range = value_range

    def transform(self, inpt, params):
        noise = params["v"]
        if noise is not None:
            channels = noise.shape[0]
            mean = torch.tensor(self.mean[:channels] if len(self.mean) >= channels else self.mean[:1] * channels)
            std = torch.tensor(self.std[:channels] if len(self.std) >= channels else self.std[:1] * channels)
            if self.value_range is not None:
                low, high = self.value_range
            elif inpt.dtype == torch.uint8:
                low, high = 0.0, 255.0
            else:  # per-image normalisation (percentiles): the image's own span stands in for it
                low, high = float(inpt.min()), float(inpt.max())
            values = low + (high - low) * (mean.view(-1, 1, 1) + std.view(-1, 1, 1) * noise)
            if inpt.dtype == torch.uint8:
                values = values.round_().clamp_(0, 255)
            params = dict(params, v=values.to(inpt.dtype))
        return super().transform(inpt, params)


def classification_train_transform(augment: ClassificationAugmentConfig, size: tuple[int, int], *,
                                   magnitude: float | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                   value_range: tuple[float, float] | None = None) -> Compose:
    """RandomResizedCrop(size, scale=(scale_min, 1)), horizontal flip, AutoAugment (policy v0) or RandAugment,
    random erasing. ``magnitude`` overrides ``augment.randaugment_magnitude`` (progressive learning's stages);
    ``mean``/``std``/``value_range``: what random erasing's noise normalises with and ``value_range`` what float
    images are resized within (:func:`train_transform_for`: ``data.mean``, ``data.std``, ``data.input_range``)."""
    steps = [RandomResizedCrop(tuple(size), scale=(augment.scale_min, 1.0), antialias=True,
                               interpolation=interpolation_mode(augment.interpolation), value_range=value_range)]
    if augment.hflip > 0:
        steps.append(v2.RandomHorizontalFlip(p=augment.hflip))
    if augment.autoaugment:  # the EfficientNet paper's policy, in place of RandAugment
        steps.append(EightBitOnly(AutoAugment()))
    elif augment.randaugment:
        strength = augment.randaugment_magnitude if magnitude is None else magnitude
        steps.append(EightBitOnly(RandAugment(num_ops=augment.randaugment_ops, magnitude=strength)))
    if augment.random_erasing > 0:
        steps.append(RandomErasing(augment.random_erasing, mean, std, value_range))
    return Compose(steps)


def train_transform_for(cfg, size: tuple[int, int] | None = None, magnitude: float | None = None) -> Compose:
    """A classification config's training transform at ``size`` (default ``data.image_size`` resolved) and
    RandAugment ``magnitude`` (default ``data.augment.randaugment_magnitude``)."""
    from tasks.config import resolve_image_size

    data = cfg.data
    return classification_train_transform(data.augment, tuple(size) if size is not None else resolve_image_size(cfg),
                                          magnitude=magnitude, mean=data.mean, std=data.std,
                                          value_range=value_range_of(cfg))


def eval_transform_for(cfg, size: tuple[int, int] | None = None) -> Compose:
    """A classification config's evaluation transform at ``size`` (default ``data.image_size`` resolved)."""
    from tasks.config import resolve_image_size

    return classification_eval_transform(cfg.data.augment, tuple(size) if size is not None else resolve_image_size(cfg),
                                         value_range=value_range_of(cfg))


def value_range_of(cfg) -> tuple[float, float] | None:
    """``data.input_range`` as floats when it normalises the images (``data.normalize=range``), else None."""
    data = cfg.data
    if data.normalize == "range" and data.input_range is not None:
        return float(data.input_range[0]), float(data.input_range[1])
    return None


def classification_eval_transform(augment: ClassificationAugmentConfig, size: tuple[int, int], *,
                                  value_range: tuple[float, float] | None = None) -> Compose:
    """Resize the short side to ``int(max(size) / eval_crop_pct)`` (``augment.interpolation``; float images
    within ``value_range``, see :func:`_float_resize`), then centre-crop ``size``."""
    return Compose([
        Resize(int(max(size) / augment.eval_crop_pct), interpolation=interpolation_mode(augment.interpolation),
               antialias=True, value_range=value_range),
        v2.CenterCrop(tuple(size)),
    ])
