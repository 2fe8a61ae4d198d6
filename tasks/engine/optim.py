"""Optimizer, per-iteration learning-rate schedule and EMA builders (torch.optim pieces, plus TF's RMSProp).

* The learning rate is scaled linearly with the global batch G (``tasks.engine.batching``: G is
  ``data.global_batch_size``, else ``data.batch_size * world_size * grad_accum``):
  ``lr = optim.lr * G / optim.base_batch_size``.
* Weight decay skips every parameter with ``ndim <= 1`` (norm weights and biases, BiFPN fusion weights)
  when ``optim.no_decay_norm_and_bias`` is set.
* The schedule counts optimizer steps (not epochs): linear warm-up over
  ``round(warmup_epochs * steps_per_epoch)`` steps from ``warmup_start_factor`` to 1, then cosine
  (down to ``min_lr_ratio``), step (``step_gamma`` every ``step_epochs``, counted from the end of
  warm-up), polynomial (``poly_power``, to 0) or constant — chained with ``SequentialLR``.
  ``train.time_limit`` refits the length (``total_steps``; ``tasks.engine.timelimit``): ``rebuild_schedule``
  builds the same chain for the new length and advances it to the step reached; warm-up keeps its length,
  capped so that at least one epoch (half of a plan shorter than two epochs) is left to decay.
* ``rmsprop_tf`` is TensorFlow 1's RMSProp, which the EfficientNet recipe was tuned with; torch's
  ``RMSprop`` differs in two places that matter at eps 1e-3 (see :class:`RMSpropTF`).

Values come from a validated config (``tasks.config``): choices and ranges are not re-checked here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from tasks.engine.batching import global_batch


def scaled_lr(cfg: Any, world_size: int = 1) -> float:
    """The peak learning rate for this run: ``optim.lr`` scaled by global batch / ``optim.base_batch_size``."""
    return cfg.optim.lr * global_batch(cfg, world_size) / cfg.optim.base_batch_size


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


class RMSpropTF(torch.optim.Optimizer):
    """RMSProp as TensorFlow 1's ``tf.train.RMSPropOptimizer`` (the EfficientNet reference), per parameter:

        g  = grad + weight_decay * param              (TF adds the L2 term to the loss)
        ms = alpha * ms + (1 - alpha) * g^2           (ms starts at 1, not 0)
        mom = momentum * mom + lr * g / sqrt(ms + eps)   (eps inside the square root)
        param -= mom

    torch's ``RMSprop`` starts ``ms`` at 0 (so the first steps are ~3x larger at alpha 0.9) and adds eps
    outside the square root (eps 1e-3 there is a much weaker damping than TF's).
    """

    def __init__(self, params, lr: float, alpha: float = 0.9, eps: float = 1e-3, momentum: float = 0.9,
                 weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if not self.state[p]:
                    self.state[p]["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            grads = [p.grad for p in params]
            if group["weight_decay"]:
                grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
            squares = [self.state[p]["square_avg"] for p in params]
            torch._foreach_mul_(squares, group["alpha"])
            torch._foreach_addcmul_(squares, grads, grads, value=1 - group["alpha"])
            denominators = torch._foreach_add(squares, group["eps"])
            torch._foreach_sqrt_(denominators)
            if group["momentum"] > 0:
                buffers = [self.state[p]["momentum_buffer"] for p in params]
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_addcdiv_(buffers, grads, denominators, value=group["lr"])
                torch._foreach_sub_(params, buffers)
            else:
                torch._foreach_addcdiv_(params, grads, denominators, value=-group["lr"])
        return loss


def _fused(groups) -> dict:
    """``fused=True`` where torch has the one-kernel implementation for every parameter (CPU and CUDA floats):
    the same update as the per-tensor loop (to float rounding), 2-3x faster on a CPU (one AdamW step of D0's
    ~420 tensors: 80 -> 32 ms on this machine's cores); ``{}`` elsewhere (torch's default)."""
    params = [p for group in groups for p in group["params"]]
    supported = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params)
    return {"fused": True} if params and supported else {}


def _sgd(groups, lr, opt):
    return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov, **_fused(groups))


def _rmsprop(groups, lr, opt):
    return torch.optim.RMSprop(groups, lr=lr, alpha=opt.rmsprop_alpha, eps=opt.eps, momentum=opt.momentum)


def _rmsprop_tf(groups, lr, opt):
    return RMSpropTF(groups, lr=lr, alpha=opt.rmsprop_alpha, eps=opt.eps, momentum=opt.momentum)


def _adamw(groups, lr, opt):
    return torch.optim.AdamW(groups, lr=lr, eps=opt.eps, **_fused(groups))


OPTIMIZERS = {"sgd": _sgd, "rmsprop": _rmsprop, "rmsprop_tf": _rmsprop_tf, "adamw": _adamw}


def build_optimizer(model: nn.Module, cfg: Any, world_size: int = 1) -> torch.optim.Optimizer:
    """``cfg.optim.name`` (see ``OPTIMIZERS``) over ``model``'s trainable parameters at the scaled LR."""
    opt = cfg.optim
    groups = param_groups(model, opt.weight_decay, opt.no_decay_norm_and_bias)
    return OPTIMIZERS[opt.name](groups, scaled_lr(cfg, world_size), opt)


def steps_per_epoch(batches_per_epoch: int, grad_accum: int, whole_steps: bool = False) -> int:
    """Optimizer steps in one epoch: a short final accumulation group still steps, unless ``whole_steps``
    (``data.global_batch_size``: every step holds the whole global batch, the rest of the epoch is left)."""
    return batches_per_epoch // grad_accum if whole_steps else math.ceil(batches_per_epoch / grad_accum)


def build_schedule(optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int,
                   total_steps: int | None = None) -> lr_scheduler.LRScheduler:
    """Per-optimizer-step schedule over ``cfg.train.epochs * steps_per_epoch`` steps, or ``total_steps`` (a
    time-limit plan: warm-up capped, see the module doc)."""
    sched = cfg.schedule
    total = max(1, cfg.train.epochs * steps_per_epoch if total_steps is None else total_steps)
    warmup = min(total, max(0, round(sched.warmup_epochs * steps_per_epoch)))
    if total_steps is not None:  # ultralytics caps warm-up at epochs - 1 when its time limit shortens a run
        warmup = min(warmup, max(total - steps_per_epoch, total // 2))
    main_steps = max(1, total - warmup)
    main = _MAIN_SCHEDULES[sched.name](optimizer, sched, steps_per_epoch, main_steps)
    if warmup == 0:
        return main
    warm = lr_scheduler.LinearLR(optimizer, start_factor=sched.warmup_start_factor, end_factor=1.0,
                                 total_iters=warmup)
    return lr_scheduler.SequentialLR(optimizer, schedulers=[warm, main], milestones=[warmup])


def rebuild_schedule(optimizer: torch.optim.Optimizer, cfg: Any, steps_per_epoch: int, total_steps: int,
                     done_steps: int = 0) -> lr_scheduler.LRScheduler:
    """The schedule of ``build_schedule(..., total_steps)`` advanced by ``done_steps`` steps: the learning
    rate the optimizer holds afterwards is the new schedule's at that step (what the next step uses)."""
    for group in optimizer.param_groups:  # torch's chained schedules start from the lr the groups hold
        group["lr"] = group.setdefault("initial_lr", group["lr"])
    schedule = build_schedule(optimizer, cfg, steps_per_epoch, total_steps)
    with warnings.catch_warnings():  # "lr_scheduler.step() before optimizer.step()": intended here
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(done_steps):
            schedule.step()
    return schedule


_MAIN_SCHEDULES = {
    # every param group has the same peak lr, so the cosine floor is one number
    "cosine": lambda opt, s, per_epoch, steps: lr_scheduler.CosineAnnealingLR(
        opt, T_max=steps, eta_min=_peak_lr(opt) * s.min_lr_ratio),
    "step": lambda opt, s, per_epoch, steps: lr_scheduler.StepLR(
        opt, step_size=max(1, round(s.step_epochs * per_epoch)), gamma=s.step_gamma),
    "poly": lambda opt, s, per_epoch, steps: lr_scheduler.PolynomialLR(opt, total_iters=steps, power=s.poly_power),
    "constant": lambda opt, s, per_epoch, steps: lr_scheduler.ConstantLR(opt, factor=1.0, total_iters=0),
}


def optimizer_step(optimizer: torch.optim.Optimizer, scheduler: lr_scheduler.LRScheduler, *, scaler=None,
                   clip: float | None = None, params: list | None = None, ema: ModelEMA | None = None,
                   model: nn.Module | None = None) -> None:
    """One optimizer step as the engine takes it: clip the gradient norm of ``params`` to ``clip`` (unscaled
    first under fp16), step (through the GradScaler ``scaler``), zero the gradients, advance the per-step
    schedule, and move the EMA towards ``model``."""
    if clip is not None:
        if scaler is not None:
            scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(params, clip)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if ema is not None:
        ema.update(model)


def _peak_lr(optimizer: torch.optim.Optimizer) -> float:
    """The schedule's peak: the groups' ``initial_lr`` once a schedule was built (a rebuild comes mid-run)."""
    group = optimizer.param_groups[0]
    return group.get("initial_lr", group["lr"])


class ModelEMA:
    """EMA of a model's parameters and buffers, held in ``AveragedModel(use_buffers=True)``.

    Each update moves the copy towards the model by ``1 - d``: ``d = decay``, or with ``warmup`` (TF's
    ``ExponentialMovingAverage(num_updates=...)``, timm's warm-up) ``d = min(decay, (1 + n) / (10 + n))``
    after ``n`` updates, so early weights are not frozen in for thousands of steps. Without warm-up the
    result equals ``AveragedModel.update_parameters`` with ``get_ema_multi_avg_fn(decay)`` step for step;
    ``update`` only avoids what that method costs per call on a GPU (two device->host reads of
    ``n_averaged``, re-grouping every tensor, ~4 kernels per integer buffer) by grouping once, counting
    updates on the host, and doing the integer buffers' identical arithmetic on one stacked tensor.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False):
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
        self.averaged.requires_grad_(False)
        self.decay, self.warmup = decay, warmup
        self._source: nn.Module | None = None
        self._groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = []
        self.updates = 0

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def current_decay(self) -> float:
        """The decay the next update uses."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

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
        decay = self.current_decay()
        for ema_tensors, model_tensors in self._groups:
            if self.updates == 0:
                torch._foreach_copy_(ema_tensors, model_tensors)
            elif ema_tensors[0].is_floating_point():
                torch._foreach_lerp_(ema_tensors, model_tensors, 1 - decay)
            elif len({t.shape for t in ema_tensors}) > 1:
                for ema_tensor, model_tensor in zip(ema_tensors, model_tensors):
                    ema_tensor.copy_(ema_tensor * decay + model_tensor * (1 - decay))
            else:  # get_ema_multi_avg_fn's integer branch, p * decay + q * (1 - decay), on one stack
                mixed = torch.stack(ema_tensors) * decay + torch.stack(model_tensors) * (1 - decay)
                torch._foreach_copy_(ema_tensors, list(mixed.unbind()))
        self.updates += 1
        self.averaged.n_averaged.fill_(self.updates)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.averaged.load_state_dict(state)
        self.updates = int(self.averaged.n_averaged)
