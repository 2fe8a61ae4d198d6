"""Loading a config: a complete YAML preset plus ``--set`` overrides -> one typed, validated ``Config``.

The schema (sections, fields, their choices and ranges) is ``tasks.config.schema``; the task named by
``model.task`` picks its ``Config`` subclass, so a preset holds exactly the keys its task has.
Loading and validation live here; nothing else in effdense reads raw YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from collections.abc import Iterable
from pathlib import Path

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from backbones.errors import EffdenseError

from .presets import resolve_preset
from .schema import (IMAGENET_MEAN, IMAGENET_STD, ClassificationConfig, Config,
                     DetectionConfig, ModelConfig, Range, SegmentationConfig, task_schemas)
from .scaling import detection_scale, detector_at, resolve_image_size

__all__ = ["Config", "ClassificationConfig", "SegmentationConfig", "DetectionConfig", "ConfigError", "load",
           "save", "to_dict", "validate", "resolve_image_size", "schema_for", "IMAGENET_MEAN", "IMAGENET_STD"]


# -- loading: YAML file + ``--set a.b=c`` overrides -> a typed, validated ``Config`` -----------------


class ConfigError(EffdenseError):
    """A bad config file, key or value; the message is one line naming the file or key."""


def schema_for(task: str) -> type[Config]:
    """The ``Config`` subclass of ``task``; a one-line error listing the tasks when unknown."""
    schemas = task_schemas()
    if task not in schemas:
        raise ConfigError(f"model.task={task!r} must be one of: {', '.join(schemas)}")
    return schemas[task]


def load(path: str | Path, overrides: Iterable[str] = ()) -> Config:
    """Read a complete YAML preset, apply ``key.path=value`` overrides, validate, return a ``Config``.

    Override values are parsed as YAML scalars/lists (``model.weights=null``, ``data.mean=[0.5,0.5,0.5]``).
    The schema is the one of the task the file (or an override) names in ``model.task``.
    """
    raw = _read_yaml(path)
    parsed = [(f"--set {override}", _parse_override(override)) for override in overrides]
    task = ModelConfig.task
    for _, tree in [(str(path), raw), *parsed]:
        model = tree.get("model")
        if isinstance(model, dict) and "task" in model:
            task = model["task"]
    schema = schema_for(str(task))
    merged = OmegaConf.structured(schema)
    for source, tree in [(str(path), raw), *parsed]:
        merged = _merge_checked(merged, tree, schema, source=source)
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        raise _type_error(error, merged, schema, source=str(path)) from None
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


# -- reading and merging ---------------------------------------------------------------------------


def _read_yaml(path: str | Path) -> dict:
    path = resolve_preset(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' not found (expected a YAML file or a shipped preset's name such as "
                          f"demo/classification; `effdense configs list` names them)")
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


def _merge_checked(merged, raw: dict, schema: type, source: str):
    _check_keys(raw, schema, prefix="", source=source)
    try:
        return OmegaConf.merge(merged, raw)
    except OmegaConfBaseException as error:
        raise _type_error(error, raw, schema, source) from None


def _check_keys(raw: dict, schema: type, prefix: str, source: str, root: type | None = None) -> None:
    """Every key of ``raw`` must name a field of ``schema``; sections must be mappings.

    Size fields (``[h, w]``) given as one int become ``[n, n]`` here, in ``raw``.
    """
    root = root or schema
    fields = _schema_fields(schema)
    metadata = {f.name: f.metadata for f in dataclasses.fields(schema)}
    for key, value in raw.items():
        key_path = f"{prefix}{key}"
        if key not in fields:
            where = f"in '{prefix[:-1]}'" if prefix else "at the top level"
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
            raise ConfigError(f"{source}: config key '{key_path}' is unknown{_task_note(key_path, root)}; "
                              f"valid keys {where}: {', '.join(sorted(fields))}{hint}")
        if dataclasses.is_dataclass(fields[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: config key '{key_path}' is a section; expected a mapping with keys "
                                  f"{', '.join(sorted(_schema_fields(fields[key])))}, got {value!r}")
            _check_keys(value, fields[key], prefix=f"{key_path}.", source=source, root=root)
        elif metadata[key].get("size") and isinstance(value, int) and not isinstance(value, bool):
            raw[key] = [value, value]
        elif isinstance(value, bool) and _YAML_WORDS[value] & set(metadata[key].get("choices", ())):
            # YAML reads an unquoted off / on / no / yes as a boolean: give a word choice its word back
            raw[key] = next(word for word in metadata[key]["choices"] if word in _YAML_WORDS[value])


_YAML_WORDS = {False: {"off", "no", "false"}, True: {"on", "yes", "true"}}


def _task_note(key_path: str, schema: type) -> str:
    """' (a segmentation key; this config is for classification)' when another task's schema has it."""
    for task, other in task_schemas().items():
        if other is not schema and _field_type(key_path, other) is not None:
            own = schema.TASK
            return f" for model.task={own} (it is a {task} key)"
    return ""


def _schema_fields(schema: type) -> dict[str, object]:
    """Field name -> resolved type annotation of a schema dataclass."""
    hints = typing.get_type_hints(schema)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}


