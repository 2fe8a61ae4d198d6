"""smp interop: smp.Unet checkpoints give smp's logits in our U-Net; our encoders pass smp's encoder contract.

The encoder-contract tests port the checks of smp's own ``tests/encoders/base.py::BaseEncoderTester``
and ``tests/models/base.py`` to our registered encoders. Nothing downloads (encoder_weights=None).
"""

import logging

import pytest
import segmentation_models_pytorch as smp
import torch

from backbones.weights import save_safetensors
from tasks.segmentation import build_segmenter
from tasks.segmentation.smp import register_smp_encoders


def _randomise_norms(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)


def _smp_file(tmp_path, encoder, **kwargs):
    torch.manual_seed(0)
    model = smp.Unet(encoder, encoder_weights=None, classes=5, **kwargs).eval()
    _randomise_norms(model)
    path = tmp_path / f"{encoder}.pth"
    torch.save(model.state_dict(), path)  # what users have: smp's own state dict, saved by torch
    return model, path


def _relative_error(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


@pytest.mark.parametrize("encoder, ours, kwargs, size", [
    ("efficientnet-b0", "efficientnet-b0", {}, (64, 96)),
    ("timm-efficientnet-b0", "efficientnet-b0", {}, (64, 96)),
    # EfficientNet-PyTorch pads for its native size whatever the input: an odd size must agree too.
    ("efficientnet-b3", "efficientnet-b3", {"decoder_attention_type": "scse", "aux_params": {"classes": 5}}, (70, 90)),
    ("timm-efficientnet-b3", "efficientnet-b3", {"decoder_attention_type": "scse"}, (64, 96)),
    pytest.param("tu-efficientnet_b0", "efficientnet-b0", {}, (64, 96), marks=pytest.mark.slow),
])
def test_smp_checkpoint_gives_smp_logits(tmp_path, encoder, ours, kwargs, size):
    theirs, path = _smp_file(tmp_path, encoder, **kwargs)
    aux = kwargs.get("aux_params", {}).get("classes")
    net = build_segmenter(ours, 5, weights=path, attention=kwargs.get("decoder_attention_type"), aux_classes=aux).eval()
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = theirs(x), net(x)
    if aux:
        assert _relative_error(expected[1], got[1]) < 1e-4
        expected, got = expected[0], got[0]
    assert got.shape == (1, 5, *size)
    assert _relative_error(expected, got) < 1e-4


def test_smp_checkpoint_strict_errors(tmp_path, caplog):
    theirs, path = _smp_file(tmp_path, "timm-efficientnet-b0")
    state = theirs.state_dict()
    broken = dict(state)
    del broken["decoder.blocks.1.conv2.0.weight"]
    broken["decoder.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"1 missing keys \(decoder\.blocks\.1\.conv2\.conv\.weight\); "
                                         r"1 unexpected keys \(decoder\.extra\.weight\)"):
        build_segmenter("efficientnet-b0", 5, weights=tmp_path / "broken.pth")
    no_stem = {k: v for k, v in state.items() if k != "encoder.blocks.0.0.conv_dw.weight"}
    torch.save(no_stem, tmp_path / "no_dw.pth")
    with pytest.raises(ValueError, match="missing keys .*stages.0.0.dw.conv.weight"):
        build_segmenter("efficientnet-b0", 5, weights=tmp_path / "no_dw.pth")
    with pytest.raises(ValueError, match="flavour"):
        build_segmenter("efficientnet-b0", 5, weights=path, flavour="smp")
    with pytest.raises(ValueError, match="conflicts with flavour"):
        build_segmenter("efficientnet-b0", 5, weights=path, s2_tap="stage")
    with pytest.raises(ValueError, match="shape"):
        build_segmenter("efficientnet-b0", 5, weights=path, decoder_channels=(128, 64, 32, 16, 8))
    # Another class count: the last conv stays fresh (logged); everything else loads.
    with caplog.at_level(logging.WARNING, logger="effdense"):
        net = build_segmenter("efficientnet-b0", 3, weights=path)
    assert "head.conv.weight" in caplog.text
    torch.testing.assert_close(net.decoder.blocks[0].conv1.conv.weight, state["decoder.blocks.0.conv1.0.weight"])


def test_own_file_round_trip_and_classifier_hint(tmp_path):
    net = build_segmenter("efficientnet-b0", 4, attention="scse").eval()
    _randomise_norms(net)
    save_safetensors(net, tmp_path / "model.safetensors")
    again = build_segmenter("efficientnet-b0", 4, weights=tmp_path / "model.safetensors", attention="scse").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x), net(x))
    save_safetensors(net.backbone, tmp_path / "backbone.safetensors")
    with pytest.raises(ValueError, match="backbone_weights"):
        build_segmenter("efficientnet-b0", 4, weights=tmp_path / "backbone.safetensors")
    fresh = build_segmenter("efficientnet-b0", 4, backbone_weights=tmp_path / "backbone.safetensors")
    torch.testing.assert_close(fresh.backbone.stem.conv.weight, net.backbone.stem.conv.weight)


