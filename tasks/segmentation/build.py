"""Building segmenters: ``build_segmenter`` (U-Net or BiFPN head, from arguments, as ``smp.Unet``) and
``build_model`` (the task module a ``SegmentationConfig`` describes), and the strict whole-model load."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from torch import nn

import backbones
from backbones.errors import WeightsError
from backbones.weights import load_weights, read_state_dict
from heads.bifpn_seg import (DEFAULT_LEVELS, TAP_LEVELS, BiFPNSegDecoder, BiFPNSegHead, backbone_taps, check_levels,
                             levels_for_crop)
from heads.fcn import FCNHead
from heads.unet import AuxClassificationHead, SegmentationHead, UNetDecoder

from tasks.config.scaling import backbone_build, bifpn_size, decoder_widths
from tasks.engine.normalize import pixel_options

from . import smp as smp_interop
from .inference import inference_options
from .losses import LOSS_TERMS, SegmentationLoss
from .model import SegmentationTask, Segmenter, load_whole

log = logging.getLogger("effdense")

__all__ = ["build_segmenter", "build_model", "build_loss", "build_fcn_head", "check_mode", "load_whole",
           "dataset_classes", "HEADS", "UNET_DEFAULTS", "FCN_TAP"]

HEADS = ("unet", "bifpn")
FCN_TAP = "s16"  # the FCN auxiliary head's input: mmseg's in_index=2 of a ResNet (res4, stride 16 undilated)
UNET_DEFAULTS = dict(decoder_channels=(256, 128, 64, 32, 16), attention=None, decoder_norm="batchnorm",
                     upsampling="nearest", encoder_depth=5)


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
    bifpn = dict(width=bifpn_width, repeats=bifpn_repeats, levels=bifpn_levels, fusion=bifpn_fusion,
                 head_depth=bifpn_head_depth, refine=bifpn_refine, refine_width=bifpn_refine_width)
    if head == "bifpn":
        unet = dict(decoder_channels=tuple(decoder_channels), attention=attention, decoder_norm=decoder_norm,
                    upsampling=upsampling, encoder_depth=encoder_depth)
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
    widths = decoder_widths(decoder_channels, backbone_options.get("phi") if backbone == "efficientnet" else None)
    decoder = UNetDecoder.for_backbone(net, decoder_channels=widths[:encoder_depth],
                                       attention=attention, norm=decoder_norm, upsampling=upsampling)
    head = SegmentationHead(decoder.out_channels, num_classes)
    return assemble(net, decoder, head, aux_classes, aux_pooling, aux_dropout, backbone_weights, state, label,
                     found if state is not None else None)


def assemble(net, decoder, head, aux_classes: int | None, aux_pooling: str, aux_dropout: float,
              backbone_weights, state: dict | None, label: str | None, smp_flavour: str | None) -> Segmenter:
    """Backbone + decoder + head (+ the aux head on the deepest tap) as a :class:`Segmenter`, then the
    encoder's ``backbone_weights`` and the whole-model ``state`` (read from ``label``), when given."""
    aux = None if aux_classes is None else AuxClassificationHead(net.feature_info[-1].channels, aux_classes,
                                                                 pooling=aux_pooling, dropout=aux_dropout)
    model = Segmenter(net, decoder, head, aux)
    if backbone_weights is not None:
        load_weights(model.backbone, backbone_weights)
    if state is not None:
        load_whole(model, state, label, smp_flavour)
    return model


