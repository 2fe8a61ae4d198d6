"""One typed config schema for every task, loaded from a complete YAML file plus ``--set`` overrides.

The schema is plain dataclasses (OmegaConf structured configs validate keys and types against it).
Loading and validation live below the schema; nothing else in effdense reads raw YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

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
    persistent_workers: bool = False  # true skips worker start-up per epoch, but a resumed run then draws different augmentations
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


# -- loading: YAML file + ``--set a.b=c`` overrides -> a typed, validated ``Config`` -----------------


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line naming the file or key."""


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a complete YAML preset, apply ``key.path=value`` overrides, validate, return a ``Config``.

    Override values are parsed as YAML scalars/lists (``model.weights=null``, ``data.mean=[0.5,0.5,0.5]``).
    """
    merged = OmegaConf.structured(Config)
    merged = _merge_checked(merged, _read_yaml(path), source=str(path))
    for override in overrides:
        merged = _merge_checked(merged, _parse_override(override), source=f"--set {override}")
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _type_error(error, merged, source=str(path)) from None
    validate(cfg)
    return cfg


def save(cfg: Config, path: str | Path) -> Path:
    """Write ``cfg`` as a complete YAML file that ``load`` reads back to an equal ``Config``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    return path


def to_dict(cfg: Config) -> dict:
    """``cfg`` as nested plain dicts and lists (for logging, checkpoints, JSON)."""
    return dataclasses.asdict(cfg)


def resolve_image_size(cfg: Config) -> int:
    """``data.image_size`` when set, else the native resolution of the configured backbone scale."""
    if cfg.data.image_size is not None:
        return int(cfg.data.image_size)
    import backbones

    if cfg.model.phi is not None:
        return backbones.get_preset("efficientnet", phi=cfg.model.phi).resolution
    return backbones.get_preset(cfg.model.backbone).resolution


# -- reading and merging ---------------------------------------------------------------------------


def _read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (expected a YAML preset such as configs/demo/classification.yaml)")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML{_describe_yaml_error(error)}") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: cannot read the config file ({error})") from None
    if not OmegaConf.is_dict(loaded):
        raise ConfigError(f"{path}: the top level must be a mapping of sections "
                          f"({', '.join(_schema_fields(Config))}), got a list")
    return OmegaConf.to_container(loaded, resolve=False)


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    return where + ": " + " ".join(str(getattr(error, "problem", None) or error).split())


def _parse_override(override: str) -> dict:
    key, sep, _ = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected key.path=value (e.g. train.epochs=3)")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([override]), resolve=False)
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as error:
        raise ConfigError(f"--set {override!r}: cannot parse ({_first_line(error)})") from None


def _merge_checked(merged, raw: dict, source: str):
    _check_keys(raw, Config, prefix="", source=source)
    try:
        return OmegaConf.merge(merged, raw)
    except OmegaConfBaseException as error:
        raise _type_error(error, raw, source) from None


