"""Checkpoint files: atomic writes, RNG state capture/restore, and loading with ``weights_only=True``.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, so ``torch.load(...,
weights_only=True)`` reads it back (no pickled numpy arrays or Python objects). Every file goes to a
temporary name in the same directory first, is flushed and fsync'ed, then renamed over the target
with ``os.replace`` (atomic on POSIX) and the directory is fsync'ed: a process killed at any moment
leaves either the previous complete file or the new complete file, never a torn one. Temporary files
are named ``.<target>.tmp-<random>`` so nothing ever mistakes one for the target.

Resume is exact: the data order of an epoch is a function of (seed, epoch) (``set_epoch`` on the
sampler, the loader's generator re-seeded with seed + epoch); a mid-epoch checkpoint holds each
rank's RNG states at the epoch start and after the last step, so the resumed run rebuilds the epoch's
iterator from the former, replays (loads and discards) the consumed batches — keeping DataLoader
workers' random streams in step — then continues from the latter. Exactness with ``num_workers > 0``
needs ``persistent_workers=False`` (persistent workers carry their RNG across epochs) and, on CUDA,
``train.deterministic`` (cuDNN autotuning may pick different kernels in a new process).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.files import TEMP_MARKER, atomic_write, write_safetensors
from backbones.weights import checkpoint_network_state

from tasks.engine.errors import EngineError

FORMAT = "effdense-checkpoint-v1"


def atomic_copy(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy ``source`` to ``target`` with the same all-or-nothing guarantee as ``atomic_write``."""
    with open(source, "rb") as src:
        return atomic_write(target, lambda dst: shutil.copyfileobj(src, dst, 16 << 20))


