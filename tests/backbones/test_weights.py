"""Weight import checked against the peer libraries' own models holding the same (random) weights.

Every BatchNorm of a peer gets random statistics and affine terms before saving, so a wrong BN
mapping or a wrong eps shows in the outputs. TF "SAME" cases run at even sizes (64): there every
stride-2 conv pads asymmetrically; at odd sizes like 65 or 97 TF padding is symmetric at every
stride-2 conv and could not tell the two apart.
"""

import logging
import os
import shutil

import pytest
import torch
import torchvision

import backbones
from backbones.errors import WeightsError
from backbones import weights as W
from backbones.convert import convert
from tasks.classification import build_classifier

timm = pytest.importorskip("timm")

TOL = dict(rtol=1e-4, atol=1e-5)
TF_B0 = dict(padding="same", norm_eps=1e-3, norm_momentum=0.01)


def randomize_bn(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random affine terms and random running statistics in every BatchNorm.

    Left at mean 0 / var 1, a default-initialised deep net shrinks its activations to ~1e-13 in eval
    mode and its logits become a function of BN constants alone. So the statistics are drawn from
    the net itself (one pass of random images with BN in training mode, every layer's signal stays
    O(1)) and then randomly perturbed, channel by channel.
    """
    g = torch.Generator().manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    model.eval()  # no dropout or drop-path in the calibration pass; only BN in training mode
    with torch.no_grad():
        for m in norms:
            m.weight.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.reset_running_stats()
            m.train()
        momenta = [m.momentum for m in norms]
        for m in norms:
            m.momentum = None  # cumulative average: one batch sets the statistics
        model(torch.randn(2, 3, 64, 64, generator=g))
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
            m.running_mean.add_(torch.randn(m.num_features, generator=g) * 0.05 * m.running_var.sqrt())
            m.running_var.mul_(torch.rand(m.num_features, generator=g) * 0.2 + 0.9)
    return model.eval()


@pytest.fixture(autouse=True)
def nchw_kernels(monkeypatch):
    """The peers run NCHW kernels; here ours do too, so the comparisons are bit-for-bit. (On the CPU ours
    run channels-last by default: the same function, rounded differently, which these deliberately
    ill-conditioned random nets amplify; test_backbones checks that path against NCHW.)"""
    monkeypatch.setattr(backbones.EfficientNet, "CPU_CHANNELS_LAST", False)


def save_peer(peer: torch.nn.Module, path) -> str:
    torch.save(randomize_bn(peer).state_dict(), path)
    return str(path)


def image(size: int, channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, size, size, generator=torch.Generator().manual_seed(7))


def assert_logits_match(ours: torch.nn.Module, peer: torch.nn.Module, size: int) -> None:
    x = image(size)
    with torch.no_grad():
        expected = peer.eval()(x)
        got = ours.eval()(x)
    # Not vacuous: the logits depend on the image, not only on BN constants.
    assert (expected[0] - expected[1]).abs().max() > 0.05 * expected.abs().max()
    torch.testing.assert_close(got, expected, **TOL)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These nets run on tiny inputs, where a second intra-op thread costs more than it gains."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tv_b0(tmp_path_factory):
    """A torchvision efficientnet_b0 with random weights, and the file it was saved to."""
    torch.manual_seed(0)
    peer = torchvision.models.efficientnet_b0()
    return peer, save_peer(peer, tmp_path_factory.mktemp("tv") / "tv_b0.pth")


# ------------------------------------------------------------------------------ logits equivalence

@pytest.mark.parametrize("ctor, arch", [
    ("efficientnet_b3", "efficientnet-b3"),
    ("efficientnet_b5", "efficientnet-b5"),  # BN eps 1e-3 from the preset
    ("efficientnet_v2_s", "efficientnetv2-s"),  # FusedMBConv
])
def test_torchvision_logits(ctor, arch, tmp_path):
    torch.manual_seed(0)
    peer = getattr(torchvision.models, ctor)()
    ours = build_classifier(arch, weights=save_peer(peer, tmp_path / "tv.pth"))
    assert_logits_match(ours, peer, 64)


def test_torchvision_b0_logits(tv_b0):
    peer, path = tv_b0
    assert_logits_match(build_classifier("efficientnet-b0", weights=path), peer, 64)


@pytest.mark.parametrize("name, arch, options", [
    ("efficientnet_b0", "efficientnet-b0", {}),
    ("tf_efficientnet_b0", "efficientnet-b0", TF_B0),
    ("tf_efficientnet_lite0", "efficientnet-lite0", dict(padding="same", norm_eps=1e-3)),
    ("tf_efficientnetv2_s", "efficientnetv2-s", dict(padding="same")),  # ConvBnAct + EdgeResidual names
])
def test_timm_logits(name, arch, options, tmp_path):
    torch.manual_seed(0)
    peer = timm.create_model(name, pretrained=False)
    ours = build_classifier(arch, weights=save_peer(peer, tmp_path / "timm.pth"), **options)
    assert W.detect_format(torch.load(tmp_path / "timm.pth", weights_only=True)).format == "timm"
    assert_logits_match(ours, peer, 64)


def test_tf_weights_need_same_padding(tmp_path):
    """Control: the comparison above does see the padding flavour (and so is not vacuous)."""
    torch.manual_seed(0)
    peer = timm.create_model("tf_efficientnet_b0", pretrained=False)
    ours = build_classifier("efficientnet-b0", weights=save_peer(peer, tmp_path / "tf.pth"),
                            norm_eps=1e-3, norm_momentum=0.01).eval()
    x = image(64)
    with torch.no_grad():
        assert not torch.allclose(ours(x), peer(x), **TOL)


def _smp_efficientnet(name: str):
    """EfficientNet-PyTorch's model: the package itself, or the copy vendored in smp."""
    try:
        from efficientnet_pytorch import EfficientNet
        from efficientnet_pytorch.utils import get_model_params
    except ImportError:
        vendored = pytest.importorskip("segmentation_models_pytorch.encoders._efficientnet")
        EfficientNet, get_model_params = vendored.EfficientNet, vendored.get_model_params
    # image_size=None: dynamic TF "SAME" padding, so any input size is computed as TF would.
    return EfficientNet(*get_model_params(name, {"image_size": None}))


def test_efficientnet_pytorch_logits(tmp_path):
    torch.manual_seed(0)
    peer = _smp_efficientnet("efficientnet-b0")
    path = save_peer(peer, tmp_path / "lukemelas.pth")
    ours = build_classifier("efficientnet-b0", weights=path, **TF_B0)
    assert W.load_weights(ours, path).format == "efficientnet-pytorch"
    assert_logits_match(ours, peer, 64)


# ------------------------------------------------------------------------------------ feature taps

@pytest.mark.parametrize("name, arch, options, size", [
    ("efficientnet_b0", "efficientnet-b0", {}, 64),
    ("tf_efficientnet_lite0", "efficientnet-lite0", dict(padding="same", norm_eps=1e-3), 70),
])
def test_taps_match_timm_features_only(name, arch, options, size, tmp_path):
    torch.manual_seed(0)
    peer = timm.create_model(name, pretrained=False, features_only=True)
    ours = backbones.create(arch, weights=save_peer(peer, tmp_path / "f.pth"), **options).eval()
    x = image(size)
    with torch.no_grad():
        expected, got = peer(x), ours(x)
    assert [f.channels for f in ours.feature_info] == peer.feature_info.channels()
    assert len(expected) == len(got) == 5
    for spec, ref in zip(ours.feature_info, expected):
        torch.testing.assert_close(got[spec.name], ref, **TOL)


def test_effdet_checkpoint_loads_into_backbone(tmp_path):
    effdet = pytest.importorskip("effdet")
    torch.manual_seed(0)
    det = effdet.create_model("tf_efficientdet_d0", pretrained=False, pretrained_backbone=False).eval()
    randomize_bn(det.backbone)
    torch.save(det.state_dict(), tmp_path / "d0.pth")
    ours = backbones.create("efficientnet-b0", out_indices=(2, 3, 4), **TF_B0).eval()
    report = W.load_weights(ours, tmp_path / "d0.pth")
    assert report.format == "effdet"
    assert any(k.startswith("fpn.") for k in report.dropped)
    x = image(64)
    with torch.no_grad():
        expected, got = det.backbone(x), ours(x)
    assert list(got) == ["s8", "s16", "s32"]
    for ref, tap in zip(expected, got.values()):
        torch.testing.assert_close(tap, ref, **TOL)


# ------------------------------------------------------------------------------------------ imagenet

def test_imagenet_reads_torchvision_file_from_hub_cache(tv_b0, tmp_path, monkeypatch):
    peer, path = tv_b0
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    url = torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    shutil.copyfile(path, cache / os.path.basename(url))
    ours = backbones.create("efficientnet-b0", weights="imagenet").eval()
    x = image(64)
    with torch.no_grad():
        expected = peer.features[:-1](x)  # torchvision's stages without the head conv
        assert torch.equal(ours.stem.conv.weight, peer.features[0][0].weight)
        torch.testing.assert_close(ours(x)["s32"], expected, **TOL)


def test_imagenet_unknown_arch_lists_known():
    with pytest.raises(ValueError, match="efficientnet-lite0.*efficientnet-b0, efficientnet-b1") as err:
        backbones.create("efficientnet-lite0", weights="imagenet")
    assert "\n" not in str(err.value)


# -------------------------------------------------------------------------------- partial / adapted

def test_classifier_file_into_backbone_alone(tv_b0):
    peer, path = tv_b0
    net = backbones.create("efficientnet-b0").eval()
    report = W.load_weights(net, path)
    assert {"classifier.1.weight", "features.8.0.weight"} <= set(report.dropped)
    with torch.no_grad():
        torch.testing.assert_close(net(image(64))["s32"], peer.features[:-1](image(64)), **TOL)


def test_num_classes_change_keeps_fresh_fc(tv_b0, caplog):
    peer, path = tv_b0
    torch.manual_seed(3)
    fresh = build_classifier("efficientnet-b0", num_classes=10)
    torch.manual_seed(3)
    with caplog.at_level(logging.WARNING, logger="effdense"):
        loaded = build_classifier("efficientnet-b0", num_classes=10, weights=path)
    assert "re-initialised" in caplog.text
    assert torch.equal(loaded.head.fc.weight, fresh.head.fc.weight)
    assert torch.equal(loaded.head.fc.bias, fresh.head.fc.bias)
    assert torch.equal(loaded.head.conv.conv.weight, peer.features[8][0].weight)
    assert torch.equal(loaded.backbone.stem.conv.weight, peer.features[0][0].weight)


@pytest.mark.parametrize("channels", [1, 4])
def test_in_channels_adapts_pretrained_stem(tv_b0, channels):
    peer, path = tv_b0
    rgb = peer.features[0][0].weight.detach()
    if channels == 1:
        expected = rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3]
    else:  # R, G, B, R scaled by 3/4
        expected = torch.cat([rgb, rgb[:, :1]], dim=1) * 0.75
    net = backbones.create("efficientnet-b0", in_channels=channels)
    report = W.load_weights(net, path)
    assert report.adapted == ["stem.conv.weight"]
    torch.testing.assert_close(net.stem.conv.weight, expected)
    assert torch.equal(net.stages[6][0].project.bn.running_var, peer.features[7][0].block[3][1].running_var)
    assert net(image(64, channels))["s32"].shape == (2, 320, 2, 2)


