"""A tiny task (2 convs + optional BN + linear over 3x16x16 uint8 images) that follows the engine's
task protocol, with knobs that make random state matter (dropout, in-model flips, noisy data) or that
misbehave on purpose (NaN loss at a step, a signal sent to itself at a step, a slow step)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.config import ClassificationConfig as Config

NUM_CLASSES = 4


class TopOneEvaluator:
    primary_metric = "top1"
    higher_is_better = True

    def reset(self):
        self.correct = torch.zeros((), dtype=torch.float64)
        self.total = torch.zeros((), dtype=torch.float64)
        self.logit_sum = torch.zeros((), dtype=torch.float64)  # tells which weights produced the logits

    def update(self, logits, labels):
        self.correct += (logits.argmax(1) == labels).sum().cpu().double()
        self.total += labels.numel()
        self.logit_sum += logits.double().sum().cpu()

    def compute(self):
        counts = torch.stack([self.correct, self.total, self.logit_sum])
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(counts)
        return {"top1": float(counts[0] / counts[1]), "seen": float(counts[1]), "logit_sum": float(counts[2])}


class ToyTask(nn.Module):
    def __init__(self, batch_norm=True, dropout=0.0, flip=False, nan_at=None, signal_at=None, signum=15, sleep=0.0,
                 inf_grad_at=None):
        super().__init__()
        norm = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1, bias=not batch_norm), norm, nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(8, NUM_CLASSES))
        self.flip, self.nan_at, self.sleep, self.inf_grad_at = flip, nan_at, sleep, inf_grad_at
        self.signal_at, self.signum = signal_at, signum
        self.calls = 0  # training forwards so far

    def forward(self, images, targets=None):
        x = images.float() / 255.0 - 0.5
        if not self.training:
            return self.net(x)
        if self.flip:  # random augmentation on the model side: uses the global torch RNG
            x = torch.where(torch.rand(x.shape[0], 1, 1, 1, device=x.device) < 0.5, x.flip(3), x)
        logits = self.net(x)
        ce = F.cross_entropy(logits, targets)
        if self.nan_at is not None and self.calls == self.nan_at:
            ce = ce * float("nan")
        if self.inf_grad_at is not None and self.calls == self.inf_grad_at:
            weight = self.net[-1].weight  # a finite loss (sqrt(0) = 0) whose gradient is inf
            ce = ce + (weight - weight.detach()).abs().sqrt().sum()
        if self.signal_at is not None and self.calls == self.signal_at:
            os.kill(os.getpid(), self.signum)
        if self.sleep:
            time.sleep(self.sleep)
        self.calls += 1
        return {"ce": ce, "reg": 1e-3 * logits.pow(2).mean()}

    def make_evaluator(self):
        return TopOneEvaluator()


class NoisyImages(Dataset):
    """Fixed uint8 images + labels; ``noise`` adds torch-RNG jitter per sample (data-side randomness)."""

    def __init__(self, count=48, seed=123, noise=False):
        generator = torch.Generator().manual_seed(seed)
        self.labels = torch.randint(0, NUM_CLASSES, (count,), generator=generator)
        base = torch.rand(count, 3, 16, 16, generator=generator) * 160
        self.images = (base + self.labels.view(-1, 1, 1, 1) * 30).to(torch.uint8)
        self.noise = noise

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = self.images[index]
        if self.noise:
            image = (image.short() + torch.randint(-8, 9, image.shape, dtype=torch.int16)).clamp(0, 255).to(torch.uint8)
        return image, self.labels[index]


def make_loaders(cfg, *, count=48, noise=False, workers=0, shuffle=True, sampler=None):
    train = NoisyImages(count, noise=noise)
    val = NoisyImages(24, seed=7)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    train_loader = DataLoader(train, batch_size=cfg.data.batch_size, shuffle=shuffle and sampler is None,
                              sampler=sampler, generator=generator, num_workers=workers,
                              persistent_workers=False)
    val_loader = DataLoader(val, batch_size=8, shuffle=False)
    return {"train": train_loader, "val": val_loader}


def make_config(**overrides) -> Config:
    """A small CPU config; ``overrides`` are ``"section.key": value`` pairs."""
    cfg = Config()
    cfg.data.batch_size = 8
    cfg.optim.lr = 0.4
    cfg.optim.base_batch_size = 256
    cfg.optim.weight_decay = 1e-4
    cfg.schedule.name = "cosine"
    cfg.schedule.warmup_epochs = 0.5
    cfg.schedule.min_lr_ratio = 0.05
    cfg.train.epochs = 2
    cfg.train.device = "cpu"
    cfg.train.progress = False
    cfg.train.log_every = 4
    cfg.train.ema = True
    cfg.train.ema_decay = 0.9
    cfg.train.ema_warmup = False  # plain_loop's EMA is AveragedModel's fixed decay
    cfg.train.seed = 3
    for key, value in overrides.items():
        section, name = key.split(".")
        setattr(getattr(cfg, section), name, value)
    return cfg


def hand_lr(step, peak, warmup, total, start_factor, min_ratio):
    """The warm-up + cosine learning rate at optimizer step ``step``, computed from the formulas."""
    import math

    if step < warmup:
        return peak * (start_factor + (1 - start_factor) * step / warmup)
    progress = (step - warmup) / (total - warmup)
    floor = peak * min_ratio
    return floor + (peak - floor) * (1 + math.cos(math.pi * progress)) / 2


def trained_state(trainer):
    """Everything that must match between an uninterrupted and a resumed run."""
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    if trainer.ema is not None:
        state.update({f"ema.{k}": v for k, v in trainer.ema.state_dict().items()})
    for index, value in trainer.optimizer.state_dict()["state"].items():
        state.update({f"optim.{index}.{k}": v for k, v in value.items() if torch.is_tensor(v)})
    return state


def plain_loop(model, cfg, batch_size, steps_per_epoch):
    """The reference: SGD + momentum, decay only on ndim>1 params, warm-up + cosine LR from the formulas,
    data in order. Returns the model and each epoch's mean training loss."""
    peak = cfg.optim.lr * batch_size / cfg.optim.base_batch_size
    warmup, total = round(cfg.schedule.warmup_epochs * steps_per_epoch), cfg.train.epochs * steps_per_epoch
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    optimizer = torch.optim.SGD([{"params": decay, "weight_decay": cfg.optim.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=peak, momentum=cfg.optim.momentum)
    loader = DataLoader(NoisyImages(48), batch_size=batch_size, shuffle=False)
    step, epoch_losses = 0, []
    model.train()
    for _ in range(cfg.train.epochs):
        losses_this_epoch = []
        for images, labels in loader:
            for group in optimizer.param_groups:
                group["lr"] = hand_lr(step, peak, warmup, total, cfg.schedule.warmup_start_factor,
                                      cfg.schedule.min_lr_ratio)
            losses = model(images, labels)
            loss = losses["ce"] + losses["reg"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses_this_epoch.append(loss.item())
            step += 1
        epoch_losses.append(sum(losses_this_epoch) / len(losses_this_epoch))
    return model, epoch_losses
