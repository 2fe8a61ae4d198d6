"""Reading images: any file the loaders meet -> a uint8 (3, H, W) RGB tensor, or one line naming the file."""

from __future__ import annotations

import io
import re
from pathlib import Path

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms.v2.functional import pil_to_tensor

from tasks.data.errors import DataError

__all__ = ["IMAGE_EXTENSIONS", "UnreadableImageError", "read_rgb", "read_image"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (corrupt, truncated, or not an image)."""


def read_rgb(path: str | Path) -> torch.Tensor:
    """Decode an image file to a uint8 (3, H, W) RGB tensor, or raise one line naming the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableImageError(f"{path}: cannot read the file ({error.strerror or error})") from None
    try:
        if not data:
            raise ValueError("the file is empty")
        if data[:2] == b"BM":  # torchvision.io decodes JPEG/PNG/WebP/GIF; BMP goes through Pillow
            with Image.open(io.BytesIO(data)) as image:
                return pil_to_tensor(image.convert("RGB"))
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{path} is not a readable image (corrupt or truncated?): "
                                   f"{_short_reason(error)}") from None


def _short_reason(error: Exception) -> str:
    """The useful part of a decoder message, without torchvision's 'func, file.cpp:123, ' prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", text).split(". ")[0]


def read_image(path: str | Path) -> torch.Tensor:
    """uint8 (3, H, W) RGB from any image file; grayscale and RGBA convert, 16-bit keeps its top 8 bits."""
    image = read_rgb(path)
    if image.dtype == torch.uint16:
        image = (image.to(torch.int32) >> 8).to(torch.uint8)
    return image
