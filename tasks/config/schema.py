"""The typed config schema: one dataclass per section, a complete ``Config`` per task.

Choices and ranges are declared once, on the field itself (``choice(...)``, ``number(...)``), and
``tasks.config.validate`` is the only place that checks them; the engine, optimizers and tasks trust
a validated config. Sections that mean something for one task only (``model.segmentation``,
``model.detection``, the augmentation of each task, its loss terms) exist only in that task's
``Config`` subclass, so a classification preset cannot carry detection keys: the loader picks the
schema from ``model.task`` and an unknown key fails naming the key and the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

from .scaling import backbone_at_model, detection_scale, detector_at

from .fields import (ANY_NUMBER, AT_LEAST_ONE, FRACTION, FRACTION_ABOVE_ZERO, FRACTION_BELOW_ONE, NON_NEGATIVE,
                     OPEN_UNIT, POSITIVE, Range, choice, number, numbers, size_field)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# -- model -------------------------------------------------------------------------------------------

NAMED_B = tuple(str(i) for i in range(8))
BEYOND_THE_TABLE = "the published rows; any other size is model.phi=<float>, e.g. model.phi=8 (B7/D7 grown by the rules)"


@dataclass
class ModelConfig:
    task: str = choice("classification", "classification", "segmentation", "detection")
    backbone: str = "efficientnet-b0"  # a name from backbones.list_names()
    phi: Optional[float] = number(None, ANY_NUMBER)  # set -> backbone "efficientnet" with this compound coefficient
    # a published row: 0..7 (B0..B7; detection D0..D7 and "7x"); beyond them model.phi
    scale: Optional[str] = choice(None, None, *NAMED_B, doc=BEYOND_THE_TABLE)
    num_classes: int = number(1000, AT_LEAST_ONE)
    weights: Optional[str] = None  # the whole model: a checkpoint (EMA weights when it holds them) or "imagenet"
    backbone_weights: Optional[str] = None  # the encoder only: an ImageNet classifier/backbone file or "imagenet"
    drop_path: float = number(0.2, FRACTION_BELOW_ONE)  # stochastic depth, linear per block
    padding: str = choice("symmetric", "symmetric", "same")  # same = TF-compatible
    norm_eps: Optional[float] = number(None, POSITIVE)  # None = the preset's
    norm_momentum: Optional[float] = number(None, FRACTION)
    sync_bn: bool = False  # convert BatchNorm to SyncBatchNorm under DDP (CUDA)
    in_channels: int = number(3, AT_LEAST_ONE)  # image bands (1 = grayscale, 4 = RGB + NIR, ...); ImageNet stems adapted


@dataclass
class ClassificationModelConfig(ModelConfig):
    dropout: Optional[float] = number(None, FRACTION_BELOW_ONE)  # classifier dropout; None = the preset's


@dataclass
class SegmentationHeadConfig:
    # smp's modes: multiclass (softmax over C classes, index masks), binary (one sigmoid channel, masks 0/1),
    # multilabel (C sigmoid channels, a 0/1 mask per class)
    mode: str = choice("multiclass", "multiclass", "binary", "multilabel")
    head: str = choice("unet", "unet", "bifpn")  # bifpn: EfficientDet's BiFPN over P2.. with a per-pixel classifier
    decoder_channels: list[int] = numbers([256, 128, 64, 32, 16], AT_LEAST_ONE, length=5)
    attention: Optional[str] = choice(None, None, "scse")
    norm: str = choice("batchnorm", "batchnorm", "identity")  # the decoder's norm
    upsampling: str = choice("nearest", "nearest", "bilinear")
    # stage: end of stage 1 (timm); stem: the stem output (smp's EfficientNet encoders); null: stage, or what
    # an smp checkpoint in model.weights needs
    s2_tap: Optional[str] = choice(None, None, "stage", "stem")
    output_stride: int = choice(32, 32, 16, 8)  # < 32: the deepest stages dilated instead of strided
    aux_head: bool = False  # multi-label class-presence head on s32 (loss.aux_weight)
    aux_dropout: float = number(0.2, FRACTION_BELOW_ONE)
    fcn_aux: bool = False  # an FCN auxiliary head on the stride-16 tap (mmseg's), weighted by loss.fcn_aux_weight
    # How model.weights was laid out when it came from smp: null = detected from its keys (a file we saved
    # from an smp model needs it again): effdense | smp (efficientnet-bN) | smp-timm | smp-tu
    flavour: Optional[str] = choice(None, None, "effdense", "smp", "smp-timm", "smp-tu")
    # head: bifpn (null each: from the compound coefficient, i.e. the EfficientDet row of the scale, and the
    # level range from the crop: P2 .. the highest level still >= 4 px, P2..P7 from 512 px up)
    bifpn_width: Optional[int] = number(None, AT_LEAST_ONE)
    bifpn_repeats: Optional[int] = number(None, AT_LEAST_ONE)
    bifpn_levels: Optional[list[int]] = numbers(None, Range(1, 8))  # e.g. [2, 3, 4, 5, 6, 7]
    bifpn_fusion: Optional[str] = choice(None, None, "fast", "softmax", "sum")
    bifpn_head_depth: Optional[int] = number(None, AT_LEAST_ONE)  # separable convs before the classifier
    bifpn_refine: Optional[bool] = None  # the s2 refinement stage (null: on)
    bifpn_refine_width: Optional[int] = number(None, AT_LEAST_ONE)  # its channels (null: the BiFPN width)


@dataclass
class SegmentationModelConfig(ModelConfig):
    task: str = choice("segmentation", "classification", "segmentation", "detection")
    num_classes: int = number(19, AT_LEAST_ONE)
    segmentation: SegmentationHeadConfig = field(default_factory=SegmentationHeadConfig)


@dataclass
class DetectionHeadConfig:
    # null: the named scale's value (heads.efficientdet_preset)
    width: Optional[int] = number(None, AT_LEAST_ONE)  # BiFPN channels
    repeats: Optional[int] = number(None, AT_LEAST_ONE)  # BiFPN cells
    head_depth: Optional[int] = number(None, AT_LEAST_ONE)  # class/box net repeats
    fusion: Optional[str] = choice(None, None, "fast", "softmax", "sum")
    anchor_scale: Optional[float] = number(None, POSITIVE)
    nms: str = choice("hard", "hard", "soft")  # soft = gaussian soft-NMS (sigma 0.5)
    nms_iou: float = number(0.5, OPEN_UNIT)
    candidates: int = number(5000, AT_LEAST_ONE)  # top-k before NMS
    max_detections: int = number(100, AT_LEAST_ONE)
    score_threshold: float = number(0.0, FRACTION_BELOW_ONE)  # 0: keep all (COCO evaluation wants them)
    # which anchors learn each box: iou (IoU >= 0.5, each box's best anchor forced; effdet) or atss (Zhang et al.
    # 2020: per level the atss_topk locations nearest the box centre, IoU above their mean + std, centre inside)
    assigner: str = choice("iou", "iou", "atss")
    atss_topk: int = number(9, AT_LEAST_ONE)


@dataclass
class DetectionModelConfig(ModelConfig):
    task: str = choice("detection", "classification", "segmentation", "detection")
    num_classes: int = number(90, AT_LEAST_ONE)
    scale: Optional[str] = choice(None, None, *NAMED_B, "7x", *(f"lite{i}" for i in range(5)), doc=BEYOND_THE_TABLE)
    detection: DetectionHeadConfig = field(default_factory=DetectionHeadConfig)


# -- data --------------------------------------------------------------------------------------------


@dataclass
class DataConfig:
    format: str = "imagefolder"  # each task's Config narrows the choices
    root: str = "data/imagenet"
    train_split: str = "train"
    val_split: str = "val"
    image_size: Optional[list[int]] = size_field()  # [h, w] training input (an int = square); null = the task's native
    batch_size: int = number(64, AT_LEAST_ONE)  # per process, at most (one forward)
    # the batch of one optimizer step over every process; each process's share is split into micro-batches of
    # at most data.batch_size (gradient accumulation) so the recipe is the same on 1 or 64 GPUs; null: off
    global_batch_size: Optional[int] = number(None, AT_LEAST_ONE)
    eval_batch_size: Optional[int] = number(None, AT_LEAST_ONE)  # None = batch_size
    workers: int = number(8, NON_NEGATIVE)
    pin_memory: bool = True
    persistent_workers: bool = False  # true skips worker start-up per epoch, but a resumed run then draws different augmentations
    on_bad_sample: str = choice("error", "error", "skip")
    # checked before the first training step, both splits: quick (labels and annotation files, cheap), full
    # (every file, what `effdense data check` does) or off
    check: str = choice("quick", "full", "quick", "off")
    # How pixel values become 0..1 before mean/std: range (data.input_range, the dtype's for 8-bit images)
    # or percentile (each image between its data.percentiles, stardist's convention)
    normalize: str = choice("range", "range", "percentile")
    input_range: Optional[list[float]] = numbers(None, ANY_NUMBER, length=2,
                                                 doc="[lo, hi] pixel values that map to 0..1, e.g. [0, 4095] for 12-bit")
    percentiles: list[float] = numbers([1.0, 99.8], Range(0, 100), length=2)
    mean: list[float] = numbers(list(IMAGENET_MEAN), FRACTION,
                                doc=f"one per band (model.in_channels), 0..1 pixel scale, e.g. ImageNet {list(IMAGENET_MEAN)}")
    std: list[float] = numbers(list(IMAGENET_STD), FRACTION_ABOVE_ZERO,
                               doc=f"one per band (model.in_channels), 0..1 pixel scale, e.g. ImageNet {list(IMAGENET_STD)}")


@dataclass
class ClassificationAugmentConfig:
    hflip: float = number(0.5, FRACTION)  # probability
    scale_min: float = number(0.08, FRACTION_ABOVE_ZERO)  # RandomResizedCrop lower scale bound
    randaugment: bool = True
    randaugment_ops: int = number(2, NON_NEGATIVE)
    randaugment_magnitude: int = number(9, Range(0, 30))  # on TF's scale (10 = the ops' full strength, as timm's rand-m9; the papers go to 28)
    autoaugment: bool = False  # the EfficientNet paper's AutoAugment policy (in place of RandAugment)
    random_erasing: float = number(0.0, FRACTION)  # probability per image (timm's reprob)
    interpolation: str = choice("bicubic", "bicubic", "bilinear")  # resizing, train and eval
    mixup: float = number(0.0, NON_NEGATIVE)  # Mixup's Beta(alpha, alpha); 0: off
    cutmix: float = number(0.0, NON_NEGATIVE)  # CutMix's Beta(alpha, alpha); 0: off (with both, one per batch)
    eval_crop_pct: float = number(0.875, FRACTION_ABOVE_ZERO)  # resize to size / crop_pct, then centre-crop size


@dataclass
class ClassificationDataConfig(DataConfig):
    format: str = choice("imagefolder", "imagefolder")
    augment: ClassificationAugmentConfig = field(default_factory=ClassificationAugmentConfig)


@dataclass
class SegmentationAugmentConfig:
    hflip: float = number(0.5, FRACTION)
    scale_min: float = number(0.5, POSITIVE)  # random rescale of the image before the crop
    scale_max: float = number(2.0, POSITIVE)
    photometric: bool = True  # mmseg's PhotoMetricDistortion: each op with p 0.5, random order
    cat_max_ratio: float = number(1.0, FRACTION_ABOVE_ZERO)  # crops where one class covers more are re-drawn (mmseg: 0.75)


@dataclass
class SegmentationEvalConfig:
    # resize: the image to data.image_size (predictions are compared at the label's resolution);
    # full: the whole image at its own size; slide: the whole image in windows, overlaps averaged
    mode: str = choice("full", "resize", "full", "slide")
    window: Optional[list[int]] = size_field()  # slide: tile [h, w] (null = data.image_size)
    stride: Optional[list[int]] = size_field()  # slide: step [h, w] (null = 2/3 of the window)
    flip: bool = False  # TTA: average with the h-flipped prediction
    scales: list[float] = numbers([1.0], POSITIVE)  # TTA: multi-scale (resize factors)
    threshold: float = number(0.5, OPEN_UNIT)  # binary / multilabel: a pixel is the class when its sigmoid > this


@dataclass
class TileConfig:
    """Training on tiles of large images at their native resolution (aerial photos, slides)."""

    size: Optional[int] = number(None, Range(32))  # tile side in pixels; null: off (whole images, resized)
    overlap: float = number(0.2, FRACTION_BELOW_ONE)  # of the tile side, between neighbouring tiles


@dataclass
class SegmentationDataConfig(DataConfig):
    format: str = choice("cityscapes", "cityscapes", "maskfolder")
    root: str = "data/cityscapes"
    ignore_index: int = number(255, NON_NEGATIVE)
    class_names: Optional[list[str]] = None  # maskfolder: names for the per-class table (null = 0..C-1)
    tile: TileConfig = field(default_factory=TileConfig)
    augment: SegmentationAugmentConfig = field(default_factory=SegmentationAugmentConfig)
    eval: SegmentationEvalConfig = field(default_factory=SegmentationEvalConfig)


@dataclass
class DetectionAugmentConfig:
    hflip: float = number(0.5, FRACTION)
    scale_min: float = number(0.1, POSITIVE)  # scale jitter, then crop/pad to image_size
    scale_max: float = number(2.0, POSITIVE)
    # the small-data recipe (ultralytics' names and meanings; 0 = off)
    mosaic: float = number(0.0, FRACTION)  # probability of a 4-image mosaic (then the affine below crops it)
    mixup: float = number(0.0, FRACTION)  # probability of blending in a second (mosaic) sample, boxes of both kept
    close_mosaic: int = number(0, NON_NEGATIVE)  # the last N epochs train without mosaic and mixup
    hsv_h: float = number(0.0, FRACTION)  # random gains: hue +-hsv_h (fraction of the circle)
    hsv_s: float = number(0.0, FRACTION)  # saturation x (1 +- hsv_s)
    hsv_v: float = number(0.0, FRACTION)  # value x (1 +- hsv_v)
    translate: float = number(0.0, FRACTION_BELOW_ONE)  # random affine: shift +-translate x size
    affine_scale: float = number(0.0, FRACTION_BELOW_ONE)  # random affine: zoom 1 +- affine_scale


@dataclass
class DetectionDataConfig(DataConfig):
    # coco: a COCO json + images; voc: Pascal VOC XML; yolo: images/<split> + labels/<split>/*.txt
    format: str = choice("coco", "coco", "voc", "yolo")
    root: str = "data/coco"
    class_names: Optional[list[str]] = None  # voc / yolo: the classes in label order (yolo: else data.yaml's names)
    # null: the COCO layout, <root>/annotations/instances_<split>.json and images in <root>/<split>/
    train_annotations: Optional[str] = None
    val_annotations: Optional[str] = None
    train_images: Optional[str] = None
    val_images: Optional[str] = None
    max_instances: int = number(100, AT_LEAST_ONE)  # boxes kept per image
    # contiguous: the sorted category ids are labels 0..K-1 (80 for COCO); category_id: label = id - 1
    # with max(id) classes (90 for COCO), the layout of effdet's / TF's COCO checkpoints
    label_map: str = choice("contiguous", "contiguous", "category_id")
    tile: TileConfig = field(default_factory=TileConfig)
    augment: DetectionAugmentConfig = field(default_factory=DetectionAugmentConfig)


# -- optimisation and training -------------------------------------------------------------------------


@dataclass
class OptimConfig:
    name: str = choice("sgd", "sgd", "rmsprop", "rmsprop_tf", "adamw")  # rmsprop_tf: TF's (eps in the sqrt, ms from 1)
    lr: float = number(0.1, POSITIVE)  # at base_batch_size; scaled linearly with the global batch
    base_batch_size: int = number(256, AT_LEAST_ONE)
    momentum: float = number(0.9, FRACTION_BELOW_ONE)
    nesterov: bool = False
    weight_decay: float = number(1e-5, NON_NEGATIVE)
    no_decay_norm_and_bias: bool = True
    rmsprop_alpha: float = number(0.9, OPEN_UNIT)  # RMSProp decay (TF "decay")
    eps: float = number(1e-3, POSITIVE)  # RMSProp eps (TF reference) / AdamW eps


@dataclass
class ScheduleConfig:
    name: str = choice("cosine", "cosine", "step", "poly", "constant")
    warmup_epochs: float = number(0.0, NON_NEGATIVE)
    warmup_start_factor: float = number(0.01, FRACTION_ABOVE_ZERO)
    min_lr_ratio: float = number(0.0, FRACTION)  # cosine floor as a fraction of the peak lr
    step_epochs: float = number(2.4, POSITIVE)  # step: decay every N epochs
    step_gamma: float = number(0.97, FRACTION_ABOVE_ZERO)
    poly_power: float = number(0.9, POSITIVE)


@dataclass
class ClassificationLossConfig:
    label_smoothing: float = number(0.1, FRACTION_BELOW_ONE)


@dataclass
class SegmentationLossConfig:
    # The loss is the weighted sum of these terms (0 = off); each is logged by name.
    cross_entropy: float = number(1.0, NON_NEGATIVE)  # multiclass mode; binary / multilabel use bce
    bce: float = number(0.0, NON_NEGATIVE)  # binary / multilabel: binary cross-entropy with logits
    pos_weight: Optional[list[float]] = numbers(None, POSITIVE)  # bce: weight of the positives, one per channel
    tversky: float = number(0.0, NON_NEGATIVE)  # smp.losses.TverskyLoss
    tversky_alpha: float = number(0.5, NON_NEGATIVE)  # its false-positive weight
    tversky_beta: float = number(0.5, NON_NEGATIVE)  # its false-negative weight
    dice: float = number(0.0, NON_NEGATIVE)  # smp.losses.DiceLoss (multiclass)
    lovasz: float = number(0.0, NON_NEGATIVE)  # smp.losses.LovaszLoss
    focal: float = number(0.0, NON_NEGATIVE)  # smp.losses.FocalLoss
    focal_gamma: float = number(2.0, NON_NEGATIVE)
    class_weights: Optional[list[float]] = numbers(None, NON_NEGATIVE)  # cross-entropy weight per class
    ohem: bool = False  # cross-entropy on the hard pixels only: p < ohem_thresh, at least ohem_min_kept
    ohem_thresh: float = number(0.7, OPEN_UNIT)
    ohem_min_kept: int = number(100_000, AT_LEAST_ONE)
    aux_weight: float = number(0.4, NON_NEGATIVE)  # the aux head's presence loss (when model.segmentation.aux_head)
    fcn_aux_weight: float = number(0.4, NON_NEGATIVE)  # the FCN auxiliary head's loss (model.segmentation.fcn_aux)


@dataclass
class DetectionLossConfig:
    focal_alpha: float = number(0.25, OPEN_UNIT)
    focal_gamma: float = number(1.5, NON_NEGATIVE)
    huber_delta: float = number(0.1, POSITIVE)
    box_weight: float = number(50.0, NON_NEGATIVE)  # the Huber term's weight (box_loss huber)
    box_loss: str = choice("huber", "huber", "giou", "ciou")  # on the codes (huber) or on the decoded boxes
    iou_weight: float = number(2.0, NON_NEGATIVE)  # the GIoU / CIoU term's weight (box_loss giou / ciou)


@dataclass
class TrainConfig:
    # auto: the largest per-GPU batch that trains without running out of memory (a few probe steps, 90% kept,
    # on CUDA; the lr follows by the linear rule); null: data.batch_size as it is
    batch_size: Optional[str] = choice(None, None, "auto")
    epochs: int = number(10, AT_LEAST_ONE)
    max_steps: Optional[int] = number(None, AT_LEAST_ONE)  # stop early after this many optimizer steps (demos, benchmarks)
    # minutes of training (null: no limit; train.epochs is then ignored): the epoch count is refitted to the time
    # measured so far (wall time, evaluations included) after each epoch and during the first, the lr schedule with
    # it (warmup kept, capped to leave an epoch), and training stops once the time is spent, then evaluates and
    # saves as at a normal end; --resume continues the budget (tasks.engine.timelimit)
    time_limit: Optional[float] = number(None, POSITIVE)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: str = choice("none", "none", "bf16", "fp16")
    channels_last: bool = False
    compile: bool = False
    grad_accum: int = number(1, AT_LEAST_ONE)
    clip_grad: Optional[float] = number(None, POSITIVE)  # max gradient norm
    ema: bool = False
    ema_decay: float = number(0.9999, OPEN_UNIT)
    # the global batch ema_decay was tuned at; at another batch B the decay per step is ema_decay ** (B / this)
    # (one decay per image, timm's rule); null: ema_decay as it is
    ema_reference_batch: Optional[int] = number(None, AT_LEAST_ONE)
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n updates (TF, timm)
    seed: int = number(0, NON_NEGATIVE)  # initialisation, data order and augmentation
    deterministic: bool = False
    eval_every: int = number(1, AT_LEAST_ONE)  # epochs
    log_every: int = number(20, AT_LEAST_ONE)  # steps
    checkpoint_every: int = number(1, AT_LEAST_ONE)  # epochs
    grad_checkpointing: bool = False  # recompute activations in backward (less memory, ~30% more time)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # None = run-<timestamp>
    overwrite: bool = False  # reuse a run directory that holds another run's files (they are replaced)
    progress: bool = True  # tqdm bars on rank 0


@dataclass
class ProgressiveConfig:
    """EfficientNetV2's progressive learning (Tan & Le 2021, Table 6): training in ``stages`` equal parts, image
    size and regularisation rising together from the first value to the second of each pair (null: constant)."""

    stages: int = number(1, AT_LEAST_ONE)  # 1: off
    image_size: Optional[list[int]] = numbers(None, Range(32), length=2)  # [first, last] square sides
    randaugment: Optional[list[int]] = numbers(None, Range(0, 30), length=2)  # magnitudes (V2-S: [5, 15])
    dropout: Optional[list[float]] = numbers(None, FRACTION_BELOW_ONE, length=2)
    mixup: Optional[list[float]] = numbers(None, NON_NEGATIVE, length=2)


@dataclass
class ClassificationTrainConfig(TrainConfig):
    progressive: ProgressiveConfig = field(default_factory=ProgressiveConfig)


@dataclass
class Config:
    """The shared sections; each task's subclass below narrows ``model``, ``data`` and ``loss`` and names its
    task in ``TASK`` (how ``tasks.config.schema_for`` finds it: no side table to keep in step)."""

    TASK: ClassVar[str] = ""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: Any = None
    train: TrainConfig = field(default_factory=TrainConfig)

    def native_image_size(self) -> list[int]:
        """The input [h, w] when ``data.image_size`` is null."""
        raise NotImplementedError


@dataclass
class ClassificationConfig(Config):
    TASK: ClassVar[str] = "classification"
    model: ClassificationModelConfig = field(default_factory=ClassificationModelConfig)
    data: ClassificationDataConfig = field(default_factory=ClassificationDataConfig)
    loss: ClassificationLossConfig = field(default_factory=ClassificationLossConfig)
    train: ClassificationTrainConfig = field(default_factory=ClassificationTrainConfig)

    def native_image_size(self) -> list[int]:
        size = backbone_at_model(self.model)[2]  # B0 224 ... B7 600 (paper, Table 1), interpolated between
        return [size, size]


@dataclass
class SegmentationConfig(Config):
    TASK: ClassVar[str] = "segmentation"
    model: SegmentationModelConfig = field(default_factory=SegmentationModelConfig)
    data: SegmentationDataConfig = field(default_factory=SegmentationDataConfig)
    loss: SegmentationLossConfig = field(default_factory=SegmentationLossConfig)

    def native_image_size(self) -> list[int]:
        return [512, 512]  # segmentation crops are a data choice, not the backbone's; presets set theirs


@dataclass
class DetectionConfig(Config):
    TASK: ClassVar[str] = "detection"
    model: DetectionModelConfig = field(default_factory=DetectionModelConfig)
    data: DetectionDataConfig = field(default_factory=DetectionDataConfig)
    loss: DetectionLossConfig = field(default_factory=DetectionLossConfig)

    def native_image_size(self) -> list[int]:
        size = detector_at(detection_scale(self.model)).input_size  # D0 512 ... D7 1536, interpolated between
        return [size, size]


def task_schemas() -> dict[str, type[Config]]:
    """Task name -> its ``Config`` subclass, in definition order."""
    return {cls.TASK: cls for cls in Config.__subclasses__() if cls.TASK}
