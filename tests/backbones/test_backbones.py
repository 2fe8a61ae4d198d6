"""The backbone contract, run over every registered name, checked against the published tables."""

import copy
import math

import pytest
import torch

import backbones
from backbones.specs import make_divisible
from tasks.classification import build_classifier

NAMES = backbones.list_names()
PRESET_NAMES = [n for n in NAMES if n != "efficientnet"]

# ../shared/reference/efficientnet.md: taps (timm features_only convention) and classifier params.
TAPS = {
    "efficientnet-b0": (16, 24, 40, 112, 320), "efficientnet-b1": (16, 24, 40, 112, 320),
    "efficientnet-b2": (16, 24, 48, 120, 352), "efficientnet-b3": (24, 32, 48, 136, 384),
    "efficientnet-b4": (24, 32, 56, 160, 448), "efficientnet-b5": (24, 40, 64, 176, 512),
    "efficientnet-b6": (32, 40, 72, 200, 576), "efficientnet-b7": (32, 48, 80, 224, 640),
    # Lite sizes scale channels like the B size of the same width (timm tf_efficientnet_lite*).
    "efficientnet-lite0": (16, 24, 40, 112, 320), "efficientnet-lite1": (16, 24, 40, 112, 320),
    "efficientnet-lite2": (16, 24, 48, 120, 352), "efficientnet-lite3": (24, 32, 48, 136, 384),
    "efficientnet-lite4": (24, 32, 56, 160, 448),
    # torchvision EfficientNetV2 stage table.
    "efficientnetv2-s": (24, 48, 64, 160, 256), "efficientnetv2-m": (24, 48, 80, 176, 512),
    "efficientnetv2-l": (32, 64, 96, 224, 640),
}
PARAMS = {
    "efficientnet-b0": 5_288_548, "efficientnet-b1": 7_794_184, "efficientnet-b2": 9_109_994,
    "efficientnet-b3": 12_233_232, "efficientnet-b4": 19_341_616, "efficientnet-b5": 30_389_784,
    "efficientnet-b6": 43_040_704, "efficientnet-b7": 66_347_960,
    "efficientnetv2-s": 21_458_488, "efficientnetv2-m": 54_139_356, "efficientnetv2-l": 118_515_272,
}
# Published sizes in millions (reference table: B8 87.4M, L2 480.3M; timm lite0 4.65M).
PARAMS_APPROX = {"efficientnet-b8": 87.4, "efficientnet-l2": 480.3, "efficientnet-lite0": 4.65}
NATIVE = {"efficientnet-b0": (224, 0.2), "efficientnet-b3": (300, 0.3), "efficientnet-b7": (600, 0.5),
          "efficientnet-l2": (800, 0.5), "efficientnetv2-s": (384, 0.2)}


def _create(name, **kw):
    if name == "efficientnet":
        kw.setdefault("phi", -1.5)
    return backbones.create(name, **kw)


