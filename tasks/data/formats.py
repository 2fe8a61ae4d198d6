"""The format table: one row per on-disk dataset format, read by ``build_loaders``, ``effdense data
check`` and ``effdense data synth``. Adding a format is one row here and one module beside this one.

A row gives the task the format feeds, ``dataset(cfg, split, train)`` (a map-style dataset of
``(image (C, H, W), target)`` samples: C = ``model.in_channels``, uint8 for 8-bit files; read with
:func:`tasks.data.images.image_options` of the config), the ``collate(cfg, train)`` function for its batches (None:
torch's default stacking), ``check(cfg, workers=, progress=)`` (every problem, one line each) and
``synth(root, seed=, **options)`` (a small dataset in exactly this layout).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tasks.config import Config, resolve_image_size

from tasks.data.errors import DataError
from tasks.data.imagefolder import ImageFolderDataset, class_mismatch, list_split, num_classes_problem
from tasks.data.images import ImageReader, image_options
from tasks.data.transforms.classification import eval_transform_for, train_transform_for

@dataclass(frozen=True)
class DataFormat:
    name: str
    task: str
    layout: str  # the on-disk layout, for help texts and errors
    dataset: Callable  # (cfg, split name, train: bool) -> Dataset
    check: Callable  # (cfg, workers=4, progress=False) -> list[str]
    synth: Callable  # (root, seed=0, **options) -> Path
    collate: Callable = lambda cfg, train: None  # (cfg, train: bool) -> collate_fn or None (default stacking)
    demo_options: Callable = lambda cfg: {}  # (cfg) -> the synth options the demo writes this config's data with

# -- imagefolder (classification) -------------------------------------------------------------------

def _imagefolder_dataset(cfg: Config, split: str, train: bool) -> ImageFolderDataset:
    size = resolve_image_size(cfg)  # training: progressive learning's stages replace the transform (its size)
    transform = train_transform_for(cfg, size) if train else eval_transform_for(cfg, size)
    dataset = ImageFolderDataset(cfg.data.root, split, transform, cfg.data.on_bad_sample, image_options(cfg))
    if train:  # the label of a class is its index among the sorted folder names: both splits must agree
        mismatch = class_mismatch(dataset.listing, list_split(cfg.data.root, cfg.data.val_split))
        if mismatch:
            raise DataError(f"data.root '{cfg.data.root}': {mismatch}")
    if dataset.num_classes != cfg.model.num_classes:
        raise DataError(num_classes_problem(cfg, dataset.classes, split))
    return dataset

def _imagefolder_check(cfg: Config, workers: int = 4, progress: bool = False) -> list[str]:
    from tasks.data.check import check_imagefolder

    return check_imagefolder(cfg, workers=workers, progress=progress)

def _imagefolder_synth(root: str | Path, seed: int = 0, classes: int = 4, **options) -> Path:
    from tasks.data.synthetic.classification import write_classification

    return write_classification(root, num_classes=classes, seed=seed, **options)

# -- cityscapes and mask folders (segmentation) ------------------------------------------------------

def _segmentation_transform(cfg: Config, train: bool):
    from tasks.data.transforms.segmentation import eval_transform_for, train_transform_for

    return train_transform_for(cfg) if train else eval_transform_for(cfg)

def _cityscapes_dataset(cfg: Config, split: str, train: bool):
    from tasks.data.cityscapes import CityscapesDataset, NUM_CLASSES

    if cfg.model.num_classes != NUM_CLASSES:
        raise DataError(f"model.num_classes={cfg.model.num_classes} but Cityscapes has {NUM_CLASSES} train ids; "
                        f"set model.num_classes={NUM_CLASSES}")
    return _read_images(CityscapesDataset(cfg.data.root, split, _segmentation_transform(cfg, train),
                                          cfg.data.on_bad_sample, cfg.data.ignore_index), cfg, train)

def _maskfolder_dataset(cfg: Config, split: str, train: bool):
    from tasks.data.maskfolder import MaskFolderDataset

    return _read_images(MaskFolderDataset(cfg.data.root, split, cfg.model.num_classes,
                                          _segmentation_transform(cfg, train), cfg.data.on_bad_sample,
                                          cfg.data.ignore_index, cfg.data.class_names,
                                          mode=cfg.model.segmentation.mode), cfg, train)

def _read_images(dataset, cfg: Config, train: bool = False):
    """A paired dataset whose images are read with the config's bands and scaling, one depth per split
    (and, for training with ``data.tile.size``, one sample per tile)."""
    dataset.reader.image_reader = ImageReader(**image_options(cfg), reference=dataset.pairs[0].image)
    return _tiled(dataset, cfg, train)

def _tiled(dataset, cfg: Config, train: bool):
    """``data.tile.size`` set: the training split as tiles at native resolution (``tasks.data.tiles``); the
    validation split keeps whole images (segmentation slides windows, detection ``--slice``s)."""
    tile = getattr(cfg.data, "tile", None)
    if train and tile is not None and tile.size is not None:
        dataset.use_tiles(int(tile.size), float(tile.overlap))
        if tuple(resolve_image_size(cfg)) != (tile.size, tile.size):  # the train transform sees each tile as an image
            import logging

            logging.getLogger("effdense").warning(
                "data.tile.size=%d but data.image_size=%s: the train transform fits (detection) or crops "
                "(segmentation) each tile to data.image_size; equal sizes keep the native resolution",
                tile.size, list(resolve_image_size(cfg)))
    return dataset

def _check_cityscapes(cfg: Config, workers: int = 4, progress: bool = False) -> list[str]:
    from tasks.data.cityscapes import check_cityscapes

    return check_cityscapes(cfg.data.root, (cfg.data.train_split, cfg.data.val_split), workers, progress,
                            image_options=image_options(cfg))

def _check_maskfolder(cfg: Config, workers: int = 4, progress: bool = False) -> list[str]:
    from tasks.data.maskfolder import check_maskfolder

    return check_maskfolder(cfg.data.root, cfg.model.num_classes, cfg.data.ignore_index,
                            (cfg.data.train_split, cfg.data.val_split), workers, progress,
                            mode=cfg.model.segmentation.mode, class_names=cfg.data.class_names,
                            image_options=image_options(cfg))

def _synth_cityscapes(root: str | Path, seed: int = 0, **options) -> Path:
    from tasks.data.synthetic.segmentation import write_cityscapes

    return write_cityscapes(root, seed=seed, **options)

def _synth_maskfolder(root: str | Path, seed: int = 0, **options) -> Path:
    from tasks.data.synthetic.segmentation import write_maskfolder

    return write_maskfolder(root, seed=seed, **options)

def _segmentation_collate_for(cfg: Config, train: bool):
    from tasks.data.seg_common import segmentation_collate

    return segmentation_collate(train, cfg.data.ignore_index)

# -- coco (detection) ----------------------------------------------------------------------------------

def _detection_transform(cfg: Config, train: bool):
    """Every detection format's transform: scale jitter, crop/pad and flip (train; plus the small-data recipe's
    random affine and HSV gains when set) or letterbox (eval), padding with the value that normalises to 0."""
    from tasks.data.transforms.detection import DetectionEvalTransform, DetectionTrainTransform, mean_fill

    size, augment, fill = resolve_image_size(cfg), cfg.data.augment, mean_fill(cfg)
    if not train:
        return DetectionEvalTransform(size, fill)
    return DetectionTrainTransform(size, (augment.scale_min, augment.scale_max), augment.hflip, fill,
                                   **_recipe_options(cfg))

def _recipe_options(cfg: Config) -> dict:
    """``data.augment``'s HSV and affine options; hue and saturation need 3 bands (one-line error otherwise)."""
    augment, bands = cfg.data.augment, cfg.model.in_channels
    if bands != 3 and (augment.hsv_h or augment.hsv_s):
        raise DataError(f"data.augment.hsv_h={augment.hsv_h} / hsv_s={augment.hsv_s} change hue and saturation, which "
                        f"need 3 bands (RGB) but model.in_channels={bands}; set both to 0 (hsv_v, a brightness "
                        f"gain, works with any band count)")
    top = cfg.data.input_range[1] if cfg.data.input_range is not None else None  # None: 255 for 8-bit images
    return {"hsv": (augment.hsv_h, augment.hsv_s, augment.hsv_v), "translate": augment.translate,
            "affine_scale": augment.affine_scale, "value_top": top}