def _check_keys(raw: dict, schema: type, prefix: str, source: str) -> None:
    """Every key of ``raw`` must name a field of ``schema``; sections must be mappings."""
    fields = _schema_fields(schema)
    for key, value in raw.items():
        key_path = f"{prefix}{key}"
        if key not in fields:
            where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: config key '{key_path}' is unknown; "
                              f"valid keys {where}: {', '.join(sorted(fields))}{hint}")
        if dataclasses.is_dataclass(fields[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key '{key_path}' is a section; expected a mapping with keys "
                                  f"{', '.join(sorted(_schema_fields(fields[key])))}, got {value!r}")
            _check_keys(value, fields[key], prefix=f"{key_path}.", source=source)


def _schema_fields(schema: type) -> dict[str, object]:
    """Field name -> resolved type annotation of a schema dataclass."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _type_error(error: OmegaConfBaseException, raw, source: str) -> ConfigError:
    key_path = getattr(error, "full_key", None)
    if not key_path:
        return ConfigError(f"{source}: {_first_line(error)}")
    expected = _field_type(re.sub(r"\[\d+\]", "", key_path))
    if key_path.endswith("]"):  # one element of a list field
        expected = typing.get_args(expected)[0]
    return ConfigError(f"{source}: config key '{key_path}' has the wrong type: got {_lookup(raw, key_path)!r}; "
                       f"expected {_type_name(expected)}")


def _lookup(raw, key_path: str):
    node = raw
    for part in re.findall(r"[^.\[\]]+", key_path):
        try:
            node = node[int(part)] if isinstance(node, list) or OmegaConf.is_list(node) else node[part]
        except (KeyError, IndexError, ValueError, TypeError, OmegaConfBaseException):
            return "?"
    return node


def _field_type(field_path: str):
    field_type: object = Config
    for part in field_path.split("."):
        if not dataclasses.is_dataclass(field_type):
            return object
        field_type = _schema_fields(field_type).get(part, object)
    return field_type


def _type_name(field_type) -> str:
    args = [a for a in typing.get_args(field_type) if a is not type(None)]
    if typing.get_origin(field_type) is list:
        return f"list of {_type_name(args[0])}"
    if type(None) in typing.get_args(field_type):
        return f"{_type_name(args[0])} or null"
    return "bool (true or false)" if field_type is bool else getattr(field_type, "__name__", str(field_type))


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# -- validation: ranges and choices ----------------------------------------------------------------


@dataclass(frozen=True)
class _Range:
    """A numeric interval; ``None`` bounds are open-ended. Values must also be finite."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is None:  # ranges here are bounded below or not at all
            return "must be a finite number"
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {left}{self.low:g}, {self.high:g}{right}"


_POSITIVE = _Range(0, low_open=True)
_AT_LEAST_ONE = _Range(1)
_NON_NEGATIVE = _Range(0)
_FRACTION = _Range(0, 1)  # [0, 1]
_FRACTION_BELOW_ONE = _Range(0, 1, high_open=True)  # [0, 1)
_FRACTION_ABOVE_ZERO = _Range(0, 1, low_open=True)  # (0, 1]
_OPEN_UNIT = _Range(0, 1, low_open=True, high_open=True)  # (0, 1)

RANGES: dict[str, _Range] = {
    "model.phi": _Range(),
    "model.num_classes": _AT_LEAST_ONE,
    "model.drop_path": _FRACTION_BELOW_ONE,
    "model.dropout": _FRACTION_BELOW_ONE,
    "model.norm_eps": _POSITIVE,
    "model.norm_momentum": _FRACTION,
    "data.image_size": _Range(32),
    "data.batch_size": _AT_LEAST_ONE,
    "data.eval_batch_size": _AT_LEAST_ONE,
    "data.workers": _NON_NEGATIVE,
    "data.augment.hflip": _FRACTION,
    "data.augment.scale_min": _FRACTION_ABOVE_ZERO,
    "data.augment.randaugment_ops": _NON_NEGATIVE,
    "data.augment.randaugment_magnitude": _Range(0, 30),  # RandAugment's 31 magnitude bins
    "data.augment.eval_crop_pct": _FRACTION_ABOVE_ZERO,
    "optim.lr": _POSITIVE,
    "optim.base_batch_size": _AT_LEAST_ONE,
    "optim.momentum": _FRACTION_BELOW_ONE,
    "optim.weight_decay": _NON_NEGATIVE,
    "optim.rmsprop_alpha": _OPEN_UNIT,
    "optim.eps": _POSITIVE,
    "schedule.warmup_epochs": _NON_NEGATIVE,
    "schedule.warmup_start_factor": _FRACTION_ABOVE_ZERO,
    "schedule.min_lr_ratio": _FRACTION,
    "schedule.step_epochs": _POSITIVE,
    "schedule.step_gamma": _FRACTION_ABOVE_ZERO,
    "schedule.poly_power": _POSITIVE,
    "loss.label_smoothing": _FRACTION_BELOW_ONE,
    "train.epochs": _AT_LEAST_ONE,
    "train.max_steps": _AT_LEAST_ONE,
    "train.grad_accum": _AT_LEAST_ONE,
    "train.clip_grad": _POSITIVE,
    "train.ema_decay": _OPEN_UNIT,
    "train.seed": _NON_NEGATIVE,
    "train.eval_every": _AT_LEAST_ONE,
    "train.log_every": _AT_LEAST_ONE,
    "train.checkpoint_every": _AT_LEAST_ONE,
}

CHOICES: dict[str, tuple[str, ...]] = {
    "model.task": ("classification", "segmentation", "detection"),
    "model.padding": ("symmetric", "same"),
    "data.format": ("imagefolder", "cityscapes", "coco"),
    "data.on_bad_sample": ("error", "skip"),
    "optim.name": ("sgd", "rmsprop", "adamw"),
    "schedule.name": ("cosine", "step", "poly", "constant"),
    "train.amp": ("none", "bf16", "fp16"),
}

NON_EMPTY_STRINGS = ("data.root", "data.train_split", "data.val_split", "train.output_dir")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def validate(cfg: Config) -> Config:
    """Check ranges and choices; raise one ``ConfigError`` line listing every problem. Returns ``cfg``."""
    problems = [*_range_problems(cfg), *_choice_problems(cfg), *_normalisation_problems(cfg), *_backbone_problems(cfg)]
    if not _DEVICE_PATTERN.fullmatch(str(cfg.train.device)):
        problems.append(f"train.device={cfg.train.device!r} must be auto, cpu, cuda or cuda:N")
    problems += [f"{key}={_get(cfg, key)!r} must be a non-empty string" for key in NON_EMPTY_STRINGS
                 if not str(_get(cfg, key)).strip()]
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} config problems: " + "; ".join(problems))
    return cfg


def _get(cfg: Config, key_path: str):
    node = cfg
    for part in key_path.split("."):
        node = getattr(node, part)
    return node


def _range_problems(cfg: Config) -> list[str]:
    problems = []
    for key, allowed in RANGES.items():
        value = _get(cfg, key)
        if value is not None and not allowed.contains(value):
            problems.append(f"{key}={value!r} {allowed.describe()}")
    return problems


def _choice_problems(cfg: Config) -> list[str]:
    return [f"{key}={_get(cfg, key)!r} must be one of: {', '.join(choices)}"
            for key, choices in CHOICES.items() if _get(cfg, key) not in choices]


def _normalisation_problems(cfg: Config) -> list[str]:
    problems = []
    for key, values, allowed in (("data.mean", cfg.data.mean, _FRACTION), ("data.std", cfg.data.std, _FRACTION_ABOVE_ZERO)):
        if len(values) != 3:
            problems.append(f"{key}={list(values)} must have 3 values (one per RGB channel)")
        elif not all(allowed.contains(v) for v in values):
            problems.append(f"{key}={list(values)}: each value {allowed.describe()} (0..1 pixel scale, "
                            f"e.g. ImageNet {list(IMAGENET_MEAN if key == 'data.mean' else IMAGENET_STD)})")
    return problems


def _backbone_problems(cfg: Config) -> list[str]:
    import backbones

    names = backbones.list_names()
    if cfg.model.backbone not in names:
        return [f"model.backbone={cfg.model.backbone!r} is unknown; known backbones: {', '.join(names)}"]
    if cfg.model.backbone == "efficientnet" and cfg.model.phi is None:
        return ["model.backbone='efficientnet' needs model.phi (a compound coefficient, e.g. model.phi=2.5)"]
    return []