def _n_params(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_every_name(name):
    torch.manual_seed(0)
    net = _create(name)
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    out = net(x)
    assert list(out) == ["s2", "s4", "s8", "s16", "s32"]
    for spec, (key, feat) in zip(net.feature_info, out.items()):
        assert spec.name == key
        assert feat.shape == (2, spec.channels, 64 // spec.stride, 64 // spec.stride)
        assert torch.isfinite(feat).all()
    sum(f.mean() for f in out.values()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.parametrize("name", sorted(TAPS))
def test_taps_match_reference_table(name):
    with torch.device("meta"):
        net = backbones.create(name)
    assert tuple(f.channels for f in net.feature_info) == TAPS[name]
    assert [f.stride for f in net.feature_info] == [2, 4, 8, 16, 32]


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_classifier_params_equal_table(name):
    with torch.device("meta"):
        model = build_classifier(name, num_classes=1000)
    assert _n_params(model) == PARAMS[name]


@pytest.mark.parametrize("name", sorted(PARAMS_APPROX))
def test_classifier_params_published_millions(name):
    with torch.device("meta"):
        model = build_classifier(name, num_classes=1000)
    assert round(_n_params(model) / 1e6, 2 if name.endswith("lite0") else 1) == PARAMS_APPROX[name]


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_preset_resolution_and_dropout_without_building(name):
    preset = backbones.get_preset(name)
    assert (preset.resolution, preset.dropout) == NATIVE[name]


def test_make_divisible_rule_by_hand():
    # max(8, int(c*w + 4) // 8 * 8), plus 8 when that is below 0.9 * c * w.
    assert make_divisible(32 * 1.1) == 32  # 35.2 -> 32 (>= 31.68)
    assert make_divisible(40 * 1.1) == 48  # 44 -> 48
    assert make_divisible(1280 * 1.8) == 2304
    assert make_divisible(3) == 8
    assert make_divisible(20) == 24  # 24 (int(24)//8*8)
    assert make_divisible(11) == 16  # int(15)//8*8 = 8 < 9.9 -> 16


def test_free_phi_follows_compound_rule():
    # By default (rule="table") an integral phi in 0..7 is the named preset, B5+'s TF BatchNorm included.
    assert backbones.create("efficientnet", phi=0).state_dict().keys() == backbones.create("efficientnet-b0").state_dict().keys()
    phi0 = build_classifier("efficientnet", phi=0.0)
    assert _n_params(phi0) == PARAMS["efficientnet-b0"]
    for k in range(8):
        assert backbones.get_preset("efficientnet", phi=k) == backbones.get_preset(f"efficientnet-b{k}")
    assert backbones.create("efficientnet", phi=6).stem.bn.eps == 1e-3
    with torch.device("meta"):
        assert _n_params(build_classifier("efficientnet", phi=3)) == PARAMS["efficientnet-b3"]
    # rule="paper": the closed form at every phi.
    preset = backbones.get_preset("efficientnet", phi=2.5, rule="paper")
    assert preset.width == pytest.approx(1.1**2.5) and preset.depth == pytest.approx(1.2**2.5)
    assert preset.resolution == round(224 * 1.15**2.5 / 8) * 8
    arch = preset.arch()
    assert [s.repeats for s in arch.stages] == [math.ceil(r * 1.2**2.5) for r in (1, 2, 2, 3, 3, 4, 1)]
    assert backbones.create("efficientnet", phi=2.5, rule="paper").arch.stages == arch.stages
    assert backbones.get_preset("efficientnet", phi=3, rule="paper").width == pytest.approx(1.1**3)  # not B3's 1.2
    with pytest.raises(ValueError, match="'table', 'paper'"):
        backbones.get_preset("efficientnet", phi=2.5, rule="interpolate")
    # Negative phi (the closed form under either rule) shrinks but never below one block per stage or 8 channels.
    small = backbones.get_preset("efficientnet", phi=-6).arch()
    assert min(s.repeats for s in small.stages) == 1 and min(s.out_channels for s in small.stages) >= 8
    explicit = backbones.get_preset("efficientnet", width=1.2, depth=1.4).arch()
    assert explicit.stages == backbones.get_preset("efficientnet-b3").arch().stages


def test_unknown_name_lists_known_names():
    with pytest.raises(ValueError, match="efficientnet-b0.*efficientnetv2-s"):
        backbones.create("efficientnet-b9")
    with pytest.raises(ValueError, match="phi"):
        backbones.create("efficientnet")


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize("name", ["efficientnet-b0", "efficientnetv2-s", "efficientnet-lite0"])
def test_output_stride_by_dilation(name, output_stride):
    net = backbones.create(name, output_stride=output_stride).eval()
    ref = backbones.create(name).eval()
    out = net(torch.randn(1, 3, 64, 64))
    for spec in net.feature_info:
        assert spec.stride == min(int(spec.name[1:]), output_stride)
        assert out[spec.name].shape[-1] == 64 // spec.stride
    # Same weights, same taps above the output stride: dilation changes nothing there.
    net.load_state_dict(ref.state_dict())
    x = torch.randn(1, 3, 64, 64)
    a, b = net(x), ref(x)
    for spec in net.feature_info:
        if int(spec.name[1:]) <= output_stride:
            torch.testing.assert_close(a[spec.name], b[spec.name])
    # The strided block keeps the previous dilation; the blocks after it dilate.
    assert net.stages[-1][-1].dw.conv.dilation[0] == 32 // output_stride


@pytest.mark.parametrize("in_channels", [1, 4])
def test_in_channels(in_channels):
    net = backbones.create("efficientnet-b0", in_channels=in_channels)
    assert net.stem.conv.weight.shape[1] == in_channels
    assert net(torch.randn(2, in_channels, 32, 32))["s32"].shape == (2, 320, 1, 1)


def test_out_indices_and_early_exit():
    net = backbones.create("efficientnet-b0", out_indices=(1, 3))
    assert [f.name for f in net.feature_info] == ["s4", "s16"]
    assert list(net(torch.randn(1, 3, 32, 32))) == ["s4", "s16"]
    with pytest.raises(ValueError, match="out_indices"):
        backbones.create("efficientnet-b0", out_indices=(5,))


def test_drop_path_linear_per_block():
    net = backbones.create("efficientnet-b0", drop_path=0.2)
    blocks = [b for stage in net.stages for b in stage]
    for index, block in enumerate(blocks):
        if block.residual:
            assert block.drop_path.p == pytest.approx(0.2 * index / len(blocks))
        else:
            assert block.drop_path is None
    assert sum(b.residual for b in blocks) == 16 - 7 + 0  # 16 blocks, first of each of 7 stages has no skip


def test_norm_options_and_preset_defaults():
    net = backbones.create("efficientnet-b0", norm_eps=1e-3, norm_momentum=0.01)
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.eps == 1e-3 and m.momentum == 0.01 for m in bns)
    # torchvision's B5-B7 and V2 use TF's BatchNorm settings.
    assert backbones.create("efficientnetv2-s").stem.bn.eps == 1e-3
    assert backbones.create("efficientnet-b0").stem.bn.eps == 1e-5


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    net = backbones.create("efficientnet-b0").train()
    x = torch.randn(2, 3, 64, 64)
    def grads():
        net.zero_grad()
        torch.manual_seed(1)
        net(x)["s32"].square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]
    plain = grads()
    net.set_grad_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_channels_last_in_and_out():
    net = backbones.create("efficientnet-b0").eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    ref = backbones.create("efficientnet-b0").eval()
    ref.load_state_dict(net.state_dict())
    out, expected = net(x), ref(x.contiguous())
    for key in out:
        assert out[key].is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(out[key], expected[key], rtol=1e-4, atol=1e-5)


def test_same_padding_matches_tf_rule_and_exports():
    # TF "SAME": out = ceil(in / stride); extra pad goes bottom/right.
    net = backbones.create("efficientnet-b0", padding="same").eval()
    for size in (64, 65, 97):
        out = net(torch.randn(1, 3, size, size))
        assert out["s2"].shape[-1] == math.ceil(size / 2)
        assert out["s32"].shape[-1] == math.ceil(size / 32)
    conv = net.stem.conv  # 3x3 stride 2 on 64 px: total pad 1, all of it bottom/right
    x = torch.randn(1, 3, 64, 64)
    manual = torch.nn.functional.conv2d(torch.nn.functional.pad(x, [0, 1, 0, 1]), conv.weight, stride=2)
    torch.testing.assert_close(conv(x), manual)
    exported = torch.export.export(net, (torch.randn(1, 3, 96, 96),))
    x = torch.randn(1, 3, 96, 96)
    torch.testing.assert_close(exported.module()(x)["s32"], net(x)["s32"])


@pytest.mark.parametrize("name", ["efficientnet-b0", "efficientnet-lite0", "efficientnetv2-s"])
def test_cpu_channels_last_path_equals_nchw(name):
    """On the CPU the backbone runs channels-last by default: the same function as NCHW (forward and
    gradients). The reference is the float64 NCHW net; the channels-last float32 run must be as close
    to it as the NCHW float32 run is. (With the torchvision init and BN in train mode, lite0's ReLU6
    clamps make its float32 weight gradients 2% off float64 in either layout: a tolerance against the
    float32 NCHW run alone would measure that conditioning, not the layout.)"""
    torch.manual_seed(0)
    net = backbones.create(name)
    x = torch.randn(2, 3, 96, 96)

    def run(model, inputs, channels_last):
        model.cpu_channels_last = channels_last
        model.zero_grad()
        feats = model(inputs)
        assert feats["s8"].is_contiguous(memory_format=torch.channels_last) == channels_last
        sum(f.square().mean() for f in feats.values()).backward()
        weights = [p.grad.double() for n, p in model.named_parameters() if n.endswith("conv.weight")]
        return [f.detach().double() for f in feats.values()], weights

    reference = run(copy.deepcopy(net).double(), x.double(), False)
    def error(result):  # worst relative L2 error over the features, then over the conv weight grads
        return [max(float((a - b).norm() / b.norm()) for a, b in zip(got, ref))
                for got, ref in zip(result, reference)]

    nchw, nhwc = error(run(net, x, False)), error(run(net, x, True))
    assert nhwc[0] < 1e-4 and nchw[0] < 1e-4
    assert nhwc[1] < 2 * nchw[1] + 1e-5, (nhwc, nchw)
