"""Progressive learning's stage schedule (EfficientNetV2, Tan & Le 2021, Sec. 4.2 and Algorithm 1), task-agnostic.

Training is split into ``N`` stages of ``epochs / N`` epochs each (epoch ``e`` is in stage ``e * N // epochs``,
so uneven splits differ by one epoch at most). Each scheduled value rises linearly from its first to its last
value, stage ``i`` (0-based) taking ``first + (last - first) * i / (N - 1)`` (the paper's Algorithm 1: the
first stage at the first value, the last at the last). Values given as ``multiple=`` (image sizes) are rounded
to that multiple in the stages between the two ends, which stay exactly as given.

The engine knows nothing of what the values mean: a task builds :class:`StageHook` with its ``apply(trainer,
stage)`` (classification: the train loader's transform, the head's dropout, the Mixup alpha) and passes it in
``Trainer(..., epoch_callbacks=[hook])``; the trainer calls it at each epoch start with ``(trainer, epoch)``.
The hook prints :func:`schedule_table` at its first call and applies a stage whenever the epoch's stage is not
the one applied last (so a resumed run gets its stage back). :func:`rebuild_loader` gives a loader's twin
(same dataset, sampler and settings, new workers) for when workers hold a dataset copy across epochs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("effdense")

__all__ = ["Stage", "build_stages", "stage_index", "schedule_table", "StageHook", "rebuild_loader"]


@dataclass(frozen=True)
class Stage:
    index: int  # 0-based
    epochs: range  # the (0-based) epochs it covers
    values: dict[str, Any] = field(default_factory=dict)


def stage_index(epoch: int, epochs: int, stages: int) -> int:
    """The 0-based stage of 0-based ``epoch`` when ``epochs`` are split into ``stages`` near-equal parts."""
    return min(stages - 1, max(0, epoch) * stages // epochs)


def build_stages(epochs: int, stages: int, ramps: dict[str, tuple[float, float] | None],
                 constants: dict[str, Any] | None = None, multiple: dict[str, int] | None = None) -> list[Stage]:
    """The stages: ``ramps`` name -> ``(first, last)`` (linear over the stages) or None (then
    ``constants[name]``, the same in every stage; None there means "left as built"). ``multiple``: name ->
    round the in-between stages' values to this multiple (the ends stay as given)."""
    if stages < 1:
        raise ValueError(f"stages={stages} must be at least 1")
    if epochs < stages:
        raise ValueError(f"{stages} stages need at least {stages} epochs, got {epochs}")
    constants, multiple = constants or {}, multiple or {}
    out = []
    for index in range(stages):
        values = {}
        for name, ramp in ramps.items():
            if ramp is None:
                values[name] = constants.get(name)
                continue
            first, last = ramp
            if index == 0 or index == stages - 1:  # the ends exactly as given (their type too)
                value = first if index == 0 else last
            else:
                value = first + (last - first) * index / (stages - 1)
                if name in multiple:
                    value = multiple[name] * round(value / multiple[name])
            values[name] = value
        start = next(e for e in range(epochs) if stage_index(e, epochs, stages) == index)
        end = max(e for e in range(epochs) if stage_index(e, epochs, stages) == index) + 1
        out.append(Stage(index, range(start, end), values))
    return out


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (tuple, list)):
        return "x".join(_cell(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def schedule_table(stages: list[Stage], title: str = "progressive learning") -> str:
    """A plain-text table: one row per stage (its epochs, 1-based, then each value; ``-``: as built)."""
    names = list(stages[0].values) if stages else []
    header = ["stage", "epochs", *names]
    rows = [[f"{s.index + 1}/{len(stages)}", f"{s.epochs.start + 1}-{s.epochs.stop}",
             *(_cell(s.values[name]) for name in names)] for s in stages]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [f"{title}: {len(stages)} stages"]
    lines += ["  ".join(str(cell).rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    return "\n".join(lines)


class StageHook:
    """The per-epoch callback ``(trainer, epoch)``: applies ``apply(trainer, stage)`` when ``epoch`` enters a
    stage other than the one applied last (the first call always applies), printing the table first.
    ``applied``: the indices of the stages applied, in order (a record for tests and logs)."""

    def __init__(self, stages: list[Stage], apply: Callable[[Any, Stage], None], title: str = "progressive learning"):
        if not stages:
            raise ValueError("StageHook needs at least one stage")
        self.stages, self.apply, self.title = stages, apply, title
        self.epochs = stages[-1].epochs.stop
        self.current: int | None = None
        self.applied: list[int] = []

    def stage_at(self, epoch: int) -> Stage:
        return self.stages[stage_index(epoch, self.epochs, len(self.stages))]

    def table(self) -> str:
        return schedule_table(self.stages, self.title)

    def __call__(self, trainer, epoch: int) -> None:
        stage = self.stage_at(epoch)
        if stage.index == self.current:
            return
        main = getattr(trainer, "is_main", True)
        if main and self.current is None:
            log.info("%s", self.table())
        self.apply(trainer, stage)
        self.current = stage.index
        self.applied.append(stage.index)
        if main:
            values = ", ".join(f"{name} {_cell(value)}" for name, value in stage.values.items())
            log.info("stage %d/%d from epoch %d: %s", stage.index + 1, len(self.stages), epoch + 1, values)


def rebuild_loader(loader):
    """A new ``DataLoader`` over ``loader``'s dataset with its sampler, batch size and settings (fresh workers:
    persistent workers keep the dataset they were started with, so a changed transform needs new ones)."""
    from torch.utils.data import DataLoader

    options = dict(batch_size=loader.batch_size, sampler=loader.sampler, num_workers=loader.num_workers,
                   collate_fn=loader.collate_fn, pin_memory=loader.pin_memory, drop_last=loader.drop_last,
                   timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
                   persistent_workers=loader.persistent_workers,
                   multiprocessing_context=loader.multiprocessing_context)
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    twin = DataLoader(loader.dataset, **options)
    if len(twin) != len(loader):
        raise RuntimeError(f"rebuilt loader has {len(twin)} batches, the original {len(loader)}")
    return twin