def _type_error(error: OmegaConfBaseException, raw, schema: type, source: str) -> ConfigError:
    key_path = getattr(error, "full_key", None)
    if not key_path:
        return ConfigError(f"{source}: {_first_line(error)}")
    field_path = re.sub(r"\[\d+\]", "", key_path)
    expected = _field_type(field_path, schema) or object
    if _field_metadata(field_path, schema).get("size"):
        return ConfigError(f"{source}: config key '{key_path}' has the wrong type: got {_lookup(raw, key_path)!r}; "
                           f"expected an int (square), [height, width] or null")
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


def _field_type(field_path: str, schema: type):
    """The annotation of ``field_path`` in ``schema`` (None when the schema has no such field)."""
    field_type: object = schema
    for part in field_path.split("."):
        if not dataclasses.is_dataclass(field_type):
            return None
        field_type = _schema_fields(field_type).get(part)
    return field_type


def _field_metadata(field_path: str, schema: type) -> dict:
    *parents, name = field_path.split(".")
    owner = _field_type(".".join(parents), schema) if parents else schema
    if not dataclasses.is_dataclass(owner):
        return {}
    return next((dict(f.metadata) for f in dataclasses.fields(owner) if f.name == name), {})


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


# -- validation: the choices and ranges declared on the schema's fields ------------------------------

NON_EMPTY_STRINGS = ("data.root", "data.train_split", "data.val_split", "train.output_dir")
_DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


def validate(cfg: Config) -> Config:
    """Check every field's declared choices and ranges, and the cross-field rules; raise one
    ``ConfigError`` line listing every problem. Returns ``cfg``."""
    problems = _field_problems(cfg, "")
    problems += _backbone_problems(cfg)
    if not _DEVICE_PATTERN.fullmatch(str(cfg.train.device)):
        problems.append(f"train.device={cfg.train.device!r} must be auto, cpu, cuda or cuda:N")
    problems += [f"{key}={_get(cfg, key)!r} must be a non-empty string" for key in NON_EMPTY_STRINGS
                 if not str(_get(cfg, key)).strip()]
    if cfg.optim.nesterov and cfg.optim.momentum <= 0:
        problems.append(f"optim.nesterov=true needs optim.momentum > 0 (got {cfg.optim.momentum})")
    bands = cfg.model.in_channels
    problems += [f"data.{key}={list(getattr(cfg.data, key))} has {len(getattr(cfg.data, key))} values; expected one per "
                 f"band, model.in_channels={bands}" for key in ("mean", "std") if len(getattr(cfg.data, key)) != bands]
    augment = getattr(cfg.data, "augment", None)
    if augment is not None and getattr(augment, "scale_max", None) is not None and augment.scale_min > augment.scale_max:
        problems.append(f"data.augment.scale_min={augment.scale_min} must be <= data.augment.scale_max={augment.scale_max}")
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


def _field_problems(node, prefix: str) -> list[str]:
    problems = []
    for f in dataclasses.fields(node):
        key, value, meta = f"{prefix}{f.name}", getattr(node, f.name), f.metadata
        if dataclasses.is_dataclass(value):
            problems += _field_problems(value, f"{key}.")
            continue
        hint = f" ({meta['doc']})" if meta.get("doc") else ""
        if "choices" in meta and value not in meta["choices"]:
            shown = ", ".join("null" if c is None else str(c) for c in meta["choices"])
            problems.append(f"{key}={value!r} must be one of: {shown}{hint}")
        allowed: Range | None = meta.get("range")
        if allowed is not None and value is not None and not allowed.contains(value):
            problems.append(f"{key}={value!r} {allowed.describe()}{hint}")
        each: Range | None = meta.get("each")
        if each is not None and value is not None:
            lengths = meta.get("lengths")
            if lengths and len(value) not in lengths:
                what = "[height, width]" if meta.get("size") else f"{' or '.join(map(str, lengths))} values"
                problems.append(f"{key}={list(value)} must have {what}{hint}")
            elif not all(each.contains(v) for v in value):
                problems.append(f"{key}={list(value)}: each value {each.describe()}{hint}")
    return problems


def _backbone_problems(cfg: Config) -> list[str]:
    import backbones

    names = backbones.list_names()
    if cfg.model.backbone not in names:
        return [f"model.backbone={cfg.model.backbone!r} is unknown; known backbones: {', '.join(names)}"]
    if cfg.model.backbone == "efficientnet" and cfg.model.phi is None:
        return ["model.backbone='efficientnet' needs model.phi (a compound coefficient, e.g. model.phi=2.5)"]
    if isinstance(cfg, DetectionConfig):
        return _detection_scale_problems(cfg)
    return []  # model.scale is one of its declared choices (checked with every field)


def _detection_scale_problems(cfg: DetectionConfig) -> list[str]:
    try:
        preset = detector_at(detection_scale(cfg.model))
    except ValueError as error:
        return [str(error)]
    multiple = 2 ** max(preset.levels)
    size = cfg.data.image_size
    if size is not None and any(side % multiple for side in size):
        return [f"data.image_size={list(size)}: each side must be a multiple of {multiple} "
                f"(2^{max(preset.levels)}, the coarsest BiFPN level)"]
    return []
