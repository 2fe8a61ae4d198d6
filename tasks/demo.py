"""``effdense demo``: synthesize a dataset, train a small classifier on the CPU, evaluate it."""

from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "classification.yaml"


def run_demo(output: str = "runs/demo", overrides: list[str] = ()) -> int:
    from .classification import build_model
    from .config import load
    from .data import synthetic
    from .data.loaders import build_loaders
    from .engine import Trainer

    cfg = load(DEMO_CONFIG, list(overrides))
    root = synthetic.write_classification(cfg.data.root, num_classes=cfg.model.num_classes)
    print(f"synthetic dataset: {root}")
    out = Path(output)
    cfg.train.output_dir, cfg.train.run_name = str(out.parent), out.name
    trainer = Trainer(build_model(cfg), build_loaders(cfg), cfg)
    start = time.perf_counter()
    trainer.fit()
    minutes = (time.perf_counter() - start) / 60
    metrics = trainer.evaluate()
    print(f"trained {cfg.model.backbone} for {cfg.train.epochs} epochs in {minutes:.1f} min on {trainer.device}")
    print("validation: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    print(f"run directory: {trainer.run_dir} (metrics.jsonl, plots, model.safetensors; "
          f"tensorboard --logdir {trainer.run_dir})")
    print(json.dumps(metrics))
    return 0
