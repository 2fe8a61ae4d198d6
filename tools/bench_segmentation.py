"""Time our U-Net B0 against smp's ``Unet("efficientnet-b0")`` and ``Unet("tu-efficientnet_b0")``, and
our BiFPN segmentation head beside our U-Net at the same backbone.

    python tools/bench_segmentation.py                  # CPU here; on a GPU also AMP bf16 + channels_last
    python tools/bench_segmentation.py --rounds 1       # a quick check that it runs
    python tools/bench_segmentation.py --backbone efficientnet-b3 --no-peers   # U-Net vs BiFPN at B3

Same decoder on the three U-Nets (smp's defaults: channels 256..16, batchnorm, nearest); the BiFPN
head (``build_segmenter(head="bifpn")``) has the EfficientDet row's width and repeats at the
backbone's scale (B0: 64 x 3), levels P2..P7. Same process and device: one training step (forward,
cross-entropy, backward, SGD) at batch 2, 512x512, and inference (eval, no grad) at batch 1,
1024x2048. Rounds are interleaved and alternate the order of the models; each round times every
model once, and the result is the median over rounds of the per-round ratio ours/peer (>1 means our
U-Net is faster; for the BiFPN row: its time over our U-Net's, >1 means the BiFPN head is slower).
On CUDA each model's peak memory of its warm-up step is reported too. Nothing downloads
(encoder_weights=None).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.segmentation import build_segmenter  # noqa: E402

REFERENCE, BIFPN = "effdense unet", "effdense bifpn"  # our U-Net (the reference of every ratio), our BiFPN head


def peers(backbone: str) -> dict[str, str]:
    """smp's U-Net encoders of the same scale: EfficientNet-PyTorch's and timm's through ``tu-``."""
    scale = backbone.removeprefix("efficientnet-")
    return {f"smp efficientnet-{scale}": f"efficientnet-{scale}",
            f"smp tu-efficientnet_{scale}": f"tu-efficientnet_{scale}"}


def build_models(classes: int, backbone: str = "efficientnet-b0", with_peers: bool = True) -> dict[str, nn.Module]:
    models = {REFERENCE: build_segmenter(backbone, classes), BIFPN: build_segmenter(backbone, classes, head="bifpn")}
    if with_peers:
        import segmentation_models_pytorch as smp

        for label, encoder in peers(backbone).items():
            models[label] = smp.Unet(encoder, encoder_weights=None, classes=classes)
    return models


def make_step(model: torch.nn.Module, mode: str, images: torch.Tensor, masks: torch.Tensor):
    if mode == "infer":
        model.eval()

        @torch.no_grad()
        def step():
            return model(images)
        return step
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(images).float(), masks, ignore_index=255).backward()
        optimizer.step()
    return step


def timed(step, device: torch.device, amp: bool) -> float:
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(models, device, mode, batch, size, amp, channels_last, rounds, classes):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, *size, device=device).contiguous(memory_format=fmt)
    masks = torch.randint(0, classes, (batch, *size), device=device)
    steps, peaks = {}, {}
    for name, model in models.items():
        model.to(device, memory_format=fmt)
        steps[name] = make_step(model, mode, images, masks)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        timed(steps[name], device, amp)  # warm-up (cudnn autotune, allocator)
        if device.type == "cuda":
            peaks[name] = torch.cuda.max_memory_allocated(device) / 2**20
    names = list(models)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(steps[name], device, amp))
    for model in models.values():
        model.cpu()
    return times, peaks


def report(title, times, peaks, batch):
    print(f"\n{title}")
    ours = times[REFERENCE]
    for name, values in times.items():
        line = f"  {name:<24} {batch / statistics.median(values):9.2f} img/s"
        if name == BIFPN:
            ratios = [b / a for a, b in zip(ours, values)]  # per round: BiFPN time / U-Net time
            line += f"   bifpn/unet time {statistics.median(ratios):.3f}x (median of {len(ratios)} rounds)"
        elif name != REFERENCE:
            ratios = [b / a for a, b in zip(ours, values)]  # per round: peer time / our time
            line += f"   ours/peer {statistics.median(ratios):.3f}x (median of {len(ratios)} rounds)"
        if name in peaks:
            line += f"   peak {peaks[name]:8.0f} MiB"
            if name == BIFPN:
                line += f" (bifpn/unet {peaks[name] / peaks[REFERENCE]:.2f}x)"
            elif name != REFERENCE:
                line += f" (ours/peer {peaks[REFERENCE] / peaks[name]:.2f}x)"
        print(line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11, help="interleaved rounds (median of per-round ratios)")
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--train-size", type=int, nargs=2, default=(512, 512), metavar=("H", "W"))
    parser.add_argument("--train-batch", type=int, default=2)
    parser.add_argument("--infer-size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--infer-batch", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-cpu", action="store_true", help="only the CUDA rows (when a GPU exists)")
    parser.add_argument("--backbone", default="efficientnet-b0", help="efficientnet-b0 .. -b7 (both heads and peers)")
    parser.add_argument("--no-peers", action="store_true", help="only our U-Net and BiFPN heads (no smp)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models = build_models(args.classes, args.backbone, not args.no_peers)
    configs = [] if args.no_cpu else [(torch.device("cpu"), False, False)]
    if torch.cuda.is_available():
        configs += [(torch.device("cuda"), False, False), (torch.device("cuda"), True, True)]
    for device, amp, channels_last in configs:
        flavour = f"{device.type}" + (", AMP bf16 + channels_last" if amp else ", fp32")
        times, peaks = bench(models, device, "train", args.train_batch, args.train_size, amp, channels_last,
                             args.rounds, args.classes)
        report(f"train step, batch {args.train_batch}, {args.train_size[0]}x{args.train_size[1]} ({flavour})",
               times, peaks, args.train_batch)
        times, peaks = bench(models, device, "infer", args.infer_batch, args.infer_size, amp, channels_last,
                             args.rounds, args.classes)
        report(f"inference, batch {args.infer_batch}, {args.infer_size[0]}x{args.infer_size[1]} ({flavour})",
               times, peaks, args.infer_batch)


if __name__ == "__main__":
    main()
