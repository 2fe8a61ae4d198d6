"""``convert``: a foreign checkpoint (torchvision, timm, effdet, EfficientNet-PyTorch) -> effdense safetensors."""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from . import create
from .errors import WeightsError
from .files import write_safetensors
from .weights import _HEAD_OURS, Source, _load_state, _source_head, detect_format, read_state_dict

LOG = logging.getLogger("effdense")

__all__ = ["convert"]


def convert(src_path: str | os.PathLike, arch: str, out_path: str | os.PathLike, **create_options) -> str:
    """Convert a foreign checkpoint into effdense safetensors for ``arch`` (``backbones.create`` name).

    The backbone is built with ``create_options`` and loaded strictly. If the source has classifier
    weights, the file uses the classifier layout (``backbone.*``, ``head.conv.*``, ``head.fc.*``),
    loadable by ``tasks.classification.build_classifier``; otherwise it holds the backbone alone.
    Returns the written path.
    """
    label = os.fspath(src_path)
    backbone = create(arch, **create_options)
    state = read_state_dict(label)
    src = detect_format(state, label)
    report = _load_state(backbone, state, src, label)
    tensors = {k: v.detach().contiguous() for k, v in backbone.state_dict().items()}
    head = _head_tensors(state, src, backbone, label)
    if head:
        tensors = {"backbone." + k: v for k, v in tensors.items()}
        tensors.update(head)
    meta = {"effdense.arch": arch, "effdense.source_format": report.format}
    out = str(write_safetensors(out_path, tensors, meta))
    LOG.info("converted %s (%s) -> %s (%d tensors)", label, report.format, out, len(tensors))
    return out


def _head_tensors(state: dict, src: Source, backbone: nn.Module, label: str) -> dict[str, torch.Tensor]:
    """The source's classifier head under effdense names, or {} when it has none."""
    head = {}
    for ours, theirs in zip(_HEAD_OURS, _source_head(backbone, src)):
        head.update({f"{ours}.{k[len(theirs) + 1:]}": v.contiguous() for k, v in state.items()
                     if k.rsplit(".", 1)[0] == theirs})
    conv = head.get("head.conv.conv.weight")
    if conv is None:
        return {}
    if conv.dim() != 4 or conv.shape[1] != backbone.num_features:
        raise WeightsError(f"{label}: classifier head conv has shape {list(conv.shape)}; expected "
                         f"[C, {backbone.num_features}, 1, 1] for {backbone.name}")
    return head
