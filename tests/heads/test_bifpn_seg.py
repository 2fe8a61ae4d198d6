"""BiFPN segmentation head: sizes, level ranges, the detector's BiFPN (ours and effdet's) on the same
weights, gradients, fusion modes, weight files, sliding window, bad arguments."""

import math
from pathlib import Path

import pytest
import torch

from backbones.errors import WeightsError
from backbones.files import write_safetensors
from heads.bifpn import BiFPN, bifpn_nodes
from heads.bifpn_seg import BiFPNSegDecoder, BiFPNSegHead, backbone_taps, tap_names
from tasks.segmentation import SegmentationTask, build_segmenter

SMALL = dict(bifpn_width=16, bifpn_repeats=1)  # fast on the CPU
B0_TAPS = {"s2": 16, "s4": 24, "s8": 40, "s16": 112, "s32": 320}


def _randomise(module, seed=0):
    """Random BatchNorm statistics/affines and fusion weights, so that a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2, generator=g)
                m.running_var.uniform_(0.5, 1.5, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
        for name, p in module.named_parameters():
            if name.endswith("weights"):  # ours (.weights) and effdet's (.edge_weights)
                p.uniform_(0.2, 1.5, generator=g)
    return module


def _taps(height, width, names, seed=1):
    """Backbone-like maps: ceil(size / stride) per tap, as strided convs produce."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, B0_TAPS[n], math.ceil(height / int(n[1:])), math.ceil(width / int(n[1:])), generator=g)
            for n in names]


@pytest.mark.parametrize("size", [(64, 64), (67, 71), (100, 60), (33, 45)])
def test_any_input_size_gives_logits_at_that_size(size):
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 5, head="bifpn", **SMALL).eval()
    with torch.no_grad():
        logits = net(torch.randn(1, 3, *size))
    assert logits.shape == (1, 5, *size)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("levels, refine, taps, stride", [
    (range(2, 8), False, ["s4", "s8", "s16", "s32"], 4),  # the paper's P2..P7
    (range(2, 8), None, ["s2", "s4", "s8", "s16", "s32"], 2),  # the default: refined with s2
    (range(1, 8), None, ["s2", "s4", "s8", "s16", "s32"], 2),  # ESeg-style, from s2 (nothing finer to refine with)
    (range(2, 9), True, ["s2", "s4", "s8", "s16", "s32"], 2),  # up to P8
    (range(3, 8), False, ["s8", "s16", "s32"], 8),  # the detector's P3..P7
    (range(3, 8), True, ["s4", "s8", "s16", "s32"], 4),
    (range(2, 5), False, ["s4", "s8", "s16"], 4),  # no level above the backbone's
])
def test_level_ranges(levels, refine, taps, stride):
    assert backbone_taps(levels, refine) == taps
    refined = refine if refine is not None else levels[0] > 1
    assert tap_names(levels) == (taps[1:] if refined else taps)
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 3, head="bifpn", bifpn_levels=levels, bifpn_refine=refine, **SMALL).eval()
    assert [spec.name for spec in net.backbone.feature_info] == taps
    assert net.decoder.out_stride == stride and net.decoder.levels == tuple(levels)
    assert len(net.decoder.fpn.extra) == max(0, levels[-1] - 5)
    x = torch.randn(1, 3, 72, 88)
    last = net.decoder.fpn.cells[-1]
    top_down = bifpn_nodes(levels[0], levels[-1])[:len(levels) - 1]
    assert [node.inputs for node in last.nodes] == [node.inputs for node in top_down]
    with torch.no_grad():
        (finest,) = net.decoder.fpn(list(net.backbone(x).values())[-len(tap_names(levels)):])
        first = 2 ** levels[0]
        assert finest.shape[-2:] == (math.ceil(72 / first), math.ceil(88 / first))
        assert net(x).shape == (1, 3, 72, 88)


def _last_bottom_up(count: int, repeats: int) -> tuple[str, ...]:
    """Key prefixes of the last cell's bottom-up nodes (``count`` levels), which the segmentation pyramid
    leaves out."""
    return tuple(f"cells.{repeats - 1}.nodes.{i}." for i in range(count - 1, 2 * (count - 1)))


def test_p3_p7_part_equals_the_detector_bifpn():
    torch.manual_seed(0)
    decoder = _randomise(BiFPNSegDecoder([40, 112, 320], width=24, repeats=2, levels=range(3, 8))).eval()
    reference = _randomise(BiFPN([40, 112, 320], 24, 2, range(3, 8)), seed=5).eval()
    missing, unexpected = reference.load_state_dict(decoder.fpn.state_dict(), strict=False)
    # exactly the last cell's bottom-up nodes (P4''..P7'') are absent; they do not feed P3
    assert not unexpected and missing and all(k.startswith(_last_bottom_up(5, 2)) for k in missing)
    assert len(decoder.fpn.cells[0].nodes) == 8 and len(decoder.fpn.cells[1].nodes) == 4
    features = _taps(96, 160, ["s8", "s16", "s32"])
    with torch.no_grad():
        expected = reference(features)
        torch.testing.assert_close(decoder(features), expected[0], rtol=0, atol=0)


