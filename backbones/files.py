"""All-or-nothing file writes: a killed process never leaves a half-written checkpoint behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from .errors import FileWriteError

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
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        if _is_write_failure(error):  # disk full, no permission, a vanished folder: the user's to fix
            raise FileWriteError(f"{path}: could not write the file ({_reason(error)}); any earlier {path.name} is "
                                 f"unchanged; free disk space or check the folder's permissions") from None
        raise
    _fsync_dir(path.parent)
    return path


def _is_write_failure(error: BaseException) -> bool:
    """OSError from the file system, or torch's zip writer saying it could not write (its RuntimeError)."""
    if isinstance(error, OSError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("PytorchStreamWriter failed" in text or "file write failed" in text)


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error).strip().splitlines()[-1].split("] ")[-1].lstrip(". ") if str(error).strip() else type(error).__name__


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor],
                      metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` as ``.safetensors`` atomically (contiguous CPU copies, no shared storage)."""
    from safetensors.torch import save

    plain = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in tensors.items()}
    payload = save(plain, metadata={"format": "pt", **(metadata or {})})
    return atomic_write(path, lambda handle: handle.write(payload))
