"""Reading images: any file the loaders meet -> a (C, H, W) tensor in the file's own dtype, or one line naming the file.

- Files: PNG, JPEG, WebP, GIF (torchvision.io), BMP (Pillow), TIFF (``.tif``/``.tiff``, tifffile).
- Depth: 8-bit files give uint8, 16-bit files uint16 (never truncated), float files (and other
  integer kinds: int16, int32, ...) float32. Only 8-bit has a default range (0..255); any other depth
  needs ``data.input_range`` or ``data.normalize=percentile``, or the read is a one-line
  :class:`ImageFormatError` asking for it (``scaled=False``, the default).
- Bands: ``bands`` (``model.in_channels``) of them. With 3, gray, gray+alpha, RGBA and palette files
  convert to RGB (a 1-band TIFF repeats its band); any other band count than ``bands`` is an error
  naming the file, the count found and ``model.in_channels``.
- Values travel as they are: scaling to 0..1 (and mean/std) is ``tasks.engine.normalize``'s, on the
  device. torchvision's transforms take uint8 or float only, so the augmenting transforms turn other
  images into float32 of the same values (:func:`workable`); photometric ops are 8-bit only
  (:class:`EightBitOnly`).
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils._pytree import tree_flatten
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from tasks.data.errors import DataError

log = logging.getLogger("effdense")

__all__ = ["header_size", "display_rgb", "IMAGE_EXTENSIONS", "TIFF_EXTENSIONS", "UnreadableImageError", "ImageFormatError", "ImageReader",
           "EightBitOnly", "read_rgb", "read_image", "decode", "describe_dtype", "depth_problem", "image_options",
           "is_scaled", "reading_images", "value_range", "workable"]

TIFF_EXTENSIONS = (".tif", ".tiff")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", *TIFF_EXTENSIONS)
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_KEPT_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.uint16): torch.uint16}


class UnreadableImageError(DataError):
    """An image file that cannot be decoded (corrupt, truncated, or not an image)."""


class ImageFormatError(UnreadableImageError):
    """An image that decodes but does not fit the config: another band count than ``model.in_channels``, a
    depth without a range (``data.input_range``), or another depth than the dataset's other images."""


def describe_dtype(dtype: torch.dtype) -> str:
    """'8-bit', '16-bit' or 'float32': how a user names an image's depth."""
    return {torch.uint8: "8-bit", torch.uint16: "16-bit"}.get(dtype, str(dtype).replace("torch.", ""))


def depth_problem(path: str | Path, dtype: torch.dtype) -> str | None:
    """The line for an image whose depth has no default range (anything but 8-bit), or None for uint8."""
    if dtype == torch.uint8:
        return None
    example = ("[0, 65535] or the range your sensor uses, e.g. [0, 4095] for 12-bit" if dtype == torch.uint16
               else "the range its values take, e.g. [0, 1]")
    return (f"{path}: is a {describe_dtype(dtype)} image and only 8-bit images have a default range (0..255); "
            f"set data.input_range to the values that map to 0..1 ({example}) or data.normalize=percentile")


def _bands_problem(path: Path, found: int, bands: int) -> str:
    return (f"{path}: has {found} band{'s' if found != 1 else ''} but model.in_channels={bands}; expected "
            f"{bands}-band images (or set model.in_channels={found} with {found} data.mean/data.std values)")