def remove_stale_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files left by a writer that was killed mid-write; returns what was removed."""
    directory = Path(directory)
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.name.startswith(".") and TEMP_MARKER in entry.name and entry.is_file():
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (a dict readable with ``weights_only=True``) atomically to ``path``."""
    return atomic_write(path, lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; a missing or damaged file is a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"checkpoint {path} does not exist; pass the path of a last.pt or best.pt "
                                f"written by a training run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises many types for damaged or foreign files
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise EngineError(f"checkpoint {path} cannot be read ({first_line}); it is damaged or was not "
                         f"written by effdense — resume from another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise EngineError(f"checkpoint {path} is not an effdense training checkpoint (no format "
                         f"'{FORMAT}'); pass a last.pt or best.pt from a run directory")
    return state


save_safetensors = write_safetensors  # (path, tensors, metadata=None) -> Path


# ---------------------------------------------------------------- RNG state


def capture_rng_state() -> dict[str, Any]:
    """Every global RNG the training loop touches, as tensors/ints/floats (``weights_only``-safe)."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_internal, py_gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": str(np_kind), "keys": torch.from_numpy(np_keys.astype(np.int64)),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": int(py_version), "internal": torch.tensor(py_internal, dtype=torch.int64),
                   "gauss_next": py_gauss_next},
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng_state`` (CUDA states are restored for the devices both runs have)."""
    torch.set_rng_state(state["torch"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32),
                         numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(int(v) for v in python_state["internal"].tolist()),
                     python_state["gauss_next"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        for index, cuda_state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)


def seed_everything(seed: int) -> None:
    """Seed python ``random``, numpy and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ---------------------------------------------------------------- training state


def training_state(*, model, ema, optimizer, scheduler, scaler, position: dict[str, int], rng: list | None,
                   config: dict, best: dict, meta: dict | None = None) -> dict[str, Any]:
    """Everything ``--resume`` needs, as one ``weights_only``-readable dict.

    ``position`` holds ``epoch`` (0-based, the epoch in progress or next), ``step`` (optimizer steps
    done), ``batch_in_epoch`` (batches of that epoch already consumed), ``world_size``, and what fixed
    the schedule: ``steps_per_epoch`` and ``global_batch``; ``rng`` has one entry per rank.
    ``meta`` (``task``, ``class_names``) lets predict/export work without the dataset.
    ``net_prefix`` records where the exportable network sits inside the task model's state dict.
    """
    return {
        "format": FORMAT, **position, "rng": rng, "config": config, "best": best, "meta": meta or {},
        "model": model.state_dict(), "net_prefix": "net." if hasattr(model, "net") else "",
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def write_run_checkpoint(run_dir: str | os.PathLike, state: dict[str, Any], *, last: bool, best: bool,
                         network: torch.nn.Module, ema: bool) -> None:
    """``last.pt`` plus ``model.safetensors`` (``network``'s weights) and/or ``best.pt`` in ``run_dir``."""
    run_dir = Path(run_dir)
    if last:
        save_checkpoint(run_dir / "last.pt", state)
        metadata = {"epoch": str(state["epoch"]), "step": str(state["step"]), "ema": str(ema).lower()}
        metadata.update(meta_to_strings(state.get("meta") or {}))
        save_safetensors(run_dir / "model.safetensors", network.state_dict(), metadata=metadata)
    if best and last:
        atomic_copy(run_dir / "last.pt", run_dir / "best.pt")
    elif best:
        save_checkpoint(run_dir / "best.pt", state)


def restore_training_state(state: dict[str, Any], path: str | os.PathLike, *, model, ema, optimizer,
                           scheduler, scaler) -> None:
    """Load model/EMA/optimizer/scheduler/scaler from ``state``; a mismatch is a one-line error."""
    try:
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    except (RuntimeError, ValueError, KeyError) as error:
        reason = " ".join(str(error).split())[:300]
        raise EngineError(f"checkpoint {path} does not fit this model/optimizer ({reason}); resume with the "
                         f"config the run was started with") from None
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])


def network_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The exportable network's weights from a training checkpoint: EMA weights when it holds them
    (the one rule, shared with every weight loader: ``backbones.weights.checkpoint_network_state``)."""
    return checkpoint_network_state(state)


def meta_to_strings(meta: dict[str, Any]) -> dict[str, str]:
    """``meta`` as safetensors metadata (string values): ``effdense.task``, and every other entry as JSON
    under ``effdense.<key>`` (``effdense.class_names``, ``effdense.cat_ids``)."""
    out = {}
    for key, value in meta.items():
        if value is None:
            continue
        out[f"effdense.{key}"] = str(value) if key == "task" else json.dumps(value)
    return out


def weights_meta(path: str | os.PathLike) -> dict[str, Any]:
    """``{"task": ..., "class_names": [...]}`` stored with a run's weights (``last.pt``/``best.pt`` or
    ``model.safetensors``); {} for files from elsewhere (torchvision, timm, ...) or unreadable ones."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                raw = handle.metadata() or {}
            meta = {}
            for key, value in raw.items():
                if key.startswith("effdense.") and key != "effdense.arch":
                    name = key[len("effdense."):]
                    meta[name] = value if name in ("task", "source_format") else json.loads(value)
            return meta
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # the weight loader reports unreadable files with the reason
        return {}
    if isinstance(state, dict) and state.get("format") == FORMAT:
        return {k: v for k, v in (state.get("meta") or {}).items() if v is not None}
    return {}


# Settings that shape the schedule and the data position: a checkpoint's scheduler and position are only
# valid for the same values (a resumed scheduler keeps the old total length and milestones).
RESUME_KEYS = ("train.epochs", "train.grad_accum", "data.batch_size", "optim", "schedule")


def _lookup(tree: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return None
        tree = tree[part]
    return tree


def check_resumable(state: dict[str, Any], path, config: dict, *, steps_per_epoch: int, global_batch: int,
                    world_size: int) -> None:
    """Refuse (one line naming every difference) a resume whose config (``RESUME_KEYS``), steps per epoch,
    global batch or, mid-epoch, number of processes differ from those of the run that wrote ``state``."""
    saved = state.get("config") or {}
    changed = []
    for key in RESUME_KEYS:
        old, new = _lookup(saved, key), _lookup(config, key)
        if old is not None and old != new:
            changed.append(f"{key} {old} -> {new}")
    # The schedule's length and the scaled LR were fixed by these: a new dataset size or world size would
    # keep the old T_max / LR (cosine climbing again after its old end).
    for key, now in (("steps_per_epoch", steps_per_epoch), ("global_batch", global_batch)):
        then = state.get(key)
        if then is not None and then != now:
            why = "a different dataset size or world size" if key == "steps_per_epoch" else "a different world size"
            changed.append(f"{key.replace('_', ' ')} {then} -> {now} ({why})")
    processes = len(state.get("rng") or [])
    if processes and processes != world_size and state["batch_in_epoch"]:
        changed.append(f"processes {processes} -> {world_size} (mid-epoch checkpoint)")
    if changed:
        raise EngineError(f"cannot resume {path}: {'; '.join(changed)} differ from the run that wrote it; resume "
                          f"with the same settings, or start a new run from its weights (eval/--set model.weights)")
