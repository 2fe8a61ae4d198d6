"""``data.augment.close_mosaic``: the last N epochs of a detection run train without mosaic and mixup (the
small-data recipe, ultralytics' ``close_mosaic=10``), so that the model finishes on images like the ones
it will see (the one-image transform: scale jitter, crop, flip, and the recipe's affine and HSV, which stay).

:func:`epoch_callbacks` gives the trainer's per-epoch hook (the registry's detection row). At each epoch
start it reads the run's current length, ``trainer.epochs`` when the trainer refits it (``train.time_limit``)
else ``train.epochs``, and sets mosaic and mixup off from epoch ``total - close_mosaic`` on (on again before
it, should a refit lengthen the run; a resumed run gets the state of its epoch). Persistent DataLoader
workers hold their own copy of the dataset, so the hook then replaces the train loader with a twin (same
dataset, sampler and settings, fresh workers); with other workers the change reaches the next epoch's.
"""

from __future__ import annotations

import logging

from tasks.data.mosaic import MosaicDetection
from tasks.engine.progressive import rebuild_loader

log = logging.getLogger("effdense")

__all__ = ["CloseMosaic", "epoch_callbacks"]


class CloseMosaic:
    """The hook ``(trainer, epoch)``: mosaic and mixup on before epoch ``total - close_mosaic``, off from it.
    ``switches``: (epoch, on) for each change made (a record for tests and logs)."""

    def __init__(self, close_mosaic: int):
        self.close_mosaic = int(close_mosaic)
        self.switches: list[tuple[int, bool]] = []

    def __call__(self, trainer, epoch: int) -> None:
        total = int(getattr(trainer, "epochs", trainer.train_cfg.epochs))
        on = epoch < total - self.close_mosaic
        loader = trainer.loaders["train"]
        dataset = loader.dataset
        if not isinstance(dataset, MosaicDetection):
            raise TypeError(f"data.augment.close_mosaic switches the train dataset's mosaic and mixup, but it is a "
                            f"{type(dataset).__name__}, not a MosaicDetection")
        if dataset.mixing == on:
            return
        dataset.set_mixing(on)
        if loader.persistent_workers and loader.num_workers > 0:  # its workers keep the dataset they started with
            trainer.loaders["train"] = rebuild_loader(loader)
        self.switches.append((epoch, on))
        if getattr(trainer, "is_main", True):
            state = "on" if on else f"off for the last {total - epoch} of {total} epochs (close_mosaic)"
            log.info("epoch %d: mosaic and mixup %s", epoch + 1, state)


def epoch_callbacks(cfg) -> list:
    """What ``Trainer(..., epoch_callbacks=)`` takes for a detection config: the close_mosaic hook when
    ``data.augment.close_mosaic`` and mosaic or mixup are set, else ``[]``."""
    augment = cfg.data.augment
    if augment.close_mosaic > 0 and (augment.mosaic or augment.mixup):
        return [CloseMosaic(augment.close_mosaic)]
    return []