# ------------------------------------------------------------------------------ saving, converting

def test_own_safetensors_round_trip(tmp_path):
    torch.manual_seed(0)
    src = build_classifier("efficientnet-b0", num_classes=7)
    with torch.no_grad():  # every tensor distinct, BN statistics and counters included
        for value in src.state_dict().values():
            value.copy_(torch.rand_like(value) + 0.1 if value.is_floating_point() else torch.full_like(value, 5))
    out = W.save_safetensors(src, tmp_path / "sub" / "c.safetensors")
    assert os.listdir(tmp_path / "sub") == ["c.safetensors"]  # no temp file left behind
    torch.manual_seed(1)
    dst = build_classifier("efficientnet-b0", num_classes=7)
    assert W.load_weights(dst, out).format == "effdense"
    for key, value in src.state_dict().items():
        assert torch.equal(dst.state_dict()[key], value), key
    backbone = backbones.create("efficientnet-b0", weights=out)  # its backbone part alone
    assert torch.equal(backbone.stem.conv.weight, src.backbone.stem.conv.weight)


def test_convert_torchvision_then_strict_classifier_load(tv_b0, tmp_path):
    peer, path = tv_b0
    out = convert(path, "efficientnet-b0", tmp_path / "b0.safetensors")
    state = W.read_state_dict(out)
    assert "head.fc.weight" in state and "backbone.stem.conv.weight" in state
    num_classes = state["head.fc.weight"].shape[0]
    ours = build_classifier("efficientnet-b0", num_classes=num_classes)
    ours.load_state_dict(state, strict=True)
    assert_logits_match(ours, peer, 64)


