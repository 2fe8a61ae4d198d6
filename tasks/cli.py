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

REPO_CONFIGS = Path(__file__).resolve().parents[1] / "configs"
log = logging.getLogger("effdense")


def _task_module(task: str):
    from . import classification

    modules = {"classification": classification}
    if task not in modules:
        raise SystemExit(f"effdense: model.task={task!r} is not implemented yet (available: {', '.join(modules)})")
    return modules[task]


def _load_config(args, join_group: bool = False):
    """The validated config; with ``join_group`` also join the torchrun process group (if launched by
    torchrun), before any loader is built, so that the samplers shard the data across ranks."""
    from .config import load
    from .engine.distributed import setup_process

    cfg = load(args.config, args.set or [])
    if join_group:
        setup_process(cfg.train.device, cfg.train.deterministic)
    return cfg


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="a YAML preset, e.g. configs/classification/efficientnet_b0_imagenet.yaml")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set train.epochs=3 (repeatable)")


def cmd_train(args) -> int:
    from .data.loaders import build_loaders
    from .engine import NonFiniteLossError, Trainer, TrainingInterrupted

    cfg = _load_config(args, join_group=True)
    if args.output:
        cfg.train.output_dir = str(Path(args.output).parent)
        cfg.train.run_name = Path(args.output).name
    loaders = build_loaders(cfg)
    model = _task_module(cfg.model.task).build_model(cfg)
    trainer = Trainer(model, loaders, cfg)
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


def load_task_weights(task_model, path: str) -> None:
    """Weights for a task module: an engine checkpoint (EMA weights when it holds them) or any
    network file ``backbones.weights`` reads (model.safetensors, torchvision, timm, ...)."""
    from backbones.weights import load_weights

    from .engine.checkpoint import FORMAT, network_state

    if str(path).endswith(".pt"):
        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not a plain torch file: load_weights gives the one-line reason
            state = None
        if isinstance(state, dict) and state.get("format") == FORMAT:
            task_model.net.load_state_dict(network_state(state))
            return
    load_weights(task_model.net, path)


def cmd_eval(args) -> int:
    from .data.loaders import build_loaders
    from .engine import Trainer

    cfg = _load_config(args, join_group=True)
    cfg.train.progress = not args.json
    loaders = build_loaders(cfg)
    model = _task_module(cfg.model.task).build_model(cfg)
    load_task_weights(model, args.weights)
    metrics = Trainer(model, loaders, cfg, run_dir=None, create_run_dir=False).evaluate()
    if args.json:
        print(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            print(f"{key:>12}: {value:.4f}")
    return 0


def cmd_predict(args) -> int:
    import torch

    from .config import resolve_image_size
    from .data.imagefolder import list_split, read_rgb
    from .data.transforms import classification_eval_transform

    cfg = _load_config(args)
    model = _task_module(cfg.model.task).build_model(cfg)
    load_task_weights(model, args.weights)
    model.eval()
    try:
        classes = list_split(cfg.data.root, cfg.data.train_split).classes
    except (OSError, ValueError):
        classes = [str(i) for i in range(model.num_classes)]
    transform = classification_eval_transform(cfg.data.augment, resolve_image_size(cfg))
    results = []
    for path in args.images:
        image = transform(read_rgb(path))
        with torch.no_grad():
            probs = model(image.unsqueeze(0)).softmax(dim=1)[0]
        top = probs.topk(min(args.topk, probs.numel()))
        labels = [{"label": classes[i], "index": int(i), "prob": round(float(p), 5)}
                  for p, i in zip(top.values, top.indices)]
        results.append({"image": str(path), "top": labels})
        print(f"{path}: " + ", ".join(f"{item['label']} {item['prob']:.3f}" for item in labels))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(results, indent=1))
        print(f"wrote {out / 'predictions.json'}")
    return 0


def cmd_data(args) -> int:
    if args.data_command == "synth":
        from .data import synthetic

        root = synthetic.write_classification(args.dir, num_classes=args.classes, train_per_class=args.train_per_class,
                                              val_per_class=args.val_per_class, size=args.size, seed=args.seed)
        print(f"wrote a synthetic {args.task} dataset to {root}")
        return 0
    from .data.check import check_dataset

    problems = check_dataset(_load_config(args))
    for line in problems:
        print(line)
    print(f"{len(problems)} problem(s) found" if problems else "no problems found")
    return 1 if problems else 0


def cmd_weights(args) -> int:
    from backbones.weights import convert

    options = {"padding": args.padding}
    if args.norm_eps is not None:
        options["norm_eps"] = args.norm_eps
    out = convert(args.src, args.arch, args.output, **options)
    print(f"wrote {out}")
    return 0


def cmd_backbones(args) -> int:
    import backbones

    from .summary import describe, format_table

    if args.phi is not None:
        rows = [describe("efficientnet", phi=args.phi)]
    else:
        rows = [describe(name) for name in (args.names or backbones.list_names()[:-1])]
    print(format_table(rows))
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(args.output, args.set or [])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effdense", description="Dense prediction on scalable EfficientNet backbones.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model from a config", description="Train a model from a YAML config.")
    _add_config_args(p)
    p.add_argument("--output", help="run directory (default: <train.output_dir>/<train.run_name or run-<time>>)")
    p.add_argument("--resume", metavar="CKPT", help="continue exactly from a last.pt/best.pt checkpoint")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate weights on the config's validation split",
                       description="Evaluate weights on the config's validation split.")
    _add_config_args(p)
    p.add_argument("--weights", required=True, help="last.pt/best.pt, model.safetensors, or a torchvision/timm file")
    p.add_argument("--json", action="store_true", help="print the metrics dict as JSON on the last stdout line")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("predict", help="top-k labels for images", description="Print the top-k labels of each image.")
    _add_config_args(p)
    p.add_argument("--weights", required=True, help="last.pt/best.pt, model.safetensors, or a torchvision/timm file")
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--out", help="also write predictions.json into this directory")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("data", help="synthesize or check datasets", description="Synthesize or check datasets.")
    data_sub = p.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    s = data_sub.add_parser("synth", help="write a small synthetic dataset in the real on-disk format")
    s.add_argument("task", choices=["classification"], help="which format to write")
    s.add_argument("dir", help="output directory")
    s.add_argument("--classes", type=int, default=4)
    s.add_argument("--train-per-class", type=int, default=60)
    s.add_argument("--val-per-class", type=int, default=20)
    s.add_argument("--size", type=int, default=64, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_data)
    c = data_sub.add_parser("check", help="scan a config's dataset and list every problem")
    _add_config_args(c)
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
    p.add_argument("names", nargs="*", help="only these names")
    p.set_defaults(func=cmd_backbones)

    p = sub.add_parser("demo", help="synthesize data, train on CPU for ~2 minutes, evaluate",
                       description="Write a synthetic dataset, train a small classifier on it, evaluate it.")
    p.add_argument("--output", default="runs/demo", help="run directory")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override the demo config")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    from .config import ConfigError
    from .data import DataError

    try:
        return args.func(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as error:
        # User-caused problems: one line, no traceback (run with -v for one).
        if args.verbose:
            raise
        print(f"effdense: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
