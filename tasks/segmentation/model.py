"""The segmentation network (``Segmenter``) and its task module (``SegmentationTask``).

``tasks.segmentation.build.build_segmenter`` returns the network as ``smp.Unet`` does: float normalised images (N, 3, H, W) in,
logits (N, classes, H, W) out -- ``(logits, aux_logits)`` when the auxiliary head is on. It loads our
own files and, for the U-Net head, state dicts saved from smp's ``Unet`` (``tasks.segmentation.smp``).
``head="bifpn"`` puts EfficientDet's BiFPN over P2..P7 with a classifier on P2 in place of the U-Net
(``heads.bifpn_seg``).

``SegmentationTask`` is the engine's task protocol around it: uint8 images in, normalised on the
device; train mode ``forward(images, targets)`` returns the named loss terms
(``tasks.segmentation.losses``); eval mode ``forward(images)`` returns logits on the input canvas.
The FCN auxiliary head (mmseg's, ``heads.fcn.FCNHead`` on the backbone's ``s16`` tap) belongs to the task
module, not to ``net``: only training runs it (its ``fcn_aux`` loss term); evaluation, ``model.safetensors``
(``net``'s weights) and exported graphs (``net``) never hold it.

Modes (smp's, ``model.segmentation.mode``): ``multiclass`` (C channels, softmax, argmax), ``binary`` (one
channel, sigmoid) and ``multilabel`` (C channels, a sigmoid each); in the sigmoid modes a pixel is the
class where its sigmoid is above ``threshold``. The network is the same in every mode; only the channel
count and what the loss, the evaluator and predict make of the logits differ.

Targets. Training: ``{"masks": int64 (N, h, w)}`` (255 = ignore; a bare tensor works too): class indices
(multiclass), 0/1 (binary), or (N, C, h, w) 0/1 per channel (multilabel). Evaluation: the dict documented in ``tasks.segmentation.evaluate`` (masks at original resolution,
``image_size``, ``orig_size``, ``image_id``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

import backbones
from backbones.errors import WeightsError, mismatch_parts, preview
from backbones.weights import load_state, read_state_dict
from heads.bifpn_seg import BiFPNSegDecoder, BiFPNSegHead
from heads.unet import AuxClassificationHead, SegmentationHead, UNetDecoder

from tasks.config.schema import IMAGENET_MEAN, IMAGENET_STD
from tasks.engine.normalize import PixelNormalization

from .evaluate import SegmentationEvaluator
from .inference import INFERENCE_MODES, pair, slide_logits, tta_logits
from .losses import SegmentationLoss

log = logging.getLogger("effdense")

__all__ = ["Segmenter", "SegmentationTask", "load_whole"]



class Segmenter(nn.Module):
    """``backbone`` taps -> ``decoder`` -> ``head`` logits at the input size (+ ``aux_head`` on the deepest tap).

    ``decoder``/``head``: ``UNetDecoder`` + ``SegmentationHead`` (logits at the input size), or
    ``BiFPNSegDecoder`` + ``BiFPNSegHead`` (logits at the finest level's stride, resized bilinearly
    to the input size here).
    """

    def __init__(self, backbone: backbones.EfficientNet, decoder: UNetDecoder | BiFPNSegDecoder,
                 head: SegmentationHead | BiFPNSegHead, aux_head: AuxClassificationHead | None = None):
        super().__init__()
        self.backbone, self.decoder, self.head, self.aux_head = backbone, decoder, head, aux_head

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def head_kind(self) -> str:
        """``"unet"`` or ``"bifpn"``."""
        return "bifpn" if isinstance(self.decoder, BiFPNSegDecoder) else "unet"

    def forward(self, x: torch.Tensor):
        return self.forward_with_taps(x)[0]

    def forward_with_taps(self, x: torch.Tensor):
        """(what ``forward`` returns, the backbone's taps by name: ``{"s2": ..., "s32": ...}``) -- for the
        heads that only training runs (the FCN auxiliary head reads ``s16``)."""
        features = self.backbone(x)
        taps = list(features.values())
        logits = self.head(self.decoder(taps, x.shape[-2:]))
        if logits.shape[-2:] != x.shape[-2:]:  # a head that classifies at a coarser stride (BiFPN: P2)
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.aux_head is None:
            return logits, features
        return (logits, self.aux_head(taps[-1])), features


class SegmentationTask(PixelNormalization):
    """The task protocol for segmentation (see the module docstring).

    Inference: ``inference="whole"`` (the full canvas at once) or ``"slide"`` (``window`` and
    ``stride``, (h, w) each); ``flip`` adds the horizontally flipped input, ``scales`` resizes the
    input by each factor; the logits of all passes are averaged at the input size.
    ``categories``: ``[(name, [class indices])]`` for the evaluator's category mIoU.
    ``mode``: ``multiclass``, ``binary`` or ``multilabel``; ``threshold``: the sigmoid modes' decision.
    ``fcn_head``: a training-only head on the backbone tap ``fcn_tap`` (``s16``) whose logits go to the
    criterion as ``fcn_logits`` (``heads.fcn.FCNHead``; None: none).
    """

    primary_metric = "mIoU"

    def __init__(self, net: Segmenter, class_names: Sequence[str] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 criterion: SegmentationLoss | None = None, ignore_index: int = 255, inference: str = "whole",
                 window: Sequence[int] | None = None, stride: Sequence[int] | None = None, flip: bool = False,
                 scales: Sequence[float] = (1.0,), categories: Sequence[tuple[str, Sequence[int]]] | None = None,
                 mode: str = "multiclass", threshold: float = 0.5, fcn_head: nn.Module | None = None,
                 fcn_tap: str = "s16", **pixel):
        super().__init__(mean, std, **pixel)  # normalisation on the device (pixel: input_range / percentiles)
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference={inference!r} is not one of {', '.join(INFERENCE_MODES)}")
        if inference == "slide":
            if window is None:
                raise ValueError("inference='slide' needs window=(h, w)")
            window = pair(window, "window")
            stride = pair(stride if stride is not None else window, "stride")
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales={list(scales)} must be positive factors, e.g. (0.75, 1.0, 1.25)")
        self.net = net
        self.class_names = list(class_names) if class_names is not None else None
        if criterion is not None and getattr(criterion, "mode", mode) != mode:
            raise ValueError(f"criterion mode {criterion.mode!r} differs from mode={mode!r}")
        self.criterion = criterion if criterion is not None else SegmentationLoss(
            net.num_classes, {"bce" if mode != "multiclass" else "cross_entropy": 1.0}, ignore_index, mode=mode)
        self.mode, self.threshold = mode, float(threshold)
        self.ignore_index = ignore_index
        self.inference, self.window, self.stride = inference, window, stride
        self.flip, self.scales = flip, tuple(float(s) for s in scales)
        self.categories = categories
        if fcn_head is not None:
            taps = [spec.name for spec in net.backbone.feature_info]
            if fcn_tap not in taps:
                raise ValueError(f"fcn_tap={fcn_tap!r} is not among the backbone's taps ({', '.join(taps)})")
        self.fcn_head, self.fcn_tap = fcn_head, fcn_tap

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def forward(self, images: torch.Tensor, targets: Mapping | torch.Tensor | None = None):
        x = self.normalize(images)
        if self.training:
            if targets is None:
                raise ValueError("SegmentationTask in train mode needs targets ({'masks': int64 (N, H, W), "
                                 "multilabel (N, C, H, W)})")
            masks = targets["masks"] if isinstance(targets, Mapping) else targets
            if self.fcn_head is None:
                out, extra = self.net(x), {}
            else:
                out, taps = self.net.forward_with_taps(x)
                extra = {"fcn_logits": self.fcn_head(taps[self.fcn_tap])}
            logits, aux = out if isinstance(out, tuple) else (out, None)
            return self.criterion(logits, masks, aux, **extra)
        return self.infer(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out[0] if isinstance(out, tuple) else out

    def _one_pass(self, x: torch.Tensor) -> torch.Tensor:
        if self.inference == "slide":
            return slide_logits(self._logits, x, self.window, self.stride)
        return self._logits(x).float()

    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images -> float logits (N, C, H, W) on the same canvas, with the configured TTA."""
        return tta_logits(self._one_pass, x, self.scales, self.flip)

    def load_weights(self, path: str | os.PathLike) -> None:
        """A whole-model file into ``net``, strictly: ours (``last.pt``: its EMA weights when it has them,
        ``model.safetensors``) or an smp ``Unet`` state dict of the flavour ``net`` was built with."""
        from .smp import detect_flavour

        label = os.fspath(path)
        state = read_state_dict(label)
        load_whole(self.net, state, label, detect_flavour(state, label))

    def make_evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(self.num_classes, self.class_names, self.ignore_index, self.categories,
                                     device=self.pixel_mean.device, mode=self.mode, threshold=self.threshold)


def load_whole(model: Segmenter, state: dict, label: str, smp_flavour: str | None) -> None:
    """Load a whole-model state dict strictly (the encoder through ``backbones.weights``)."""
    from .smp import split_smp_state

    if smp_flavour and model.head_kind == "bifpn":
        raise WeightsError(f"{label}: an smp Unet checkpoint, which does not fit head='bifpn'; expected a BiFPN "
                           f"segmenter saved by effdense (or head='unet')")
    if smp_flavour:
        encoder, rest, dropped, unexpected = split_smp_state(state, len(model.decoder.blocks))
    else:
        encoder = {k: v for k, v in state.items() if k.startswith("backbone.")}
        rest = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        dropped, unexpected = [], []
        if not encoder:
            raise WeightsError(f"{label}: no backbone.* or smp encoder.* tensors (first keys: {', '.join(list(state)[:3])}); "
                             f"expected a whole segmentation model -- for a classifier or backbone file use "
                             f"backbone_weights")
    load_state(model.backbone, encoder, label)
    ours = {k: v for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    new, fresh, missing, shapes = {}, [], [], []
    for key, tensor in ours.items():
        if key not in rest:
            missing.append(key)
            continue
        value = rest.pop(key)
        if value.shape == tensor.shape:
            new[key] = value
        elif key.split(".")[0] in ("head", "aux_head") and value.shape[1:] == tensor.shape[1:]:
            fresh.append(key)  # another class count: keep our fresh layer, as timm does for a classifier
        else:
            shapes.append(f"{key}: ours {list(tensor.shape)} vs file {list(value.shape)}")
    unexpected += list(rest)
    if missing or unexpected or shapes:
        found = mismatch_parts(missing, unexpected, shapes)
        if model.head_kind == "bifpn":
            raise WeightsError(f"{label}: the decoder/heads do not fit this BiFPN segmenter: {found}; "
                               f"expected the same bifpn_width, bifpn_repeats, bifpn_levels, bifpn_fusion, "
                               f"bifpn_head_depth, bifpn_refine(_width) and aux head as when it was saved")
        raise WeightsError(f"{label}: the decoder/heads do not fit this U-Net: {found}; expected the same "
                         f"decoder_channels, attention, decoder_norm, encoder_depth and aux head as when it was saved")
    model.load_state_dict({**model.state_dict(), **new})
    if fresh:
        log.warning("%s: %s left freshly initialised: the checkpoint has another class count", label, preview(fresh))
    if dropped:
        log.info("%s: dropped %d tensors smp builds but never runs (%s)", label, len(dropped), preview(dropped))