def decode(path: str | Path, rgb: bool = False) -> torch.Tensor:
    """(C, H, W) as stored: uint8, uint16 or float32; ``rgb``: PNG/JPEG/... converted to 3 bands by the decoder
    (gray, gray+alpha, RGBA, palette, CMYK JPEG), TIFFs left as they are. One line naming the file when
    the file cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UnreadableImageError(f"{path}: cannot read the file ({error.strerror or error})") from None
    try:
        if not data:
            raise ValueError("the file is empty")
        if data[:4] in _TIFF_MAGIC:
            return _decode_tiff(path, data)
        if path.suffix.lower() in TIFF_EXTENSIONS:
            raise ValueError("not a TIFF file (no TIFF header)")
        if data[:2] == b"BM":  # torchvision.io decodes JPEG/PNG/WebP/GIF; BMP goes through Pillow
            with Image.open(io.BytesIO(data)) as image:
                return pil_to_tensor(image.convert("RGB") if rgb or image.mode not in ("L", "RGB") else image)
        mode = ImageReadMode.RGB if rgb else ImageReadMode.UNCHANGED
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except ImageFormatError:
        raise
    except (RuntimeError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"{path} is not a readable image (corrupt or truncated?): "
                                   f"{_short_reason(error)}") from None


def _decode_tiff(path: Path, data: bytes) -> torch.Tensor:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            series = tif.series[0]
            array, axes = series.asarray(), series.axes
    except Exception as error:  # noqa: BLE001 -- tifffile raises many kinds (TiffFileError, struct.error, ...)
        raise ValueError(_short_reason(error)) from None
    if not array.dtype.isnative:  # big-endian files
        array = array.astype(array.dtype.newbyteorder("="))
    keep = [i for i, size in enumerate(array.shape) if size != 1 or axes[i] in "YX"]
    array, axes = array.reshape([array.shape[i] for i in keep]), "".join(axes[i] for i in keep)
    if array.ndim == 3 and axes[-1] == "S":  # interleaved samples (RGB, RGBA, ...): bands last on disk
        array = np.moveaxis(array, -1, 0)
    elif array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ImageFormatError(f"{path}: a TIFF of {array.ndim} dimensions (axes {axes}, shape "
                               f"{list(array.shape)}); expected a 2-D image with bands (YX, YXS or CYX)")
    dtype = _KEPT_DTYPES.get(array.dtype)
    if dtype is None:
        if array.dtype.kind not in "uifb":
            raise ImageFormatError(f"{path}: TIFF pixels of type {array.dtype}; expected integer or float values")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return torch.from_numpy(np.ascontiguousarray(array))


def _short_reason(error: Exception) -> str:
    """The useful part of a decoder message, without torchvision's 'func, file.cpp:123, ' prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return re.sub(r"^\w+, \S+:\d+, ", "", text).split(". ")[0]


def read_image(path: str | Path, bands: int = 3, scaled: bool = False) -> torch.Tensor:
    """(``bands``, H, W) in the file's dtype (uint8, uint16, float32), or one line naming the file.

    ``bands`` is ``model.in_channels``: with 3, any PNG/JPEG converts to RGB (as the decoder does) and a
    1-band TIFF repeats its band; otherwise the file must hold exactly ``bands`` bands. ``scaled``: the
    config says how to scale any depth (``data.input_range`` or ``data.normalize=percentile``); without
    it only 8-bit images are accepted (:func:`image_options` gives both from a config).
    """
    path = Path(path)
    image = decode(path, rgb=bands == 3)
    if bands == 3 and image.shape[0] == 1:
        image = image.expand(3, -1, -1).contiguous()
    if image.shape[0] != bands:
        raise ImageFormatError(_bands_problem(path, image.shape[0], bands))
    if not scaled:
        problem = depth_problem(path, image.dtype)
        if problem:
            raise ImageFormatError(problem)
    return image


def read_rgb(path: str | Path) -> torch.Tensor:
    """(3, H, W) RGB in the file's dtype (uint8, uint16 or float32: never truncated) from any image file."""
    return read_image(path, 3, scaled=True)


def is_scaled(cfg) -> bool:
    """Whether the config says how to scale images other than 8-bit ones."""
    return cfg.data.input_range is not None or cfg.data.normalize == "percentile"


def image_options(cfg) -> dict:
    """The :func:`read_image` options a config gives: ``bands`` (``model.in_channels``) and ``scaled``."""
    return {"bands": int(cfg.model.in_channels), "scaled": is_scaled(cfg)}


class ImageReader:
    """:func:`read_image` with a dataset's options that also refuses an image of another dtype than the
    dataset's ``reference`` (its first image): one 16-bit file among 8-bit ones is a one-line error naming
    both files, not a batch that cannot stack or that mixes two scales. Picklable (DataLoader workers).
    """

    def __init__(self, bands: int = 3, scaled: bool = False, reference: str | Path | None = None):
        self.bands, self.scaled = int(bands), bool(scaled)
        self.reference = Path(reference) if reference is not None else None
        self.dtype: torch.dtype | None = None  # the reference's, learnt at the first read (per process)

    def __call__(self, path: str | Path) -> torch.Tensor:
        image = read_image(path, self.bands, self.scaled)
        if self.dtype is None:
            self.dtype = self._reference_dtype(Path(path), image.dtype)
        if image.dtype != self.dtype:
            raise ImageFormatError(
                f"{path}: is a {describe_dtype(image.dtype)} image but {self.reference} (the dataset's first "
                f"image) is {describe_dtype(self.dtype)}; expected one depth for every image of a dataset "
                f"(convert them; `effdense data check` lists each depth)")
        return image

    def _reference_dtype(self, path: Path, dtype: torch.dtype) -> torch.dtype:
        if self.reference is None or self.reference == path:
            self.reference = path
            return dtype
        try:
            return decode(self.reference, rgb=self.bands == 3).dtype
        except UnreadableImageError:  # a bad first image: the first one read stands in for it
            self.reference = path
            return dtype