def _mixed(dataset, cfg: Config, train: bool):
    """The training split with ``data.augment.mosaic`` or ``mixup`` set: wrapped in ``MosaicDetection``."""
    augment = cfg.data.augment
    if not train or not (augment.mosaic or augment.mixup):
        return dataset
    from tasks.data.mosaic import MosaicDetection
    from tasks.data.transforms.detection import mean_fill

    return MosaicDetection(dataset, resolve_image_size(cfg), augment.mosaic, augment.mixup, augment.hflip,
                           fill=mean_fill(cfg), **_recipe_options(cfg))

def _coco_dataset(cfg: Config, split: str, train: bool):
    from tasks.data.coco import CocoDetection, annotation_paths, classes_problem

    transform = _detection_transform(cfg, train)
    annotation_file, image_dir = annotation_paths(cfg, split, train)
    dataset = CocoDetection(cfg.data.root, split, transform, annotation_file=annotation_file, image_dir=image_dir,
                            max_instances=cfg.data.max_instances, on_bad_sample=cfg.data.on_bad_sample,
                            label_map=cfg.data.label_map, image_options=image_options(cfg))
    if dataset.num_classes != cfg.model.num_classes:
        raise DataError(classes_problem(annotation_file, dataset.num_classes, cfg.model.num_classes,
                                        cfg.data.label_map))
    return _mixed(_tiled(dataset, cfg, train), cfg, train)

