"""Detector weight import: effdet ``tf_efficientdet_d*`` / ``efficientdet_d*`` files and effdense's own.

effdet files load strictly: the backbone through ``backbones.weights`` (effdet's timm layout), the
BiFPN and heads by a name map derived from our modules (node i of cell r is effdet's ``fnode`` i;
its inputs keep effdet's offsets). TF-ported files carry a conv bias right before each BatchNorm
("redundant bias"); it is folded into that BatchNorm's running mean (BN(conv(x) + b) has mean
``running_mean - b``), which is exact in eval mode and changes nothing in training (batch statistics
remove any constant). When the file's class count differs from the model's, only the class
predictor's pointwise conv (weights and prior bias) stays freshly initialised, and a warning says so.
"""

from __future__ import annotations

import logging
import os
import re

import torch
from torch import nn

from backbones.errors import WeightsError
from backbones.errors import mismatch_parts, preview
from backbones.weights import LoadReport, load_state, read_state_dict

LOG = logging.getLogger("effdense")

_CLASS_PREDICTOR = ("class_net.predict.pw.weight", "class_net.predict.pw.bias")


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """``"effdet"`` (fpn.cell.*), ``"effdense"`` (fpn.cells.*) or ``"backbone"`` (no detector parts)."""
    if any(k.startswith("fpn.cell.") for k in state):
        return "effdet"
    if any(k.startswith("fpn.cells.") for k in state):
        return "effdense"
    return "backbone"


