"""What one model scale costs on this device: ``measure_scale(cfg)``; and ``find_batch_size(cfg)``.

Everything runs the task module the engine trains (``tasks.registry.build_model(cfg)``) with the
config's ``train.amp`` and ``train.channels_last``, on uint8 batches as the loaders deliver them:

* latency: eval mode, batch 1, ``inference_mode``; the median over ``runs`` calls, each synchronised
  (for detection the forward includes top-k and NMS: the time to a list of detections).
* throughput: eval mode at the config's eval batch (``data.eval_batch_size``, else ``data.batch_size``):
  images per second of the median call.
* training step: forward, summed losses, backward, optimizer step (the engine's optimizer), at
  ``data.batch_size``, on a synthetic batch from the task's ``example_batch``; the median step after one
  warm-up step (``train_ms_per_image``: that step over its batch). Peak training memory:
  ``torch.cuda.max_memory_allocated`` over those steps on CUDA; on CPU no peak is measured (``None``,
  printed "n/a"): torch's CPU allocator keeps no statistics and process RSS mixes in the allocator's
  caching and every earlier scale.
* parameters and GMACs (multiply-accumulates, the unit the EfficientNet paper calls FLOPs) of the
  network at batch 1 and the measured input size: ``FlopCounterMode`` on the meta device, so they
  are known even for scales that are not measured or do not fit in memory.

On the CPU nothing catches running out of memory (the kernel kills the process), so each scale is
planned first (``tasks.budget.memory``): its peak is estimated on the meta device and compared with the
free memory. A scale whose batch-1 training step would not fit is not started: its row says ``skipped``
("needs ~X GB at batch 1, this machine has Y GB free (80% of it planned on)"). Where the config's
batch would not fit, the step (or the throughput) is measured at the largest batch that does; and each
timed phase is kept under ``max_seconds`` (default ``CPU_PHASE_SECONDS``) by a smaller batch, judged
from the time per image measured before it (the batch-1 latency; for the step, 3x the inference time
per image).
``extra["train_batch"]`` / ``["eval_batch"]`` are the batches used and ``note`` says why; the per-image
figures (latency, img/s, ``train_ms_per_image``) stay comparable across rows.

Random weights: ``model.weights``/``model.backbone_weights`` are dropped (timing needs none, and a file
fits one scale only); ``train.compile`` is not applied (compilation time would dominate a few calls).
On a shared CPU, set the intra-op threads (``torch.set_num_threads``) before measuring: OpenMP's
spinning barrier made 2-thread timings 20x slower here whenever another process held a core.

Running out of memory (``torch.cuda.OutOfMemoryError`` or a RuntimeError saying "out of memory") is
not an error here: the measurement says so (``oom``) and the memory is released.

Synthetic batches: each task's registry row gives ``example_batch(cfg, batch_size, device) -> (uint8
images (N, 3, H, W), targets)`` in the task's training-target format (``tasks.<task>.scale``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from tasks.config import resolve_image_size
from tasks.engine.distributed import pick_device
from tasks.engine.evaluate import autocast, images_to_device
from tasks.engine.optim import build_optimizer, scaled_lr

from .memory import (
    MEMORY_MARGIN,
    available_memory_gb,
    estimate_memory,
    neat_batch,
    plan_batches,
)

__all__ = ["Measurement", "example_batch", "measure_scale", "count_cost", "is_oom",
           "BatchSizeResult", "find_batch_size"]


@dataclass
class Measurement:
    """One scale's numbers; ``None`` where not measured."""

    params_m: float | None = None
    gmacs: float | None = None
    latency_ms: float | None = None  # batch 1, median
    throughput: float | None = None  # images/s at the eval batch
    train_step_ms: float | None = None  # at the training batch, median
    train_ms_per_image: float | None = None  # train_step_ms / the batch it was measured at
    peak_memory_gb: float | None = None  # CUDA training peak; None on CPU
    status: str = "ok"  # ok | oom | skipped (would not fit host memory) | not measured
    note: str = ""
    extra: dict = field(default_factory=dict)  # batch sizes, image size, runs


# ------------------------------------------------------------------------------------------ batches


def example_batch(cfg, batch_size: int, device="cpu"):
    """A synthetic training batch for ``cfg``'s task: its registry row's ``example_batch``."""
    from tasks import registry

    return registry.get(cfg.model.task).example_batch(cfg, batch_size, device)


