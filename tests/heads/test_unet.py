"""heads.unet against smp's own U-Net decoder and heads (same weights -> same numbers)."""

import pytest
import torch
from segmentation_models_pytorch.base.heads import ClassificationHead as SmpClassificationHead
from segmentation_models_pytorch.base.heads import SegmentationHead as SmpSegmentationHead
from segmentation_models_pytorch.decoders.unet.decoder import UnetDecoder as SmpUnetDecoder

from heads.unet import AuxClassificationHead, SegmentationHead, UNetDecoder
from tasks.segmentation.smp import split_smp_state

CHANNELS = [16, 24, 40, 112, 320]  # B0 taps s2..s32
SIZE = (67, 71)  # odd on purpose: every block must upsample to its skip's exact size


def _features(size=SIZE, channels=CHANNELS, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes, h, w = [], *size
    for _ in channels:  # the sizes a stride-2 conv with padding 1 produces
        h, w = (h + 1) // 2, (w + 1) // 2
        shapes.append((h, w))
    return [torch.randn(2, c, *s, generator=g) for c, s in zip(channels, shapes)]


def _randomise_norms(module, seed=1):
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3, generator=g)
            m.running_var.uniform_(0.5, 2.0, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.2, generator=g)


def _smp_to_ours(smp_module, prefix: str, num_blocks: int):
    state = {f"{prefix}{k}": v for k, v in smp_module.state_dict().items()}
    _, mapped, dropped, unknown = split_smp_state(state, num_blocks)
    assert not unknown
    return mapped, dropped


@pytest.mark.parametrize("attention, norm, upsampling", [(None, "batchnorm", "nearest"), ("scse", "batchnorm", "nearest"),
                                                         (None, "identity", "bilinear"), ("scse", "identity", "bilinear")])
def test_decoder_equals_smp(attention, norm, upsampling):
    torch.manual_seed(0)
    theirs = SmpUnetDecoder([3] + CHANNELS, (256, 128, 64, 32, 16), n_blocks=5, use_norm=norm,
                            attention_type=attention, interpolation_mode=upsampling).eval()
    _randomise_norms(theirs)
    ours = UNetDecoder(CHANNELS, attention=attention, norm=norm, upsampling=upsampling).eval()
    mapped, dropped = _smp_to_ours(theirs, "decoder.", 5)
    ours_state = {k[len("decoder."):]: v for k, v in mapped.items()}
    ours.load_state_dict(ours_state, strict=True)
    # smp builds scSE before the last block's (absent) skip and never runs it: the only tensors we drop.
    assert all(".4.attention1." in key for key in dropped) and bool(dropped) == (attention == "scse")
    features = _features()
    with torch.no_grad():
        expected = theirs([torch.zeros(2, 3, *SIZE)] + features)
        got = ours(features, SIZE)
    assert got.shape == (2, 16, *SIZE)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_heads_equal_smp():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 9, 11)
    theirs, ours = SmpSegmentationHead(16, 5, kernel_size=3), SegmentationHead(16, 5)
    ours.conv.load_state_dict(theirs[0].state_dict())
    torch.testing.assert_close(ours(x), theirs(x))
    theirs_up, ours_up = SmpSegmentationHead(16, 5, upsampling=4), SegmentationHead(16, 5, upsampling=4)
    ours_up.conv.load_state_dict(theirs_up[0].state_dict())
    torch.testing.assert_close(ours_up(x), theirs_up(x))
    deep = torch.randn(2, 320, 3, 4)
    for pooling in ("avg", "max"):
        smp_aux = SmpClassificationHead(320, 7, pooling=pooling, dropout=0.2).eval()
        our_aux = AuxClassificationHead(320, 7, pooling=pooling, dropout=0.2).eval()
        our_aux.fc.load_state_dict(smp_aux[3].state_dict())
        torch.testing.assert_close(our_aux(deep), smp_aux(deep))


def test_any_size_and_fewer_taps():
    decoder = UNetDecoder(CHANNELS[:3], decoder_channels=(64, 32, 16))
    features = _features((33, 50), CHANNELS[:3])
    out = decoder(features, (33, 50))
    assert out.shape == (2, 16, 33, 50)
    out.mean().backward()
    assert decoder(features).shape[-2:] == (2 * features[0].shape[-2], 2 * features[0].shape[-1])


def test_bad_arguments():
    with pytest.raises(ValueError, match="one per tap"):
        UNetDecoder(CHANNELS, decoder_channels=(256, 128, 64))
    with pytest.raises(ValueError, match="attention"):
        UNetDecoder(CHANNELS, attention="cbam")
    with pytest.raises(ValueError, match="norm"):
        UNetDecoder(CHANNELS, norm="groupnorm")
    with pytest.raises(ValueError, match="upsampling"):
        UNetDecoder(CHANNELS, upsampling="bicubic")
    with pytest.raises(ValueError, match="expected 5"):
        UNetDecoder(CHANNELS)(_features()[:4])
    with pytest.raises(ValueError, match="num_classes"):
        SegmentationHead(16, 0)
