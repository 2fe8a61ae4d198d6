"""The ``effdense`` command line: train, eval, predict, demo, data, weights, backbones.

Every subcommand is a thin layer over library functions; tools/*.py call the same ``main``.
Multi-GPU: ``torchrun --nproc-per-node N -m tasks.cli train CONFIG ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("effdense")


def _load_config(args):
    from tasks.config import load

    return load(args.config, args.set or [])


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML file or a shipped preset's name (`effdense configs list`), e.g. "
                                       "detection/efficientdet_d0_coco")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")


def cmd_train(args) -> int:
    from tasks import registry
    from tasks.data import build_loaders
    from tasks.engine import NonFiniteLossError, Trainer, TrainingInterrupted
    from tasks.engine.distributed import cleanup

    cfg = _load_config(args)
    if args.resume and args.output and Path(args.output).resolve() != Path(args.resume).resolve().parent:
        from tasks.config import ConfigError

        raise ConfigError(f"--resume {args.resume} continues in the checkpoint's own directory "
                          f"{Path(args.resume).resolve().parent}, not --output {args.output}; drop --output")
    if args.output:
        cfg.train.output_dir = str(Path(args.output).parent)
        cfg.train.run_name = Path(args.output).name
    if args.overwrite:
        cfg.train.overwrite = True
    try:
        run_files = {}
        if cfg.train.batch_size == "auto":
            run_files["batch_size.json"] = _auto_batch_size(cfg)
        loaders = build_loaders(cfg)  # under torchrun this joins the process group first
        _check_labels(cfg)
        scale = registry.describe_scale(cfg)  # what model.phi / model.scale resolves to
        run_files["scale.json"] = scale
        trainer = Trainer(registry.build_model(cfg), loaders, cfg, run_files=run_files,
                          epoch_callbacks=registry.get(cfg.model.task).epoch_callbacks(cfg))
        if trainer.is_main:
            log.info("scale: %s", ", ".join(f"{k}={v}" for k, v in scale.items() if v is not None))
        if args.resume:
            trainer.resume(args.resume)
        try:
            metrics = trainer.fit()
        except TrainingInterrupted as stop:  # SIGINT/SIGTERM: last.pt was written; say how to continue
            if trainer.is_main:
                print(f"effdense: {stop}", file=sys.stderr)
            return stop.exit_code
        except NonFiniteLossError as error:
            print(f"effdense: error: {error}", file=sys.stderr)
            return 1
        if trainer.is_main:
            print(f"run directory: {trainer.run_dir}")
            print(json.dumps(metrics))
        return 0
    finally:
        cleanup()


def _check_labels(cfg) -> None:
    """``data.check``: both splits' labels before the first step, so a bad val file fails now, not epochs in."""
    from tasks.data import DataError, check_labels

    problems = check_labels(cfg, cfg.data.check)
    if problems:
        more = f" (and {len(problems) - 1} more: `effdense data check` lists them)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; data.check={cfg.data.check} (off skips this check)")


def _auto_batch_size(cfg) -> dict:
    """``train.batch_size=auto``: rank 0 probes the largest batch that fits its GPU (the others take it);
    sets ``data.batch_size`` (the lr follows by the linear rule) and returns what was found, for the run."""
    from tasks.budget.measure import find_batch_size
    from tasks.engine.distributed import broadcast_object, is_main_process, setup_process
    from tasks.engine.optim import scaled_lr

    device, _ = setup_process(cfg.train.device, cfg.train.deterministic)
    found = find_batch_size(cfg, device=device) if is_main_process() else None
    batch, message = broadcast_object((found.batch_size, found.message) if found else None)
    cfg.data.batch_size = int(batch)
    log.info("train.batch_size=auto: %s", message)
    return {"batch_size": cfg.data.batch_size, "lr": scaled_lr(cfg), "message": message}


