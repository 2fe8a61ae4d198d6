"""What a run directory records (written by rank 0 only): config, metrics.jsonl, TensorBoard, PNG plots.

* ``config.yaml`` — the resolved config the run used.
* ``metrics.jsonl`` — one JSON object per evaluation with flat keys: ``epoch``, ``step``, ``lr``,
  ``img_per_s``, ``epoch_time_s``, ``train/<loss term>`` (``train/loss`` is their sum, averaged over
  the epoch's steps) and ``val/<metric>`` for every metric the evaluator returned.
* TensorBoard events — the same scalars under the same tags, plus ``train/*`` every ``log_every`` steps.
* ``loss.png`` (training loss terms against step) and ``metrics.png`` (one panel per validation metric
  against epoch), redrawn after every evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

from tasks.engine.checkpoint import atomic_write
from tasks.engine.errors import EngineError

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
METRICS_PLOT = "metrics.png"
# What one run writes (besides TensorBoard's events.out.* files): a reused directory is checked for these.
RUN_FILES = (METRICS_FILE, LOSS_PLOT, METRICS_PLOT, "config.yaml", "last.pt", "best.pt", "model.safetensors")


LOCK_FILE = ".effdense.lock"


def lock_run_dir(run_dir: str | os.PathLike) -> Path:
    """Take ``run_dir``'s exclusive lock: a file created with ``O_EXCL`` that holds this process's pid.

    A second training into the same directory is refused while the first runs (one line naming its pid);
    a lock left by a process that no longer exists (killed with -9) is taken over. Returns the lock's
    path; :func:`unlock_run_dir` removes it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if owner is not None and owner != os.getpid() and _process_exists(owner):
                raise EngineError(f"run directory {run_dir} is in use by process {owner} (it holds {lock}); wait for "
                                  f"that run to end, or choose another --output / train.run_name") from None
            lock.unlink(missing_ok=True)  # its process is gone (or it is ours): a stale lock
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{os.getpid()}\n")
        return lock
    raise EngineError(f"run directory {run_dir}: could not take {lock} (another process keeps creating it)")


def unlock_run_dir(lock: Path | None) -> None:
    """Remove a lock taken by :func:`lock_run_dir` (only while it is still this process's)."""
    if lock is not None and _lock_owner(lock) == os.getpid():
        lock.unlink(missing_ok=True)


