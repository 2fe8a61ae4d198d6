"""Why a trained detector fires on empty, low-contrast images: activation sizes per stage, by BatchNorm statistics.

    python bench/detector_activations.py RUN_DIR                # RUN_DIR/last.pt and RUN_DIR/config.yaml
    python bench/detector_activations.py RUN_DIR --weights best.pt --images 40

Splits the run's validation images by contrast (the per-image standard deviation of the pixels: the lowest
``--low`` fraction against the rest) and prints, for each tap (the backbone's three taps, the BiFPN's P3 and
P7, the class logits, the box size codes), the mean absolute activation on each group and their ratio, with
the BatchNorm layers in three states:

- ``running``: the checkpoint's running statistics, as evaluation uses them;
- ``batch``: each batch normalised by its own statistics (train-mode BatchNorm, no update);
- ``recomputed``: running statistics recomputed over the training split with the weights as they are
  (``torch.optim.swa_utils.update_bn``: a cumulative average, not a momentum);

and, per state, the largest class logit and size code on the images that hold no object. It also lists the
BatchNorm layers whose running statistics are furthest from the recomputed ones (|log var ratio|), which is
what tells a statistics lag (momentum too slow for the run's length) from a model that really activates.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import load  # noqa: E402
from tasks.data import build_loaders  # noqa: E402
from tasks.registry import build_with_weights  # noqa: E402


def taps(task) -> dict[str, torch.Tensor]:
    """Hooks that record the detector's intermediate outputs in ``store`` (name -> tensor), one forward at a time."""
    store: dict[str, torch.Tensor] = {}
    net = task.net

    def keep(name, pick):
        def hook(_module, _inputs, output):
            for key, value in pick(output):
                store[f"{name}{key}"] = value.detach()
        return hook

    net.backbone.register_forward_hook(keep("backbone/", lambda out: list(out.items())[-3:] if isinstance(out, dict)
                                            else [(str(i), v) for i, v in enumerate(out)][-3:]))
    net.fpn.register_forward_hook(keep("bifpn/", lambda out: [("P3", out[0]), ("P7", out[-1])]))
    net.class_net.register_forward_hook(keep("class_logits", lambda out: [("", torch.cat([o.flatten(1) for o in out], 1))]))
    net.box_net.register_forward_hook(keep("box_codes", lambda out: [("", torch.cat([o.flatten(1) for o in out], 1))]))
    return store


def measure(task, store, images: torch.Tensor, targets: list[dict], low: torch.Tensor, bn_mode: str) -> dict:
    """Per tap: (mean |x| on low-contrast images, on the others); and the max logit / size code on empty images."""
    task.eval()
    if bn_mode == "batch":
        for module in task.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.train()
                module.track_running_stats_saved = module.momentum
                module.momentum = 0.0  # normalise by the batch, leave the running statistics as they are
    with torch.no_grad():
        task.net(task.normalize(images))
    if bn_mode == "batch":
        for module in task.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.momentum = module.track_running_stats_saved
                module.eval()
    empty = torch.tensor([len(t["boxes"]) == 0 for t in targets])
    rows = {}
    for name, value in store.items():
        per_image = value.abs().flatten(1).mean(1)
        rows[name] = (float(per_image[low].mean()), float(per_image[~low].mean()))
    num_classes = task.net.num_classes
    logits = store["class_logits"]
    codes = store["box_codes"].view(len(images), -1)
    size_codes = codes.view(len(images), -1, 4)[..., 2:] if codes.shape[1] % 4 == 0 else codes
    rows["empty: max logit"] = float(logits[empty].max()) if empty.any() else math.nan
    rows["empty: max size code"] = float(size_codes[empty].max()) if empty.any() else math.nan
    del num_classes
    return rows


def bn_drift(running: nn.Module, recomputed: nn.Module, top: int = 8) -> list[tuple[str, float, float]]:
    """The BatchNorm layers whose running variance is furthest (in log ratio) from the recomputed one."""
    rows = []
    fresh = dict(recomputed.named_modules())
    for name, module in running.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            other = fresh[name]
            ratio = (module.running_var + module.eps) / (other.running_var + other.eps)
            worst = float(ratio.log().abs().max())
            rows.append((name, worst, float(ratio.log().abs().mean())))
    return sorted(rows, key=lambda r: -r[1])[:top]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a training run directory (its config.yaml and weights)")
    parser.add_argument("--weights", default="last.pt", help="weights file in the run directory (default last.pt)")
    parser.add_argument("--images", type=int, default=40, help="validation images measured (default 40)")
    parser.add_argument("--low", type=float, default=0.25, help="fraction of images called low-contrast (default 0.25)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    run = Path(args.run)
    cfg = load(str(run / "config.yaml"), ["train.device=cpu", "data.workers=0", "data.check=off", *args.overrides])
    task = build_with_weights(cfg, str(run / args.weights))
    cfg.data.eval_batch_size = args.images
    loaders = build_loaders(cfg)
    images, targets = next(iter(loaders["val"]))
    contrast = images.float().flatten(1).std(1)
    low = contrast <= contrast.quantile(args.low)
    print(f"{len(images)} validation images; low-contrast: pixel std <= {float(contrast.quantile(args.low)):.1f} "
          f"({int(low.sum())} images), the rest up to {float(contrast.max()):.1f}; "
          f"{sum(len(t['boxes']) == 0 for t in targets)} without objects")
    store = taps(task)
    results = {"running": measure(task, store, images, targets, low, "running"),
               "batch": measure(task, store, images, targets, low, "batch")}
    recomputed = copy.deepcopy(task)
    torch.optim.swa_utils.update_bn(((images_, targets_) for images_, targets_ in loaders["train"]),
                                    _Normalised(recomputed))
    store_re = taps(recomputed)
    results["recomputed"] = measure(recomputed, store_re, images, targets, low, "running")
    names = list(results["running"])
    print(f"{'tap':24s} " + " ".join(f"{mode:>22s}" for mode in results))
    print(f"{'':24s} " + " ".join(f"{'low':>7s} {'rest':>7s} {'ratio':>6s}" for _ in results))
    for name in names:
        cells = []
        for mode in results:
            value = results[mode][name]
            if isinstance(value, tuple):
                cells.append(f"{value[0]:7.3f} {value[1]:7.3f} {value[0] / max(value[1], 1e-12):6.2f}")
            else:
                cells.append(f"{value:22.2f}")
        print(f"{name:24s} " + " ".join(cells))
    print("\nBatchNorm layers furthest from recomputed statistics (|log running var / recomputed var|: max, mean):")
    for name, worst, mean in bn_drift(task, recomputed):
        print(f"  {name:60s} {worst:6.2f} {mean:6.2f}")
    return 0


class _Normalised(nn.Module):
    """update_bn feeds the loader's first element (uint8 images): the detector's net on normalised images."""

    def __init__(self, task):
        super().__init__()
        self.task = task

    def forward(self, images):
        return self.task.net.forward_raw(self.task.normalize(images))


if __name__ == "__main__":
    sys.exit(main())
