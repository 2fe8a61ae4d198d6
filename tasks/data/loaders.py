"""``build_loaders(cfg)``: train/val DataLoaders yielding ``(uint8 (N, 3, H, W), int64 (N,))`` batches.

Shuffling is seeded by ``train.seed``: the train sampler draws each epoch's order from (seed, epoch)
and the DataLoader's generator seeds the workers, so two runs with the same seed see the same batches.
Call ``loaders["train"].sampler.set_epoch(epoch)`` at the start of each epoch (DistributedSampler
needs it; our single-process sampler advances by itself when it is not called, and agrees when it is).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from tasks.config import Config, resolve_image_size

from . import DataError
from .imagefolder import ImageFolderDataset, class_mismatch
from .transforms import classification_eval_transform, classification_train_transform


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch`` (the DistributedSampler convention)."""

    def __init__(self, length: int, seed: int = 0):
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1  # without set_epoch the next epoch still gets a new order
        return iter(torch.randperm(self.length, generator=generator).tolist())

    def __len__(self) -> int:
        return self.length


class ShardSampler(Sampler[int]):
    """Indices ``rank, rank + world, ...``: disjoint shards covering the dataset once, in order."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(cfg: Config) -> dict[str, DataLoader]:
    """``{"train": DataLoader, "val": DataLoader}`` for ``cfg.data``; class names at ``loader.dataset.classes``."""
    if cfg.data.format != "imagefolder":
        raise NotImplementedError(f"data.format={cfg.data.format!r}: loaders are not implemented yet "
                                  f"(available: 'imagefolder')")
    if cfg.model.task != "classification":
        raise DataError(f"data.format='imagefolder' holds classification data, but model.task={cfg.model.task!r}")
    size = resolve_image_size(cfg)
    data = cfg.data
    train_set = ImageFolderDataset(data.root, data.train_split, classification_train_transform(data.augment, size),
                                   data.on_bad_sample)
    val_set = ImageFolderDataset(data.root, data.val_split, classification_eval_transform(data.augment, size),
                                 data.on_bad_sample)
    mismatch = class_mismatch(train_set.listing, val_set.listing)
    if mismatch:
        raise DataError(f"data.root '{data.root}': {mismatch}")
    if train_set.num_classes != cfg.model.num_classes:
        raise DataError(num_classes_problem(cfg, train_set.classes))
    return {"train": _make_loader(train_set, cfg, train=True), "val": _make_loader(val_set, cfg, train=False)}


def num_classes_problem(cfg: Config, classes: list[str]) -> str:
    shown = ", ".join(classes[:5]) + (", ..." if len(classes) > 5 else "")
    return (f"model.num_classes={cfg.model.num_classes} but data.root '{cfg.data.root}' has {len(classes)} class "
            f"folders in '{cfg.data.train_split}' ({shown}); set model.num_classes={len(classes)}")


def _make_loader(dataset: Dataset, cfg: Config, train: bool) -> DataLoader:
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if distributed and train:
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.train.seed, drop_last=False)
    elif distributed:  # evaluation: every image exactly once across the ranks (no padding repeats)
        sampler = ShardSampler(len(dataset), rank, dist.get_world_size())
    else:
        sampler = EpochShuffleSampler(len(dataset), cfg.train.seed) if train else SequentialSampler(dataset)
    batch_size = cfg.data.batch_size if train else (cfg.data.eval_batch_size or cfg.data.batch_size)
    if train and len(sampler) < batch_size:
        raise DataError(f"data.batch_size={batch_size} is larger than the {len(sampler)} training images per process "
                        f"in '{dataset.split_dir}'; with drop_last no batch would remain")
    workers = cfg.data.workers
    # Each rank gets its own worker seeds (different augmentations), reproducible from train.seed.
    stream = 2 * rank + (0 if train else 1)
    generator = torch.Generator().manual_seed(cfg.train.seed + 10_007 * stream)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.data.persistent_workers and workers > 0,
        drop_last=train,
        generator=generator,
    )
