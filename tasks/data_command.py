"""``effdense data``: write a synthetic dataset, check a config's dataset (and what it needs besides the
files: the device, the model), convert a detection dataset between coco, voc and yolo, or write
Cityscapes' train-id masks once."""

from __future__ import annotations

from pathlib import Path

from tasks.config import load

__all__ = ["cmd_data", "setup_problems"]


def cmd_data(args) -> int:
    from tasks.data import FORMATS, check_dataset
    from tasks.data.formats import formats_for

    if args.data_command == "cityscapes-trainids":
        from tasks.data.cityscapes import write_train_ids

        written = write_train_ids(args.root, overwrite=args.overwrite)
        print(f"wrote {written} *_gtFine_labelTrainIds.png files under {Path(args.root) / 'gtFine'}")
        return 0
    if args.data_command == "convert":
        from tasks.data.convert import convert

        for line in convert(args.source_format, args.src, args.to, args.output, args.splits, args.class_names):
            print(line)
        print(f"wrote {args.to} data converted from {args.source_format} ({args.src}) to {args.output}")
        return 0
    if args.data_command == "synth":
        formats = formats_for(args.task)
        name = args.format or formats[0]
        if name not in formats:
            from tasks.config import ConfigError

            raise ConfigError(f"--format {name!r} does not hold {args.task} data; formats for {args.task}: "
                              f"{', '.join(formats)}")
        options = {key: getattr(args, key) for key in ("classes", "train_per_class", "val_per_class", "size")
                   if getattr(args, key) is not None}
        root = FORMATS[name].synth(args.dir, seed=args.seed, **options)
        print(f"wrote a synthetic {args.task} dataset ({name}: {FORMATS[name].layout}) to {root}")
        return 0
    cfg = load(args.config, args.set or [])
    from tasks.data.check import image_census

    census = image_census(cfg, progress=True)  # per split: the images' dtype, bands, values; one depth per dataset
    for line in census.lines():
        print(line)
    problems = list(dict.fromkeys(setup_problems(cfg) + census.problems + check_dataset(cfg, progress=True)))
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) found" if problems else "no problems found")
    return 1 if problems else 0


def setup_problems(cfg) -> list[str]:
    """What `data check` finds beyond the files: a device this machine lacks, a model the config cannot build
    (built on the meta device: no memory, no weights read)."""
    import torch

    from backbones.errors import EffdenseError

    from tasks import registry
    from tasks.engine.distributed import pick_device

    problems = []
    try:
        pick_device(cfg.train.device)
    except EffdenseError as error:
        problems.append(str(error))
    weights = {"weights": cfg.model.weights, "backbone_weights": cfg.model.backbone_weights}
    problems += [f"model.{key}={path!r}: no such file" for key, path in weights.items()
                 if path not in (None, "imagenet") and not Path(path).is_file()]
    cfg.model.weights = cfg.model.backbone_weights = None
    try:
        with torch.device("meta"):
            registry.get(cfg.model.task).build_model(cfg)
    except (EffdenseError, ValueError) as error:
        problems.append(f"the model does not build: {error}")
    finally:
        cfg.model.weights, cfg.model.backbone_weights = weights["weights"], weights["backbone_weights"]
    return problems
