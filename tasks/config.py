"""One typed config schema for every task, loaded from a complete YAML file plus ``--set`` overrides.

The schema is plain dataclasses (OmegaConf structured configs validate keys and types against it).
Loading and validation live below the schema; nothing else in effdense reads raw YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    task: str = "classification"  # classification | segmentation | detection
    backbone: str = "efficientnet-b0"  # a name from backbones.list_names()
    phi: Optional[float] = None  # set -> backbone "efficientnet" with this compound coefficient
    num_classes: int = 1000
    weights: Optional[str] = None  # a checkpoint path or "imagenet"
    drop_path: float = 0.2  # stochastic depth, linear per block
    dropout: Optional[float] = None  # classifier dropout; None = the preset's
    padding: str = "symmetric"  # symmetric | same (TF-compatible)
    norm_eps: Optional[float] = None  # None = the preset's
    norm_momentum: Optional[float] = None
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP


@dataclass
class AugmentConfig:
    hflip: float = 0.5  # probability
    scale_min: float = 0.08  # RandomResizedCrop lower scale bound
    randaugment: bool = True
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9
    eval_crop_pct: float = 0.875  # resize to size / crop_pct, then centre-crop size


@dataclass
class DataConfig:
    format: str = "imagefolder"  # imagefolder | cityscapes | coco
    root: str = "data/imagenet"
    train_split: str = "train"
    val_split: str = "val"
    image_size: Optional[int] = None  # None = the backbone's native resolution
    batch_size: int = 64  # per process
    eval_batch_size: Optional[int] = None  # None = batch_size
    workers: int = 8
    pin_memory: bool = True
    persistent_workers: bool = True
    on_bad_sample: str = "error"  # error | skip
    mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class OptimConfig:
    name: str = "sgd"  # sgd | rmsprop | adamw
    lr: float = 0.1  # at base_batch_size; scaled linearly with the global batch
    base_batch_size: int = 256
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-5
    no_decay_norm_and_bias: bool = True
    rmsprop_alpha: float = 0.9  # RMSProp decay (TF "decay")
    eps: float = 1e-3  # RMSProp eps (TF reference) / AdamW eps


@dataclass
class ScheduleConfig:
    name: str = "cosine"  # cosine | step | poly | constant
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 0.01
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of the peak lr
    step_epochs: float = 2.4  # step: decay every N epochs
    step_gamma: float = 0.97
    poly_power: float = 0.9


@dataclass
class LossConfig:
    label_smoothing: float = 0.1


@dataclass
class TrainConfig:
    epochs: int = 10
    max_steps: Optional[int] = None  # stop early after this many optimizer steps (demos, benchmarks)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = "none"  # none | bf16 | fp16
    channels_last: bool = False
    compile: bool = False
    grad_accum: int = 1
    clip_grad: Optional[float] = None  # max gradient norm
    ema: bool = False
    ema_decay: float = 0.9999
    seed: int = 0
    deterministic: bool = False
    eval_every: int = 1  # epochs
    log_every: int = 20  # steps
    checkpoint_every: int = 1  # epochs
    grad_checkpointing: bool = False
    output_dir: str = "runs"
    run_name: Optional[str] = None  # None = <config stem>-<timestamp>
    progress: bool = True  # tqdm bars on rank 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