def build_bifpn_segmenter(backbone: str, num_classes: int, weights, bifpn: dict, unet: dict, aux_classes,
                           aux_dropout, aux_pooling, flavour, backbone_weights, backbone_options: dict) -> Segmenter:
    """``build_segmenter(head="bifpn")``: the backbone taps the levels need + BiFPN decoder + classifier."""
    if flavour not in (None, "effdense"):
        raise ValueError(f"flavour={flavour!r} is an smp U-Net layout; head='bifpn' has none -- drop flavour or "
                         f"use head='unet'")
    changed = [key for key, value in unet.items() if value != UNET_DEFAULTS[key]]
    if changed:
        raise ValueError(f"{', '.join(changed)} set with head='bifpn'; these are U-Net options, expected their "
                         f"defaults (or head='unet')")
    if backbone_options.get("output_stride", 32) != 32:
        raise ValueError(f"output_stride={backbone_options['output_stride']} with head='bifpn'; expected 32 (the "
                         f"pyramid takes the strided taps; dilation has no place in it)")
    state = label = None
    if weights is not None:  # read before building: a bad file fails fast
        label = os.fspath(weights)
        state = read_state_dict(label)
    levels = check_levels(bifpn["levels"] if bifpn["levels"] is not None else DEFAULT_LEVELS)
    refine = levels[0] > 1 if bifpn["refine"] is None else bool(bifpn["refine"])
    names = backbone_taps(levels, refine)
    width, repeats = bifpn["width"], bifpn["repeats"]
    if width is None or repeats is None:
        row_width, row_repeats = bifpn_size(backbone, backbone_options.get("phi"))
        width = row_width if width is None else width
        repeats = row_repeats if repeats is None else repeats
    net = backbones.create(backbone, out_indices=tuple(TAP_LEVELS[name] - 1 for name in names), **backbone_options)
    # The pyramid and classifier take the backbone's BatchNorm (B0-B4: PyTorch's 1e-5 / 0.1; TF's 1e-3 / 0.01 for
    # B5+): with TF's 0.01 momentum, a short run evaluates on running statistics that have barely moved.
    bn = next(m for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    norm = dict(norm_eps=bn.eps, norm_momentum=bn.momentum)
    decoder = BiFPNSegDecoder.for_backbone(net, width, repeats, levels, refine=refine, fusion=bifpn["fusion"] or "fast",
                                           refine_width=bifpn["refine_width"], padding=net.padding, **norm)
    head = BiFPNSegHead(decoder.out_channels, num_classes, depth=2 if bifpn["head_depth"] is None else
                        bifpn["head_depth"], **norm)
    flavour = smp_interop.detect_flavour(state, label) if state is not None else None
    return assemble(net, decoder, head, aux_classes, aux_pooling, aux_dropout, backbone_weights, state, label, flavour)


def dataset_classes(cfg) -> tuple[list[str], list | None]:
    """(class names, Cityscapes categories or None) for ``cfg``'s data format (binary: ``["foreground"]``
    unless ``data.class_names`` names it)."""
    if cfg.data.format == "cityscapes":
        from tasks.data.cityscapes import CATEGORIES, CLASS_NAMES

        return list(CLASS_NAMES), list(CATEGORIES)
    default = ["foreground"] if cfg.model.segmentation.mode == "binary" else None
    names = cfg.data.class_names or default or [str(i) for i in range(cfg.model.num_classes)]
    return list(names), None


def check_mode(cfg) -> None:
    """One-line ``ConfigError`` when ``model.segmentation.mode`` does not fit the class count or the data format."""
    from tasks.config import ConfigError

    mode, m = cfg.model.segmentation.mode, cfg.model
    if mode == "binary" and m.num_classes != 1:
        raise ConfigError(f"model.segmentation.mode=binary predicts one sigmoid channel (masks 0/1); expected "
                          f"model.num_classes=1, got model.num_classes={m.num_classes} (several classes: "
                          f"mode multiclass or multilabel)")
    if mode != "multiclass" and cfg.data.format == "cityscapes":
        raise ConfigError(f"model.segmentation.mode={mode} with data.format=cityscapes, whose masks are 19-class "
                          f"index maps; expected mode=multiclass, or data.format=maskfolder with {mode} masks")


# The demo's synthetic data per mode: Cityscapes' 19-class maps for multiclass; a mask folder of road-vs-rest
# (binary) or road / car / paved channels (multilabel) otherwise.
DEMO_DATA = {mode: ["data.format=maskfolder", f"data.root=runs/demo-data/segmentation-{mode}",
                    f"model.num_classes={classes}", "data.image_size=64"] for mode, classes in (("binary", 1),
                                                                                                 ("multilabel", 3))}
DEMO_DATA["binary"].append("data.class_names=[road]")


def demo_overrides(overrides: list[str]) -> list[str]:
    """What ``effdense demo segmentation --set model.segmentation.mode=binary`` needs besides the mode: the data
    of that mode (set before the user's overrides, which still win)."""
    modes = [o.split("=", 1)[1] for o in overrides if o.startswith("model.segmentation.mode=")]
    return DEMO_DATA.get(modes[-1], []) if modes else []


def _head_options(cfg) -> dict:
    """``build_segmenter``'s head arguments from ``model.segmentation`` (empty for the U-Net); the BiFPN levels
    default to P2 .. the highest level still >= 4 px at the training crop (``heads.bifpn_seg.levels_for_crop``),
    null widths and repeats to the EfficientDet row of the scale (``build_segmenter``)."""
    from tasks.config import resolve_image_size

    head = cfg.model.segmentation
    if head.head != "bifpn":
        return {}
    keys = ("width", "repeats", "levels", "fusion", "head_depth", "refine", "refine_width")
    options = {"head": "bifpn", **{f"bifpn_{key}": getattr(head, f"bifpn_{key}") for key in keys}}
    if options["bifpn_levels"] is None:
        options["bifpn_levels"] = levels_for_crop(resolve_image_size(cfg))
    return options


def build_model(cfg) -> SegmentationTask:
    """The segmentation task module a ``tasks.config.SegmentationConfig`` describes. Whole-model
    ``model.weights`` replace ``model.backbone_weights`` (which are then not read, nor fetched).
    ``model.segmentation.fcn_aux`` adds the training-only FCN head (:func:`build_fcn_head`) to the task
    module, its loss weighted by ``loss.fcn_aux_weight``."""
    m, head = cfg.model, cfg.model.segmentation
    check_mode(cfg)
    criterion = build_loss(cfg)  # a loss the mode cannot take fails before the network is built
    name, options = backbone_build(m)
    # Left unset, an smp checkpoint's flavour decides these (stem s2 tap, TF padding); set, they must agree.
    if m.padding != "symmetric":
        options["padding"] = m.padding
    if head.s2_tap is not None:
        options["s2_tap"] = head.s2_tap
    net = build_segmenter(name, m.num_classes, weights=m.weights, decoder_channels=head.decoder_channels,
                          attention=head.attention, decoder_norm=head.norm, upsampling=head.upsampling,
                          aux_classes=m.num_classes if head.aux_head else None, aux_dropout=head.aux_dropout,
                          flavour=head.flavour, backbone_weights=None if m.weights else m.backbone_weights, drop_path=m.drop_path,
                          output_stride=head.output_stride, **_head_options(cfg), **options)
    names, categories = dataset_classes(cfg)
    return SegmentationTask(net, class_names=names, **pixel_options(cfg), criterion=criterion,
                            ignore_index=cfg.data.ignore_index, categories=categories, **inference_options(cfg),
                            mode=head.mode, threshold=cfg.data.eval.threshold,
                            fcn_head=build_fcn_head(net, m.num_classes) if head.fcn_aux else None, fcn_tap=FCN_TAP)


def build_fcn_head(net: Segmenter, num_classes: int) -> FCNHead:
    """mmseg's auxiliary ``FCNHead`` as its Cityscapes configs set it (one 3x3 conv of 256 + BN + ReLU,
    no input concatenation, dropout 0.1, 1x1 classifier) on ``net``'s ``s16`` tap; a tap the backbone does
    not compute is a one-line ``ConfigError``."""
    from tasks.config import ConfigError

    specs = {spec.name: spec for spec in net.backbone.feature_info}
    if FCN_TAP not in specs:
        raise ConfigError(f"model.segmentation.fcn_aux reads the backbone's {FCN_TAP} tap, which this decoder does "
                          f"not tap (taps: {', '.join(specs)}); expected model.segmentation.bifpn_levels reaching P4 "
                          f"(or a larger data.image_size), or model.segmentation.fcn_aux=false")
    return FCNHead(specs[FCN_TAP].channels, num_classes, channels=256, num_convs=1, concat_input=False, dropout=0.1)


def build_loss(cfg) -> SegmentationLoss:
    """``cfg.loss`` in ``model.segmentation.mode`` (``tasks.segmentation.losses``); a term the mode has no use
    for is a one-line ``ConfigError`` naming the key."""
    from tasks.config import ConfigError

    loss, mode = cfg.loss, cfg.model.segmentation.mode
    terms = {term: getattr(loss, term) for term in LOSS_TERMS if getattr(loss, term)}
    try:
        return SegmentationLoss(cfg.model.num_classes, losses=terms, ignore_index=cfg.data.ignore_index,
                                class_weights=loss.class_weights, ohem_thresh=loss.ohem_thresh if loss.ohem else None,
                                ohem_min_kept=loss.ohem_min_kept, aux_weight=loss.aux_weight,
                                focal_gamma=loss.focal_gamma, mode=mode, pos_weight=loss.pos_weight,
                                tversky_alpha=loss.tversky_alpha, tversky_beta=loss.tversky_beta,
                                fcn_aux_weight=loss.fcn_aux_weight)
    except ValueError as error:
        message = str(error)
        raise ConfigError(message if "loss." in message else f"loss.{message}") from None