def test_convert_headless_source_writes_backbone(tmp_path):
    torch.manual_seed(0)
    peer = timm.create_model("efficientnet_b0", pretrained=False, features_only=True)
    out = convert(save_peer(peer, tmp_path / "f.pth"), "efficientnet-b0", tmp_path / "bb.safetensors")
    state = W.read_state_dict(out)
    assert "stem.conv.weight" in state and not any(k.startswith("head.") for k in state)
    assert torch.equal(state["stem.conv.weight"], peer.conv_stem.weight)


# ---------------------------------------------------------------------------------------- bad input

def _one_line_error(exc_type, fn, *args, match=None):
    with pytest.raises(exc_type, match=match) as err:
        fn(*args)
    assert "\n" not in str(err.value)
    return str(err.value)


def test_wrong_architecture_names_keys(tv_b0, tmp_path):
    _, b0_path = tv_b0
    message = _one_line_error(ValueError, W.load_weights, backbones.create("efficientnet-b1"), b0_path)
    assert b0_path in message and "torchvision" in message and "efficientnet-b1" in message
    assert "missing keys (stages.0.1.dw.conv.weight (as features.1.1.block.0.0.weight)" in message
    assert "0 unexpected keys" in message
    torch.save(torchvision.models.efficientnet_b1().state_dict(), tmp_path / "b1.pth")
    b1_path = str(tmp_path / "b1.pth")
    message = _one_line_error(ValueError, W.load_weights, backbones.create("efficientnet-b0"), b1_path)
    assert "0 missing keys" in message and "unexpected keys (features.1.1.block.0.0.weight" in message


