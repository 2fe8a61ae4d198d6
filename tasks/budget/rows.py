"""The parts of a budget table: the limits, a scale, a row, the result; and measuring one row (with its
progress line and ``budget.json`` rewritten after each row, so an interrupted run keeps what it measured)."""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tasks.config import resolve_image_size, validate
from tasks.registry import get as get_task

from .errors import BudgetError
from .measure import Measurement

__all__ = ["Limits", "Scale", "Row", "BudgetResult", "phi_scale", "named_scale", "config_for", "why_not",
           "measure_row", "unmeasured_row", "RowLog", "check_measurable", "device_type", "accuracy", "time_budget",
           "images_per_step", "minutes_settings"]


@dataclass(frozen=True)
class Limits:
    """The budget: any of batch-1 latency (ms), peak training memory (GB), eval throughput (img/s)."""

    latency_ms: float | None = None
    memory_gb: float | None = None
    min_throughput: float | None = None

    def violations(self, m: Measurement) -> dict[str, tuple[float, float, float]]:
        """limit name -> (measured, limit, how many times over) for each limit ``m`` breaks."""
        out = {}
        checks = (("latency_ms", m.latency_ms, self.latency_ms, False),
                  ("memory_gb", m.peak_memory_gb, self.memory_gb, False),
                  ("min_throughput", m.throughput, self.min_throughput, True))
        for name, value, limit, at_least in checks:
            if limit is None or value is None:
                continue
            over = (limit / value if value > 0 else math.inf) if at_least else value / limit
            if over > 1.0:
                out[name] = (value, limit, over)
        return out

    def given(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Scale:
    """One model size: its label (``B3``, ``D7x``, ``phi=2.35``, ``efficientnet-lite0``) and config overrides."""

    label: str
    overrides: tuple[tuple[str, object], ...]  # (dotted key, value)
    key: str | None = None  # the published-table key ("3", "7x") when it is a named scale

    def set_args(self) -> list[str]:
        """``--set`` arguments that reproduce this scale."""
        return [f"{k}={'null' if v is None else v}" for k, v in self.overrides]


def named_scale(task: str, index: str) -> Scale:
    """``B3``, ``D7x``; a name that is not a number keeps its own (``lite0`` -> ``Lite0``, not ``Dlite0``)."""
    label = f"{get_task(task).scales.prefix}{index}" if index[:1].isdigit() else index.capitalize()
    return Scale(label, (("model.scale", index), ("model.phi", None)), key=index)


def phi_scale(phi: float) -> Scale:
    phi = round(float(phi), 4)
    return Scale(f"phi={phi:g}", (("model.phi", phi), ("model.scale", None)))


def _set_args(cfg, scaled, scale: Scale) -> list[str]:
    args = scale.set_args()
    if scaled.data.image_size != cfg.data.image_size:
        size = scaled.data.image_size
        args.append(f"data.image_size={'null' if size is None else list(size)}".replace(" ", ""))
    return args


def config_for(cfg, scale: Scale, image_size: str | tuple[int, int] | None = None):
    """A validated copy of ``cfg`` at ``scale`` (see the package doc for the input size)."""
    scaled = copy.deepcopy(cfg)
    for key, value in scale.overrides:
        section, name = key.split(".")
        setattr(getattr(scaled, section), name, value)
    if image_size is None:
        image_size = get_task(cfg.model.task).scales.image_size
    if image_size == "native":
        scaled.data.image_size = None
    elif image_size != "config":
        scaled.data.image_size = [int(image_size[0]), int(image_size[1])]
    return validate(scaled)


@dataclass
class Row:
    """One scale's line of the table."""

    scale: Scale
    image_size: tuple[int, int]
    measurement: Measurement
    accuracy: float | None = None
    violations: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    set_args: list[str] = field(default_factory=list)  # --set arguments that reproduce the row from the config
    steps_in_budget: int | None = None  # with --minutes: optimizer steps that fit in them (see time_budget)
    images_in_budget: int | None = None  # ... and the training images those steps see

    @property
    def fits(self) -> bool:
        return self.measurement.status == "ok" and not self.violations


@dataclass
class BudgetResult:
    """Every row, the chosen one (index or None) and what stops the next scale up; ``complete`` is False
    while a sweep or search is still measuring (the ``budget.json`` written after each row)."""

    task: str
    device: str
    limits: Limits
    rows: list[Row]
    chosen: int | None
    stopped_by: str
    settings: dict = field(default_factory=dict)
    complete: bool = True

    def table(self) -> str:
        from tasks.budget.report import format_table

        return format_table(self)

    def to_json(self) -> dict:
        from tasks.budget.report import to_json

        return to_json(self)

    def write_json(self, out_dir: str | Path) -> Path:
        """``budget.json`` in ``out_dir``, written atomically (a kill leaves the previous one whole)."""
        from backbones.files import atomic_write

        text = (json.dumps(self.to_json(), indent=1) + "\n").encode()
        return atomic_write(Path(out_dir) / "budget.json", lambda handle: handle.write(text))

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """``budget.json`` and ``budget.png`` in ``out_dir``; returns both paths."""
        from tasks.budget.report import plot

        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        return self.write_json(folder), plot(self, folder / "budget.png")


def images_per_step(cfg) -> int:
    """Training images per optimizer step in one process: the config's global batch (batch x accumulation,
    or ``data.global_batch_size``)."""
    from tasks.engine.batching import global_batch

    return global_batch(cfg, 1)


def time_budget(measurement: Measurement, minutes: float | None, batch: int) -> tuple[int | None, int | None]:
    """(optimizer steps, training images) in ``minutes`` of training at ``batch`` images a step, extrapolated
    from the measured training step: ``step s = train_ms_per_image * batch / 1000``, ``steps = floor(minutes *
    60 / step s)``, ``images = steps * batch``. The step is forward, backward and optimizer only (no data
    loading, evaluation or checkpoints): an upper bound. ``(None, None)`` without minutes or a step time."""
    if minutes is None or not measurement.train_ms_per_image:
        return None, None
    step_seconds = measurement.train_ms_per_image * batch / 1000
    steps = math.floor(minutes * 60 / step_seconds + 1e-9)
    return steps, steps * batch


def minutes_settings(cfg, minutes: float | None) -> dict:
    """The result's settings for a time budget: ``minutes`` and ``images_per_step`` ({} without one)."""
    if minutes is None:
        return {}
    if not minutes > 0:
        raise BudgetError(f"--minutes {minutes:g}: the time budget must be a positive number of minutes")
    return {"minutes": float(minutes), "images_per_step": images_per_step(cfg)}


def accuracy(task: str, scale: Scale) -> float | None:
    if scale.key is None:
        return None
    return get_task(task).scales.published.get(scale.key)


def _describe(name: str, value: float, limit: float) -> str:
    if name == "latency_ms":
        return f"needs {value:.1f} ms at batch 1, limit {limit:g} ms"
    if name == "memory_gb":
        return f"needs {value:.2f} GB to train, limit {limit:g} GB"
    return f"runs {value:.1f} img/s, limit at least {limit:g} img/s"


def why_not(row: Row) -> str:
    """'B3 needs 41.0 ms at batch 1, limit 20 ms' (each limit broken), 'B5 runs out of memory ...',
    'phi=8 needs ~31.0 GB at batch 1, this machine has 17.9 GB free' (skipped by the CPU memory guard)."""
    m = row.measurement
    if m.status == "oom":
        return f"{row.scale.label} runs {m.note}"
    if m.status == "skipped":
        return f"{row.scale.label} {m.note}"
    if m.status != "ok":
        return f"{row.scale.label} was {m.status}"
    return "; ".join(f"{row.scale.label} {_describe(name, value, limit)}"
                     for name, (value, limit, _) in row.violations.items())


def check_measurable(limits: Limits, device_type: str) -> None:
    if limits.memory_gb is not None and device_type != "cuda":
        raise BudgetError(f"--memory-gb {limits.memory_gb:g}: peak training memory is measured on CUDA only "
                          f"(torch.cuda.max_memory_allocated); on {device_type} drop the memory limit")


def device_type(cfg, device) -> str:
    from tasks.engine.distributed import pick_device

    return (pick_device(cfg.train.device) if device is None else torch.device(device)).type


# ------------------------------------------------------------------------------------------ measuring a row


class RowLog:
    """Progress of a sweep or search: a tqdm bar showing the scale being measured, one line per finished
    scale with its time ("phi=2 (260x260): 85 s, fits") on stderr, and -- with ``out_dir`` -- ``budget.json``
    rewritten (``complete: false``) after every row."""

    def __init__(self, result: BudgetResult, *, progress: bool, desc: str, total: int | None,
                 out_dir: str | Path | None = None):
        from tasks.engine.runlog import progress_bar

        self.result, self.out_dir = result, out_dir
        self.bar = progress_bar(enabled=progress, desc=desc, total=total)

    def start(self, scale: Scale, size: tuple[int, int]) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"measuring {scale.label} ({size[0]}x{size[1]})")

    def finished(self, row: Row, rows: list[Row]) -> None:
        """``row`` is done (its line, if measured); ``rows``: every row so far, in table order."""
        from tasks.budget.report import row_status

        seconds = row.measurement.extra.get("seconds")
        if self.bar is not None and seconds is not None:
            size = f"{row.image_size[0]}x{row.image_size[1]}"
            self.bar.write(f"{row.scale.label} ({size}): {seconds:.0f} s, {row_status(row)}", file=sys.stderr)
            self.bar.update(1)
        if self.out_dir is not None:
            self.result.rows = list(rows)
            self.result.write_json(self.out_dir)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def measure_row(cfg, scale: Scale, limits: Limits, measure: Callable, image_size=None,
                log: RowLog | None = None, minutes: float | None = None) -> Row:
    """Measure ``cfg`` at ``scale`` (``measure(cfg_at_scale) -> Measurement``), timed (``extra["seconds"]``);
    ``log`` shows which scale is being measured (the caller reports it done: ``log.finished``); with
    ``minutes``, the steps and images that fit in them (:func:`time_budget`)."""
    scaled = config_for(cfg, scale, image_size)
    size = resolve_image_size(scaled)
    if log is not None:
        log.start(scale, size)
    start = time.perf_counter()
    measurement = measure(scaled)
    seconds = time.perf_counter() - start
    measurement.extra = {**measurement.extra, "seconds": round(seconds, 1)}
    return Row(scale, size, measurement, accuracy(cfg.model.task, scale), limits.violations(measurement),
               _set_args(cfg, scaled, scale), *time_budget(measurement, minutes, images_per_step(scaled)))


def unmeasured_row(cfg, scale: Scale, limits: Limits, note: str, cost: Callable | None, image_size=None) -> Row:
    """A row past the end of a sweep: not measured, its parameters and GMACs still counted (``cost``)."""
    scaled = config_for(cfg, scale, image_size)
    measurement = Measurement(status="not measured", note=note)
    if cost is not None:
        measurement.params_m, measurement.gmacs = cost(scaled)
    return Row(scale, resolve_image_size(scaled), measurement, accuracy(cfg.model.task, scale),
               limits.violations(measurement), _set_args(cfg, scaled, scale))