@pytest.mark.parametrize("levels, size", [(range(2, 8), (128, 256)), (range(2, 9), (256, 512))])
def test_p2_pyramid_equals_effdet_bifpn(levels, size):
    # Independent reference: effdet's own BiFpn built for min_level 2, with our weights mapped by name.
    from effdet.config import get_efficientdet_config
    from effdet.efficientdet import BiFpn

    from tasks.detection.weights import effdet_names

    config = get_efficientdet_config("efficientdet_d0")
    config.update(dict(min_level=levels[0], max_level=levels[-1], num_levels=len(levels), fpn_channels=24,
                       fpn_cell_repeats=2, image_size=size))
    names = tap_names(levels)
    theirs = _randomise(BiFpn(config, [dict(num_chs=B0_TAPS[n], reduction=int(n[1:])) for n in names]), 5).eval()
    torch.manual_seed(0)
    decoder = _randomise(BiFPNSegDecoder([B0_TAPS[n] for n in names], 24, 2, levels)).eval()
    holder = torch.nn.Module()
    holder.fpn = decoder.fpn
    mapping = effdet_names(holder)
    mapped = {mapping[k][len("fpn."):]: v for k, v in holder.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(mapped, strict=False)
    count = len(levels)
    skipped = tuple(f"cell.1.fnode.{i}." for i in range(count - 1, 2 * (count - 1)))
    assert not unexpected and missing and all(k.startswith(skipped) for k in missing)
    features = _taps(*size, names)  # sizes that halve exactly down to the top level (effdet's static sizes)
    with torch.no_grad():
        expected = theirs(list(features))
        got = decoder(features)
    assert len(expected) == len(levels)
    torch.testing.assert_close(got, expected[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("refine", [False, True])
def test_gradients_reach_every_parameter(refine):
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 4, head="bifpn", bifpn_refine=refine, aux_classes=4, **SMALL)
    task = SegmentationTask(net).train()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    losses = task(images, {"masks": torch.randint(0, 4, (2, 64, 96))})
    assert set(losses) == {"cross_entropy", "aux_presence"}
    sum(losses.values()).backward()
    for name, param in net.named_parameters():
        if name.startswith(("decoder.", "head.")):
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
            assert param.grad.abs().sum() > 0, name
    assert (net.decoder.out_stride, net.decoder.refine is not None) == ((2, True) if refine else (4, False))


def test_narrower_refinement():
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 3, head="bifpn", bifpn_width=32, bifpn_repeats=1, bifpn_refine_width=16)
    assert net.decoder.out_channels == 16 and net.head.classifier.in_channels == 16
    assert net.decoder.refine.reduce is not None  # 32 -> 16 at stride 4, before upsampling
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 3, 50, 70)).shape == (1, 3, 50, 70)
    with pytest.raises(ValueError, match="bifpn_refine_width set with head='unet'"):
        build_segmenter("efficientnet-b0", 3, bifpn_refine_width=16)


@pytest.mark.parametrize("fusion", ["fast", "softmax", "sum"])
def test_fusion_modes(fusion):
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 3, head="bifpn", bifpn_fusion=fusion, **SMALL).eval()
    nodes = [node for cell in net.decoder.fpn.cells for node in cell.nodes]
    assert all((node.weights is None) == (fusion == "sum") and node.fusion == fusion for node in nodes)
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)


def test_weights_file_round_trip_strict(tmp_path):
    torch.manual_seed(0)
    options = dict(head="bifpn", bifpn_width=16, bifpn_repeats=2, bifpn_levels=range(2, 9), aux_classes=6)
    net = _randomise(build_segmenter("efficientnet-b0", 6, **options)).eval()
    path = write_safetensors(tmp_path / "model.safetensors", net.state_dict())
    task_path = tmp_path / "task.pt"  # a task module's state dict (net.* keys) loads too
    torch.save(SegmentationTask(net).state_dict(), task_path)
    x = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        expected = net(x)
        for source in (path, task_path):
            loaded = build_segmenter("efficientnet-b0", 6, weights=source, **options).eval()
            for a, b in zip(loaded(x), expected):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(WeightsError, match="do not fit this BiFPN segmenter.*bifpn_width"):
        build_segmenter("efficientnet-b0", 6, weights=path, **{**options, "bifpn_width": 24})
    with pytest.raises(WeightsError, match="missing"):
        build_segmenter("efficientnet-b0", 6, weights=path, **{**options, "bifpn_levels": range(2, 8)})
    unet = tmp_path / "unet.safetensors"
    write_safetensors(unet, build_segmenter("efficientnet-b0", 6, decoder_channels=(16, 8, 8, 8, 8)).state_dict())
    with pytest.raises(WeightsError, match="do not fit this BiFPN segmenter"):
        build_segmenter("efficientnet-b0", 6, weights=unet, head="bifpn", **SMALL)


