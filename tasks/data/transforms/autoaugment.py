"""RandAugment and AutoAugment on TensorFlow's magnitude scale (the EfficientNet papers' reference code).

The EfficientNet (V1 and V2) papers' augmentations come from the TF reference ``autoaugment.py``: an op's
strength at level ``M`` is ``M / 10`` of its maximum (``_MAX_LEVEL = 10``), so RandAugment ``M=9`` rotates by
27 degrees. torchvision's ``v2.RandAugment`` spreads the same maxima over 31 bins (its ``magnitude=9`` is
about TF's ``M=3``), and its ``AutoAugmentPolicy.IMAGENET`` is the AutoAugment *paper's* ImageNet policy, not
the ``v0`` policy the EfficientNet reference trains B0..B7 with (``autoaugment_name='v0'``). Hence these
classes, built from ``torchvision.transforms.v2.functional`` ops on uint8 (C, H, W) tensors:

- :class:`RandAugment`: ``num_ops`` ops drawn uniformly (with replacement) from :data:`RAND_OPS`, each applied
  (TF applies the chosen op always; timm with p 0.5). Strengths equal timm's ``rand-m{M}-n{N}`` (its level
  functions follow TF's); magnitudes above 10 are not clipped (EfficientNetV2 trains with up to 15..25, as
  TF's code does; timm clips at 10 unless ``mmax``). TF's op set includes Cutout (timm drops it in favour of
  random erasing): it is kept here, so one draw in 16 is a Cutout.
- :class:`AutoAugment`: TF's ``policy_v0`` (25 sub-policies of two (op, probability, level) steps; one
  sub-policy per image), with TF's AutoAugment constants: translate 250 px, i.e. 250/224 of the side here
  (exact at B0's 224; timm uses 0.45 of the side instead).

As in TF, geometric ops sample nearest pixels and fill with grey 128; Posterize keeps ``int(M / 10 * 4)`` bits
(TF's level function: fewer bits, i.e. stronger, at lower M). Translate and Cutout, absolute pixels in TF, are
fractions of the image side here (TF's constants divided by 224), so they keep their meaning at every size.
Randomness comes from torch's generator (seeded per DataLoader worker).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision.transforms.v2 import functional as F

__all__ = ["MAX_LEVEL", "RAND_OPS", "POLICY_V0", "RandAugment", "AutoAugment", "op_strength", "apply_op"]

MAX_LEVEL = 10.0  # TF's _MAX_LEVEL: an op's strength at level M is M / MAX_LEVEL of its maximum
FILL = 128  # TF's replace value for pixels a geometric op uncovers
# TF's constants, in pixels at 224 px, per policy: RandAugment (translate 100 px, cutout 40 px) and
# AutoAugment (250, 100). RandAugment's translate is timm's 0.45 of the side (TF's 100 px at 224: 0.446).
RANDAUGMENT_CONSTANTS = {"translate": 0.45, "cutout": 40 / 224}
AUTOAUGMENT_CONSTANTS = {"translate": 250 / 224, "cutout": 100 / 224}

_NEAREST = F.InterpolationMode.NEAREST


@dataclass(frozen=True)
class _Op:
    strength: Callable[[float, dict], float | int | None]  # level (TF scale), constants -> the op's argument
    signed: bool  # the argument's sign is drawn at random (rotate, shear, translate)
    apply: Callable[[torch.Tensor, float], torch.Tensor]


def _affine(image: torch.Tensor, **kwargs) -> torch.Tensor:
    options = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]}
    options.update(kwargs)
    return F.affine(image, interpolation=_NEAREST, fill=[float(FILL)] * image.shape[-3], center=[0.0, 0.0],
                    **options)


def _shear(image: torch.Tensor, factor: float, axis: int) -> torch.Tensor:
    # TF's shear maps output (x, y) to input (x + factor * y, y): an angle atan(factor) about the origin
    shear = [0.0, 0.0]
    shear[axis] = math.degrees(math.atan(factor))
    return _affine(image, shear=shear)


def _translate(image: torch.Tensor, fraction: float, axis: int) -> torch.Tensor:
    pixels = [0, 0]
    pixels[axis] = int(round(fraction * image.shape[-1 - axis]))  # x: fraction of the width, y: of the height
    return _affine(image, translate=pixels)


def _solarize(image: torch.Tensor, threshold: int) -> torch.Tensor:
    return image if threshold > 255 else F.solarize(image, float(threshold))  # a threshold above 255 keeps all


def _solarize_add(image: torch.Tensor, addition: int, threshold: int = 128) -> torch.Tensor:
    added = (image.to(torch.int16) + addition).clamp_(0, 255).to(torch.uint8)
    return torch.where(image < threshold, added, image)


def _cutout(image: torch.Tensor, fraction: float) -> torch.Tensor:
    """TF's cutout: a grey square of side ``2 * pad`` (pad = fraction of the short side) centred anywhere."""
    height, width = image.shape[-2:]
    pad = int(fraction * min(height, width))
    cy, cx = int(torch.randint(height, ())), int(torch.randint(width, ()))
    out = image.clone()
    out[..., max(cy - pad, 0):cy + pad, max(cx - pad, 0):cx + pad] = FILL
    return out


