"""Will a scale fit in host memory? An estimate made before anything is allocated (the CPU guard).

On CUDA running out of memory is an exception that ``effdense budget`` turns into a row; on the CPU the
kernel's OOM killer ends the process (exit -9) with nothing said. So before a scale is measured on the
CPU (and before ``train.batch_size=auto`` picks a batch there), its peak is estimated and compared with
the memory this machine has free:

    training(batch)  = P * 4 B * (1 weights + 1 gradients + optimizer slots [+ 1 EMA copy]) + 2 * batch * A
    inference(batch) = P * 4 B + 8 * batch * M

P: parameters. A: the bytes of every leaf module's outputs for one image in a training forward, run on
the meta device (nothing is allocated), at the training dtype (2 bytes an element under bf16/fp16 AMP,
4 without): roughly what autograd keeps for backward; x2 for the gradients flowing back and the
allocator. M: the largest leaf output of one image; inference keeps a few such tensors alive at once
(4-5 measured; 8 planned). Optimizer slots: sgd 1 with momentum (else 0), rmsprop / rmsprop_tf 1 (+1
with momentum), adamw 2.

Checked against real steps: growth of ``ru_maxrss`` over a fresh process with effdense's malloc setting
(``tasks.engine.host.keep_freed_memory``), torch 2.x, the ImageNet preset (RMSProp-TF with momentum,
bf16 unless said), measured / estimated GB. Training: B0 224x224 batch 8 0.54 / 0.67, batch 32 1.80 /
2.45, batch 128 7.07 / 9.55, fp32 batch 32 3.58 / 4.81; phi 2 (260x260) batch 8 1.01 / 1.36; phi 4
(380x380) batch 2 1.06 / 1.38 -- 1.25-1.36x. Inference: B0 batch 256 2.33-3.10 / 4.62; phi 2 batch 64
0.78 / 1.58; phi 4 batch 64 2.26 / 5.03 -- 1.5-2.2x. The estimate guards, it does not predict.

Free memory: ``/proc/meminfo`` MemAvailable (what the kernel can hand out without swapping), else psutil,
else ``os.sysconf``; only ``MEMORY_MARGIN`` of it is planned on ("usable": other processes, fragmentation).
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tasks.config import resolve_image_size

__all__ = ["MEMORY_MARGIN", "available_memory_gb", "optimizer_slots", "MemoryEstimate", "estimate_memory",
           "BatchPlan", "plan_batches", "neat_batch"]

GB = 2**30
MEMORY_MARGIN = 0.8  # plan on this share of the free memory
BACKWARD_FACTOR = 2.0  # training activations: the saved outputs, and the gradients as large again
INFERENCE_LIVE = 8.0  # inference: this many of the largest output alive at once (about 4-5 measured)


def available_memory_gb(meminfo: str = "/proc/meminfo") -> float | None:
    """Memory this machine can hand out now (GB): MemAvailable, else psutil, else sysconf; None if unknown."""
    try:
        with open(meminfo) as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / GB
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return psutil.virtual_memory().available / GB
    except ImportError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / GB
    except (ValueError, OSError, AttributeError):
        return None


def optimizer_slots(cfg) -> int:
    """Parameter-sized tensors the optimizer keeps (see the module doc)."""
    opt = cfg.optim
    momentum = 1 if (getattr(opt, "momentum", 0) or 0) > 0 else 0
    return {"sgd": momentum, "rmsprop": 1 + momentum, "rmsprop_tf": 1 + momentum, "adamw": 2}.get(opt.name, 2)


@dataclass(frozen=True)
class MemoryEstimate:
    """The parts of the estimate (GB); ``train_gb(batch)`` and ``eval_gb(batch)`` apply the module doc's rule."""

    params_gb: float  # the weights, fp32
    state_copies: int  # weights + gradients + optimizer slots (+ EMA)
    activations_gb: float  # per image, training (x BACKWARD_FACTOR already applied)
    live_gb: float  # per image, inference (x INFERENCE_LIVE already applied)

    def train_gb(self, batch: int) -> float:
        return self.params_gb * self.state_copies + batch * self.activations_gb

    def eval_gb(self, batch: int) -> float:
        return self.params_gb + batch * self.live_gb

    def largest_batch(self, usable_gb: float, *, train: bool, cap: int) -> int:
        """The largest batch (at most ``cap``) whose estimate is within ``usable_gb``; 0 when not even 1."""
        fixed, per_image = ((self.params_gb * self.state_copies, self.activations_gb) if train
                            else (self.params_gb, self.live_gb))
        if per_image <= 0:
            return cap if fixed <= usable_gb else 0
        return max(0, min(cap, math.floor((usable_gb - fixed) / per_image)))


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _default_build(cfg):
    from tasks import registry

    return registry.build_model(cfg)


