"""Normalisation on the device: uint8 images travel, the task module turns them into float inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["PixelNormalization", "pixel_options"]


class PixelNormalization(nn.Module):
    """``normalize(x) = (x - 255 mean) / (255 std)`` in float32, for uint8 (or float 0..255) images.

    A base for every module that takes uint8 images: the task modules of each task and the exported graph
    (``tasks.export.Normalized``). ``mean``/``std`` are per channel, on the 0..1 pixel scale (ImageNet's
    (0.485, 0.456, 0.406) / (0.229, 0.224, 0.225)). The buffers are not saved with the weights (they come
    from the config); ``persistent=True`` keeps them in the state dict, as a traced graph wants.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], persistent: bool = False):
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255,
                             persistent=persistent)
        self.register_buffer("pixel_scale", 1.0 / (torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255),
                             persistent=persistent)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """A new float32 tensor; ``images`` is never written to."""
        return (images.to(torch.float32) - self.pixel_mean).mul_(self.pixel_scale)


def pixel_options(cfg) -> dict:
    """The :class:`PixelNormalization` arguments a config gives (every task module's builder passes them on)."""
    return {"mean": cfg.data.mean, "std": cfg.data.std}
