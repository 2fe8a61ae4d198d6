"""Evaluation without a trainer: ``evaluate(model, loader, device, amp, channels_last)``.

``effdense eval`` and ``Trainer`` both run this loop; it builds no optimizer, EMA copy or DDP wrapper.
Metrics are whatever the task's evaluator computes, flattened to one level with readable names
(``{"iou": {"road": 0.9}}`` -> ``iou/road``). Every rank must get identical metrics: evaluators reduce
their counts over ranks (a confusion matrix, top-k counts) or gather predictions to rank 0, compute
there and broadcast the result (COCO); this loop only feeds them.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import nn

from tasks.engine import distributed as dist_utils
from tasks.engine.distributed import to_device
from tasks.engine.runlog import progress_bar

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` (none | bf16 | fp16) on ``device``'s type, or a no-op."""
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def images_to_device(images: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """The uint8 batch on ``device`` (the task model normalises it there), channels_last if asked."""
    images = images.to(device, non_blocking=True)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested metric dicts as one level: ``{"iou": {"road": t}}`` -> ``{"iou/road": float(t)}``."""
    flat: dict[str, float] = {}
    for name, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{prefix}{name}/"))
        else:
            flat[f"{prefix}{name}"] = float(value)
    return flat


def run_evaluation(model: nn.Module, loader, device: torch.device, amp: str = "none", channels_last: bool = False,
                   progress: bool = False) -> tuple[dict[str, float], Any]:
    """(flat metrics, the evaluator) for ``model`` over ``loader``; the model's train/eval mode is restored."""
    dist_utils.broadcast_buffers_(model)  # DDP keeps rank 0's BN statistics; evaluate with them everywhere
    evaluator = model.make_evaluator()
    evaluator.reset()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast(device, amp):
            for images, targets in progress_bar(loader, enabled=progress, desc="eval"):
                images = images_to_device(images, device, channels_last)
                evaluator.update(model(images), to_device(targets, device))
        metrics = flatten_metrics(evaluator.compute())
    finally:
        model.train(was_training)
    return metrics, evaluator


def evaluate(model: nn.Module, loader, device: str | torch.device | None = None, amp: str = "none",
             channels_last: bool = False, progress: bool = False, output_dir=None) -> dict[str, float]:
    """Metrics of a task model (``model.make_evaluator()``) over ``loader``, identical on every rank.

    ``device`` defaults to where the model's parameters are; the model is moved there. ``output_dir``:
    the evaluator also writes its files there (``save(dir)``: a per-class table, detections.json, ...).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
    metrics, evaluator = run_evaluation(model, loader, device, amp, channels_last, progress)
    if output_dir is not None and hasattr(evaluator, "save"):
        evaluator.save(output_dir)
    return metrics


def is_improvement(value: float, best: float | None, higher_is_better: bool) -> bool:
    """Whether ``value`` beats ``best`` (a non-finite value never does)."""
    if not math.isfinite(value):
        return False
    return best is None or (value > best if higher_is_better else value < best)
