"""Time our EfficientDet-D0 against effdet's ``tf_efficientdet_d0`` in one process, on one device.

    python tools/bench_detection.py                  # CPU: 512 px, train batch 2, inference batch 1
    python tools/bench_detection.py --rounds 21      # on a GPU also AMP bf16 + channels_last and peak memory

Both models hold the same weights (effdet's random initialisation, loaded through our importer) and
see the same images and boxes. Train step: forward, target assignment, loss, backward and an SGD step
(effdet: ``DetBenchTrain`` with its anchor labeler). Inference: eval mode, no grad, post-processing
included (effdet: ``DetBenchPredict``). Rounds interleave the two models and alternate which goes
first; each round gives a ratio effdet time / our time (> 1: ours is faster) and the table prints the
median of those per-round ratios (robust to a shared machine) and img/s from the median times.

On the CPU our detector runs channels-last internally whatever the input's format (oneDNN's NHWC
kernels); ``--peer-channels-last`` gives effdet channels-last weights and inputs in the fp32 rows too,
to separate that from the rest (target assignment, loss, fusion).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.detection import build_detector  # noqa: E402
from tasks.detection.weights import load_detector_weights  # noqa: E402


def build_models(size: int, num_classes: int):
    import effdet

    torch.manual_seed(0)
    theirs = effdet.create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False,
                                 num_classes=num_classes, image_size=(size, size))
    ours = build_detector("tf_efficientdet_d0", num_classes)
    load_detector_weights(ours, theirs.state_dict(), "effdet tf_efficientdet_d0 (random init)")
    return ours, theirs


def random_targets(batch: int, size: int, num_classes: int, boxes_per_image: int, device):
    generator = torch.Generator().manual_seed(0)
    xy = torch.rand(batch, boxes_per_image, 2, generator=generator) * size * 0.7
    wh = torch.rand(batch, boxes_per_image, 2, generator=generator) * size * 0.3 + 8
    boxes = torch.cat([xy, xy + wh], -1).to(device)
    labels = torch.randint(0, num_classes, (batch, boxes_per_image), generator=generator).to(device)
    ours = [{"boxes": b, "labels": l} for b, l in zip(boxes, labels)]
    theirs = {"bbox": boxes[..., [1, 0, 3, 2]], "cls": (labels + 1).float()}  # effdet: y-x order, 1-based
    return ours, theirs


def make_steps(ours, theirs, mode: str, batch: int, size: int, num_classes: int, device, channels_last: bool):
    from effdet.bench import DetBenchPredict, DetBenchTrain

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    if mode == "infer":
        ours.eval()
        bench = DetBenchPredict(theirs).to(device).eval()

        @torch.no_grad()
        def step_ours():
            return ours(images)

        @torch.no_grad()
        def step_theirs():
            return bench(images)
        return {"effdense": step_ours, "effdet": step_theirs}
    targets_ours, targets_theirs = random_targets(batch, size, num_classes, 5, device)
    ours.train()
    bench = DetBenchTrain(theirs, create_labeler=True).to(device).train()
    optimizers = {name: torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
                  for name, model in (("effdense", ours), ("effdet", theirs))}

    def step_ours():
        optimizers["effdense"].zero_grad(set_to_none=True)
        losses = ours(images, targets_ours)
        sum(losses.values()).backward()
        optimizers["effdense"].step()

    def step_theirs():
        optimizers["effdet"].zero_grad(set_to_none=True)
        bench(images, targets_theirs)["loss"].backward()
        optimizers["effdet"].step()
    return {"effdense": step_ours, "effdet": step_theirs}


def timed(step, device, amp: bool, iters: int) -> tuple[float, int]:
    """Seconds for ``iters`` steps and the peak memory they allocated (CUDA; 0 on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        for _ in range(iters):
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return time.perf_counter() - start, peak


def bench(steps: dict, device, amp: bool, iters: int, rounds: int, warmup: int):
    for step in steps.values():
        timed(step, device, amp, warmup)  # oneDNN primitives, cuDNN autotune, allocator
    times = {name: [] for name in steps}
    peaks = {name: 0 for name in steps}
    ratios = []
    for r in range(rounds):
        order = list(steps) if r % 2 == 0 else list(reversed(steps))
        for name in order:
            seconds, peak = timed(steps[name], device, amp, iters)
            times[name].append(seconds)
            peaks[name] = max(peaks[name], peak)
        ratios.append(times["effdet"][-1] / times["effdense"][-1])
    return {name: statistics.median(t) for name, t in times.items()}, statistics.median(ratios), peaks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--classes", type=int, default=90)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--iters", type=int, default=None, help="steps per timed round (default: 1 CPU, 20 GPU)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peer-channels-last", action="store_true", help="effdet channels-last in fp32 too")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    iters = args.iters or (20 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    ours, theirs = build_models(args.size, args.classes)
    ours.to(device)
    theirs.to(device)
    settings = [("fp32" + (" (both NHWC)" if args.peer_channels_last else ""), False, args.peer_channels_last)]
    if device.type == "cuda":
        settings.append(("bf16+channels_last", True, True))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device={device} ({name})  size={args.size}  rounds={args.rounds} x {iters} steps  torch={torch.__version__}")
    print(f"{'mode':<7}{'batch':>6}  {'precision':<20}{'ours img/s':>12}{'effdet img/s':>14}{'ours/effdet':>13}"
          + (f"{'ours MiB':>10}{'effdet MiB':>12}" if device.type == "cuda" else ""))
    for mode, batch in (("train", args.train_batch), ("infer", args.infer_batch)):
        for label, amp, channels_last in settings:
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            ours.to(memory_format=fmt)
            theirs.to(memory_format=fmt)
            steps = make_steps(ours, theirs, mode, batch, args.size, args.classes, device, channels_last)
            medians, ratio, peaks = bench(steps, device, amp, iters, args.rounds, args.warmup)
            row = (f"{mode:<7}{batch:>6}  {label:<20}{batch * iters / medians['effdense']:>12.2f}"
                   f"{batch * iters / medians['effdet']:>14.2f}{ratio:>12.3f}x")
            if device.type == "cuda":
                row += f"{peaks['effdense'] / 2**20:>10.0f}{peaks['effdet'] / 2**20:>12.0f}"
            print(row, flush=True)


if __name__ == "__main__":
    main()