# ------------------------------------------------------------------ our encoders inside smp

ENCODER = "effdense-efficientnet-b0"


@pytest.fixture(scope="module", autouse=True)
def registered():
    return register_smp_encoders()


def test_registry_lists_every_preset(registered):
    assert ENCODER in registered and "effdense-efficientnet-b3" in registered
    assert registered == register_smp_encoders()  # idempotent
    with pytest.raises(KeyError, match="Wrong pretrained weights"):
        smp.encoders.get_encoder(ENCODER, weights="imagenet")


def _strides(x, features):
    return [x.shape[-2] // f.shape[-2] for f in features], [x.shape[-1] // f.shape[-1] for f in features]


@pytest.mark.parametrize("name", [ENCODER, pytest.param("effdense-efficientnet-lite0", marks=pytest.mark.slow),
                                  pytest.param("effdense-efficientnetv2-s", marks=pytest.mark.slow)])
def test_encoder_forward_backward_and_channels(name):
    encoder = smp.encoders.get_encoder(name, in_channels=3)
    features = encoder(torch.rand(1, 3, 64, 64))
    assert len(features) == 6
    assert [f.shape[1] for f in features] == encoder.out_channels
    features[-1].mean().backward()


@pytest.mark.parametrize("in_channels", [1, 3, 4])
def test_encoder_in_channels(in_channels):
    encoder = smp.encoders.get_encoder(ENCODER, in_channels=in_channels).eval()
    with torch.no_grad():
        features = encoder(torch.rand(1, in_channels, 64, 64))
    assert encoder.out_channels[0] == in_channels == features[0].shape[1]


@pytest.mark.parametrize("depth", [3, 4, 5])
def test_encoder_depth(depth):
    encoder = smp.encoders.get_encoder(ENCODER, depth=depth).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = encoder(x)
    assert len(features) == depth + 1 == len(encoder.out_channels)
    expected = [1, 2, 4, 8, 16, 32][: depth + 1]
    assert _strides(x, features) == (expected, expected)
    assert encoder.output_stride == expected[-1]


@pytest.mark.parametrize("depth", [0, 6])
def test_encoder_invalid_depth(depth):
    with pytest.raises(ValueError):
        smp.encoders.get_encoder(ENCODER, depth=depth)


@pytest.mark.parametrize("output_stride", [8, 16])
def test_encoder_dilated(output_stride):
    encoder = smp.encoders.get_encoder(ENCODER, output_stride=output_stride).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        features = encoder(x)
    heights, widths = _strides(x, features)
    assert heights == widths == [min(output_stride, s) for s in [1, 2, 4, 8, 16, 32]]
    assert encoder.output_stride == output_stride
    with pytest.raises(ValueError, match="Output stride"):
        encoder.make_dilated(4)


@pytest.mark.parametrize("arch, encoder, kwargs", [
    (smp.FPN, "effdense-efficientnet-b3", {}),
    (smp.DeepLabV3Plus, ENCODER, {"encoder_output_stride": 16}),
    (smp.Unet, ENCODER, {}),
    pytest.param(smp.DeepLabV3Plus, "effdense-efficientnet-b3", {"encoder_output_stride": 16}, marks=pytest.mark.slow),
    pytest.param(smp.Unet, "effdense-efficientnet-b3", {}, marks=pytest.mark.slow),
])
def test_smp_models_on_our_encoder_train(arch, encoder, kwargs):
    model = arch(encoder, encoder_weights=None, classes=3, **kwargs)
    out = model(torch.rand(2, 3, 64, 64))
    assert out.shape == (2, 3, 64, 64)
    out.mean().backward()
    assert model.encoder.model.stem.conv.weight.grad is not None


def test_smp_unet_model_checks(tmp_path):
    # smp's BaseModelTester: in_channels 1, depth 3, aux head, any resolution (Unet: 67x71), save/load.
    model = smp.Unet(ENCODER, encoder_weights=None, in_channels=1, encoder_depth=3, decoder_channels=(64, 32, 16),
                     classes=2, aux_params={"classes": 2}).eval()
    with torch.no_grad():
        masks, labels = model(torch.rand(1, 1, 67, 71))
    assert masks.shape == (1, 2, 67, 71) and labels.shape == (1, 2)
    torch.save(model.state_dict(), tmp_path / "unet.pth")
    again = smp.Unet(ENCODER, encoder_weights=None, in_channels=1, encoder_depth=3, decoder_channels=(64, 32, 16),
                     classes=2, aux_params={"classes": 2}).eval()
    again.load_state_dict(torch.load(tmp_path / "unet.pth", weights_only=True))
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again(x)[0], model(x)[0])