def cmd_eval(args) -> int:
    from tasks.config import resolve_image_size
    from tasks.data import build_loaders
    from tasks.engine import evaluate
    from tasks.engine.distributed import cleanup, setup_process
    from tasks.registry import build_with_weights

    cfg = _load_config(args)
    try:
        device, dist_env = setup_process(cfg.train.device, cfg.train.deterministic)
        if args.slice is None:
            loader = build_loaders(cfg, splits=("val",))["val"]
        model = build_with_weights(cfg, args.weights)
        if args.fused:
            from backbones.fusion import fuse_for_inference

            model = fuse_for_inference(model.eval())
        if args.slice is not None:  # the task's sliced inference on the split's original images
            slicing = _slice_options(cfg, model, args)
            loader = model.original_image_loader(cfg)
            model = model.sliced(slicing["slice"], slicing["slice_overlap"], size=resolve_image_size(cfg))
        metrics = evaluate(model, loader, device, cfg.train.amp, cfg.train.channels_last,
                           progress=not args.json and dist_env.is_main, output_dir=args.output)
        if not dist_env.is_main:
            return 0
        if args.output:
            out = Path(args.output)
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
        if args.json:
            print(json.dumps(metrics))
        else:
            width = max(len(key) for key in metrics) if metrics else 0
            for key, value in metrics.items():
                print(f"{key:>{width}}: {value:.4f}")
        return 0
    finally:
        cleanup()


def _slice_options(cfg, model, args) -> dict:
    """``--slice SIZE --slice-overlap F`` as options, after checking the task can slice (detection: SAHI)."""
    from tasks.config import ConfigError

    if args.slice is not None and not hasattr(model, "sliced"):
        raise ConfigError(f"--slice: model.task={cfg.model.task} has no sliced inference (detection has; "
                          f"segmentation slides windows with data.eval.mode=slide and data.tile / data.eval.window)")
    if args.slice is not None and (args.slice < 1 or not 0 <= args.slice_overlap < 1):
        raise ConfigError(f"--slice {args.slice} --slice-overlap {args.slice_overlap:g}: expected a tile side >= 1 "
                          f"px and an overlap in [0, 1) (a fraction of the side), e.g. --slice 512 --slice-overlap 0.2")
    return {"slice": args.slice, "slice_overlap": args.slice_overlap} if args.slice is not None else {}


def cmd_predict(args) -> int:
    import torch

    from tasks import registry
    from tasks.engine.distributed import pick_device

    cfg = _load_config(args)
    model = registry.build_with_weights(cfg, args.weights)
    from backbones.fusion import fuse_for_inference

    model = fuse_for_inference(model.to(pick_device(cfg.train.device)).eval())  # BatchNorm folded: same outputs
    slicing = _slice_options(cfg, model, args)
    with torch.no_grad():
        registry.get(cfg.model.task).predict(cfg, model, args.images, out=args.out, topk=args.topk,
                                            score_threshold=args.score_threshold, **slicing)
    return 0


def cmd_weights(args) -> int:
    from backbones.convert import convert

    options = {"padding": args.padding}
    if args.norm_eps is not None:
        options["norm_eps"] = args.norm_eps
    out = convert(args.src, args.arch, args.output, **options)
    print(f"wrote {out}")
    return 0


def cmd_backbones(args) -> int:
    import backbones

    from tasks.registry import get
    from tasks.summary import describe, describe_task, format_table, format_task_table

    if args.task:
        head = args.head or "unet"
        if args.phi is not None:
            rows = [describe_task(args.task, phi=args.phi, head=head)]
        else:
            names = args.names or get(args.task).scales.names
            rows = [describe_task(args.task, scale=s, head=head) for s in names]
        print(format_task_table(args.task, rows))
        return 0
    if args.phi is not None:
        rows = [describe("efficientnet", phi=args.phi)]
    else:
        rows = [describe(name) for name in (args.names or backbones.list_names()[:-1])]
    print(format_table(rows))
    return 0


def cmd_budget(args) -> int:
    from tasks.budget import run_command

    import torch

    cfg = _load_config(args)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        run_command(cfg, latency_ms=args.latency_ms, memory_gb=args.memory_gb, min_throughput=args.min_throughput,
                    scales=args.scales or (), phis=args.phis or (), search=args.search, fit_batch=args.fit_batch,
                    out_dir=args.output, runs=args.runs, device=args.device, max_phi=args.max_phi,
                    minutes=args.minutes, image_size=args.image_size)
    finally:
        torch.set_num_threads(threads)  # main() may be called from a longer-lived process (tests, notebooks)
    return 0


