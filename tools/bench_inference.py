"""Inference with BatchNorm folded (backbones.fuse_for_inference) against unfused and against the peers.

    python tools/bench_inference.py                      # CPU here; on a GPU also AMP bf16 + channels_last
    python tools/bench_inference.py --rounds 1 --iters 1 --cls-size 64 --seg-size 64 64 --det-size 128   # smoke

Three groups, each in one process on one device: our B0 classifier (fused, unfused) and timm's
``efficientnet_b0``; our U-Net B0 (fused, unfused) and smp's ``Unet("efficientnet-b0")``
(encoder_weights=None); our ``tf_efficientdet_d0`` (fused, unfused; TF "SAME" padding like the peer)
and effdet's ``tf_efficientdet_d0`` in ``DetBenchPredict`` (pretrained_backbone=False), both with
top-k + NMS included. Eval mode, ``inference_mode``, random weights (nothing downloads). Every model
runs ``--iters`` calls once per round, in an order that alternates from round to round; the table shows
the median img/s and, for each model, the median over rounds of the per-round ratio of its time to
our unfused model's (>1: that model is slower than ours unfused; the fused row's inverse is the gain).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backbones.fusion import fuse_for_inference  # noqa: E402
from tasks.classification import build_classifier  # noqa: E402
from tasks.segmentation import build_segmenter  # noqa: E402

BASELINE = "effdense"


def classification_models(peers: bool, size) -> dict[str, torch.nn.Module]:
    ours = build_classifier("efficientnet-b0").eval()
    models = {BASELINE: ours, "effdense fused": fuse_for_inference(ours)}
    if peers:
        import timm

        models["timm efficientnet_b0"] = timm.create_model("efficientnet_b0", pretrained=False).eval()
    return models


def segmentation_models(peers: bool, size) -> dict[str, torch.nn.Module]:
    ours = build_segmenter("efficientnet-b0", num_classes=19).eval()
    models = {BASELINE: ours, "effdense fused": fuse_for_inference(ours)}
    if peers:
        import segmentation_models_pytorch as smp

        models["smp Unet efficientnet-b0"] = smp.Unet("efficientnet-b0", encoder_weights=None, classes=19).eval()
    return models


def detection_models(peers: bool, size) -> dict[str, torch.nn.Module]:
    try:
        from tasks.detection import build_detector
    except ImportError:
        print("detection: tasks.detection.build_detector is not available; skipped")
        return {}
    ours = build_detector("tf_efficientdet_d0").eval()
    models = {BASELINE: ours, "effdense fused": fuse_for_inference(ours)}
    if peers:
        from effdet import DetBenchPredict, create_model

        peer = create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False,
                            image_size=list(size))  # effdet's anchors are built for one input size
        models["effdet tf_efficientdet_d0"] = DetBenchPredict(peer).eval()
    return models


def timed(model, images, device, amp: bool, iters: int) -> float:
    with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(iters):
            model(images)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return time.perf_counter() - start


def bench(models, shape, device, amp, channels_last, rounds, iters):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(*shape, device=device).contiguous(memory_format=fmt)
    for model in models.values():
        model.to(device, memory_format=fmt)
        timed(model, images, device, amp, max(1, iters // 2) + 1)  # warm-up (cuDNN autotune, allocator)
    names = list(models)
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(timed(models[name], images, device, amp, iters))
    for model in models.values():
        model.cpu()
    return times


def report(title, times, batch, iters):
    print(f"\n{title}")
    base = times[BASELINE]
    for name, values in times.items():
        line = f"  {name:<28}{batch * iters / statistics.median(values):10.1f} img/s"
        if name != BASELINE:
            ratio = statistics.median(v / b for v, b in zip(values, base))
            line += f"   time vs ours unfused {ratio:.3f}x (median of {len(values)} rounds)"
        print(line, flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--iters", type=int, default=None, help="calls per round (default 1 CPU, 20 CUDA)")
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 1 CPU, 8 CUDA)")
    parser.add_argument("--cls-size", type=int, default=224)
    parser.add_argument("--seg-size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--det-size", type=int, default=512)
    parser.add_argument("--only", default="cls,seg,det", help="comma-separated groups: cls, seg, det")
    parser.add_argument("--no-peers", action="store_true", help="only our fused and unfused models")
    parser.add_argument("--no-cpu", action="store_true", help="only the CUDA rows (when a GPU exists)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    settings = [] if args.no_cpu else [(torch.device("cpu"), False, False)]
    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        settings += [(torch.device("cuda"), False, False), (torch.device("cuda"), True, True)]
    groups = {"cls": ("B0 classifier", classification_models, (3, args.cls_size, args.cls_size)),
              "seg": ("U-Net B0", segmentation_models, (3, *args.seg_size)),
              "det": ("EfficientDet-D0 (with NMS)", detection_models, (3, args.det_size, args.det_size))}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""))
    for key in [k.strip() for k in args.only.split(",") if k.strip()]:
        title, build, chw = groups[key]
        models = build(not args.no_peers, chw[1:])
        if not models:
            continue
        for device, amp, channels_last in settings:
            batch = args.batch or (8 if device.type == "cuda" else 1)
            iters = args.iters or (20 if device.type == "cuda" else 1)
            flavour = "AMP bf16 + channels_last" if amp else "fp32"
            times = bench(models, (batch, *chw), device, amp, channels_last, args.rounds, iters)
            report(f"{title}, batch {batch}, {chw[1]}x{chw[2]}, {device.type} {flavour}", times, batch, iters)


if __name__ == "__main__":
    main()
