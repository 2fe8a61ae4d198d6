"""The one task table: task name -> how to build its model, predict with it, and demo it.

``cli``, ``demo``, ``eval``, ``predict`` (and export) read this table; adding a task is one entry here
(plus its module and schema). A plain dict filled by explicit imports (no registration by import side
effect); ``get`` names the known tasks when asked for another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from . import classification, detection, segmentation
from .data.formats import formats_for
from .engine.checkpoint import seed_everything

DEMO_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"


@dataclass(frozen=True)
class Task:
    name: str
    build_model: Callable  # (cfg) -> task module (the engine's task protocol)
    predict: Callable  # (cfg, task module, image paths, out=None, **options) -> list of per-image results
    demo_config: Path

    @property
    def formats(self) -> list[str]:
        return formats_for(self.name)


TASKS: dict[str, Task] = {}


def _add(task: Task) -> None:
    if task.name in TASKS:
        raise ValueError(f"duplicate task {task.name!r}")
    TASKS[task.name] = task


_add(Task("classification", classification.build_model, classification.predict, DEMO_CONFIGS / "classification.yaml"))
_add(Task("segmentation", segmentation.build_model, segmentation.predict, DEMO_CONFIGS / "segmentation.yaml"))
_add(Task("detection", detection.build_model, detection.predict, DEMO_CONFIGS / "detection.yaml"))


def get(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def build_model(cfg) -> nn.Module:
    """``cfg``'s task module, initialised from ``train.seed`` (the same seed builds the same weights)."""
    seed_everything(cfg.train.seed)
    return get(cfg.model.task).build_model(cfg)