def _fraction(maximum: float, offset: float = 0.0):
    return lambda level, constants: level / MAX_LEVEL * maximum + offset


def _constant(key: str):
    return lambda level, constants: level / MAX_LEVEL * constants[key]


_none = lambda level, constants: None  # noqa: E731

# TF's level functions (efficientnet/autoaugment.py: level_to_arg); timm's LEVEL_TO_ARG follow them.
OPS: dict[str, _Op] = {
    "AutoContrast": _Op(_none, False, lambda image, _: F.autocontrast(image)),
    "Equalize": _Op(_none, False, lambda image, _: F.equalize(image)),
    "Invert": _Op(_none, False, lambda image, _: F.invert(image)),
    "Rotate": _Op(_fraction(30.0), True, lambda image, degrees: F.rotate(
        image, degrees, interpolation=_NEAREST, fill=[float(FILL)] * image.shape[-3])),
    "Posterize": _Op(lambda level, constants: min(8, int(level / MAX_LEVEL * 4)), False,
                     lambda image, bits: F.posterize(image, bits)),  # keeps `bits` bits
    "Solarize": _Op(lambda level, constants: int(level / MAX_LEVEL * 256), False, _solarize),
    "SolarizeAdd": _Op(lambda level, constants: int(level / MAX_LEVEL * 110), False, _solarize_add),
    "Color": _Op(_fraction(1.8, 0.1), False, F.adjust_saturation),
    "Contrast": _Op(_fraction(1.8, 0.1), False, F.adjust_contrast),
    "Brightness": _Op(_fraction(1.8, 0.1), False, F.adjust_brightness),
    "Sharpness": _Op(_fraction(1.8, 0.1), False, F.adjust_sharpness),
    "ShearX": _Op(_fraction(0.3), True, lambda image, factor: _shear(image, factor, 0)),
    "ShearY": _Op(_fraction(0.3), True, lambda image, factor: _shear(image, factor, 1)),
    "TranslateX": _Op(_constant("translate"), True, lambda image, fraction: _translate(image, fraction, 0)),
    "TranslateY": _Op(_constant("translate"), True, lambda image, fraction: _translate(image, fraction, 1)),
    "Cutout": _Op(_constant("cutout"), False, _cutout),
}

# TF's distort_image_with_randaugment op list (timm's _RAND_TRANSFORMS plus Cutout)
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "Color", "Contrast",
            "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd")

