"""Parameters and GMACs of the BiFPN segmentation model per phi beside the U-Net's at the same backbone.

    python tools/seg_head_table.py                       # phi 0..7 at 512x1024, 19 classes (markdown)
    python tools/seg_head_table.py --size 1024 2048 --phis 0 3

Per phi: backbone ``efficientnet-b<phi>``; BiFPN width and repeats from the EfficientDet row of the
same phi (``heads.efficientdet_preset``: 64, 88, 112, 160, 224, 288, 384, 384 channels and
3, 4, 5, 6, 7, 7, 8, 8 cells -- the released rounding of W = 64 * 1.35^phi, D = 3 + phi), levels
P2..P7, fast fusion, the default head (refined with the s2 tap at the full width, a 2-conv classifier
at stride 2; ``--no-refine``: the paper's classifier on P2; ``--refine-width``: a narrower stride-2
stage); the U-Net with its default decoder (256..16).
Models are built on the meta device (no memory, no weights) and counted with
``torch.utils.flop_counter.FlopCounterMode`` as ``tasks.summary`` does: GMACs = FLOPs / 2 of one
image (convs and matmuls; pooling, resizing and elementwise ops are not counted). The head columns
are the whole model minus the backbone (for the U-Net: decoder + 3x3 classifier).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from heads.efficientdet import efficientdet_preset  # noqa: E402
from tasks.segmentation import build_segmenter  # noqa: E402


def measure(net: torch.nn.Module, size: tuple[int, int]) -> dict:
    """Params (M) and GMACs of ``net`` and of its backbone alone, for one image of ``size``."""
    image = torch.empty(1, 3, *size, device="meta")
    with FlopCounterMode(display=False) as total:
        net(image)
    with FlopCounterMode(display=False) as backbone:
        net.backbone(image)
    params = sum(p.numel() for p in net.parameters()) / 1e6
    backbone_params = sum(p.numel() for p in net.backbone.parameters()) / 1e6
    gmacs, backbone_gmacs = total.get_total_flops() / 2e9, backbone.get_total_flops() / 2e9
    return dict(params=params, gmacs=gmacs, head_params=params - backbone_params, head_gmacs=gmacs - backbone_gmacs,
                backbone_params=backbone_params, backbone_gmacs=backbone_gmacs)


def rows(phis, size, classes, **bifpn_options) -> list[dict]:
    out = []
    for phi in phis:
        row = efficientdet_preset(phi)
        backbone = f"efficientnet-b{phi}"
        with torch.device("meta"):
            bifpn = build_segmenter(backbone, classes, head="bifpn", bifpn_width=row.width, bifpn_repeats=row.repeats,
                                    **bifpn_options)
            unet = build_segmenter(backbone, classes)
        out.append(dict(phi=phi, backbone=f"B{phi}", width=row.width, repeats=row.repeats,
                        bifpn=measure(bifpn.eval(), size), unet=measure(unet.eval(), size)))
    return out


def markdown(table: list[dict], size, classes) -> str:
    lines = [f"Segmentation models at {size[0]}x{size[1]}, {classes} classes (params in M, GMACs of one image; "
             f"head = model - backbone)", "",
             "| phi | backbone | BiFPN W x D | backbone params | backbone GMACs | BiFPN params | BiFPN GMACs "
             "| BiFPN head params | BiFPN head GMACs | U-Net params | U-Net GMACs | U-Net head params "
             "| U-Net head GMACs |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        b, u = r["bifpn"], r["unet"]
        lines.append(f"| {r['phi']} | {r['backbone']} | {r['width']} x {r['repeats']} | {b['backbone_params']:.2f} "
                     f"| {b['backbone_gmacs']:.1f} | {b['params']:.2f} | {b['gmacs']:.1f} | {b['head_params']:.2f} "
                     f"| {b['head_gmacs']:.1f} | {u['params']:.2f} | {u['gmacs']:.1f} | {u['head_params']:.2f} "
                     f"| {u['head_gmacs']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phis", type=int, nargs="+", default=list(range(8)), choices=range(8))
    parser.add_argument("--size", type=int, nargs=2, default=(512, 1024), metavar=("H", "W"))
    parser.add_argument("--classes", type=int, default=19)
    parser.add_argument("--no-refine", action="store_true", help="the paper's head: classifier on P2 (stride 4)")
    parser.add_argument("--refine-width", type=int, default=None, help="channels of the stride-2 stage (default: W)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    options = {"bifpn_refine": False} if args.no_refine else {"bifpn_refine_width": args.refine_width}
    print(markdown(rows(args.phis, tuple(args.size), args.classes, **options), tuple(args.size), args.classes))


if __name__ == "__main__":
    main()
