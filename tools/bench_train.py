"""Training throughput of the effdense engine against a minimal hand-written PyTorch loop.

    python tools/bench_train.py                       # CPU: B0, batch 16, 128 px
    python tools/bench_train.py --batch 128 --size 224  # on a GPU: also bf16 + channels_last, and timm's B0
    python tools/bench_train.py --overhead              # the engine's own microseconds per step

Same model (our B0 classification task), same in-memory uint8 data, same optimizer (SGD,
momentum 0.9) and step count. The engine run is ``Trainer.fit`` with ``train.max_steps`` (so it
includes the engine's per-step work: schedule, loss tracking, progress accounting), with
checkpointing and the run directory off. Rounds alternate; the fastest round
counts (as in timeit: noise only ever adds time). Prints
img/s and the ratio engine/hand (the engine's overhead must stay under 5%).
On a GPU it also runs the hand loop with timm's ``efficientnet_b0`` under the same settings.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.classification import ClassificationTask, build_classifier  # noqa: E402
from tasks.config import ClassificationConfig as Config  # noqa: E402
from tasks.engine import Trainer  # noqa: E402


def make_loader(batch, size, steps, device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch * steps, 3, size, size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 1000, (batch * steps,), generator=generator)
    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=True, drop_last=True,
                      pin_memory=device.type == "cuda", generator=torch.Generator().manual_seed(0))


def engine_config(args, device, amp, channels_last):
    cfg = Config()
    cfg.data.batch_size = args.batch
    cfg.optim.name, cfg.optim.lr, cfg.optim.base_batch_size = "sgd", 0.01, args.batch
    cfg.optim.weight_decay, cfg.schedule.name = 0.0, "constant"
    cfg.loss.label_smoothing = 0.0
    t = cfg.train
    t.epochs, t.device = 1 << 30, str(device)
    t.amp, t.channels_last, t.progress, t.log_every = ("bf16" if amp else "none"), channels_last, False, 50
    return cfg


def hand_loop(model, loader, device, amp, channels_last, steps):
    """The minimal loop: uint8 to device, normalise, forward, loss, backward, step."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(device, memory_format=fmt).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1) * 255
    scale = 1 / (torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1) * 255)

    def run():
        done = 0
        for images, labels in loader:
            images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)
            labels = labels.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = loss_fn(model(images.float().sub_(mean).mul_(scale)), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
        if device.type == "cuda":
            torch.cuda.synchronize()
    return run


def engine_loop(args, loader, device, amp, channels_last):
    """The engine's training epoch (one pass over ``loader``: ``steps`` batches); the trainer is built
    once, like the hand loop's model and optimizer, so both time steady-state steps."""
    task = ClassificationTask(build_classifier(args.model), label_smoothing=0.0)
    trainer = Trainer(task, {"train": loader, "val": loader}, engine_config(args, device, amp, channels_last),
                      create_run_dir=False)
    epochs = iter(range(1 << 30))

    def run():
        start = time.perf_counter()
        trainer._train_epoch(next(epochs))  # the training steps only; fit() adds evaluation and checkpoints
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


class TinyTask(torch.nn.Module):
    """A model so small that the per-step cost of the loop itself shows (``--overhead``)."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(8, 10))

    def forward(self, images, targets=None):
        logits = self.net(images.float() / 255)
        return {"cross_entropy": torch.nn.functional.cross_entropy(logits, targets)} if self.training else logits


def measure_overhead(args, rounds: int = 5, steps: int = 400):
    """Microseconds per step of the engine minus a hand loop, with a tiny model on the CPU."""
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randint(0, 256, (4 * steps, 3, 8, 8), dtype=torch.uint8, generator=generator),
                         torch.randint(0, 10, (4 * steps,), generator=generator))
    loader = DataLoader(data, batch_size=4)
    args.batch, args.steps = 4, steps
    trainer = Trainer(TinyTask(), {"train": loader}, engine_config(args, torch.device("cpu"), False, False),
                      create_run_dir=False)
    model = TinyTask()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def hand():
        for images, labels in loader:
            model(images, labels)["cross_entropy"].backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    hand_s, engine_s = [], []
    for epoch in range(rounds):
        hand_s.append(timed(hand))
        engine_s.append(timed(lambda: trainer._train_epoch(epoch)))
    hand_us, engine_us = min(hand_s) / steps * 1e6, min(engine_s) / steps * 1e6
    print(f"per step (tiny model, CPU, 1 thread): hand {hand_us:.0f} us, engine {engine_us:.0f} us, "
          f"engine overhead {engine_us - hand_us:.0f} us")


def timed(run):
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-b0")
    parser.add_argument("--batch", type=int, default=None, help="default 16 on CPU, 128 on GPU")
    parser.add_argument("--size", type=int, default=None, help="default 128 on CPU, 224 on GPU")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round (default 8 CPU, 50 GPU)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--overhead", action="store_true",
                        help="instead: the engine's own per-step cost, with a tiny model on the CPU")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.overhead:
        return measure_overhead(args)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.batch = args.batch or (128 if gpu else 16)
    args.size = args.size or (224 if gpu else 128)
    args.steps = args.steps or (50 if gpu else 8)
    if gpu:
        torch.backends.cudnn.benchmark = True
    loader = make_loader(args.batch, args.size, args.steps, device)
    settings = [("fp32", False, False)] + ([("bf16+channels_last", True, True)] if gpu else [])
    print(f"device={device}  model={args.model}  batch={args.batch}  size={args.size}  steps/round={args.steps}  "
          f"rounds={args.rounds}  torch={torch.__version__}")
    for label, amp, channels_last in settings:
        torch.manual_seed(0)
        loops = {"hand": hand_loop(build_classifier(args.model), loader, device, amp, channels_last, args.steps)}
        engine = engine_loop(args, loader, device, amp, channels_last)
        if gpu:
            import timm

            loops["timm-hand"] = hand_loop(timm.create_model("efficientnet_b0"), loader, device, amp, channels_last,
                                           args.steps)
        for run in loops.values():
            run()  # warm-up
        engine()
        seconds = {name: [] for name in [*loops, "engine"]}
        for _ in range(args.rounds):
            for name, run in loops.items():
                seconds[name].append(timed(run))
            seconds["engine"].append(engine())
        rate = {name: args.batch * args.steps / min(values) for name, values in seconds.items()}
        line = f"{label:<20}" + "  ".join(f"{name} {value:8.1f} img/s" for name, value in rate.items())
        line += f"  engine/hand {rate['engine'] / rate['hand']:.3f}x"
        if "timm-hand" in rate:
            line += f"  ours/timm (hand loop) {rate['hand'] / rate['timm-hand']:.3f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