# TF's policy_v0 (the EfficientNet reference's autoaugment_name='v0'): (op, probability, level) pairs
POLICY_V0 = (
    (("Equalize", 0.8, 1), ("ShearY", 0.8, 4)),
    (("Color", 0.4, 9), ("Equalize", 0.6, 3)),
    (("Color", 0.4, 1), ("Rotate", 0.6, 8)),
    (("Solarize", 0.8, 3), ("Equalize", 0.4, 7)),
    (("Solarize", 0.4, 2), ("Solarize", 0.6, 2)),
    (("Color", 0.2, 0), ("Equalize", 0.8, 8)),
    (("Equalize", 0.4, 8), ("SolarizeAdd", 0.8, 3)),
    (("ShearX", 0.2, 9), ("Rotate", 0.6, 8)),
    (("Color", 0.6, 1), ("Equalize", 1.0, 2)),
    (("Invert", 0.4, 9), ("Rotate", 0.6, 0)),
    (("Equalize", 1.0, 9), ("ShearY", 0.6, 3)),
    (("Color", 0.4, 7), ("Equalize", 0.6, 0)),
    (("Posterize", 0.4, 6), ("AutoContrast", 0.4, 7)),
    (("Solarize", 0.6, 8), ("Color", 0.6, 9)),
    (("Solarize", 0.2, 4), ("Rotate", 0.8, 9)),
    (("Rotate", 1.0, 7), ("TranslateY", 0.8, 9)),
    (("ShearX", 0.0, 0), ("Solarize", 0.8, 4)),
    (("ShearY", 0.8, 0), ("Color", 0.6, 4)),
    (("Color", 1.0, 0), ("Rotate", 0.6, 2)),
    (("Equalize", 0.8, 4), ("Equalize", 0.0, 8)),
    (("Equalize", 1.0, 4), ("AutoContrast", 0.6, 2)),
    (("ShearY", 0.4, 7), ("SolarizeAdd", 0.6, 7)),
    (("Posterize", 0.8, 2), ("Solarize", 0.6, 10)),
    (("Solarize", 0.6, 8), ("Equalize", 0.6, 1)),
    (("Color", 0.8, 6), ("Rotate", 0.4, 5)),
)


def op_strength(name: str, level: float, constants: dict | None = None):
    """The argument op ``name`` gets at ``level`` (TF scale), before its random sign: degrees for Rotate, the
    shear factor, the translate fraction of the side, bits kept, solarize threshold, enhance factor, ..."""
    return OPS[name].strength(float(level), RANDAUGMENT_CONSTANTS if constants is None else constants)


def apply_op(image: torch.Tensor, name: str, level: float, constants: dict | None = None) -> torch.Tensor:
    """Op ``name`` at ``level`` on a uint8 (C, H, W) image (a signed op's sign drawn at random)."""
    op = OPS[name]
    argument = op_strength(name, level, constants)
    if op.signed and bool(torch.rand(()) < 0.5):
        argument = -argument
    return op.apply(image, argument)


class RandAugment(nn.Module):
    """RandAugment (Cubuk et al. 2020) on TF's scale: ``num_ops`` ops from :data:`RAND_OPS` at ``magnitude``
    (0..10 spans each op's range; the papers' M), each applied with probability ``prob`` (TF: 1)."""

    def __init__(self, num_ops: int = 2, magnitude: float = 9.0, prob: float = 1.0, ops: tuple[str, ...] = RAND_OPS):
        super().__init__()
        if magnitude < 0:
            raise ValueError(f"RandAugment magnitude must be >= 0, got {magnitude}")
        unknown = [name for name in ops if name not in OPS]
        if unknown:
            raise ValueError(f"unknown RandAugment ops {unknown}; known: {', '.join(OPS)}")
        self.num_ops, self.magnitude, self.prob, self.ops = int(num_ops), float(magnitude), float(prob), tuple(ops)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for _ in range(self.num_ops):
            name = self.ops[int(torch.randint(len(self.ops), ()))]
            if self.prob >= 1.0 or bool(torch.rand(()) < self.prob):
                image = apply_op(image, name, self.magnitude, RANDAUGMENT_CONSTANTS)
        return image

    def extra_repr(self) -> str:
        return f"num_ops={self.num_ops}, magnitude={self.magnitude:g} (TF scale), prob={self.prob:g}"


class AutoAugment(nn.Module):
    """AutoAugment with the EfficientNet reference's ``policy_v0``: one random sub-policy per image, each of
    its two steps applied with its own probability at its own level."""

    def __init__(self, policy: tuple = POLICY_V0):
        super().__init__()
        self.policy = policy

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        for name, prob, level in self.policy[int(torch.randint(len(self.policy), ()))]:
            if bool(torch.rand(()) < prob):
                image = apply_op(image, name, level, AUTOAUGMENT_CONSTANTS)
        return image

    def extra_repr(self) -> str:
        return f"policy=v0 ({len(self.policy)} sub-policies, TF EfficientNet reference)"