def test_sliding_window_equals_whole_image():
    torch.manual_seed(0)
    net = _randomise(build_segmenter("efficientnet-b0", 3, head="bifpn", **SMALL)).eval()
    whole = SegmentationTask(net).eval()
    images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
    for window in [(64, 96), (80, 100)]:  # the image exactly, and larger than the image
        slide = SegmentationTask(net, inference="slide", window=window, stride=(32, 32)).eval()
        with torch.no_grad():
            torch.testing.assert_close(slide(images), whole(images), rtol=0, atol=0)


def test_sizes_from_the_efficientdet_rows():
    with torch.device("meta"):
        b0 = build_segmenter("efficientnet-b0", 19, head="bifpn")
        b3 = build_segmenter("efficientnet-b3", 19, head="bifpn")
        free = build_segmenter("efficientnet", 19, head="bifpn", phi=0.5)
    assert (b0.decoder.width, b0.decoder.repeats, b3.decoder.width, b3.decoder.repeats) == (64, 3, 160, 6)
    assert (free.decoder.width, free.decoder.repeats) == (72, 4)  # 64 * 1.35^0.5 = 74.4 -> 72; round(3.5) = 4
    assert b0.head_kind == "bifpn" and build_segmenter("efficientnet-b0", 3).head_kind == "unet"


def test_bad_arguments_are_one_line_errors():
    cases = [
        (dict(head="fpn"), "head='fpn' is not one of unet, bifpn"),
        (dict(bifpn_width=16), "bifpn_width set with head='unet'"),
        (dict(head="bifpn", attention="scse"), "attention set with head='bifpn'"),
        (dict(head="bifpn", decoder_channels=(64, 32, 16, 8, 8)), "decoder_channels set with head='bifpn'"),
        (dict(head="bifpn", flavour="smp"), "flavour='smp' is an smp U-Net layout"),
        (dict(head="bifpn", output_stride=16), "output_stride=16 with head='bifpn'; expected 32"),
        (dict(head="bifpn", bifpn_levels=(2, 4, 6)), "consecutive"),
        (dict(head="bifpn", bifpn_levels=range(6, 8)), "expected P1..P5"),
        (dict(head="bifpn", bifpn_levels=range(1, 8), bifpn_refine=True), "refinement needs a tap finer"),
        (dict(head="bifpn", bifpn_fusion="mean"), "fusion"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
            build_segmenter("efficientnet-b0", 3, **{**SMALL, **kwargs} if kwargs.get("head") == "bifpn" else kwargs)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="bifpn_width and bifpn_repeats"):
        build_segmenter("efficientnetv2-s", 3, head="bifpn")
    with pytest.raises(ValueError, match="need 3 tap channels"):
        BiFPNSegDecoder([40, 112], 16, 1, levels=range(3, 8))
    with pytest.raises(ValueError, match="refine_width=32 without refinement"):
        BiFPNSegDecoder([40, 112, 320], 16, 1, levels=range(3, 8), refine_width=32)
    with pytest.raises(ValueError, match="num_classes"):
        BiFPNSegHead(16, 0)


def test_smp_checkpoints_do_not_fit_the_bifpn_head(tmp_path):
    import segmentation_models_pytorch as smp

    path = tmp_path / "smp_unet.pth"
    torch.save(smp.Unet("tu-efficientnet_b0", encoder_weights=None, classes=3).state_dict(), path)
    with pytest.raises(WeightsError, match="an smp Unet checkpoint, which does not fit head='bifpn'"):
        build_segmenter("efficientnet-b0", 3, weights=path, head="bifpn", **SMALL)
    task = SegmentationTask(build_segmenter("efficientnet-b0", 3, head="bifpn", **SMALL))
    with pytest.raises(WeightsError, match="does not fit head='bifpn'"):
        task.load_weights(path)


def test_levels_follow_the_training_crop_in_build_model():
    from heads.bifpn_seg import levels_for_crop
    from tasks.config import load
    from tasks.segmentation import build_model

    assert levels_for_crop((512, 1024)) == levels_for_crop((1536, 1536)) == tuple(range(2, 8))  # D0's P7 at 512: 4x4
    assert levels_for_crop((256, 256)) == tuple(range(2, 7)) and levels_for_crop((128, 256)) == tuple(range(2, 6))
    assert levels_for_crop((16, 16)) == (2, 3)  # never fewer than two levels
    cfg = load(Path(__file__).resolve().parents[2] / "configs/demo/segmentation.yaml")
    cfg.model.segmentation.head = "bifpn"  # model.segmentation.head in the schema
    with torch.device("meta"):
        task = build_model(cfg)
    decoder = task.net.decoder
    assert isinstance(decoder, BiFPNSegDecoder) and decoder.levels == (2, 3, 4, 5)  # the demo's 128x128 crops
    assert (decoder.width, decoder.repeats, decoder.out_stride, decoder.out_channels) == (64, 3, 2, 64)
    assert decoder.refine.reduce is None and task.net.head.classifier.in_channels == 64
