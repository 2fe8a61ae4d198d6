"""What one model scale costs on this device: ``measure_scale(cfg)``; and ``find_batch_size(cfg)``.

Everything runs the task module the engine trains (``tasks.registry.build_model(cfg)``) with the
config's ``train.amp`` and ``train.channels_last``, on uint8 batches as the loaders deliver them:

* latency: eval mode, batch 1, ``inference_mode``; the median over ``runs`` calls, each synchronised
  (for detection the forward includes top-k and NMS: the time to a list of detections).
* throughput: eval mode at the config's eval batch (``data.eval_batch_size``, else ``data.batch_size``):
  images per second of the median call.
* training step: forward, summed losses, backward, optimizer step (the engine's optimizer), at
  ``data.batch_size``, on a synthetic batch from the task's ``example_batch``; the median step after one
  warm-up step. Peak training memory: ``torch.cuda.max_memory_allocated`` over those steps on CUDA;
  on CPU no peak is measured (``None``, printed "n/a"): torch's CPU allocator keeps no statistics and
  process RSS mixes in the allocator's caching and every earlier scale.
* parameters and GMACs (multiply-accumulates, the unit the EfficientNet paper calls FLOPs) of the
  network at batch 1 and the measured input size: ``FlopCounterMode`` on the meta device, so they
  are known even for scales that are not measured or do not fit in memory.

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

__all__ = ["Measurement", "example_batch", "measure_scale", "count_cost", "is_oom",
           "BatchSizeResult", "find_batch_size"]


@dataclass
class Measurement:
    """One scale's numbers; ``None`` where not measured. ``status``: ok | oom | not measured."""

    params_m: float | None = None
    gmacs: float | None = None
    latency_ms: float | None = None  # batch 1, median
    throughput: float | None = None  # images/s at the eval batch
    train_step_ms: float | None = None  # at the training batch, median
    peak_memory_gb: float | None = None  # CUDA training peak; None on CPU
    status: str = "ok"
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


def measure_scale(cfg, *, device: torch.device | str | None = None, runs: int | None = None,
                  build: Callable = _default_build, train: bool = True) -> Measurement:
    """Measure ``cfg``'s model on ``device`` (default: ``train.device``); see the module doc.

    ``runs``: timed calls for latency (throughput and training steps take half as many, at least 1);
    default 5 on CPU, 20 on CUDA. ``train=False`` skips the training step. Never raises for OOM.
    """
    device = pick_device(cfg.train.device) if device is None else torch.device(device)
    runs = runs or (20 if device.type == "cuda" else 5)
    few = max(1, runs // 2)
    eval_batch = cfg.data.eval_batch_size or cfg.data.batch_size
    result = Measurement(extra={"image_size": list(resolve_image_size(cfg)), "eval_batch": eval_batch,
                                "train_batch": cfg.data.batch_size, "runs": runs, "device": str(device)})
    result.params_m, result.gmacs = count_cost(cfg, build)
    model = None
    stage = "building the model"
    try:
        model = _build_on(cfg, build, device).eval()
        stage = "inference at batch 1"
        with torch.inference_mode(), autocast(device, cfg.train.amp):
            one = images_to_device(example_batch(cfg, 1)[0], device, cfg.train.channels_last)
            result.latency_ms = 1e3 * _median_time(model, one, device, runs, warmup=2)
            stage = f"inference at batch {eval_batch}"
            batch = images_to_device(example_batch(cfg, eval_batch)[0], device, cfg.train.channels_last)
            result.throughput = eval_batch / _median_time(model, batch, device, few, warmup=1)
        if train:
            stage = f"training at batch {cfg.data.batch_size}"
            _measure_training(model, cfg, device, few, result)
    except Exception as error:  # noqa: BLE001 -- only out-of-memory is a result; the rest re-raises
        if not is_oom(error):
            raise
        result.status, result.note = "oom", f"out of memory {stage}"
    finally:
        del model
        release_memory(device)
    return result


def _build_on(cfg, build: Callable, device: torch.device):
    """``cfg``'s model without weight files, on ``device`` in the config's memory format."""
    return build(_no_weights(cfg)).to(device, memory_format=torch.channels_last if cfg.train.channels_last
                                      else torch.preserve_format)


def _measure_training(model, cfg, device, steps: int, result: Measurement) -> None:
    model.train()
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type) if cfg.train.amp == "fp16" else None
    images, targets = example_batch(cfg, cfg.data.batch_size, device)
    images = images_to_device(images, device, cfg.train.channels_last)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _train_step(model, optimizer, images, targets, cfg, device, scaler)  # warm-up (optimizer state too)
    step = partial(_train_step, model, optimizer, images, targets, cfg, device, scaler)
    times = [_timed(step, device) for _ in range(steps)]
    result.train_step_ms = 1e3 * statistics.median(times)
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
                    probe_steps: int = 2, build: Callable = _default_build,
                    step: Callable | None = None) -> BatchSizeResult:
    """The largest per-GPU ``data.batch_size`` that trains ``cfg``'s model without running out of memory.

    Doubles from the configured batch until a probe (``probe_steps`` training steps) runs out of memory
    (or ``max_batch``), bisects between the last batch that fit and the first that did not, then keeps
    ``margin`` of it (rounded down to a multiple of 8 from 16 up): memory varies with the data
    (detection targets, fragmentation) and other processes. The learning rate follows the engine's
    linear rule (``tasks.engine.optim.scaled_lr``: ``optim.lr * global batch / optim.base_batch_size``);
    set ``data.batch_size`` to the result and the engine applies it. On CPU the configured batch is
    kept, with a message saying that this needs CUDA. ``step(cfg, batch) -> peak GB`` replaces the probe
    (tests); it raises an out-of-memory error when the batch does not fit.
    """
    import copy

    device = pick_device(cfg.train.device) if device is None else torch.device(device)
    if device.type != "cuda" and step is None:
        return BatchSizeResult(cfg.data.batch_size, scaled_lr(cfg),
                               f"auto batch size needs CUDA (device is {device}); keeping data.batch_size="
                               f"{cfg.data.batch_size}")
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
