"""Semantic segmentation: EfficientNet backbone + U-Net or BiFPN head, losses, sliding-window/TTA inference.

``build_segmenter`` returns the network as ``smp.Unet`` does: float normalised images (N, 3, H, W) in,
logits (N, classes, H, W) out -- ``(logits, aux_logits)`` when the auxiliary head is on. It loads our
own files and, for the U-Net head, state dicts saved from smp's ``Unet`` (``tasks.segmentation_smp``).
``head="bifpn"`` puts EfficientDet's BiFPN over P2..P7 with a classifier on P2 in place of the U-Net
(``heads.bifpn_seg``).

``SegmentationTask`` is the engine's task protocol around it: uint8 images in, normalised on the
device; train mode ``forward(images, targets)`` returns the named loss terms
(``tasks.segmentation_losses``); eval mode ``forward(images)`` returns logits on the input canvas.

Targets. Training: ``{"masks": int64 (N, h, w)}`` (255 = ignore; a bare tensor works too).
Evaluation: the dict documented in ``tasks.segmentation_eval`` (masks at original resolution,
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
from backbones.errors import WeightsError
from backbones.weights import load_state, load_weights, read_state_dict
from heads.bifpn_seg import BiFPNSegDecoder, BiFPNSegHead, levels_for_crop
from heads.unet import AuxClassificationHead, SegmentationHead, UNetDecoder

from .schema import IMAGENET_MEAN, IMAGENET_STD
from .segmentation_eval import SegmentationEvaluator
from .segmentation_losses import SegmentationLoss

log = logging.getLogger("effdense")

__all__ = ["Segmenter", "build_segmenter", "SegmentationTask", "slide_logits", "INFERENCE_MODES"]

INFERENCE_MODES = ("whole", "slide")
HEADS = ("unet", "bifpn")
UNET_DEFAULTS = dict(decoder_channels=(256, 128, 64, 32, 16), attention=None, decoder_norm="batchnorm",
                     upsampling="nearest", encoder_depth=5)


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
        taps = list(self.backbone(x).values())
        logits = self.head(self.decoder(taps, x.shape[-2:]))
        if logits.shape[-2:] != x.shape[-2:]:  # a head that classifies at a coarser stride (BiFPN: P2)
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if self.aux_head is None:
            return logits
        return logits, self.aux_head(taps[-1])


def build_segmenter(backbone: str = "efficientnet-b0", num_classes: int = 19, weights: str | os.PathLike | None = None,
                    *, decoder_channels: Sequence[int] = (256, 128, 64, 32, 16), attention: str | None = None,
                    decoder_norm: str = "batchnorm", upsampling: str = "nearest", encoder_depth: int = 5,
                    aux_classes: int | None = None, aux_dropout: float = 0.2, aux_pooling: str = "avg",
                    flavour: str | None = None, backbone_weights: str | os.PathLike | None = None,
                    head: str = "unet", bifpn_width: int | None = None, bifpn_repeats: int | None = None,
                    bifpn_levels: Sequence[int] | None = None, bifpn_fusion: str | None = None,
                    bifpn_head_depth: int | None = None, bifpn_refine: bool | None = None,
                    bifpn_refine_width: int | None = None, **backbone_options) -> Segmenter:
    """Backbone ``backbone`` (a ``backbones.create`` name; ``phi=`` with ``"efficientnet"``) + U-Net or BiFPN.

    ``head``: ``"unet"`` (default; the U-Net options below) or ``"bifpn"`` (``heads.bifpn_seg``):
    ``bifpn_width``/``bifpn_repeats`` BiFPN channels and cells (None: the EfficientDet row of the same
    scale, ``efficientnet-bN`` -> DN, ``"efficientnet"`` with ``phi`` -> the paper's rule; other
    backbones need both), ``bifpn_levels`` (None: P2..P7), ``bifpn_fusion`` (None: ``"fast"``),
    ``bifpn_head_depth`` separable convs of the classifier (None: 2), ``bifpn_refine`` (None: on from
    P2 up) joins the next finer tap (s2 for P2) before the classifier, which then runs at stride 2 with
    ``bifpn_refine_width`` channels (None: the BiFPN width); ``False`` is the paper's head
    (classifier on P2 at stride 4). The U-Net-only options
    (``decoder_channels``, ``attention``, ``decoder_norm``, ``upsampling``, ``encoder_depth``) must stay
    at their defaults with the BiFPN, ``output_stride`` must be 32, and smp flavours/checkpoints do not
    apply to it; ``bifpn_*`` options need ``head="bifpn"``.

    ``weights``: a whole-model file -- ours (safetensors or state dict of ``Segmenter`` or of the task
    module), or a state dict saved from ``smp.Unet("efficientnet-bN" | "timm-efficientnet-bN" |
    "tu-efficientnet_bN")``; the file's flavour is detected and the backbone built to match it
    (``tasks.segmentation_smp``). The load is strict: missing, unexpected and mis-shaped tensors are
    named in one error; only a different class count leaves the last conv (and aux linear) fresh, logged.
    ``backbone_weights``: an ImageNet classifier or backbone file (or ``"imagenet"``) into the encoder only.
    ``flavour``: ``effdense`` (default), ``smp``, ``smp-timm``, ``smp-tu`` -- build as smp's encoder of
    that family (needed again for a file converted from smp and saved by us).
    ``encoder_depth`` 1..5 taps (smp's encoder_depth); the first ``encoder_depth`` ``decoder_channels`` are used.
    ``backbone_options`` go to ``backbones.create``: ``phi``, ``in_channels``, ``output_stride``,
    ``drop_path``, ``norm_eps``, ``norm_momentum``, ``padding``, ``s2_tap``, ``tap_at``.
    """
    from . import segmentation_smp as smp_interop

    bifpn = dict(width=bifpn_width, repeats=bifpn_repeats, levels=bifpn_levels, fusion=bifpn_fusion,
                 head_depth=bifpn_head_depth, refine=bifpn_refine, refine_width=bifpn_refine_width)
    if head == "bifpn":
        unet = dict(decoder_channels=tuple(decoder_channels), attention=attention, decoder_norm=decoder_norm,
                    upsampling=upsampling, encoder_depth=encoder_depth)
        from .segmentation_bifpn import build_bifpn_segmenter

        return build_bifpn_segmenter(backbone, num_classes, weights, bifpn, unet, aux_classes, aux_dropout,
                                     aux_pooling, flavour, backbone_weights, backbone_options)
    if head != "unet":
        raise ValueError(f"head={head!r} is not one of {', '.join(HEADS)}")
    given = [f"bifpn_{key}" for key, value in bifpn.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} set with head='unet'; expected head='bifpn' for BiFPN options")
    state, label = None, None
    if weights is not None:
        label = os.fspath(weights)
        state = read_state_dict(label)
        found = smp_interop.detect_flavour(state, label)
        if found is not None and flavour is not None and flavour != found:
            raise WeightsError(f"{label}: an smp checkpoint of flavour {found!r}, but flavour={flavour!r} was asked; "
                             f"drop flavour or pass flavour={found!r}")
        flavour = found or flavour
    flavour = flavour or "effdense"
    if not 1 <= encoder_depth <= 5:
        raise ValueError(f"encoder_depth={encoder_depth} must be in 1..5 (taps s2..s32)")
    options = smp_interop.apply_flavour(flavour, backbone, backbone_options)
    net = backbones.create(backbone, out_indices=tuple(range(encoder_depth)), **options)
    smp_interop.finish_flavour(flavour, net)
    decoder = UNetDecoder.for_backbone(net, decoder_channels=list(decoder_channels)[:encoder_depth],
                                       attention=attention, norm=decoder_norm, upsampling=upsampling)
    head = SegmentationHead(decoder.out_channels, num_classes)
    return _assemble(net, decoder, head, aux_classes, aux_pooling, aux_dropout, backbone_weights, state, label,
                     found if state is not None else None)


def _assemble(net, decoder, head, aux_classes: int | None, aux_pooling: str, aux_dropout: float,
              backbone_weights, state: dict | None, label: str | None, smp_flavour: str | None) -> Segmenter:
    """Backbone + decoder + head (+ the aux head on the deepest tap) as a :class:`Segmenter`, then the
    encoder's ``backbone_weights`` and the whole-model ``state`` (read from ``label``), when given."""
    aux = None if aux_classes is None else AuxClassificationHead(net.feature_info[-1].channels, aux_classes,
                                                                 pooling=aux_pooling, dropout=aux_dropout)
    model = Segmenter(net, decoder, head, aux)
    if backbone_weights is not None:
        load_weights(model.backbone, backbone_weights)
    if state is not None:
        _load_whole(model, state, label, smp_flavour)
    return model


def _load_whole(model: Segmenter, state: dict, label: str, smp_flavour: str | None) -> None:
    """Load a whole-model state dict strictly (the encoder through ``backbones.weights``)."""
    from . import segmentation_smp as smp_interop

    if smp_flavour and model.head_kind == "bifpn":
        raise WeightsError(f"{label}: an smp Unet checkpoint, which does not fit head='bifpn'; expected a BiFPN "
                           f"segmenter saved by effdense (or head='unet')")
    if smp_flavour:
        encoder, rest, dropped, unexpected = smp_interop.split_smp_state(state, len(model.decoder.blocks))
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
        parts = [f"{len(missing)} missing ({_preview(missing)})", f"{len(unexpected)} unexpected ({_preview(unexpected)})"]
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches ({_preview(shapes)})")
        if model.head_kind == "bifpn":
            raise WeightsError(f"{label}: the decoder/heads do not fit this BiFPN segmenter: {'; '.join(parts)}; "
                               f"expected the same bifpn_width, bifpn_repeats, bifpn_levels, bifpn_fusion, "
                               f"bifpn_head_depth, bifpn_refine(_width) and aux head as when it was saved")
        raise WeightsError(f"{label}: the decoder/heads do not fit this U-Net: {'; '.join(parts)}; expected the same "
                         f"decoder_channels, attention, decoder_norm, encoder_depth and aux head as when it was saved")
    model.load_state_dict({**model.state_dict(), **new})
    if fresh:
        log.warning("%s: %s left freshly initialised: the checkpoint has another class count", label, _preview(fresh))
    if dropped:
        log.info("%s: dropped %d tensors smp builds but never runs (%s)", label, len(dropped), _preview(dropped))


def _preview(items: Sequence[str], count: int = 3) -> str:
    items = list(items)
    return ", ".join(items[:count]) + (f", ... ({len(items)} in all)" if len(items) > count else "") if items else "none"


# ------------------------------------------------------------------------------------------ inference

def slide_logits(run, images: torch.Tensor, window: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Sliding-window logits: ``run`` on each window, overlaps averaged with a count map.

    Windows start every ``stride`` pixels; the last row/column is moved back to end at the border; an
    image smaller than the window is one window (the network takes any size).
    """
    height, width = images.shape[-2:]
    (wh, ww), (sh, sw) = window, stride
    rows = max(height - wh + sh - 1, 0) // sh + 1
    cols = max(width - ww + sw - 1, 0) // sw + 1
    total = counts = None
    for r in range(rows):
        for c in range(cols):
            y2, x2 = min(r * sh + wh, height), min(c * sw + ww, width)
            y1, x1 = max(y2 - wh, 0), max(x2 - ww, 0)
            logits = run(images[..., y1:y2, x1:x2]).float()
            if total is None:
                total = logits.new_zeros(images.shape[0], logits.shape[1], height, width)
                counts = logits.new_zeros(1, 1, height, width)
            total[..., y1:y2, x1:x2] += logits
            counts[..., y1:y2, x1:x2] += 1
    return total / counts


class SegmentationTask(nn.Module):
    """The task protocol for segmentation (see the module docstring).

    Inference: ``inference="whole"`` (the full canvas at once) or ``"slide"`` (``window`` and
    ``stride``, (h, w) each); ``flip`` adds the horizontally flipped input, ``scales`` resizes the
    input by each factor; the logits of all passes are averaged at the input size.
    ``categories``: ``[(name, [class indices])]`` for the evaluator's category mIoU.
    """

    primary_metric = "mIoU"

    def __init__(self, net: Segmenter, class_names: Sequence[str] | None = None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 criterion: SegmentationLoss | None = None, ignore_index: int = 255, inference: str = "whole",
                 window: Sequence[int] | None = None, stride: Sequence[int] | None = None, flip: bool = False,
                 scales: Sequence[float] = (1.0,), categories: Sequence[tuple[str, Sequence[int]]] | None = None):
        super().__init__()
        if inference not in INFERENCE_MODES:
            raise ValueError(f"inference={inference!r} is not one of {', '.join(INFERENCE_MODES)}")
        if inference == "slide":
            if window is None:
                raise ValueError("inference='slide' needs window=(h, w)")
            window = _pair(window, "window")
            stride = _pair(stride if stride is not None else window, "stride")
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales={list(scales)} must be positive factors, e.g. (0.75, 1.0, 1.25)")
        self.net = net
        self.class_names = list(class_names) if class_names is not None else None
        self.criterion = criterion if criterion is not None else SegmentationLoss(net.num_classes,
                                                                                  ignore_index=ignore_index)
        self.ignore_index = ignore_index
        self.inference, self.window, self.stride = inference, window, stride
        self.flip, self.scales = flip, tuple(float(s) for s in scales)
        self.categories = categories
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, -1, 1, 1) * 255, persistent=False)
        self.register_buffer("pixel_scale", 1.0 / (torch.tensor(std).view(1, -1, 1, 1) * 255), persistent=False)

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (or float 0..255) images -> normalised float; never writes into ``images``."""
        return (images.float() - self.pixel_mean) * self.pixel_scale

    def forward(self, images: torch.Tensor, targets: Mapping | torch.Tensor | None = None):
        x = self.normalize(images)
        if self.training:
            if targets is None:
                raise ValueError("SegmentationTask in train mode needs targets ({'masks': int64 (N, H, W)})")
            masks = targets["masks"] if isinstance(targets, Mapping) else targets
            out = self.net(x)
            logits, aux = out if isinstance(out, tuple) else (out, None)
            return self.criterion(logits, masks, aux)
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
        size = x.shape[-2:]
        total, passes = None, 0
        for scale in self.scales:
            scaled = x if scale == 1.0 else F.interpolate(
                x, size=[max(1, round(s * scale)) for s in size], mode="bilinear", align_corners=False)
            for flipped in (False, True) if self.flip else (False,):
                logits = self._one_pass(scaled.flip(-1) if flipped else scaled)
                if flipped:
                    logits = logits.flip(-1)
                if logits.shape[-2:] != size:
                    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
                total = logits if total is None else total + logits
                passes += 1
        return total if passes == 1 else total / passes

    def load_weights(self, path: str | os.PathLike) -> None:
        """A whole-model file into ``net``, strictly: ours (``last.pt``: its EMA weights when it has them,
        ``model.safetensors``) or an smp ``Unet`` state dict of the flavour ``net`` was built with."""
        from . import segmentation_smp as smp_interop

        label = os.fspath(path)
        state = read_state_dict(label)
        _load_whole(self.net, state, label, smp_interop.detect_flavour(state, label))

    def make_evaluator(self) -> SegmentationEvaluator:
        return SegmentationEvaluator(self.num_classes, self.class_names, self.ignore_index, self.categories,
                                     device=self.pixel_mean.device)


def _pair(value, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or any(int(v) < 1 for v in pair):
        raise ValueError(f"{name}={value!r} must be a positive int or (h, w)")
    return int(pair[0]), int(pair[1])


# ------------------------------------------------------------------------------------------ from a config

def _eval_view(cfg) -> tuple[str, dict]:
    """(the eval transform's mode, the task's inference options) for ``data.eval``."""
    from .config import resolve_image_size

    ev, size = cfg.data.eval, resolve_image_size(cfg)
    options = {"flip": ev.flip, "scales": tuple(ev.scales)}
    if ev.mode == "slide":
        window = tuple(ev.window or size)
        stride = tuple(ev.stride or (max(1, window[0] * 2 // 3), max(1, window[1] * 2 // 3)))
        options.update(inference="slide", window=window, stride=stride)
    return ("resize" if ev.mode == "resize" else "full"), options


def eval_transform(cfg):
    """The eval transform of ``cfg`` (resize mode: the image to ``data.image_size``; else unchanged)."""
    from .config import resolve_image_size
    from .data.seg_transforms import segmentation_eval_transform

    mode, _ = _eval_view(cfg)
    return segmentation_eval_transform(mode, resolve_image_size(cfg) if mode == "resize" else None)


def dataset_classes(cfg) -> tuple[list[str], list | None]:
    """(class names, Cityscapes categories or None) for ``cfg``'s data format."""
    if cfg.data.format == "cityscapes":
        from .data.cityscapes import CATEGORIES, CLASS_NAMES

        return list(CLASS_NAMES), list(CATEGORIES)
    names = cfg.data.class_names or [str(i) for i in range(cfg.model.num_classes)]
    return list(names), None


def _head_options(cfg) -> dict:
    """``build_segmenter``'s head arguments from ``model.segmentation`` (empty for the U-Net).

    LEAD: the config keys for the BiFPN head map here -- ``head: unet|bifpn`` -> ``head``,
    ``bifpn_width``/``bifpn_repeats`` (null: the EfficientDet row of the backbone's scale, see
    ``build_segmenter``) -> ``bifpn_width``/``bifpn_repeats``; ``bifpn_levels`` (null: P2 .. the
    highest level still >= 4 px at the training crop, ``heads.bifpn_seg.levels_for_crop``: P2..P7 from
    512 up, P2..P5 for the 128 px demo) -> ``bifpn_levels``; optional: ``bifpn_fusion``,
    ``bifpn_head_depth``, ``bifpn_refine``, ``bifpn_refine_width`` (null each: the builder's default).
    Read with defaults until the schema has them.
    """
    from .config import resolve_image_size

    head = cfg.model.segmentation
    if getattr(head, "head", "unet") != "bifpn":
        return {}
    keys = ("bifpn_width", "bifpn_repeats", "bifpn_levels", "bifpn_fusion", "bifpn_head_depth", "bifpn_refine",
            "bifpn_refine_width")
    options = {"head": "bifpn", **{key: getattr(head, key, None) for key in keys}}
    if options["bifpn_levels"] is None:
        options["bifpn_levels"] = levels_for_crop(resolve_image_size(cfg))
    if options["bifpn_width"] is None or options["bifpn_repeats"] is None:  # from the compound coefficient
        from .scaling import bifpn_size

        width, repeats = bifpn_size(cfg.model)
        options["bifpn_width"] = options["bifpn_width"] or width
        options["bifpn_repeats"] = options["bifpn_repeats"] or repeats
    return options


def build_model(cfg) -> SegmentationTask:
    """The segmentation task module a ``tasks.config.SegmentationConfig`` describes."""
    from .schema import backbone_spec

    m, head, loss = cfg.model, cfg.model.segmentation, cfg.loss
    name, options = backbone_spec(m)
    for key in ("norm_eps", "norm_momentum"):
        if getattr(m, key) is not None:
            options[key] = getattr(m, key)
    # Left unset, an smp checkpoint's flavour decides these (stem s2 tap, TF padding); set, they must agree.
    if m.padding != "symmetric":
        options["padding"] = m.padding
    if head.s2_tap is not None:
        options["s2_tap"] = head.s2_tap
    from .scaling import decoder_widths

    net = build_segmenter(name, m.num_classes, weights=m.weights, decoder_channels=decoder_widths(head.decoder_channels, m),
                          attention=head.attention, decoder_norm=head.norm, upsampling=head.upsampling,
                          aux_classes=m.num_classes if head.aux_head else None, aux_dropout=head.aux_dropout,
                          flavour=head.flavour, backbone_weights=m.backbone_weights, drop_path=m.drop_path,
                          output_stride=head.output_stride, **_head_options(cfg), **options)
    terms = {term: getattr(loss, term) for term in ("cross_entropy", "dice", "lovasz", "focal") if getattr(loss, term)}
    criterion = SegmentationLoss(m.num_classes, losses=terms, ignore_index=cfg.data.ignore_index,
                                 class_weights=loss.class_weights, ohem_thresh=loss.ohem_thresh if loss.ohem else None,
                                 ohem_min_kept=loss.ohem_min_kept, aux_weight=loss.aux_weight,
                                 focal_gamma=loss.focal_gamma)
    names, categories = dataset_classes(cfg)
    _, inference = _eval_view(cfg)
    return SegmentationTask(net, class_names=names, mean=cfg.data.mean, std=cfg.data.std, criterion=criterion,
                            ignore_index=cfg.data.ignore_index, categories=categories, **inference)


def predict(cfg, model: SegmentationTask, paths, out=None, **_options) -> list[dict]:
    """Per image, at its original resolution: a colour overlay, a trainId PNG and, for Cityscapes, a
    ``<city_seq_frame>_labelIds.png`` (what cityscapesScripts' evaluator reads), flat in ``out``."""
    from .segmentation_predict import predict_paths

    colors = label_ids = None
    if cfg.data.format == "cityscapes":
        from .data.cityscapes import TRAIN_ID_COLORS, TRAIN_TO_LABEL_ID

        colors, label_ids = TRAIN_ID_COLORS, TRAIN_TO_LABEL_ID
    names = model.class_names or dataset_classes(cfg)[0]
    results = predict_paths(model, paths, out, eval_transform(cfg), colors=colors, label_ids=label_ids,
                            class_names=names)
    for result in results:
        top = sorted(result["classes"].items(), key=lambda item: -item[1])[:4]
        print(f"{result['image']}: " + ", ".join(f"{name} {share:.0%}" for name, share in top))
    if out:
        import json
        from pathlib import Path

        (Path(out) / "predictions.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {len(results)} predictions to {out}")
    return results
