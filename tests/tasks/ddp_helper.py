"""Worker for test_ddp, launched by torchrun (2 processes, gloo on CPU).

Usage: torchrun --nproc-per-node 2 tests/tasks/ddp_helper.py OUT_DIR
1. the no-BN toy with DistributedSampler(shuffle=False), for comparison with one process on batch 8;
2. a random toy (dropout, flips, noisy data, shuffled) trained straight, and the same run stopped by a
   SIGTERM that only rank 1 receives, then resumed.
Writes OUT_DIR/rank<R>.pt; the runs go under OUT_DIR/runs, OUT_DIR/straight, OUT_DIR/interrupted.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from tasks.engine import distributed  # noqa: E402
from tasks.engine import Trainer, TrainingInterrupted  # noqa: E402
from tests.tasks.toy_task import NoisyImages, ToyTask, make_config, trained_state  # noqa: E402


def loaders(cfg, rank, world, *, noise=False, shuffle=False):
    train, val = NoisyImages(48, noise=noise), NoisyImages(24, seed=7)
    return {
        "train": DataLoader(train, batch_size=4, generator=torch.Generator().manual_seed(cfg.train.seed),
                            sampler=DistributedSampler(train, world, rank, shuffle=shuffle, seed=cfg.train.seed)),
        "val": DataLoader(val, batch_size=8, sampler=DistributedSampler(val, world, rank, shuffle=False)),
    }


def random_toy(seed, **options):
    torch.manual_seed(seed)
    return ToyTask(dropout=0.3, flip=True, **options)


def main() -> None:
    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = make_config(**{"data.batch_size": 4, "train.ema": False, "train.output_dir": str(out / "runs")})
    torch.manual_seed(0)
    trainer = Trainer(ToyTask(batch_norm=False), loaders(cfg, rank, world), cfg)
    metrics = trainer.fit()
    result = {"params": trainer.model.state_dict(), "run_dir": str(trainer.run_dir), "metrics": metrics,
              "history": trainer.history, "world_size": trainer.dist.world_size}

    cfg = make_config(**{"data.batch_size": 4, "train.log_every": 2})
    data = dict(noise=True, shuffle=True)
    straight = Trainer(random_toy(0), loaders(cfg, rank, world, **data), cfg, run_dir=out / "straight")
    straight.fit()
    stopper = random_toy(0, signal_at=7 if rank == 1 else None)  # only rank 1 gets the signal
    interrupted = Trainer(stopper, loaders(cfg, rank, world, **data), cfg, run_dir=out / "interrupted")
    try:
        interrupted.fit()
        result["stop"] = None
    except TrainingInterrupted as stop:
        result["stop"] = {"exit_code": stop.exit_code, "step": stop.step, "batch_in_epoch": stop.batch_in_epoch}
    resumed = Trainer(random_toy(5), loaders(cfg, rank, world, **data), cfg, run_dir=out / "interrupted")
    resumed.resume(out / "interrupted" / "last.pt")
    resumed.fit()
    result["straight"], result["resumed"] = trained_state(straight), trained_state(resumed)
    torch.save(result, out / f"rank{rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main()
