"""The one task table: each row holds everything task-specific that the shared commands need.

``cli`` (train, eval, predict, demo, backbones), ``budget``, ``summary`` and ``export`` read this table and
branch on nothing else; adding a task is a package beside ``tasks/classification`` (model, evaluate,
predict, scale), its ``Config`` subclass in ``tasks.config.schema``, a data format row in
``tasks.data.formats``, a demo preset, and one row here. A plain dict filled by explicit imports (no
registration by import side effect); ``get`` names the known tasks when asked for another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from tasks.config import ConfigError
from tasks.config.scaling import ScaleFamily
from tasks.config.schema import ClassificationConfig, Config, DetectionConfig, SegmentationConfig
from tasks.data.formats import formats_for
from tasks.engine.checkpoint import seed_everything, weights_meta

from . import classification, detection, segmentation
from .classification import scale as classification_scale
from .detection import augment as detection_augment
from .detection import scale as detection_scale
from .segmentation import scale as segmentation_scale

__all__ = ["Task", "TASKS", "get", "build_model", "describe_scale", "load_task_weights", "build_with_weights"]


@dataclass(frozen=True)
class Task:
    name: str
    config: type[Config]  # the task's schema (``tasks.config.load`` picks it by ``model.task``)
    build_model: Callable  # (cfg) -> task module (the engine's task protocol)
    predict: Callable  # (cfg, task module, image paths, out=None, **options) -> list of per-image results
    describe_scale: Callable  # (cfg) -> plain dict: what the config's phi / scale resolves to
    example_batch: Callable  # (cfg, batch_size, device) -> (uint8 images, training targets), for budget
    scales: ScaleFamily  # the named scales, their published accuracy and how budget measures them
    summary_keys: tuple[str, ...]  # the resolved sizes `effdense backbones --task` shows per scale
    demo_preset: str  # a shipped preset name (tasks.config.presets)
    demo_overrides: Callable = lambda overrides: []  # (the user's --set list) -> what the demo data needs first
    epoch_callbacks: Callable = lambda cfg: []  # (cfg) -> the trainer's per-epoch hooks (progressive learning)

    @property
    def formats(self) -> list[str]:
        return formats_for(self.name)


TASKS: dict[str, Task] = {}


def _add(task: Task) -> None:
    if task.name in TASKS:
        raise ValueError(f"duplicate task {task.name!r}")
    if task.config.TASK != task.name:
        raise ValueError(f"task {task.name!r}: its config schema is for {task.config.TASK!r}")
    TASKS[task.name] = task


_add(Task("classification", ClassificationConfig, classification.build_model, classification.predict,
          classification_scale.describe_scale, classification_scale.example_batch, classification_scale.SCALES,
          classification_scale.SUMMARY_KEYS, "demo/classification", epoch_callbacks=classification.epoch_callbacks))
_add(Task("segmentation", SegmentationConfig, segmentation.build_model, segmentation.predict,
          segmentation_scale.describe_scale, segmentation_scale.example_batch, segmentation_scale.SCALES,
          segmentation_scale.SUMMARY_KEYS, "demo/segmentation", segmentation.demo_overrides))
_add(Task("detection", DetectionConfig, detection.build_model, detection.predict,
          detection_scale.describe_scale, detection_scale.example_batch, detection_scale.SCALES,
          detection_scale.SUMMARY_KEYS, "demo/detection", epoch_callbacks=detection_augment.epoch_callbacks))


def get(name: str) -> Task:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name]


def build_model(cfg) -> nn.Module:
    """``cfg``'s task module, initialised from ``train.seed`` (the same seed builds the same weights)."""
    seed_everything(cfg.train.seed)
    return get(cfg.model.task).build_model(cfg)


def describe_scale(cfg) -> dict:
    """What ``cfg``'s phi / scale resolves to (printed at the start of a run and saved as ``scale.json``)."""
    return get(cfg.model.task).describe_scale(cfg)


def load_task_weights(task_model, path: str, task: str | None = None) -> dict:
    """Load a weights file into a task module's network and return the metadata stored with it.

    One rule for every command: an effdense checkpoint gives its EMA weights when it holds them
    (``backbones.weights``); ``model.safetensors`` and torchvision/timm/... files load as they are.
    With ``task`` (the config's ``model.task``), weights that say they belong to another task are
    refused before anything loads (not as a list of missing keys).
    """
    from backbones.weights import load_weights

    meta = weights_meta(path)
    stored = meta.get("task")
    if task and stored and stored != task:
        raise ConfigError(f"{path} holds {stored} weights but the config is for model.task={task}; "
                          f"use a {stored} config")
    if hasattr(task_model, "load_weights"):  # the task's own rules (smp U-Nets, effdet detectors)
        task_model.load_weights(path)
    else:
        load_weights(task_model.net, path)
    for key, value in meta.items():  # class_names, and what the task stored (detection's cat_ids)
        if key != "task" and hasattr(task_model, key):
            setattr(task_model, key, value)
    return meta


def build_with_weights(cfg, path: str):
    """``cfg``'s task module with a whole-model weights file loaded (``load_task_weights``). The file replaces
    everything, so the config's ``model.weights`` and ``model.backbone_weights`` are not read (nor fetched)."""
    cfg.model.weights = cfg.model.backbone_weights = None
    model = build_model(cfg)
    load_task_weights(model, path, cfg.model.task)
    return model
