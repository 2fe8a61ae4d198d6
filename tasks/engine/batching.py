"""The batch of one optimizer step: how many images, split how over processes and forwards.

With ``data.global_batch_size`` G set, the recipe is the same on any number W of processes: each
process takes G / W images per optimizer step (W must divide G), in ``a = ceil((G / W) / data.batch_size)``
forwards of G / (W a) images with the gradients accumulated over them (when a does not divide G / W, the
largest micro-batch <= ``data.batch_size`` that divides it); ``train.grad_accum`` must stay 1. The
learning rate's linear rule (``optim.base_batch_size``), the steps per epoch (``floor(images / G)``) and
the EMA decay all follow G. Without it (null): ``data.batch_size`` per process and ``train.grad_accum``
forwards per step, so the global batch is ``data.batch_size * W * grad_accum``, as before.

EMA decays per image: with ``train.ema_reference_batch`` R set, one step's decay is ``ema_decay ** (G / R)``
(timm's rule), so the average spans the same number of images at any global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tasks.config import ConfigError
from tasks.engine.errors import EngineError


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's images are split: ``world_size`` processes x ``accum`` forwards x ``micro_batch``."""

    global_batch: int  # images per optimizer step, every process together
    world_size: int
    micro_batch: int  # images per forward in one process: the train loader's batch
    accum: int  # forwards (gradient accumulation) per optimizer step in each process
    from_global: bool  # data.global_batch_size set: every step is exactly global_batch images

    @property
    def per_process(self) -> int:
        return self.micro_batch * self.accum

    def describe(self) -> str:
        return (f"global batch {self.global_batch} = {self.world_size} process(es) x {self.accum} micro-batch(es) "
                f"x {self.micro_batch}")


def batch_plan(cfg: Any, world_size: int = 1) -> BatchPlan:
    """The run's :class:`BatchPlan` from ``data.global_batch_size``, ``data.batch_size`` and ``train.grad_accum``
    on ``world_size`` processes (rules: module doc); a one-line ``ConfigError`` when they cannot agree."""
    total, most = cfg.data.global_batch_size, cfg.data.batch_size
    if total is None:
        accum = cfg.train.grad_accum
        return BatchPlan(most * world_size * accum, world_size, most, accum, from_global=False)
    if cfg.train.grad_accum != 1:
        raise ConfigError(f"train.grad_accum={cfg.train.grad_accum} and data.global_batch_size={total} are both set: "
                          f"the global batch derives the accumulation; set train.grad_accum=1")
    if total % world_size:
        raise ConfigError(f"data.global_batch_size={total} does not split evenly over {world_size} processes; "
                          f"use a multiple of {world_size} or another process count")
    share = total // world_size
    accum = math.ceil(share / most)
    if share % accum:  # equal micro-batches: the largest divisor of the share that fits data.batch_size
        micro = max(d for d in range(1, min(most, share) + 1) if share % d == 0)
        accum = share // micro
    return BatchPlan(total, world_size, share // accum, accum, from_global=True)


def global_batch(cfg: Any, world_size: int = 1) -> int:
    """Images per optimizer step over every process: ``data.global_batch_size``, else batch x processes x accum."""
    total = cfg.data.global_batch_size
    return total if total is not None else cfg.data.batch_size * world_size * cfg.train.grad_accum


def ema_step_decay(cfg: Any, batch: int) -> float:
    """The EMA decay of one optimizer step of ``batch`` images: ``train.ema_decay ** (batch /
    train.ema_reference_batch)`` (one decay per image), or ``train.ema_decay`` as it is without a reference."""
    reference = cfg.train.ema_reference_batch
    return cfg.train.ema_decay if reference is None else cfg.train.ema_decay ** (batch / reference)


def check_train_batch(loaders: dict, plan: BatchPlan) -> None:
    """With ``data.global_batch_size`` the train loader must yield the plan's micro-batches (build_loaders' do),
    at least one optimizer step's worth an epoch."""
    loader = loaders.get("train")
    if not plan.from_global or loader is None:
        return
    size = getattr(loader, "batch_size", None)
    if size is not None and size != plan.micro_batch:
        raise EngineError(f"the train loader's batch is {size} but {plan.describe()} needs micro-batches of "
                          f"{plan.micro_batch}; build the loaders with tasks.data.build_loaders(cfg)")
    if len(loader) < plan.accum:
        raise EngineError(f"the train loader gives {len(loader)} micro-batches an epoch, fewer than one optimizer "
                          f"step's {plan.accum} ({plan.describe()}); lower data.global_batch_size")
