"""Where one detector training step goes: data, target assignment, forward, loss, backward, optimizer.

    python bench/profile_detector_step.py                          # D0 (demo preset), 128 and 256 px, CPU
    python bench/profile_detector_step.py --sizes 256 --ops 15     # also torch.profiler's top operators
    python bench/profile_detector_step.py --preset configs/detection/efficientdet_d0_custom.yaml

The step is the trainer's (``tasks.engine.Trainer``): the preset's model, optimizer, batch and augmentation
on a synthetic COCO set of shapes (``tasks.data.synthetic.detection``) at each ``--sizes``. Each part is timed
on its own, median of ``--rounds`` after ``--warmup`` steps, on the same batch:

- data: one batch from a fresh iterator of the training loader with ``workers=0`` (reading, decoding,
  augmentation and collation of ``batch`` images in one process: the work the loader's workers share), and
  the wait for a batch in the preset's own loader (its workers, persistent or not) over a whole epoch;
- assign: the anchors' targets for the batch (``net.targets``);
- forward: backbone + BiFPN + class/box nets (``EfficientDet.forward``), with autograd recording;
- loss: forward + assignment + loss minus the two above;
- backward: ``loss.backward()``;
- optimizer: gradient clipping, ``optimizer.step()``, ``zero_grad`` and the EMA update when the preset has one.

The parts are timed in turn within each real step (CPU work is synchronous); their sum is compared with a
whole step timed as the trainer runs it (the task module's forward, ``loss.backward()``, the optimizer). ``--ops N`` prints
the N operators with the most self CPU time over a few whole steps (torch.profiler). Run it on a quiet
machine: another busy process on the cores slows a step many times over.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.efficientdet import EfficientDet  # noqa: E402
from tasks.config import load  # noqa: E402
from tasks.data import build_loaders  # noqa: E402
from tasks.data.synthetic.detection import write_coco  # noqa: E402
from tasks.engine.optim import ModelEMA, build_optimizer  # noqa: E402
from tasks.registry import build_model  # noqa: E402

PARTS = ("data", "assign", "forward", "loss", "backward", "optimizer")


def _clock(device: torch.device):
    """time.perf_counter, after the device's queued work (CUDA runs asynchronously)."""
    if device.type != "cuda":
        return time.perf_counter

    def now() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()
    return now


