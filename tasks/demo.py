"""``effdense demo [TASK]``: synthesize the task's dataset, train a small model on the CPU, evaluate it.

The task's demo preset (``demo/<task>``, shipped with the package; named by the task table) says everything: the data
format and root (written here by the format's synthetic writer), the model and the schedule.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path


# What a --preset run takes from the demo preset: its data and a CPU-sized schedule (the rest is the preset's own).
DEMO_KEYS = ("data.format", "data.root", "data.train_split", "data.val_split", "data.image_size", "data.batch_size",
             "data.eval_batch_size", "data.workers", "data.pin_memory", "model.num_classes", "train.epochs",
             "train.eval_every", "train.checkpoint_every", "train.log_every", "train.device", "train.amp",
             "train.channels_last", "model.sync_bn", "data.global_batch_size", "train.batch_size")


def run_demo(task: str = "classification", output: str | None = None, overrides: list[str] = (),
             overwrite: bool = False, preset: str | None = None) -> int:
    """Train and evaluate ``task``'s demo. Its default run directory (the preset's) is the demo's own and is
    reused each time; an ``output`` directory that holds a run is refused unless ``overwrite``, as train does.
    ``preset``: train that preset instead, on the demo's data with the demo's schedule (:data:`DEMO_KEYS`), in
    ``runs/demo-<task>-<preset name>``."""
    import sys

    from tasks import registry
    from tasks.config import load
    from tasks.data import FORMATS, build_loaders
    from tasks.engine import Trainer, TrainingInterrupted

    row = registry.get(task)
    cfg = load(row.demo_preset, [*row.demo_overrides(list(overrides)), *overrides])
    if preset is not None:
        cfg = _on_demo_data(cfg, preset, overrides)
    data_format = FORMATS[cfg.data.format]
    root = data_format.synth(cfg.data.root, **data_format.demo_options(cfg))
    print(f"synthetic dataset: {root}")
    if output:
        out = Path(output)
        cfg.train.output_dir, cfg.train.run_name = str(out.parent), out.name
    cfg.train.overwrite = overwrite or not output  # the demo's own directory is meant to be run again and again
    scale = registry.describe_scale(cfg)
    print("scale: " + ", ".join(f"{k}={v}" for k, v in scale.items() if v is not None))
    trainer = Trainer(registry.build_model(cfg), build_loaders(cfg), cfg, run_files={"scale.json": scale},
                      epoch_callbacks=row.epoch_callbacks(cfg))
    start = time.perf_counter()
    try:
        trainer.fit()
    except TrainingInterrupted as stop:  # the demo has no --resume; its saved run continues through train
        print(f"effdense: demo stopped by {signal.Signals(stop.signum).name} at epoch {stop.epoch + 1}; continue it "
              f"with `effdense train {trainer.run_dir / 'config.yaml'} --resume {stop.checkpoint}`, or run the demo "
              f"again to start over", file=sys.stderr)
        return stop.exit_code
    minutes = (time.perf_counter() - start) / 60
    metrics = trainer.evaluate()
    name = getattr(trainer.model.net, "name", None) or getattr(trainer.model.net.backbone, "name", cfg.model.backbone)
    print(f"trained {name} ({task}) for {cfg.train.epochs} epochs in {minutes:.1f} min on {trainer.device}")
    if hasattr(trainer.last_evaluator, "table"):
        print(trainer.last_evaluator.table())
    else:
        print("validation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"run directory: {trainer.run_dir} (metrics.jsonl, plots, model.safetensors; "
          f"tensorboard --logdir {trainer.run_dir})")
    print(json.dumps(metrics))
    return 0


def _on_demo_data(demo, preset: str, overrides) -> object:
    """``preset`` (name or path) with the demo config's data and CPU schedule (:data:`DEMO_KEYS`), then ``overrides``."""
    from tasks.config import load, to_dict
    from tasks.config.loader import ConfigError

    values = to_dict(demo)

    def value(key: str):
        node = values
        for part in key.split("."):
            node = node[part]
        return node

    task = load(preset).model.task
    if task != demo.model.task:
        raise ConfigError(f"--preset {preset} is a {task} preset; the {demo.model.task} demo trains a {demo.model.task} "
                         f"preset (`effdense configs list` names them)")
    settings = [f"{key}={json.dumps(value(key))}" for key in DEMO_KEYS]
    return load(preset, [*settings, f"train.run_name={demo.train.run_name}-{Path(str(preset)).stem}", *overrides])
