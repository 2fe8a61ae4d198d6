"""EfficientNetV2's progressive learning for classification (Tan & Le 2021, Sec. 4, Table 6).

``train.progressive``: ``stages`` (1: off) and ``[first, last]`` pairs for ``image_size`` (the training crop's
square side; evaluation stays at ``data.image_size``), ``randaugment`` (the RandAugment magnitude, TF scale),
``dropout`` (the classifier head's) and ``mixup`` (Mixup's Beta alpha); a null pair keeps the configured value
in every stage. The schedule (:mod:`tasks.engine.progressive`: linear from first to last over the stages,
``epochs / stages`` epochs each, in-between image sizes rounded to a multiple of 8) is applied at each stage's
first epoch by the hook :func:`progressive_callback` returns: it sets the train dataset's transform (a new
DataLoader when workers are persistent), the head's ``Dropout.p`` and the task's Mixup alpha. Pass it to the
trainer: ``Trainer(model, loaders, cfg, epoch_callbacks=epoch_callbacks(cfg))``.

The paper's Table 6 (ImageNet; 4 stages of ~87 epochs, 350 in all; V2-S as quoted in issue 17, V2-M/L as
recalled from the paper -- /work/shared/reference has no copy of the table):

=========  ==========  ==========  ==========
           V2-S        V2-M        V2-L
=========  ==========  ==========  ==========
size       128 -> 300  128 -> 380  128 -> 380
RandAug    5 -> 15     5 -> 20     5 -> 25
Mixup      0 -> 0      0 -> 0.2    0 -> 0.4
Dropout    0.1 -> 0.3  0.1 -> 0.4  0.1 -> 0.5
=========  ==========  ==========  ==========

(evaluated at 384, 480, 480). The official code (google/automl ``efficientnetv2``) differs: its
``effnetv2_configs.py`` ends S at size 300 / RandAug 10 / dropout 0.2 / mixup 0, M at 384 / 15 / 0.3 / 0.2, L
at 384 / 20 / 0.4 / 0.5; its ``main.py`` sizes stage ``i`` with ``(i + 1) / N`` (the first stage already above
the first size), starts RandAugment at 5 and mixup at 0 (``np.linspace``), and has the dropout schedule
commented out. This module follows the paper's Algorithm 1 (stage ``i`` at ``i / (N - 1)``).
"""

from __future__ import annotations

from tasks.config import ConfigError, resolve_image_size
from tasks.engine.progressive import Stage, StageHook, build_stages, rebuild_loader

__all__ = ["KEYS", "progressive_stages", "progressive_callback", "epoch_callbacks", "apply_stage"]

KEYS = ("image_size", "randaugment", "dropout", "mixup")  # train.progressive's pairs, in table order


def progressive_stages(cfg) -> list[Stage] | None:
    """The stages of ``cfg.train.progressive`` (None when ``stages`` is 1); one-line errors for pairs that
    would be ignored."""
    progressive, augment = cfg.train.progressive, cfg.data.augment
    ramps = {key: getattr(progressive, key) for key in KEYS}
    given = [f"train.progressive.{key}" for key, ramp in ramps.items() if ramp is not None]
    if progressive.stages <= 1:
        if given:
            raise ConfigError(f"{', '.join(given)} set but train.progressive.stages={progressive.stages} (off); "
                              f"set train.progressive.stages (EfficientNetV2: 4) or drop the pairs")
        return None
    if progressive.stages > cfg.train.epochs:
        raise ConfigError(f"train.progressive.stages={progressive.stages} is more than train.epochs="
                          f"{cfg.train.epochs}; each stage needs at least one epoch")
    randaugment = augment.randaugment and not augment.autoaugment
    if ramps["randaugment"] is not None and not randaugment:
        why = "data.augment.autoaugment=true" if augment.autoaugment else "data.augment.randaugment=false"
        raise ConfigError(f"train.progressive.randaugment={list(ramps['randaugment'])} schedules RandAugment's "
                          f"magnitude but {why}; set data.augment.randaugment=true and autoaugment=false")
    constants = {"image_size": resolve_image_size(cfg),
                 "randaugment": augment.randaugment_magnitude if randaugment else None,
                 "dropout": cfg.model.dropout, "mixup": augment.mixup}
    return build_stages(cfg.train.epochs, progressive.stages,
                        {key: tuple(ramp) if ramp is not None else None for key, ramp in ramps.items()},
                        constants, multiple={"image_size": 8})


def apply_stage(cfg, trainer, stage: Stage) -> None:
    """Set ``stage``'s values on the trainer's train data and model (see the module's docstring)."""
    from tasks.data.transforms.classification import train_transform_for

    values = stage.values
    loader = trainer.loaders["train"]
    dataset = loader.dataset
    if not hasattr(dataset, "transform"):
        raise TypeError(f"progressive learning sets the train dataset's transform, but {type(dataset).__name__} "
                        f"has no 'transform' attribute")
    size = values["image_size"]
    size = (int(size), int(size)) if isinstance(size, (int, float)) else tuple(int(v) for v in size)
    dataset.transform = train_transform_for(cfg, size, values["randaugment"])
    if loader.persistent_workers and loader.num_workers > 0:  # its workers keep the dataset they started with
        trainer.loaders["train"] = rebuild_loader(loader)
    task = trainer.model
    if values["dropout"] is not None:
        task.net.head.dropout.p = float(values["dropout"])
    if values["mixup"] is not None:
        task.mix.mixup = float(values["mixup"])


def progressive_callback(cfg) -> StageHook | None:
    """The per-epoch hook ``(trainer, epoch)`` applying ``cfg``'s stages, or None when progressive learning is
    off. It prints the schedule (:meth:`StageHook.table`) at its first call and each stage as it starts."""
    stages = progressive_stages(cfg)
    if stages is None:
        return None
    return StageHook(stages, lambda trainer, stage: apply_stage(cfg, trainer, stage),
                     title="progressive learning (EfficientNetV2)")


def epoch_callbacks(cfg) -> list:
    """What ``Trainer(..., epoch_callbacks=)`` takes for a classification config: ``[]`` or the stage hook."""
    hook = progressive_callback(cfg)
    return [hook] if hook is not None else []
