"""Normalisation on the device: images travel in their own dtype, the task module turns them into float inputs.

``x -> ((x - lo) / (hi - lo) - mean) / std`` per band, in float32:

- ``range`` (default): ``[lo, hi]`` is ``data.input_range``, or 0..255 for 8-bit images (the same numbers as
  ``(x - 255 mean) / (255 std)``); 16-bit and float images need an explicit range (the reader asks for it).
- ``percentile``: ``lo``/``hi`` are each image's ``data.percentiles`` (e.g. 1 and 99.8), per band,
  computed on the device (stardist/csbdeep's ``normalize``: linear interpolation between order statistics,
  as ``numpy.percentile``; a band whose two percentiles are equal maps to 0 instead of dividing by 0).
  The percentiles see the whole tensor the model gets, padding of a batch's canvas included.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PixelNormalization", "pixel_options", "percentile_scale"]


class PixelNormalization(nn.Module):
    """``normalize(x) = ((x - lo) / (hi - lo) - mean) / std`` in float32, for images of any dtype.

    A base for every module that takes raw images: the task modules of each task and the exported graph
    (``tasks.export.Normalized``). ``mean``/``std`` are per band, on the 0..1 scale (ImageNet's
    (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)). ``input_range`` (lo, hi): the values that map to 0..1
    (default 0..255). ``percentiles`` (p_lo, p_hi): per-image lo/hi instead (see the module doc).
    The range folds into the buffers: ``pixel_mean = lo + mean (hi - lo)``, ``pixel_scale = 1 / (std (hi - lo))``
    in pixel units. The buffers are not saved with the weights (they come from the config);
    ``persistent=True`` keeps them in the state dict, as a traced graph wants.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], persistent: bool = False, *,
                 input_range: Sequence[float] | None = None, percentiles: Sequence[float] | None = None):
        super().__init__()
        if percentiles is not None:
            low, high = (float(p) for p in percentiles)
            if not 0 <= low < high <= 100:
                raise ValueError(f"percentiles={list(percentiles)} must be 0 <= low < high <= 100")
            self.percentiles: tuple[float, float] | None = (low, high)
            lo, span = 0.0, 1.0  # the percentile scaling already gives 0..1
        else:
            self.percentiles = None
            lo, hi = (float(v) for v in input_range) if input_range is not None else (0.0, 255.0)
            if not hi > lo:
                raise ValueError(f"input_range={list(input_range)} must be [lo, hi] with lo < hi")
            span = hi - lo
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * span + lo,
                             persistent=persistent)
        self.register_buffer("pixel_scale", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * span),
                             persistent=persistent)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A new float32 tensor; ``images`` (N, C, H, W) is never written to."""
        x = images.to(torch.float32)
        if self.percentiles is not None:
            x = percentile_scale(x, self.percentiles)
        return (x - self.pixel_mean).mul_(self.pixel_scale)


def percentile_scale(images: torch.Tensor, percentiles: Sequence[float]) -> torch.Tensor:
    """``(x - p_lo) / (p_hi - p_lo)`` per image and band of float (N, C, H, W) ``images`` (a new tensor).

    The percentiles interpolate linearly between order statistics (``numpy.percentile``'s default), found
    with ``torch.kthvalue`` (no sort of the whole tensor, and no size limit, unlike ``torch.quantile``).
    """
    flat = images.reshape(images.shape[0], images.shape[1], -1)
    count = flat.shape[-1]
    lo, hi = (_percentile(flat, float(p), count) for p in percentiles)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))
    return (images - lo[..., None, None]) / span[..., None, None]


def _percentile(flat: torch.Tensor, percent: float, count: int) -> torch.Tensor:
    position = percent / 100 * (count - 1)
    below = int(position)
    value = flat.kthvalue(below + 1, dim=-1).values
    fraction = position - below
    if fraction > 0 and below + 1 < count:
        value = value + fraction * (flat.kthvalue(below + 2, dim=-1).values - value)
    return value


def pixel_options(cfg) -> dict:
    """The :class:`PixelNormalization` arguments a config gives (every task module's builder passes them on):
    ``mean``/``std``, plus ``input_range`` when ``data.input_range`` is set, or ``percentiles`` with
    ``data.normalize=percentile`` (``input_range`` is then not used)."""
    from tasks.config import ConfigError

    options = {"mean": cfg.data.mean, "std": cfg.data.std}
    if cfg.data.normalize == "percentile":
        low, high = cfg.data.percentiles
        if not low < high:
            raise ConfigError(f"data.percentiles={list(cfg.data.percentiles)} must be [low, high] with low < high, "
                              f"e.g. [1, 99.8]")
        options["percentiles"] = (float(low), float(high))
    elif cfg.data.input_range is not None:
        low, high = cfg.data.input_range
        if not low < high:
            raise ConfigError(f"data.input_range={list(cfg.data.input_range)} must be [lo, hi] with lo < hi, "
                              f"e.g. [0, 4095] for 12-bit images")
        options["input_range"] = (float(low), float(high))
    return options