def _coco_collate(cfg: Config, train: bool):
    from tasks.data.transforms.detection import detection_collate

    return detection_collate

def _check_coco(cfg: Config, workers: int = 4, progress: bool = False) -> list[str]:
    from tasks.data.coco import annotation_paths, check_coco

    problems = []
    for split, train in ((cfg.data.train_split, True), (cfg.data.val_split, False)):
        annotation_file, image_dir = annotation_paths(cfg, split, train)
        problems += check_coco(cfg.data.root, split, annotation_file=annotation_file, image_dir=image_dir,
                               workers=workers, progress=progress, num_classes=cfg.model.num_classes,
                               label_map=cfg.data.label_map, image_options=image_options(cfg))
    return problems

def _synth_coco(root: str | Path, seed: int = 0, **options) -> Path:
    from tasks.data.synthetic.detection import write_coco

    return write_coco(root, seed=seed, **options)

# -- voc and yolo (detection): read into COCO dicts, same dataset, transforms and evaluation ------------

def _converted_dataset(cfg: Config, split: str, train: bool):
    from tasks.data.convert import converted_dataset

    return _mixed(_tiled(converted_dataset(cfg, split, _detection_transform(cfg, train)), cfg, train), cfg, train)

def _check_converted(cfg: Config, workers: int = 4, progress: bool = False) -> list[str]:
    from tasks.data.convert import check_converted

    return check_converted(cfg, workers=workers, progress=progress)

def _synth_voc(root: str | Path, seed: int = 0, **options) -> Path:
    from tasks.data.convert import synth_converted

    return synth_converted("voc", root, seed=seed, **options)

def _synth_yolo(root: str | Path, seed: int = 0, **options) -> Path:
    from tasks.data.convert import synth_converted

    return synth_converted("yolo", root, seed=seed, **options)

FORMATS: dict[str, DataFormat] = {}

def _add(row: DataFormat) -> None:
    if row.name in FORMATS:
        raise ValueError(f"duplicate data format {row.name!r}")
    FORMATS[row.name] = row

_add(DataFormat(name="imagefolder", task="classification", layout="<root>/<split>/<class>/*.jpg",
                dataset=_imagefolder_dataset, check=_imagefolder_check, synth=_imagefolder_synth))
_add(DataFormat(name="cityscapes", task="segmentation",
                layout="leftImg8bit/<split>/<city>/*_leftImg8bit.png + gtFine/<split>/<city>/*_gtFine_labelIds.png",
                dataset=_cityscapes_dataset, check=_check_cityscapes, synth=_synth_cityscapes,
                collate=_segmentation_collate_for))
def _maskfolder_demo_options(cfg: Config) -> dict:
    return {"mode": cfg.model.segmentation.mode}  # binary: 0/1 road masks; multilabel: 3 per-class PNGs

_add(DataFormat(name="maskfolder", task="segmentation",
                layout="images/<split>/*.jpg|png + masks/<split>/*.png (same stem, index masks)",
                dataset=_maskfolder_dataset, check=_check_maskfolder, synth=_synth_maskfolder,
                collate=_segmentation_collate_for, demo_options=_maskfolder_demo_options))

_add(DataFormat(name="coco", task="detection",
                layout="annotations/instances_<split>.json + <split>/*.jpg (or any COCO json + image folder)",
                dataset=_coco_dataset, check=_check_coco, synth=_synth_coco, collate=_coco_collate))
_add(DataFormat(name="voc", task="detection",
                layout="ImageSets/Main/<split>.txt + Annotations/<id>.xml + JPEGImages/<id>.jpg "
                       "(Pascal VOC; or <split>/*.xml beside the images)",
                dataset=_converted_dataset, check=_check_converted, synth=_synth_voc, collate=_coco_collate))
_add(DataFormat(name="yolo", task="detection",
                layout="images/<split>/*.jpg + labels/<split>/*.txt (class cx cy w h, normalised) + data.yaml names",
                dataset=_converted_dataset, check=_check_converted, synth=_synth_yolo, collate=_coco_collate))

def formats_for(task: str) -> list[str]:
    """The format names that feed ``task``."""
    return [name for name, row in FORMATS.items() if row.task == task]
