"""``build_loaders(cfg, splits=...)``: DataLoaders yielding ``(uint8 (N, 3, H, W), targets)`` batches.

The format table (``tasks.data.formats``) gives each split's dataset and collate function. Shuffling is
seeded by ``train.seed``: the train sampler draws each epoch's order from (seed, epoch) and the
DataLoader's generator seeds the workers, so two runs with the same seed see the same batches.
Under torchrun the process group is joined here, before any sampler exists, so the loaders are always
sharded across the ranks (training: ``DistributedSampler``; evaluation: disjoint shards, no padding).
The train loader's batch is one process's micro-batch (``tasks.engine.batching.batch_plan``). With
``data.global_batch_size`` each process's sampler stops at a whole number of optimizer steps, so every
step holds exactly the global batch and an epoch is ``floor(images / global batch)`` steps on any
number of processes.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from tasks.config import Config
from tasks.engine.batching import batch_plan
from tasks.engine.distributed import setup_process

from tasks.data.errors import DataError
from tasks.data.formats import FORMATS, formats_for

SPLITS = ("train", "val")


class EpochShuffleSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch`` (the DistributedSampler convention)."""

    num_replicas = 1

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
        self.num_replicas = world_size

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class SequentialShard(SequentialSampler):
    num_replicas = 1


class WholeSteps(Sampler[int]):
    """The first ``len(inner) // share * share`` indices of ``inner`` (``share``: one process's images per
    optimizer step), so that no step is short; ``set_epoch`` and ``num_replicas`` are ``inner``'s."""

    def __init__(self, inner: Sampler[int], share: int):
        self.inner, self.share = inner, share
        self.num_replicas = getattr(inner, "num_replicas", 1)

    def set_epoch(self, epoch: int) -> None:
        self.inner.set_epoch(epoch)

    def __iter__(self):
        return itertools.islice(iter(self.inner), len(self))

    def __len__(self) -> int:
        return len(self.inner) // self.share * self.share


def build_loaders(cfg: Config, splits: Sequence[str] = SPLITS) -> dict[str, DataLoader]:
    """``{split: DataLoader}`` for the ``splits`` asked for ("train" and/or "val"), nothing more."""
    row = FORMATS.get(cfg.data.format)
    if row is None or row.task != cfg.model.task:
        raise DataError(f"data.format={cfg.data.format!r} does not feed model.task={cfg.model.task!r}; "
                        f"formats for {cfg.model.task}: {', '.join(formats_for(cfg.model.task))}")
    unknown = [split for split in splits if split not in SPLITS]
    if unknown:
        raise ValueError(f"build_loaders: unknown splits {unknown}; expected a subset of {SPLITS}")
    setup_process(cfg.train.device, cfg.train.deterministic)  # under torchrun: join before any sampler exists
    loaders = {}
    for split in splits:
        train = split == "train"
        dataset = row.dataset(cfg, cfg.data.train_split if train else cfg.data.val_split, train)
        loaders[split] = _make_loader(dataset, cfg, train, row.collate(cfg, train))
    return loaders


def _make_loader(dataset: Dataset, cfg: Config, train: bool, collate_fn=None) -> DataLoader:
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    plan = batch_plan(cfg, dist.get_world_size() if distributed else 1) if train else None  # eval: any process count
    if distributed and train:  # a global batch: floor(N / world) each, so that steps = floor(N / global batch)
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg.train.seed, drop_last=plan.from_global)
    elif distributed:  # evaluation: every image exactly once across the ranks (no padding repeats)
        sampler = ShardSampler(len(dataset), rank, dist.get_world_size())
    else:
        sampler = EpochShuffleSampler(len(dataset), cfg.train.seed) if train else SequentialShard(dataset)
    batch_size = plan.micro_batch if train else (cfg.data.eval_batch_size or cfg.data.batch_size)
    where = getattr(dataset, "split_dir", None) or getattr(dataset, "root", "the training split")
    if plan and plan.from_global and len(sampler) < plan.per_process:
        raise DataError(f"data.global_batch_size={plan.global_batch} needs {plan.per_process} training images per "
                        f"process ({plan.world_size} processes) but '{where}' gives {len(sampler)}; no step remains")
    if train and len(sampler) < batch_size:
        raise DataError(f"data.batch_size={batch_size} is larger than the {len(sampler)} training images per process "
                        f"in '{where}'; with drop_last no batch would remain")
    if plan and plan.from_global:
        sampler = WholeSteps(sampler, plan.per_process)
    workers = cfg.data.workers
    # Each rank gets its own worker seeds (different augmentations), reproducible from train.seed.
    stream = 2 * rank + (0 if train else 1)
    generator = torch.Generator().manual_seed(cfg.train.seed + 10_007 * stream)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=cfg.data.pin_memory and torch.cuda.is_available(),
        persistent_workers=cfg.data.persistent_workers and workers > 0,
        drop_last=train,
        generator=generator,
    )