def cmd_export(args) -> int:
    import torch

    from tasks.config import resolve_image_size
    from tasks.export import export
    from tasks.registry import build_with_weights

    cfg = _load_config(args)
    model = build_with_weights(cfg, args.weights)
    example = torch.zeros(1, 3, *resolve_image_size(cfg), dtype=torch.uint8)
    result = export(model.eval(), args.format, args.output, example, dynamic_batch=args.dynamic_batch,
                    postprocess=args.postprocess, include_normalization=not args.float_input,
                    check=not args.no_check)
    print(result.summary())
    return 0


def cmd_configs(args) -> int:
    from tasks.config import ConfigError, list_presets, resolve_preset

    if args.configs_command == "list":
        print("\n".join(list_presets()))
        return 0
    path = resolve_preset(args.name)
    if not path.is_file():
        raise ConfigError(f"no preset or file {args.name!r}; `effdense configs list` names the presets")
    sys.stdout.write(path.read_text())
    return 0


def cmd_demo(args) -> int:
    from tasks.demo import run_demo

    return run_demo(args.task, args.output, args.set or [], overwrite=args.overwrite, preset=args.preset)


def _add_slice_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--slice", type=int, metavar="SIZE", help="detection: small objects in large images (SAHI): "
                        "tiles of SIZE px at native resolution + the whole image, merged by class-wise NMS")
    parser.add_argument("--slice-overlap", type=float, default=0.2, metavar="F",
                        help="with --slice: the fraction of the tile side neighbouring tiles share (default 0.2)")