def _lock_owner(lock: Path) -> int | None:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def claim_run_dir(run_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a directory that holds another run's files (``RUN_FILES``, TensorBoard events), unless
    ``overwrite`` (``train.overwrite`` / ``--overwrite``), which removes them first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    found = sorted(p.name for p in run_dir.iterdir() if p.name in RUN_FILES or p.name.startswith("events.out"))
    if not found:
        return
    if not overwrite:
        raise EngineError(f"run directory {run_dir} already holds a run ({', '.join(found[:4])}); continue it "
                          f"with --resume {run_dir / 'last.pt'}, choose another --output / train.run_name, "
                          f"or pass --overwrite (train.overwrite=true) to replace it")
    for name in found:
        (run_dir / name).unlink()
    log.info("train.overwrite: removed the previous run's files from %s", run_dir)


def config_dict(cfg: Any) -> dict:
    """The config as plain dicts/lists/scalars."""
    from tasks.config import to_dict

    return to_dict(cfg)


def write_config(cfg: Any, path: str | os.PathLike) -> None:
    """``config.yaml``: the resolved config, a complete file ``tasks.config.load`` reads back."""
    from tasks.config import save

    save(cfg, path)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a reader sees null
    return value


class RunLog:
    """Rank 0's writer for one run directory; ``resume_step`` drops records written after that step."""

    def __init__(self, run_dir: str | os.PathLike, resume_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.records: list[dict] = []
        if resume_step is not None and self.metrics_path.is_file():
            self.records = [r for r in self._read_records() if r.get("step", 0) <= resume_step]
        self._rewrite_records()
        self.train_points: list[tuple[int, dict[str, float]]] = []
        # Hide events a killed run logged after its checkpoint (those at the checkpoint's step are kept).
        purge_step = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(self.run_dir), purge_step=purge_step)

    def _read_records(self) -> list[dict]:
        records = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a kill; the record is re-made by the resumed run
        return records

    def _rewrite_records(self) -> None:
        text = "".join(json.dumps(record) + "\n" for record in self.records)
        atomic_write(self.metrics_path, lambda handle: handle.write(text.encode()))

    def log_train(self, step: int, losses: dict[str, float], lr: float, img_per_s: float) -> None:
        """Training scalars at ``step`` (called every ``log_every`` optimizer steps)."""
        for name, value in losses.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", lr, step)
        self.writer.add_scalar("train/img_per_s", img_per_s, step)
        self.train_points.append((step, dict(losses)))

    def log_eval(self, record: dict[str, Any]) -> None:
        """Append one evaluation record to metrics.jsonl, TensorBoard, and redraw the plots."""
        record = {key: _finite_or_none(value) for key, value in record.items()}
        self.records.append(record)
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record["step"]
        for key, value in record.items():
            if key.startswith("val/") and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, step)
        self.writer.add_scalar("epoch", record["epoch"], step)
        self.writer.flush()
        self.plot()

    def plot(self) -> None:
        from matplotlib.figure import Figure  # a bare Figure renders PNG with Agg; pyplot's backend is untouched

        figure = Figure(figsize=(7, 4.5))  # fixed margins: tight_layout would double the drawing time
        figure.subplots_adjust(left=0.1, right=0.97, bottom=0.12, top=0.96)
        axes = figure.add_subplot()
        terms = sorted({name for _, losses in self.train_points for name in losses}
                       | {key[6:] for record in self.records for key in record if key.startswith("train/")})
        for term in terms:
            points = [(step, losses[term]) for step, losses in self.train_points if term in losses]
            epoch_points = [(r["step"], r[f"train/{term}"]) for r in self.records
                            if r.get(f"train/{term}") is not None]
            line, style = None, {"color": "black", "linewidth": 1.6} if term == "loss" else {"linewidth": 1}
            if points:
                line, = axes.plot(*zip(*points), label=term, **style)
            if epoch_points:
                axes.plot(*zip(*epoch_points), "o", color=line.get_color() if line else None,
                          label=None if line else term)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss")
        if terms:
            axes.legend()
        axes.grid(alpha=0.3)
        figure.savefig(self.run_dir / LOSS_PLOT, dpi=90)

        metrics = sorted({key for record in self.records for key in record if key.startswith("val/")})
        columns = max(1, min(3, len(metrics)))
        rows = max(1, math.ceil(len(metrics) / columns))
        figure = Figure(figsize=(4 * columns, 3 * rows))
        figure.subplots_adjust(left=0.1, right=0.97, bottom=0.15, top=0.9, wspace=0.3, hspace=0.5)
        for index, key in enumerate(metrics):
            axes = figure.add_subplot(rows, columns, index + 1)
            points = [(r["epoch"], r[key]) for r in self.records if isinstance(r.get(key), (int, float))]
            if points:
                axes.plot(*zip(*points), "o-")
            axes.set_title(key[4:])
            axes.set_xlabel("epoch")
            axes.grid(alpha=0.3)
        figure.savefig(self.run_dir / METRICS_PLOT, dpi=90)

    def close(self) -> None:
        self.writer.close()


class LossTracker:
    """The loss terms of every micro-step, stacked into a device buffer; ``read`` syncs a window at once.

    ``add`` costs one small kernel and no host sync; ``read`` (every ``log_every`` steps) averages the
    window over ranks and copies it to the host as float64 rows, one per micro-step.
    """

    def __init__(self, device: torch.device, capacity: int):
        self.device, self.capacity = device, capacity
        self.names: tuple[str, ...] | None = None
        self.rows = 0
        self._buffer = None

    def add(self, losses: Any) -> torch.Tensor:
        """Record one micro-step's terms; returns their sum (the tensor to backpropagate)."""
        names = tuple(losses) if isinstance(losses, dict) else None
        if names != self.names:
            self._start(losses, names)
        values = [value.reshape(()) for value in losses.values()]
        torch.stack([value.detach().float() for value in values], out=self._buffer[self.rows])
        self.rows += 1
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total

    def _start(self, losses: Any, names: tuple[str, ...] | None) -> None:
        if not names or not all(isinstance(v, torch.Tensor) and v.numel() == 1 for v in losses.values()):
            raise TypeError(f"the task model returned {type(losses).__name__} in train mode; it must return a "
                            f"non-empty dict of scalar loss tensors such as {{'loss': tensor(0.7)}}")
        if self.names is not None:
            raise ValueError(f"the task model returned loss terms {list(names)} but {list(self.names)} "
                             f"before; return the same terms every step")
        self.names = names
        self._buffer = torch.zeros(self.capacity, len(names), device=self.device)

    def read(self) -> torch.Tensor:
        """The window's rows (averaged over ranks) as a float64 host tensor; starts a new window."""
        from tasks.engine import distributed

        rows = self._buffer[: self.rows]
        distributed.all_reduce_mean_(rows)
        self.rows = 0
        return rows.double().cpu()


def progress_bar(iterable=None, *, enabled: bool, desc: str, total: int | None = None, initial: int = 0,
                 leave: bool = False):
    """A tqdm bar when ``enabled`` (rank 0 with ``train.progress``); else the iterable itself (or None)."""
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, initial=initial, leave=leave, dynamic_ncols=True)