def _unwrap_bench(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """effdet's DetBenchTrain/Predict save the network under ``model.`` next to an anchors buffer."""
    state = {k: v for k, v in state.items() if k not in ("anchors.boxes", "model.anchors.boxes")}
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state


def effdet_names(model: nn.Module) -> dict[str, str]:
    """Each of our non-backbone state keys -> effdet's key (the head/pyramid name map)."""
    fpn = model.fpn
    inputs = {}  # (cell, node) -> effdet input offsets
    for r, cell in enumerate(fpn.cells):
        for i, node in enumerate(cell.nodes):
            inputs[(r, i)] = node.inputs
    names = {}
    for key in model.state_dict():
        if key.startswith("backbone."):
            continue
        names[key] = _effdet_key(key, inputs, len(fpn.in_channels))
    return names


_RULES = [
    (r"fpn\.extra\.(\d+)\.conv\.(conv|bn)\.(.+)", lambda m, io, n: f"fpn.resample.{n + int(m[1])}.conv.{m[2]}.{m[3]}"),
    (r"fpn\.cells\.(\d+)\.nodes\.(\d+)\.resample\.(\d+)\.(conv|bn)\.(.+)",
     lambda m, io, n: f"fpn.cell.{m[1]}.fnode.{m[2]}.combine.resample.{io[(int(m[1]), int(m[2]))][int(m[3])]}"
                      f".conv.{m[4]}.{m[5]}"),
    (r"fpn\.cells\.(\d+)\.nodes\.(\d+)\.weights",
     lambda m, io, n: f"fpn.cell.{m[1]}.fnode.{m[2]}.combine.edge_weights"),
    (r"fpn\.cells\.(\d+)\.nodes\.(\d+)\.conv\.(dw|pw)\.(.+)",
     lambda m, io, n: f"fpn.cell.{m[1]}.fnode.{m[2]}.after_combine.conv.conv_{m[3]}.{m[4]}"),
    (r"fpn\.cells\.(\d+)\.nodes\.(\d+)\.bn\.(.+)",
     lambda m, io, n: f"fpn.cell.{m[1]}.fnode.{m[2]}.after_combine.conv.bn.{m[3]}"),
    (r"(class|box)_net\.convs\.(\d+)\.(dw|pw)\.(.+)",
     lambda m, io, n: f"{m[1]}_net.conv_rep.{m[2]}.conv_{m[3]}.{m[4]}"),
    (r"(class|box)_net\.norms\.(\d+)\.(\d+)\.(.+)", lambda m, io, n: f"{m[1]}_net.bn_rep.{m[2]}.{m[3]}.bn.{m[4]}"),
    (r"(class|box)_net\.predict\.(dw|pw)\.(.+)", lambda m, io, n: f"{m[1]}_net.predict.conv_{m[2]}.{m[3]}"),
]


def _effdet_key(key: str, inputs: dict, num_inputs: int) -> str | None:
    for pattern, build in _RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return build(match, inputs, num_inputs)
    return None


def _redundant_bias(bn_key: str) -> str | None:
    """effdet's conv bias that feeds the BatchNorm ``bn_key`` (an effdet ``...running_mean`` key)."""
    if ".after_combine.conv.bn." in bn_key:
        return bn_key.split(".after_combine.conv.bn.")[0] + ".after_combine.conv.conv_pw.bias"
    if ".conv.bn." in bn_key:  # resample / extra-level 1x1 convs
        return bn_key.split(".conv.bn.")[0] + ".conv.conv.bias"
    match = re.fullmatch(r"(class|box)_net\.bn_rep\.(\d+)\.\d+\.bn\.running_mean", bn_key)
    if match:
        return f"{match[1]}_net.conv_rep.{match[2]}.conv_pw.bias"
    return None


def load_detector_weights(model: nn.Module, source: str | os.PathLike | dict, label: str | None = None) -> LoadReport:
    """Load an effdet or effdense detector checkpoint (path or state dict) into ``model`` strictly."""
    if isinstance(source, dict):
        state, label = source, label or "state dict"
    else:
        label = label or os.fspath(source)
        state = read_state_dict(source)
    state = _unwrap_bench(state)
    layout = detect_layout(state)
    if layout == "backbone":
        raise WeightsError(f"{label}: holds no detector (no fpn.* keys, first keys: {preview(state)}); expected an "
                         f"effdet or effdense detector file; a classifier/backbone file goes in backbone_weights")
    if layout == "effdense":
        return _load_effdense(model, state, label)
    return _load_effdet(model, state, label)


def _fresh_predictor(model: nn.Module, file_shape: torch.Size, label: str) -> bool:
    ours = model.class_net.predict.pw.weight.shape
    if file_shape == ours:
        return False
    if file_shape[1:] != ours[1:] or file_shape[0] % model.num_anchors:
        return False  # another architecture: reported as a shape mismatch
    LOG.warning("%s: class predictor re-initialised (prior bias): the file has %d classes, the model %d",
                label, file_shape[0] // model.num_anchors, model.num_classes)
    return True


def _load_effdense(model: nn.Module, state: dict, label: str) -> LoadReport:
    ours = model.state_dict()
    report = LoadReport(source=label, format="effdense")
    fresh = _CLASS_PREDICTOR[0] in state and _fresh_predictor(model, state[_CLASS_PREDICTOR[0]].shape, label)
    new, missing, shapes = {}, [], []
    for key, tensor in ours.items():
        if fresh and key in _CLASS_PREDICTOR:
            new[key] = tensor
            report.reinitialized.append(key)
        elif key in state:
            new[key] = state[key]
            if state[key].shape != tensor.shape:
                shapes.append(f"{key}: ours {list(tensor.shape)} vs file {list(state[key].shape)}")
        elif key.endswith(".num_batches_tracked"):
            new[key] = tensor
        else:
            missing.append(key)
    unexpected = [k for k in state if k not in ours]
    _raise_mismatch(label, "effdense", missing, unexpected, shapes)
    model.load_state_dict(new, strict=True)
    report.loaded = len(new) - len(report.reinitialized)
    LOG.info("loaded %d tensors from %s (effdense detector)", report.loaded, label)
    return report


def _load_effdet(model: nn.Module, state: dict, label: str) -> LoadReport:
    backbone_state = {k: v for k, v in state.items() if k.startswith("backbone.")}
    if not backbone_state:
        raise WeightsError(f"{label}: effdet detector file without backbone.* keys; expected a full effdet checkpoint")
    report = load_state(model.backbone, backbone_state, label)
    report.format = "effdet"
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    names = effdet_names(model)
    fresh = _fresh_predictor(model, state["class_net.predict.conv_pw.weight"].shape, label) \
        if "class_net.predict.conv_pw.weight" in state else False
    used = set(backbone_state)
    new, missing, shapes, folded = {}, [], [], 0
    for key, tensor in ours.items():
        theirs = names.get(key)
        if fresh and key in _CLASS_PREDICTOR:
            new[key] = tensor
            used.add(theirs)
            report.reinitialized.append(key)
            continue
        if theirs not in state:
            if key.endswith(".num_batches_tracked"):
                new[key] = tensor
            else:
                missing.append(f"{key} (as {theirs})")
            continue
        used.add(theirs)
        value = state[theirs]
        if key.endswith(".running_mean"):
            bias_key = _redundant_bias(theirs)
            if bias_key in state:  # fold BN(conv(x) + b) into the BN statistics
                value = value - state[bias_key]
                used.add(bias_key)
                folded += 1
        if value.shape != tensor.shape:
            shapes.append(f"{key}: ours {list(tensor.shape)} vs file {list(value.shape)} ({theirs})")
        new[key] = value
    unexpected = [k for k in state if k not in used]
    _raise_mismatch(label, "effdet", missing, unexpected, shapes)
    model.load_state_dict({**model.backbone.state_dict(prefix="backbone."), **new}, strict=True)
    report.loaded += len(new) - len(report.reinitialized)
    if folded and getattr(model, "padding", "symmetric") != "same":
        LOG.warning("%s: TF-ported weights (redundant conv biases) in a model with symmetric padding; build it as "
                    "tf_efficientdet_* (padding='same') for the reference outputs", label)
    LOG.info("loaded %d tensors from %s (effdet detector, %d redundant biases folded into BatchNorm)",
             report.loaded, label, folded)
    return report


def _raise_mismatch(label: str, layout: str, missing: list, unexpected: list, shapes: list) -> None:
    if not (missing or unexpected or shapes):
        return
    raise WeightsError(f"{label}: {layout} detector checkpoint does not fit this model: "
                       f"{mismatch_parts(missing, unexpected, shapes)}; expected "
                     f"weights of the same EfficientDet size (name/phi) and options")
