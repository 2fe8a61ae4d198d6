"""Subprocess for test_engine: trains the random toy task and exits 128+signal when stopped by one.

Usage: python tests/tasks/train_helper.py RUN_DIR   (prints "forward N" before each training forward)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tasks.engine import Trainer, TrainingInterrupted  # noqa: E402
from tests.tasks.toy_task import ToyTask, make_config, make_loaders  # noqa: E402


class AnnouncingToy(ToyTask):
    def forward(self, images, targets=None):
        if self.training:
            print(f"forward {self.calls}", flush=True)
        return super().forward(images, targets)


def main() -> int:
    cfg = make_config()
    torch.manual_seed(0)
    model = AnnouncingToy(dropout=0.3, flip=True, sleep=0.03)
    try:
        Trainer(model, make_loaders(cfg, noise=True), cfg, run_dir=sys.argv[1]).fit()
    except TrainingInterrupted as stop:
        print(stop, file=sys.stderr)
        return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
