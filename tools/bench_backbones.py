"""Time our EfficientNet-B0 classifier against timm's and torchvision's B0 in one process.

    python tools/bench_backbones.py                 # CPU here; on a GPU also AMP bf16 + channels_last
    python tools/bench_backbones.py --batch 64 --model efficientnet-b3 --peer-timm efficientnet_b3

Inference (eval, inference_mode) and one training step (forward, backward, SGD) at the same batch
and size. Every model runs once in every round, in an order that alternates from round to round; each
round gives a ratio ours/peer (>1: we are faster) and the table shows the median of those paired
ratios (on a shared machine two identical models differ by up to 10% in fastest-of-N, which pairing
cancels) and the median img/s. ``--same-weights`` loads timm's random weights into ours (identical
logits), so that only the implementations differ.

    python tools/bench_backbones.py --model efficientnet-lite0 --peer-timm efficientnet_lite0 --peer-torchvision ''
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.classification import build_classifier  # noqa: E402


def build_models(args):
    import timm
    import torchvision

    models = {"effdense": build_classifier(args.model)}
    models["timm"] = timm.create_model(args.peer_timm, pretrained=False)
    if args.same_weights:
        from backbones.weights import load_state

        load_state(models["effdense"], models["timm"].state_dict(), f"timm {args.peer_timm}")
    if args.peer_torchvision:
        models["torchvision"] = getattr(torchvision.models, args.peer_torchvision)()
    return models


def make_step(model, mode, images, labels):
    if mode == "infer":
        model.eval()

        @torch.inference_mode()
        def step():
            return model(images)
    else:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        loss_fn = torch.nn.CrossEntropyLoss()

        def step():
            optimizer.zero_grad(set_to_none=True)
            loss_fn(model(images), labels).backward()
            optimizer.step()
    return step


def run(step, device, amp, iters):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
        sync()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        sync()
    return time.perf_counter() - start


def bench(models, device, mode, batch, size, amp, channels_last, iters, rounds):
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 1000, (batch,), device=device)
    steps = {}
    for name, model in models.items():
        model.to(device, memory_format=fmt)
        steps[name] = make_step(model, mode, images, labels)
        run(steps[name], device, amp, max(2, iters // 3))  # warm-up (cudnn autotune, allocator)
    times = {name: [] for name in models}
    names = list(steps)
    for index in range(rounds):
        for name in (names if index % 2 == 0 else names[::-1]):  # alternate the order: no model always goes first
            times[name].append(run(steps[name], device, amp, iters))
    rates = {name: batch * iters / statistics.median(t) for name, t in times.items()}
    ratios = {name: statistics.median(p / o for p, o in zip(t, times["effdense"]))
              for name, t in times.items() if name != "effdense"}
    return rates, ratios


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="efficientnet-b0", help="effdense backbone name")
    parser.add_argument("--peer-timm", default="efficientnet_b0", help="timm model name")
    parser.add_argument("--peer-torchvision", default="efficientnet_b0", help="torchvision model ('' to skip)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=None, help="steps per timed round (default: 1 CPU, 50 GPU)")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--same-weights", action="store_true", help="load timm's weights into ours")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    iters = args.iters or (50 if device.type == "cuda" else 1)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    models = build_models(args)
    settings = [("fp32", False, False)]
    if device.type == "cuda":
        settings.append(("bf16+channels_last", True, True))
    print(f"device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads)  batch={args.batch}  size={args.size}  torch={torch.__version__}")
    header = f"{'mode':<7}{'precision':<20}" + "".join(f"{n + ' img/s':>18}" for n in models)
    header += "".join(f"{'ours/' + n + ' (median)':>26}" for n in models if n != "effdense")
    print(header)
    for mode in ("infer", "train"):
        for label, amp, channels_last in settings:
            rates, ratios = bench(models, device, mode, args.batch, args.size, amp, channels_last, iters, args.rounds)
            row = f"{mode:<7}{label:<20}" + "".join(f"{rates[n]:>18.1f}" for n in models)
            row += "".join(f"{ratios[n]:>25.3f}x" for n in models if n != "effdense")
            print(row, flush=True)


if __name__ == "__main__":
    main()