def test_shape_mismatch_named(tv_b0):
    _, path = tv_b0
    net = build_classifier("efficientnet-b0")
    net.head.conv = type(net.head.conv)(320, 1000, 1)  # a head width the file does not have
    message = _one_line_error(ValueError, W.load_weights, net, path)
    assert "shape mismatches (head.conv.conv.weight: ours [1000, 320, 1, 1] vs file [1280, 320, 1, 1]" in message


def test_missing_file():
    message = _one_line_error(WeightsError, W.load_weights, backbones.create("efficientnet-b0"),
                              "/nonexistent/b0.pth")
    assert "/nonexistent/b0.pth" in message


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_and_random_files(suffix, tmp_path):
    valid = tmp_path / f"valid{suffix}"
    state = {"stem.conv.weight": torch.randn(32, 3, 3, 3), "x": torch.randn(1000)}
    if suffix == ".pth":
        torch.save(state, valid)
    else:
        from safetensors.torch import save_file
        save_file(state, valid)
    data = valid.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: len(data) // 2])
    (tmp_path / f"noise{suffix}").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8,
                                                            generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    for name in ("cut", "noise"):
        path = str(tmp_path / f"{name}{suffix}")
        message = _one_line_error(ValueError, W.read_state_dict, path, match="not a readable checkpoint")
        assert path in message


class _Payload:
    """Unpickling this calls os.mkdir(path): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_weights_only_refuses_arbitrary_objects(tmp_path):
    breach = tmp_path / "breach"
    torch.save({"stem.conv.weight": torch.zeros(1), "payload": _Payload(breach)}, tmp_path / "evil.pth")
    message = _one_line_error(ValueError, W.read_state_dict, str(tmp_path / "evil.pth"),
                              match="refused to unpickle")
    assert "evil.pth" in message and "weights_only" in message and "mkdir" in message
    assert not breach.exists()


def test_unknown_layout_lists_formats(tmp_path):
    torch.save({"encoder.layer1.weight": torch.zeros(2)}, tmp_path / "other.pth")
    message = _one_line_error(ValueError, W.load_weights, backbones.create("efficientnet-b0"),
                              tmp_path / "other.pth", match="unrecognised checkpoint layout")
    assert all(name in message for name in ("torchvision", "timm", "effdet", "EfficientNet-PyTorch", "effdense"))


def test_containers_and_ddp_prefix_unwrapped(tmp_path):
    plain, ema = torch.ones(2), torch.zeros(2)
    torch.save({"epoch": 3, "state_dict_ema": {"a.weight": ema}, "state_dict": {"module.a.weight": plain}},
               tmp_path / "ckpt.pth")
    assert torch.equal(W.read_state_dict(tmp_path / "ckpt.pth")["a.weight"], plain)
    torch.save({"model_ema": {"a.weight": ema}}, tmp_path / "ema.pth")
    assert torch.equal(W.read_state_dict(tmp_path / "ema.pth")["a.weight"], ema)
    torch.save({"model": {"state_dict": {"_orig_mod.a.weight": plain}}}, tmp_path / "nested.pth")
    assert list(W.read_state_dict(tmp_path / "nested.pth")) == ["a.weight"]
    torch.save({"epoch": 3}, tmp_path / "empty.pth")
    _one_line_error(ValueError, W.read_state_dict, str(tmp_path / "empty.pth"), match="holds no tensors")


def test_adapt_input_channels_rule():
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3, 1, 1)  # kernels (0, 1, 2) and (3, 4, 5)
    assert W.adapt_input_channels(w, 1).flatten().tolist() == [3.0, 12.0]
    seven = W.adapt_input_channels(w, 7).reshape(2, 7)
    assert seven[0].tolist() == pytest.approx([c * 3 / 7 for c in (0, 1, 2, 0, 1, 2, 0)])
    assert seven[1].tolist() == pytest.approx([c * 3 / 7 for c in (3, 4, 5, 3, 4, 5, 3)])
