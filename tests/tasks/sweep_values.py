"""What the config sweep sets each leaf key to: derived from the field itself (its choices, range, type), or
from this one table for the keys whose valid values the field cannot say (a path, a list of a given length,
a file made by an earlier run), and the keys that cannot run on a CPU, each with its reason."""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

SKIP = object()

# key -> reason: settings that cannot run here; they run on the GPU report (tools/gpu_report.sh)
CPU_SKIPS = {
    "train.amp=fp16": "fp16 autocast with a GradScaler needs CUDA",
    "train.compile=true": "torch.compile's first call takes minutes on this CPU; the GPU report compiles",
    "model.sync_bn=true": "SyncBatchNorm converts only under DDP on CUDA",
    "train.batch_size=auto": "the batch probe runs on CUDA (on the CPU it keeps the batch and says so)",
    "train.device=cuda": "no CUDA here",
}

# key -> list of values, or a callable (context) -> list; context: {"task", "cfg", "files"}
TABLE: dict[str, Any] = {
    "model.task": SKIP,  # another task is another schema: every task is swept on its own
    "model.backbone": lambda c: ["efficientnet-b0" if c["cfg"].model.backbone != "efficientnet-b0" else "efficientnet-lite0"],
    "model.scale": lambda c: ["1"],  # the smallest other published row keeps the key meaningful
    "model.phi": lambda c: [0.5],
    "model.weights": lambda c: [c["files"]["weights"]],
    "model.backbone_weights": lambda c: [c["files"]["backbone_weights"]],
    "model.num_classes": SKIP,  # the data decides it (a mismatch is a one-line error, tested in test_data)
    "model.in_channels": lambda c: [1],
    "data.root": SKIP,  # every setting runs on the sweep's own data
    "data.train_split": lambda c: [c["cfg"].data.val_split],
    "data.val_split": lambda c: [c["cfg"].data.train_split],
    "data.train_annotations": lambda c: [c["files"]["train_annotations"]],
    "data.val_annotations": lambda c: [c["files"]["val_annotations"]],
    "data.train_images": lambda c: [c["files"]["train_images"]],
    "data.val_images": lambda c: [c["files"]["val_images"]],
    "data.class_names": lambda c: [[f"class{i}" for i in range(c["cfg"].model.num_classes)]],
    "data.mean": lambda c: [[0.5] * c["cfg"].model.in_channels],
    "data.std": lambda c: [[0.25] * c["cfg"].model.in_channels],
    "data.input_range": lambda c: [[0.0, 255.0]],
    "data.percentiles": lambda c: [[0.5, 99.5]],
    "data.workers": lambda c: [1],  # one worker process: the DataLoader path without spending a core
    "data.batch_size": lambda c: [3],
    "data.eval_batch_size": lambda c: [3],
    "data.image_size": lambda c: [[256, 256]] if c["task"] == "detection" else [[48, 48]],
    "data.eval.window": lambda c: [[48, 48]],
    "data.eval.stride": lambda c: [[32, 32]],
    "data.eval.scales": lambda c: [[0.75, 1.0]],
    "data.tile.size": lambda c: [48],
    "model.segmentation.decoder_channels": lambda c: [[128, 64, 32, 16, 8]],
    "model.segmentation.bifpn_levels": lambda c: [[2, 3, 4, 5]],
    "loss.class_weights": lambda c: [[1.0] * c["cfg"].model.num_classes],
    "loss.pos_weight": lambda c: [[2.0]],
    "loss.ohem_min_kept": lambda c: [64],
    "train.device": lambda c: ["cpu"],
    "train.output_dir": lambda c: [c["files"]["output_dir"]],
    "train.run_name": lambda c: [f"sweep-named-{c['task']}"],
    "train.epochs": lambda c: [2],
    "train.max_steps": SKIP,  # the sweep's own setting (one step)
    "train.progress": SKIP,  # bars off in tests; on is the default everywhere else
    "train.seed": lambda c: [1],
    "train.progressive.image_size": lambda c: [[32, 48]],
    "train.progressive.randaugment": lambda c: [[2, 6]],
    "train.progressive.dropout": lambda c: [[0.1, 0.3]],
    "train.progressive.mixup": lambda c: [[0.0, 0.2]],
}


def leaf_fields(schema: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """(dotted key, field, annotation) for every leaf of a schema dataclass."""
    hints = typing.get_type_hints(schema)
    leaves = []
    for f in dataclasses.fields(schema):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            leaves += leaf_fields(kind, f"{prefix}{f.name}.")
        else:
            leaves.append((f"{prefix}{f.name}", f, kind))
    return leaves


def _base(kind):
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return _base(args[0]) if typing.get_origin(kind) is typing.Union else kind


def derived_values(key: str, f: dataclasses.Field, kind, current) -> list | None:
    """Valid values other than ``current`` that the field itself declares; None when it cannot say."""
    meta, base = f.metadata, _base(kind)
    if "choices" in meta:
        return [c for c in meta["choices"] if c != current]
    if base is bool:
        return [not current]
    allowed = meta.get("range")
    if allowed is not None and base in (int, float):
        return [_number_inside(allowed, current, base)]
    return None


def _number_inside(allowed, current, base):
    low = allowed.low if allowed.low is not None else 0.0
    if current is None:
        value = low + 1 if allowed.high is None else (low + allowed.high) / 2
    elif allowed.high is not None:
        value = (current + (allowed.high if current <= (low + allowed.high) / 2 else low)) / 2
    else:
        value = current * 2 if current else low + 1
    value = int(math.ceil(value)) if base is int else float(value)
    if base is int and value == current:
        value += 1
    assert allowed.contains(value) and value != current, (value, current)
    return value


def yaml_value(value) -> str:
    """How ``--set key=value`` writes ``value``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(yaml_value(v) for v in value) + "]"
    return str(value)