def reading_images(reader, image_options: dict | None):
    """``reader`` (a segmentation ``PairReader``) reading its images with ``image_options`` (``bands``,
    ``scaled``; None: 8-bit RGB); for the checkers, which compare depths across images themselves."""
    reader.image_reader = ImageReader(**image_options) if image_options else None
    return reader


def value_range(image: torch.Tensor) -> tuple[float, float]:
    """(min, max) of an image of any dtype (uint16 has no min/max kernels)."""
    values = image.to(torch.int32) if image.dtype == torch.uint16 else image
    return float(values.min()), float(values.max())


def workable(image: torch.Tensor) -> torch.Tensor:
    """An image torchvision's transforms accept: uint8 and float32 as they are, any other dtype (uint16)
    as float32 of the same values (not divided by anything: the scale stays the file's)."""
    if image.dtype in (torch.uint8, torch.float32):
        return image
    out = image.to(torch.float32)
    return tv_tensors.wrap(out, like=image) if isinstance(image, tv_tensors.TVTensor) else out


_skipped: set[str] = set()


class EightBitOnly(v2.Transform):
    """``transform`` (a photometric op: ColorJitter, RandAugment) on 8-bit images of 1 or 3 bands only.

    torchvision's photometric ops assume 0..255 uint8 or 0..1 float (they clamp to it) and 1 or 3 bands; on
    the raw values of 16-bit or float images, or on 4 bands, they would clip or fail. Those images pass
    unchanged; a warning says so once per process.
    """

    def __init__(self, transform):
        super().__init__()
        self.inner = transform

    def forward(self, *inputs):
        flat, _ = tree_flatten(inputs)
        image = next((item for item in flat if isinstance(item, torch.Tensor)
                      and not isinstance(item, (tv_tensors.Mask, tv_tensors.BoundingBoxes))), None)
        if image is None or (image.dtype == torch.uint8 and image.ndim >= 3 and image.shape[-3] in (1, 3)):
            return self.inner(*inputs)
        bands = image.shape[-3] if image.ndim >= 3 else 1
        what = f"{describe_dtype(image.dtype)} images of {bands} band{'s' if bands != 1 else ''}"
        if what not in _skipped:
            _skipped.add(what)
            names = ", ".join(type(op).__name__ for op in getattr(self.inner, "transforms", [self.inner]))
            log.warning("%s skipped for %s (16-bit files reach the transforms as float32 of the same values): "
                        "torchvision's photometric ops take 8-bit images of 1 or 3 bands", names, what)
        return inputs if len(inputs) > 1 else inputs[0]

    def __repr__(self) -> str:
        return f"EightBitOnly({self.inner!r})"


def display_rgb(image: torch.Tensor) -> torch.Tensor:
    """A uint8 (3, H, W) picture of any image ``read_image`` returns, for overlays and drawings: 8-bit RGB as it
    is; other depths stretched between each band's minimum and maximum; one band repeated, more than three
    cut to the first three."""
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    image = image[:3]
    if image.dtype == torch.uint8:
        return image
    flat = image.to(torch.float32).flatten(1)
    low, high = flat.min(1).values.view(3, 1, 1), flat.max(1).values.view(3, 1, 1)
    return ((image.to(torch.float32) - low) / (high - low).clamp_min(1e-12) * 255).round().to(torch.uint8)


def header_size(path: str | Path) -> tuple[int, int] | None:
    """(width, height) from an image file's header (nothing decoded); what Pillow cannot open (multi-band or
    float TIFFs) is decoded; None when the file is missing or not a readable image."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with Image.open(path) as image:
            return int(image.width), int(image.height)
    except (OSError, ValueError, Image.DecompressionBombError):
        pass
    try:
        return tuple(int(v) for v in reversed(decode(path).shape[-2:]))
    except DataError:
        return None
