"""The shipped presets, found by name as well as by path.

The repository's ``configs/`` is the source; a wheel carries the same files as package data in
``tasks/presets/`` (``pyproject.toml`` maps that package to ``configs/``). A preset's name is its path
under that folder without ``.yaml``: ``detection/efficientdet_d0_coco``, ``demo/classification``.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["presets_root", "list_presets", "resolve_preset"]

_PACKAGE = Path(__file__).resolve().parents[1]  # tasks/


def presets_root() -> Path:
    """The folder holding the presets: ``tasks/presets`` in an installed wheel, else the checkout's ``configs/``."""
    installed = _PACKAGE / "presets"
    if installed.is_dir():
        return installed
    return _PACKAGE.parent / "configs"


def list_presets() -> list[str]:
    """Every preset name, sorted (``classification/efficientnet_b0_imagenet``, ..., ``demo/detection``, ...)."""
    root = presets_root()
    return sorted(path.relative_to(root).with_suffix("").as_posix() for path in root.rglob("*.yaml"))


def resolve_preset(name_or_path: str | Path) -> Path:
    """A config file's path: an existing file as given, else the shipped preset of that name (with or without
    ``.yaml``, with or without a leading ``configs/``). An unknown name is returned unchanged, so that the
    loader's "not found" error names what the user typed."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.as_posix().removeprefix("configs/")
    for candidate in (name, f"{name}.yaml"):
        shipped = presets_root() / candidate
        if shipped.is_file():
            return shipped
    return path
