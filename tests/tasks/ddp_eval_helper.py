"""Worker for test_ddp's evaluation checks, launched by torchrun (2 processes, gloo on CPU).

Usage: torchrun --nproc-per-node 2 tests/tasks/ddp_eval_helper.py OUT_DIR
1. ``evaluate`` over ShardSampler splits of 3 images (2 + 1: uneven) and of 1 image (rank 1's shard empty);
2. a run whose evaluator reports a different metric on each rank: rank 0 decides ``best`` for everyone
   (a per-rank decision would have one rank enter the collective save alone and hang);
3. loaders built with a plain (unsharded) sampler: refused.
Writes OUT_DIR/rank<R>.pt.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from tasks.data.loaders import ShardSampler  # noqa: E402
from tasks.engine import EngineError, Trainer, distributed, evaluate  # noqa: E402
from tests.tasks.toy_task import NoisyImages, ToyTask, TopOneEvaluator, make_config  # noqa: E402


class RankSkewEvaluator(TopOneEvaluator):
    """top1 = rank 0's true value, and on rank 1 a value that gets worse every evaluation."""

    calls = 0

    def compute(self):
        metrics = super().compute()
        RankSkewEvaluator.calls += 1
        if distributed.get_rank() == 1:
            metrics["top1"] = 1.0 - 0.1 * RankSkewEvaluator.calls
        return metrics


class SkewedToy(ToyTask):
    def make_evaluator(self):
        return RankSkewEvaluator()


def main() -> None:
    out = Path(sys.argv[1])
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = make_config(**{"data.batch_size": 4, "train.ema": False, "train.epochs": 3})
    distributed.setup_process("cpu")
    torch.manual_seed(0)
    model = ToyTask().eval()
    result = {}
    for count in (3, 1):
        data = NoisyImages(count, seed=7)
        loader = DataLoader(data, batch_size=2, sampler=ShardSampler(count, rank, world))
        result[f"eval{count}"] = evaluate(model, loader, "cpu")
        result[f"shard{count}"] = len(loader.sampler)

    train = NoisyImages(48)
    loaders = {"train": DataLoader(train, batch_size=4, sampler=DistributedSampler(train, world, rank, seed=3)),
               "val": DataLoader(NoisyImages(8, seed=7), batch_size=4, sampler=ShardSampler(8, rank, world))}
    trainer = Trainer(SkewedToy(), loaders, cfg, run_dir=out / "skewed")
    trainer.fit()  # three evaluations, ranks disagree on every one: must not hang
    result["best"] = trainer.best
    result["best_step"] = torch.load(out / "skewed" / "best.pt", weights_only=True)["step"] if rank == 0 else None

    plain = {"train": DataLoader(train, batch_size=4, shuffle=True)}
    try:
        Trainer(ToyTask(), plain, cfg, create_run_dir=False)
        result["unsharded"] = None
    except EngineError as error:
        result["unsharded"] = str(error)
    torch.save(result, out / f"rank{rank}.pt")
    distributed.cleanup()


if __name__ == "__main__":
    main()