def estimate_memory(cfg, build: Callable = _default_build, *, ema: bool = False) -> MemoryEstimate:
    """``cfg``'s training and inference memory per the module doc, from one training forward on the meta
    device (at batch 2, halved; ``ema``: count the trainer's EMA copy too)."""
    cfg = copy.deepcopy(cfg)
    cfg.model.weights = None  # the meta build reads no files
    cfg.model.backbone_weights = None
    height, width = resolve_image_size(cfg)
    totals = {"sum": 0, "max": 0}

    def hook(module, inputs, output):
        for tensor in _tensors(output):
            totals["sum"] += tensor.numel()
            totals["max"] = max(totals["max"], tensor.numel())

    with torch.device("meta"):
        model = build(cfg).train()
        net = getattr(model, "net", model)
        forward = getattr(net, "forward_raw", net)  # detection: the network without the loss
        handles = [m.register_forward_hook(hook) for m in net.modules() if next(m.children(), None) is None]
        try:
            # batch 2: BatchNorm refuses one value per channel in training (a 1x1 map at batch 1)
            forward(torch.empty(2, getattr(cfg.model, "in_channels", 3), height, width))
        finally:
            for handle in handles:
                handle.remove()
    params = sum(p.numel() for p in net.parameters())
    element = 2 if cfg.train.amp in ("bf16", "fp16") else 4
    copies = 2 + optimizer_slots(cfg) + (1 if ema else 0)
    return MemoryEstimate(params * 4 / GB, copies, BACKWARD_FACTOR * totals["sum"] / 2 * element / GB,
                          INFERENCE_LIVE * totals["max"] / 2 * element / GB)


def neat_batch(batch: int) -> int:
    """``batch`` rounded down to a multiple of 8 from 16 up (1..15 stay as they are)."""
    return batch - batch % 8 if batch >= 16 else max(0, batch)


@dataclass
class BatchPlan:
    """The batches a CPU measurement may use: the config's, or smaller ones that fit (``*_reason`` says why)."""

    train_batch: int
    eval_batch: int
    free_gb: float | None
    estimate: MemoryEstimate | None
    skip: str = ""  # set: the scale is not started ("needs ~X GB at batch 1, this machine has Y GB free")
    train_reason: list[str] = field(default_factory=list)
    eval_reason: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {"free_gb": None if self.free_gb is None else round(self.free_gb, 2)}
        if self.estimate is not None:
            out.update(estimated_train_gb=round(self.estimate.train_gb(max(1, self.train_batch)), 3),
                       estimated_eval_gb=round(self.estimate.eval_gb(max(1, self.eval_batch)), 3))
        return out


def plan_batches(estimate: MemoryEstimate, free_gb: float | None, train_batch: int, eval_batch: int, *,
                 train: bool = True, margin: float = MEMORY_MARGIN) -> BatchPlan:
    """Keep the config's batches where the estimate fits ``margin`` of ``free_gb``, else the largest that
    does; ``skip`` when not even batch 1 fits (its training step; inference only when ``train`` is off)."""
    plan = BatchPlan(train_batch, eval_batch, free_gb, estimate)
    if free_gb is None:
        return plan  # unknown: measure as configured
    usable = free_gb * margin
    need = max(estimate.train_gb(1) if train else 0.0, estimate.eval_gb(1))
    if need > usable:
        plan.skip = (f"needs ~{need:.1f} GB at batch 1, this machine has {free_gb:.1f} GB free "
                     f"({margin:.0%} of it planned on)")
        return plan
    if train and estimate.train_gb(train_batch) > usable:
        plan.train_batch = neat_batch(estimate.largest_batch(usable, train=True, cap=train_batch))
        plan.train_reason.append(f"b{train_batch} needs ~{estimate.train_gb(train_batch):.1f} GB of {usable:.1f} "
                                 f"GB usable")
    if estimate.eval_gb(eval_batch) > usable:
        plan.eval_batch = neat_batch(estimate.largest_batch(usable, train=False, cap=eval_batch))
        plan.eval_reason.append(f"b{eval_batch} needs ~{estimate.eval_gb(eval_batch):.1f} GB of {usable:.1f} GB usable")
    return plan