# ------------------------------------------------------------------------------------------ helpers


def is_oom(error: BaseException) -> bool:
    """Out of device (or host) memory, however torch reported it."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def release_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:  # glibc keeps freed heap pages; hand them back so the next scale's estimate sees them free
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_time(model, images, device: torch.device, runs: int, warmup: int) -> float:
    """Median seconds of ``model(images)`` over ``runs`` synchronised calls, after ``warmup`` calls
    (kernels, cuDNN autotuning, the allocator)."""
    for _ in range(warmup):
        model(images)
    return statistics.median(_timed(partial(model, images), device) for _ in range(runs))


def _no_weights(cfg):
    import copy

    cfg = copy.deepcopy(cfg)
    cfg.model.weights = None  # timing needs no trained weights (and a file may not fit another scale)
    cfg.model.backbone_weights = None
    return cfg


def _default_build(cfg):
    from tasks import registry

    return registry.build_model(cfg)


def count_cost(cfg, build: Callable = _default_build) -> tuple[float, float]:
    """(parameters in millions, GMACs of one image at the config's input size), on the meta device."""
    cfg = _no_weights(cfg)
    height, width = resolve_image_size(cfg)
    with torch.device("meta"):
        model = build(cfg).eval()
        net = getattr(model, "net", model)
        forward = getattr(net, "forward_raw", net)  # detection: the network without NMS
        image = torch.empty(1, 3, height, width)
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            forward(image)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    return params, counter.get_total_flops() / 2e9


# ------------------------------------------------------------------------------------------ measuring


def _train_step(model, optimizer, images, targets, cfg, device, scaler):
    optimizer.zero_grad(set_to_none=True)
    with autocast(device, cfg.train.amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


CPU_PHASE_SECONDS = 60.0  # on the CPU, each timed phase (throughput, training) aims to take at most this


def measure_scale(cfg, *, device: torch.device | str | None = None, runs: int | None = None,
                  build: Callable = _default_build, train: bool = True,
                  free_gb: Callable[[], float | None] | None = None, max_seconds: float | None = None) -> Measurement:
    """Measure ``cfg``'s model on ``device`` (default: ``train.device``); see the module doc.

    ``runs``: timed calls for latency (throughput and training steps take half as many, at least 1);
    default 5 on CPU, 20 on CUDA. ``train=False`` skips the training step. Never raises for OOM.
    On the CPU: ``free_gb()`` gives the free host memory (default ``available_memory_gb``; tests fake it)
    and ``max_seconds`` the time per phase (default ``CPU_PHASE_SECONDS``); see the module doc.
    """
    device = pick_device(cfg.train.device) if device is None else torch.device(device)
    runs = runs or (20 if device.type == "cuda" else 5)
    few = max(1, runs // 2)
    eval_batch = cfg.data.eval_batch_size or cfg.data.batch_size
    train_batch = cfg.data.batch_size
    result = Measurement(extra={"image_size": list(resolve_image_size(cfg)), "eval_batch": eval_batch,
                                "train_batch": train_batch, "config_eval_batch": eval_batch,
                                "config_train_batch": train_batch, "runs": runs, "device": str(device)})
    result.params_m, result.gmacs = count_cost(cfg, build)
    plan = None
    if device.type != "cuda":
        plan = plan_batches(estimate_memory(cfg, build), (free_gb or available_memory_gb)(), train_batch, eval_batch,
                            train=train)
        result.extra["memory"] = plan.as_dict()
        if plan.skip:
            result.status, result.note = "skipped", plan.skip
            return result
        eval_batch, train_batch = plan.eval_batch, plan.train_batch
        max_seconds = CPU_PHASE_SECONDS if max_seconds is None else max_seconds
    model = None
    stage = "building the model"
    try:
        model = _build_on(cfg, build, device).eval()
        stage = "inference at batch 1"
        with torch.inference_mode(), autocast(device, cfg.train.amp):
            one = images_to_device(example_batch(cfg, 1)[0], device, cfg.train.channels_last)
            result.latency_ms = 1e3 * _median_time(model, one, device, runs, warmup=2)
            eval_batch = _time_cap(eval_batch, result.latency_ms / 1e3, 1 + few, max_seconds, plan, "eval")
            stage = f"inference at batch {eval_batch}"
            batch = images_to_device(example_batch(cfg, eval_batch)[0], device, cfg.train.channels_last)
            result.throughput = eval_batch / _median_time(model, batch, device, few, warmup=1)
            del one, batch
        if train:  # a training step costs about 3 forwards (forward + backward)
            train_batch = _time_cap(train_batch, 3 / result.throughput, 1 + few, max_seconds, plan, "train",
                                    least=min(2, train_batch))  # BatchNorm cannot train one 1x1 map
            stage = f"training at batch {train_batch}"
            _measure_training(model, cfg, device, few, result, train_batch)
    except Exception as error:  # noqa: BLE001 -- only out-of-memory is a result; the rest re-raises
        if not is_oom(error):
            raise
        result.status, result.note = "oom", f"out of memory {stage}"
    finally:
        del model
        release_memory(device)
    result.extra.update(eval_batch=eval_batch, train_batch=train_batch)
    if plan is not None:  # the estimate at the batches used
        plan.eval_batch, plan.train_batch = eval_batch, train_batch
        result.extra["memory"] = plan.as_dict()
    if plan is not None and result.status == "ok":
        result.note = "; ".join(f"{what} at b{batch} ({', '.join(why)})" for what, batch, why in
                                (("img/s", eval_batch, plan.eval_reason), ("step", train_batch, plan.train_reason))
                                if why)
    return result


def _time_cap(batch: int, seconds_per_image: float, calls: int, max_seconds: float | None, plan, phase: str,
              least: int = 1) -> int:
    """``batch``, or a smaller one (at least ``least``) so that ``calls`` calls take about ``max_seconds``
    (the reason goes to ``plan``)."""
    if max_seconds is None or plan is None:
        return batch
    capped = neat_batch(max(least, int(max_seconds / (calls * max(seconds_per_image, 1e-9)))))
    if capped >= batch:
        return batch
    getattr(plan, f"{phase}_reason").append(f"time cap {max_seconds:g} s")
    return capped


def _build_on(cfg, build: Callable, device: torch.device):
    """``cfg``'s model without weight files, on ``device`` in the config's memory format."""
    return build(_no_weights(cfg)).to(device, memory_format=torch.channels_last if cfg.train.channels_last
                                      else torch.preserve_format)


def _measure_training(model, cfg, device, steps: int, result: Measurement, batch: int | None = None) -> None:
    batch = batch or cfg.data.batch_size
    model.train()
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    images, targets = example_batch(cfg, batch, device)
    images = images_to_device(images, device, cfg.train.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _train_step(model, optimizer, images, targets, cfg, device, scaler)  # warm-up (optimizer state too)
    step = partial(_train_step, model, optimizer, images, targets, cfg, device, scaler)
    times = [_timed(step, device) for _ in range(steps)]
    result.train_step_ms = 1e3 * statistics.median(times)
    result.train_ms_per_image = result.train_step_ms / batch
    if device.type == "cuda":
        result.peak_memory_gb = torch.cuda.max_memory_allocated(device) / 2**30
    optimizer.zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------ batch size


@dataclass
class BatchSizeResult:
    """The batch ``find_batch_size`` chose, the learning rate the engine will use with it, and why."""

    batch_size: int
    lr: float
    message: str
    probes: list[tuple[int, bool, float | None]] = field(default_factory=list)  # (batch, fits, peak GB)


def find_batch_size(cfg, *, device: torch.device | str | None = None, margin: float = 0.9, max_batch: int = 4096,
                    probe_steps: int = 2, build: Callable = _default_build, step: Callable | None = None,
                    free_gb: Callable[[], float | None] | None = None) -> BatchSizeResult:
    """The largest per-GPU ``data.batch_size`` that trains ``cfg``'s model without running out of memory.

    Doubles from the configured batch until a probe (``probe_steps`` training steps) runs out of memory
    (or ``max_batch``), bisects between the last batch that fit and the first that did not, then keeps
    ``margin`` of it (rounded down to a multiple of 8 from 16 up): memory varies with the data
    (detection targets, fragmentation) and other processes. The learning rate follows the engine's
    linear rule (``tasks.engine.optim.scaled_lr``: ``optim.lr * global batch / optim.base_batch_size``);
    set ``data.batch_size`` to the result and the engine applies it. On the CPU nothing is probed (running
    out of host memory kills the process): the configured batch is kept where the memory estimate
    (``tasks.budget.memory``, with the EMA copy when ``train.ema``) fits the free memory (``free_gb()``,
    faked in tests), else the largest batch that does; a model that does not fit at batch 1 is a
    :class:`BudgetError`. ``step(cfg, batch) -> peak GB`` replaces the probe (tests); it raises an
    out-of-memory error when the batch does not fit.
    """
    import copy

    device = pick_device(cfg.train.device) if device is None else torch.device(device)
    if device.type != "cuda" and step is None:
        return _cpu_batch_size(cfg, device, build, free_gb)
    if not 0 < margin <= 1:
        raise ValueError(f"margin={margin} must be in (0, 1]")
    probe = step or (lambda c, b: _probe(c, b, device, probe_steps, build))
    probes: list[tuple[int, bool, float | None]] = []

    def fits(batch: int) -> bool:
        trial = copy.deepcopy(cfg)
        trial.data.batch_size = batch
        try:
            probes.append((batch, True, probe(trial, batch)))
            return True
        except Exception as error:  # noqa: BLE001
            if not is_oom(error):
                raise
        probes.append((batch, False, None))
        release_memory(device)  # out of the except block: the error's traceback no longer holds the probe's tensors
        return False

    low, high, batch = 0, None, max(1, cfg.data.batch_size)  # low fits, high does not
    while batch <= max_batch:
        if not fits(batch):
            high = batch
            break
        low, batch = batch, batch * 2
    if high is not None:
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if fits(middle) else (low, middle)
    good = low
    if good == 0:
        raise RuntimeError(f"find_batch_size: even batch 1 runs out of memory on {device} for this model "
                           f"(model.scale/phi too large for the device)")
    chosen = max(1, int(good * margin))
    if chosen >= 16:
        chosen -= chosen % 8
    final = copy.deepcopy(cfg)
    final.data.batch_size = chosen
    message = (f"auto batch size: {good} fits on {device}, using {chosen} ({margin:.0%} margin); "
               f"lr {scaled_lr(final):.4g} (optim.lr {cfg.optim.lr:g} x {chosen} / {cfg.optim.base_batch_size})")
    return BatchSizeResult(chosen, scaled_lr(final), message, probes)


def _cpu_batch_size(cfg, device: torch.device, build: Callable, free_gb: Callable | None) -> BatchSizeResult:
    """``find_batch_size`` on the CPU: the configured batch, or the largest the memory estimate lets fit."""
    import copy

    from .errors import BudgetError

    batch = cfg.data.batch_size
    head = f"auto batch size needs CUDA to probe (device is {device})"
    free = (free_gb or available_memory_gb)()
    if free is None:
        return BatchSizeResult(batch, scaled_lr(cfg), f"{head}; free memory unknown: keeping data.batch_size={batch}")
    estimate = estimate_memory(cfg, build, ema=bool(cfg.train.ema))
    usable = free * MEMORY_MARGIN
    if estimate.train_gb(batch) <= usable:
        return BatchSizeResult(batch, scaled_lr(cfg),
                               f"{head}; data.batch_size={batch} fits the memory estimate "
                               f"(~{estimate.train_gb(batch):.1f} GB of {usable:.1f} GB usable): keeping it")
    chosen = neat_batch(estimate.largest_batch(usable, train=True, cap=batch))
    if chosen < 1:
        raise BudgetError(f"train.batch_size=auto: this model needs ~{estimate.train_gb(1):.1f} GB to train at batch 1 "
                          f"on the CPU, this machine has {free:.1f} GB free; choose a smaller model.scale/model.phi "
                          f"or data.image_size")
    final = copy.deepcopy(cfg)
    final.data.batch_size = chosen
    return BatchSizeResult(chosen, scaled_lr(final),
                           f"{head}; data.batch_size={batch} needs ~{estimate.train_gb(batch):.1f} GB of "
                           f"{usable:.1f} GB usable ({free:.1f} GB free): using {chosen} "
                           f"(~{estimate.train_gb(chosen):.1f} GB); lr {scaled_lr(final):.4g}")


def _probe(cfg, batch: int, device: torch.device, steps: int, build: Callable) -> float:
    """``steps`` training steps at ``batch`` (``cfg.data.batch_size``); returns the peak memory in GB
    (raises on OOM)."""
    model = None
    try:
        model = _build_on(cfg, build, device)
        result = Measurement()
        _measure_training(model, cfg, device, max(1, steps - 1), result)  # a warm-up step + the rest
        return result.peak_memory_gb
    finally:
        del model
        release_memory(device)