def build_parser() -> argparse.ArgumentParser:
    from tasks.data_command import cmd_data

    parser = argparse.ArgumentParser(prog="effdense", description="Dense prediction on scalable EfficientNet backbones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a config", description="Train a model from a YAML config.")
    _add_config_args(p)
    p.add_argument("--output", help="run directory (default: <train.output_dir>/<train.run_name or run-<time>>)")
    p.add_argument("--resume", metavar="CKPT", help="continue exactly from a last.pt/best.pt checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="reuse a run directory that holds another run (its files are replaced)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate weights on the config's validation split",
                       description="Evaluate weights on the config's validation split.")
    _add_config_args(p)
    p.add_argument("--weights", required=True, help="last.pt/best.pt, model.safetensors, or a torchvision/timm file")
    p.add_argument("--json", action="store_true", help="print the metrics dict as JSON on the last stdout line")
    p.add_argument("--output", metavar="DIR", help="also write metrics.json (and the evaluator's files) into DIR")
    p.add_argument("--fused", action="store_true", help="fold BatchNorm into the convs first (inference speed)")
    _add_slice_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="run a model on image files",
                       description="Predict on image files: top-k labels (classification); the task's outputs "
                                   "otherwise. Class names come from the weights file (or ImageNet's for 1000 classes).")
    _add_config_args(p)
    p.add_argument("--weights", required=True, help="last.pt/best.pt, model.safetensors, or a torchvision/timm file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5, help="classification: labels per image")
    p.add_argument("--score-threshold", type=float, default=0.3, help="detection: the lowest score drawn")
    p.add_argument("--out", help="write the outputs (predictions.json, images) into this directory")
    _add_slice_args(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="synthesize or check datasets", description="Synthesize or check datasets.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    from tasks.registry import TASKS

    s = data_sub.add_parser("synth", help="write a small synthetic dataset in the real on-disk format")
    s.add_argument("task", choices=list(TASKS), help="the task whose data to write")
    s.add_argument("dir", help="output directory")
    s.add_argument("--format", help="the on-disk format (default: the task's first; see `effdense data check`)")
    s.add_argument("--classes", type=int, help="classification: number of classes (default 4)")
    s.add_argument("--train-per-class", type=int, help="classification: training images per class (default 60)")
    s.add_argument("--val-per-class", type=int, help="classification: validation images per class (default 20)")
    s.add_argument("--size", type=int, help="classification: image side in pixels (default 64)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data)
    c = data_sub.add_parser("check", help="scan a config's dataset and list every problem")
    _add_config_args(c)
    c.set_defaults(func=cmd_data)
    c = data_sub.add_parser("convert", help="convert a detection dataset (coco, voc, yolo) into another format",
                            description="Write a detection dataset's splits in another format into a new folder "
                                        "(images copied; an existing, non-empty folder is refused).")
    c.add_argument("source_format", choices=("voc", "yolo", "coco"), metavar="{voc,yolo,coco}",
                   help="the format of SRC")
    c.add_argument("src", help="the dataset's root folder")
    c.add_argument("--to", required=True, choices=("coco", "yolo", "voc"), help="the format to write")
    c.add_argument("-o", "--output", required=True, metavar="DST", help="the new folder (must not hold anything)")
    c.add_argument("--splits", nargs="+", help="the splits to convert (default: every split found)")
    c.add_argument("--class-names", nargs="+", help="voc/yolo source: the classes in label order (default: "
                                                    "yolo's data.yaml names, voc's sorted object names)")
    c.set_defaults(func=cmd_data)
    c = data_sub.add_parser("cityscapes-trainids", help="write *_gtFine_labelTrainIds.png beside every labelIds PNG",
                            description="Write the 19-class train-id masks (255 = ignore) once, as cityscapesScripts' "
                                        "createTrainIdLabelImgs does; training then reads them directly.")
    c.add_argument("root", help="the Cityscapes root (holding gtFine/)")
    c.add_argument("--overwrite", action="store_true", help="rewrite existing labelTrainIds files")
    c.set_defaults(func=cmd_data)

    p = sub.add_parser("weights", help="convert checkpoints", description="Convert checkpoints to effdense safetensors.")
    w_sub = p.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    c = w_sub.add_parser("convert", help="torchvision/timm/effdet/EfficientNet-PyTorch file -> effdense safetensors")
    c.add_argument("src", help="source checkpoint (.pth/.pt/.bin/.safetensors)")
    c.add_argument("--arch", required=True, help="backbone name, e.g. efficientnet-b3 (see `effdense backbones`)")
    c.add_argument("-o", "--output", required=True, help="output .safetensors path")
    c.add_argument("--padding", default="symmetric", choices=["symmetric", "same"],
                   help="'same' for TF-ported weights (timm tf_*, effdet, EfficientNet-PyTorch)")
    c.add_argument("--norm-eps", type=float, help="BatchNorm eps (1e-3 for TF-ported weights)")
    c.set_defaults(func=cmd_weights)

    p = sub.add_parser("backbones", help="the backbone family as a table (params, GMACs, resolution, taps)",
                       description="Print every backbone with its parameters, GMACs, native resolution and taps.")
    p.add_argument("--phi", type=float, help="show one free-coefficient model, e.g. --phi 2.5")
    p.add_argument("--task", choices=list(TASKS), help="the whole task model per scale (D0..D7x for detection, "
                                                       "U-Net on B0..B7 for segmentation) at the task's input size")
    p.add_argument("--head", choices=["unet", "bifpn"], help="segmentation: which head (default unet)")
    p.add_argument("names", nargs="*", help="only these names (with --task: scales 0..7, 7x)")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("budget", help="which scale fits this hardware: latency, throughput, memory per scale",
                       description="Measure each scale of the config's task on this device (latency at batch 1, "
                                   "throughput at the eval batch, a training step and its peak memory at the "
                                   "config's batch, parameters, GMACs), mark the largest that meets every limit, "
                                   "and write budget.json + budget.png.")
    _add_config_args(p)
    p.add_argument("--latency-ms", type=float, help="the most milliseconds one image may take (batch 1)")
    p.add_argument("--memory-gb", type=float, help="the most GPU memory a training step may use (CUDA only)")
    p.add_argument("--min-throughput", type=float, help="the fewest images per second at the eval batch")
    p.add_argument("--scales", nargs="+", metavar="NAME",
                   help="scales to measure: `effdense backbones` names (efficientnet-b0 ...), "
                        "efficientdet-d0 ... -d7x, -lite0 ... -lite4")
    p.add_argument("--phis", nargs="+", type=float, metavar="PHI", help="free compound coefficients (--phis -1 0.5)")
    p.add_argument("--search", choices=["phi"], help="bisect phi (to 0.05) for the largest model within the limits")
    p.add_argument("--max-phi", type=float, metavar="PHI",
                   help="with --search phi: the largest phi tried (default 8, the largest published row)")
    p.add_argument("--fit-batch", action="store_true", help="also find the largest training batch (CUDA)")
    p.add_argument("--minutes", type=float, metavar="N", help="steps (N*60 / the training step measured at "
                   "--image-size) and images (steps x the config's global batch) each scale trains in N minutes here")
    p.add_argument("--image-size", metavar="native|config|HxW", help="measure at each scale's own size (default: "
                   "classification, detection), data.image_size if set (config; default: segmentation), or HxW")
    p.add_argument("--runs", type=int, help="timed runs per measurement (default: device-dependent)")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: the config's train.device)")
    p.add_argument("--threads", type=int, help="CPU threads (set 1 on a shared machine for steadier timings)")
    p.add_argument("--output", default="runs/budget", help="where budget.json and budget.png go")
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser("export", help="write a model as ONNX, TorchScript or a torch.export program",
                       description="Export a trained model (BatchNorm folded, TF padding frozen) for deployment; "
                                   "the graph takes uint8 images (N, 3, H, W) at the config's input size and "
                                   "normalises them itself, and the written file is checked against PyTorch.")
    _add_config_args(p)
    p.add_argument("--weights", required=True, help="last.pt/best.pt, model.safetensors, or a peer's file")
    p.add_argument("--format", required=True, choices=["onnx", "torchscript", "exported-program"])
    p.add_argument("-o", "--output", required=True, help="output file (.onnx, .pt, .pt2)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    p.add_argument("--postprocess", choices=["outside", "inside"], default="outside",
                   help="detection: class/box maps + anchors out (outside), or top-k + NMS in the graph (inside)")
    p.add_argument("--float-input", action="store_true", help="the graph takes float normalised images instead")
    p.add_argument("--no-check", action="store_true", help="skip reloading the file and comparing outputs")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("configs", help="the shipped presets: list them, or print one to copy and edit",
                       description="List the presets that ship with effdense, or print one (`effdense configs show "
                                   "detection/efficientdet_d0_coco > my.yaml`, then `effdense train my.yaml`).")
    c_sub = p.add_subparsers(dest="configs_command", required=True, metavar="ACTION")
    c_sub.add_parser("list", help="every preset name").set_defaults(func=cmd_configs)
    c = c_sub.add_parser("show", help="print a preset (YAML) to standard output")
    c.add_argument("name", help="a preset name from `effdense configs list` (or a path)")
    c.set_defaults(func=cmd_configs)

    p = sub.add_parser("demo", help="synthesize data, train on CPU for ~2 minutes, evaluate",
                       description="Write a synthetic dataset, train a small model for the task on it, evaluate it.")
    p.add_argument("task", nargs="?", default="classification", choices=list(TASKS), help="which task's demo")
    p.add_argument("--output", help="run directory (default: the demo config's, runs/demo-<task>, reused each time)")
    p.add_argument("--overwrite", action="store_true", help="replace a run that --output already holds")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the demo config")
    p.add_argument("--preset", help="train this preset instead (e.g. detection/efficientdet_d0_custom) on the demo's data")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from backbones.errors import EffdenseError

    from tasks.engine.host import keep_freed_memory

    keep_freed_memory()  # large CPU tensors reuse freed memory instead of page-faulting fresh pages

    try:
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C outside training (which saves and stops by itself): one line, exit 130
        print(f"effdense: {args.command} interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    except EffdenseError as error:
        # User-caused problems (config, data, weights, run directory): one line; anything else is a bug
        # and keeps its traceback.
        if args.verbose:
            raise
        print(f"effdense: error: {error} (run with -v for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
