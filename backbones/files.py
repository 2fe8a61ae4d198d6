"""All-or-nothing file writes: a killed process never leaves a half-written checkpoint behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

TEMP_MARKER = ".tmp-"


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # makes the rename durable; not possible on every filesystem
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, fsync it, and rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARKER}", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as ``.safetensors`` atomically (contiguous CPU copies, no shared storage)."""
    from safetensors.torch import save

    plain = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    payload = save(plain, metadata={"format": "pt", **(metadata or {})})
    return atomic_write(path, lambda handle: handle.write(payload))