def timed(fn, rounds: int, warmup: int) -> float:
    """Median seconds of ``fn()`` over ``rounds`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def loader_wait(loader, batches: int) -> float:
    """Mean seconds the training loop waits for a batch, over ``batches`` batches of a fresh iterator (the
    first, which pays for the workers' start, included: that is what each epoch pays without persistent workers)."""
    start, count = time.perf_counter(), 0
    for count, _ in enumerate(loader, start=1):
        if count >= batches:
            break
    return (time.perf_counter() - start) / max(count, 1)


def profile(preset: str, size: int, data_root: Path, overrides: list[str], rounds: int, warmup: int,
            ops: int, device: str = "cpu") -> dict:
    cfg = load(preset, [f"data.root={data_root}", "data.train_split=train", "data.val_split=val",
                        f"data.image_size={size}", f"train.device={device}", "data.check=off", *overrides])
    device = torch.device(device)
    task = build_model(cfg).train().to(device)
    net = task.net
    optimizer = build_optimizer(task, cfg)
    ema = ModelEMA(task, cfg.train.ema_decay, warmup=cfg.train.ema_warmup) if cfg.train.ema else None
    clip = cfg.train.clip_grad

    workers = cfg.data.workers
    cfg.data.workers = 0
    single = build_loaders(cfg, ["train"])["train"]
    cfg.data.workers = workers
    images, targets = next(iter(single))
    images = images.to(device)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    now = _clock(device)
    amp = cfg.train.amp if device.type == "cuda" else "none"  # the trainer's autocast (CUDA only here)

    def autocast():
        dtype = torch.bfloat16 if amp == "bf16" else torch.float16
        return torch.autocast(device.type, dtype=dtype, enabled=amp != "none")

    data_seconds = timed(lambda: next(iter(single)), rounds, 1)
    preset_loader = build_loaders(cfg, ["train"])["train"]
    wait_seconds = loader_wait(preset_loader, min(len(preset_loader), 8))

    def step(parts: dict | None = None):
        """One training step as the trainer runs it, each part timed in turn (CPU work is synchronous)."""
        marks = [now()]
        with autocast():
            x = task.normalize(images)
            class_maps, box_maps = EfficientDet.forward(net, x)
            marks.append(now())
            sizes = [m.shape[-2:] for m in class_maps]
            anchors = net.anchors(x.shape[-2:], sizes, x.device)
            assigned = net.targets(targets, anchors, sizes)
            marks.append(now())
            losses = net.training_loss(class_maps, box_maps, x.shape[-2:], targets, assigned=assigned)
            loss = sum(losses.values())
        marks.append(now())
        loss.backward()
        marks.append(now())
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in task.parameters() if p.requires_grad], clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(task)
        marks.append(now())
        if parts is not None:
            for name, a, b in zip(("forward", "assign", "loss", "backward", "optimizer"), marks, marks[1:]):
                parts.setdefault(name, []).append(b - a)

    def whole():  # the task module's own training forward, as the trainer calls it
        with autocast():
            loss = sum(task(images, targets).values())
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_([p for p in task.parameters() if p.requires_grad], clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(task)

    parts: dict[str, list[float]] = {}
    if hasattr(net, "training_loss"):  # older checkouts (before issue 22) time the whole step only
        for _ in range(warmup):
            step()
        for _ in range(rounds):
            step(parts)
    else:
        parts = {name: [float("nan")] for name in ("forward", "assign", "loss", "backward", "optimizer")}
    row = {"size": size, "batch": images.shape[0], "data": data_seconds, "loader_wait": wait_seconds,
           **{name: statistics.median(times) for name, times in parts.items()},
           "step": timed(lambda: (whole(), now()), rounds, 0 if parts else warmup), "threads": torch.get_num_threads()}
    if ops:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                whole()
        row["ops"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=ops)
    return row


def table(rows: list[dict]) -> str:
    head = (f"{'size':>5} {'batch':>5} | {'data':>7} {'wait':>7} | {'assign':>7} {'forward':>8} {'loss':>7} "
            f"{'backward':>8} {'optim':>7} | {'sum':>7} {'step':>7} | model share (fwd/bwd/assign+loss/opt)")
    lines = [head, "-" * len(head)]
    for r in rows:
        model = r["assign"] + r["forward"] + r["loss"] + r["backward"] + r["optimizer"]
        share = "/".join(f"{100 * v / model:.0f}%" for v in (r["forward"], r["backward"], r["assign"] + r["loss"],
                                                            r["optimizer"]))
        lines.append(f"{r['size']:>5} {r['batch']:>5} | {r['data']:7.3f} {r['loader_wait']:7.3f} | "
                     f"{r['assign']:7.3f} {r['forward']:8.3f} {r['loss']:7.3f} {r['backward']:8.3f} "
                     f"{r['optimizer']:7.3f} | {model:7.3f} {r['step']:7.3f} | {share}")
    lines.append("seconds per step (medians). data: one batch read + augmented in one process (workers=0); "
                 "wait: the training loop's mean wait per batch with the preset's loader (first batch included).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="configs/demo/detection.yaml", help="detection preset (default: the demo's D0)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="input sizes (default 128 256)")
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per part (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls before each part")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda (make gpu-report; with the preset's "
                                                        "train.amp there)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, all cores)")
    parser.add_argument("--ops", type=int, default=0, help="also print the N operators with most self CPU time")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config overrides, e.g. --set data.batch_size=8 (repeatable)")
    parser.add_argument("--json", help="also write the rows to this file (a new file: an existing one is refused)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.json and Path(args.json).exists():
        parser.error(f"--json {args.json} exists; give a new file name")
    torch.manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="effdense-profile-") as tmp:
        for size in args.sizes:
            root = write_coco(Path(tmp) / f"shapes{size}", train_images=64, val_images=4, min_size=size,
                              max_size=size + size // 2)
            row = profile(args.preset, size, root, args.overrides, args.rounds, args.warmup, args.ops, args.device)
            rows.append(row)
            if "ops" in row:
                print(f"--- top operators, {size} px (3 whole steps) ---\n{row.pop('ops')}")
    print(f"preset {args.preset} {' '.join(args.overrides)}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
