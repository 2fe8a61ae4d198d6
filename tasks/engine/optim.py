"""Optimizer, per-iteration learning-rate schedule and EMA builders (torch.optim pieces only).

* The learning rate is scaled linearly with the global batch:
  ``lr = optim.lr * batch_size * world_size * grad_accum / optim.base_batch_size``.
* Weight decay skips every parameter with ``ndim <= 1`` (norm weights and biases) when
  ``optim.no_decay_norm_and_bias`` is set.
* The schedule counts optimizer steps (not epochs): linear warm-up over
  ``round(warmup_epochs * steps_per_epoch)`` steps from ``warmup_start_factor`` to 1, then cosine
  (down to ``min_lr_ratio``), step (``step_gamma`` every ``step_epochs``, counted from the end of
  warm-up), polynomial (``poly_power``, to 0) or constant — chained with ``SequentialLR``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "step", "poly", "constant")


def scaled_lr(cfg: Any, world_size: int = 1) -> float:
    """The peak learning rate for this run: ``optim.lr`` scaled by global batch / ``optim.base_batch_size``."""
    global_batch = cfg.data.batch_size * world_size * cfg.train.grad_accum
    if cfg.optim.base_batch_size <= 0:
        raise ValueError(f"optim.base_batch_size={cfg.optim.base_batch_size} must be a positive integer; "
                         f"fix it in the config (256 is the usual reference)")
    return cfg.optim.lr * global_batch / cfg.optim.base_batch_size


def param_groups(model: nn.Module, weight_decay: float, no_decay_norm_and_bias: bool) -> list[dict]:
    """Trainable parameters split into a decayed group and (optionally) an undecayed ``ndim <= 1`` group."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False); "
                         "unfreeze some before training")
    if not no_decay_norm_and_bias or weight_decay == 0:
        return [{"params": trainable, "weight_decay": weight_decay}]
    decay = [p for p in trainable if p.ndim > 1]
    no_decay = [p for p in trainable if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: Any, world_size: int = 1) -> torch.optim.Optimizer:
    """``cfg.optim.name`` (sgd | rmsprop | adamw) over ``model``'s trainable parameters at the scaled LR."""
    opt = cfg.optim
    lr = scaled_lr(cfg, world_size)
    groups = param_groups(model, opt.weight_decay, opt.no_decay_norm_and_bias)
    if opt.name == "sgd":
        if opt.nesterov and opt.momentum <= 0:
            raise ValueError(f"optim.nesterov=true needs optim.momentum > 0 (got {opt.momentum}); "
                             f"set a momentum or turn nesterov off")
        return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov)
    if opt.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=lr, alpha=opt.rmsprop_alpha, eps=opt.eps, momentum=opt.momentum)
    if opt.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, eps=opt.eps)
    raise ValueError(f"optim.name={opt.name!r} is not one of {'|'.join(OPTIMIZERS)}; fix optim.name in the config")


def steps_per_epoch(batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps in one epoch (a short final accumulation group still steps)."""
    return math.ceil(batches_per_epoch / grad_accum)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int) -> lr_scheduler.LRScheduler:
    """Per-optimizer-step schedule over ``cfg.train.epochs * steps_per_epoch`` steps (see module doc)."""
    sched = cfg.schedule
    total = max(1, cfg.train.epochs * steps_per_epoch)
    warmup = min(total, max(0, round(sched.warmup_epochs * steps_per_epoch)))
    main_steps = max(1, total - warmup)
    if sched.name == "cosine":
        eta_min = optimizer.param_groups[0]["lr"] * sched.min_lr_ratio  # every group has the same peak lr
        main = lr_scheduler.CosineAnnealingLR(optimizer, T_max=main_steps, eta_min=eta_min)
    elif sched.name == "step":
        main = lr_scheduler.StepLR(optimizer, step_size=max(1, round(sched.step_epochs * steps_per_epoch)),
                                   gamma=sched.step_gamma)
    elif sched.name == "poly":
        main = lr_scheduler.PolynomialLR(optimizer, total_iters=main_steps, power=sched.poly_power)
    elif sched.name == "constant":
        main = lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)
    else:
        raise ValueError(f"schedule.name={sched.name!r} is not one of {'|'.join(SCHEDULES)}; "
                         f"fix schedule.name in the config")
    if warmup == 0:
        return main
    if not 0.0 < sched.warmup_start_factor <= 1.0:
        raise ValueError(f"schedule.warmup_start_factor={sched.warmup_start_factor} must be in (0, 1]; "
                         f"fix it in the config (0.01 is usual)")
    warm = lr_scheduler.LinearLR(optimizer, start_factor=sched.warmup_start_factor, end_factor=1.0,
                                 total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, schedulers=[warm, main], milestones=[warmup])


class ModelEMA:
    """EMA of a model's parameters and buffers, held in ``AveragedModel(use_buffers=True)``.

    The averaging function is ``get_ema_multi_avg_fn(decay)`` and the result equals
    ``AveragedModel.update_parameters`` step for step; ``update`` only avoids what that method costs
    per call on a GPU — two device->host reads of ``n_averaged``, re-grouping every tensor, and ~4
    kernels per integer buffer (BatchNorm's ``num_batches_tracked``) — by grouping once, counting
    updates on the host, and doing the integer buffers' identical arithmetic on one stacked tensor.
    """

    def __init__(self, model: nn.Module, decay: float):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"train.ema_decay={decay} must be in [0, 1]; fix it in the config (0.9999 is usual)")
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self.decay = decay
        self._source: nn.Module | None = None
        self._groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def _bind(self, model: nn.Module) -> None:
        averaged = [t.detach() for t in (*self.module.parameters(), *self.module.buffers())]
        current = [t.detach() for t in (*model.parameters(), *model.buffers())]
        if len(averaged) != len(current):
            raise ValueError("the EMA copy and the trained model no longer have the same tensors; "
                             "build the EMA from the model being trained")
        grouped: dict[tuple, tuple[list, list]] = {}
        for ema_tensor, model_tensor in zip(averaged, current):
            key = (ema_tensor.device, ema_tensor.dtype)
            pair = grouped.setdefault(key, ([], []))
            pair[0].append(ema_tensor)
            pair[1].append(model_tensor)
        self._source, self._groups = model, list(grouped.values())

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model`` (the first call copies, as ``AveragedModel`` does)."""
        if model is not self._source:
            self._bind(model)
        for ema_tensors, model_tensors in self._groups:
            if self.updates == 0:
                torch._foreach_copy_(ema_tensors, model_tensors)
            elif ema_tensors[0].is_floating_point() or len({t.shape for t in ema_tensors}) > 1:
                self.averaged.multi_avg_fn(ema_tensors, model_tensors, None)
            else:  # get_ema_multi_avg_fn's integer branch, p * decay + q * (1 - decay), on one stack
                mixed = torch.stack(ema_tensors) * self.decay + torch.stack(model_tensors) * (1 - self.decay)
                torch._foreach_copy_(ema_tensors, list(mixed.unbind()))
        self.updates += 1
        self.averaged.n_averaged.fill_(self.updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(self.averaged.n_averaged)
