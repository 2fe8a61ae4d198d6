"""Worker for test_recipes, launched by torchrun (2 processes, gloo on CPU): the toy task on the demo's
synthetic classification data through ``tasks.data.build_loaders`` at ``data.global_batch_size`` 12, at
most 4 images a forward, for 2 epochs. Records what each rank trained on into OUT_DIR/rank<R>.pt.

Usage: torchrun --nproc-per-node 2 tests/tasks/global_batch_helper.py OUT_DIR   (the data in OUT_DIR/data)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tasks.config import load, resolve_preset  # noqa: E402
from tasks.data import build_loaders  # noqa: E402
from tasks.engine import Trainer  # noqa: E402
from tests.tasks.toy_task import ToyTask  # noqa: E402

OVERRIDES = ["data.image_size=32", "data.global_batch_size=12", "data.batch_size=4", "data.workers=0",
             "data.eval_batch_size=8", "train.epochs=2", "train.device=cpu", "train.progress=false", "train.ema=true",
             "train.ema_decay=0.99", "train.ema_reference_batch=3", "train.ema_warmup=false", "train.log_every=1"]


def main() -> None:
    out = Path(sys.argv[1])
    root = out / "data"
    cfg = load(resolve_preset("demo/classification"),
               [f"data.root={root}", f"train.output_dir={out / 'runs'}", *OVERRIDES])
    loaders = build_loaders(cfg)  # joins the process group
    rank = int(os.environ["RANK"])
    sampler = loaders["train"].sampler
    sampler.set_epoch(0)
    first_epoch = list(sampler)
    torch.manual_seed(0)
    model = ToyTask(batch_norm=False)
    forwards, images_at_step = [], []
    model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]) if module.training else None)
    trainer = Trainer(model, loaders, cfg)
    trainer.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: images_at_step.append(sum(forwards)))
    trainer.fit()
    plan = trainer.plan
    torch.save({"plan": [plan.global_batch, plan.world_size, plan.micro_batch, plan.accum],
                "steps_per_epoch": trainer.steps_per_epoch, "batches": len(loaders["train"]),
                "loader_batch": loaders["train"].batch_size, "forwards": forwards, "images_at_step": images_at_step,
                "step": trainer.step, "lr": trainer.optimizer.param_groups[0]["initial_lr"],
                "ema_decay": trainer.ema.decay, "first_epoch": first_epoch,
                "params": trainer.model.state_dict()}, out / f"rank{rank}.pt")
    from tasks.engine import distributed

    distributed.cleanup()  # leave the process group before exit (as ddp_helper.py does)


if __name__ == "__main__":
    main()
