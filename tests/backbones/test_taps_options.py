"""The s2_tap / tap_at options, checked against smp's own encoders (an independent reference)."""

import pytest
import torch
from segmentation_models_pytorch.encoders import encoders as smp_encoders

import backbones


@pytest.mark.parametrize("name", ["efficientnet-b0", "efficientnet-b3", "efficientnet-b7"])
def test_stem_tap_channels_equal_smp_tables(name):
    # smp's EfficientNet encoders tap the stem at s2: [3, 32, ...] for b0, 40 for b3, 64 for b7.
    expected = smp_encoders[name]["params"]["out_channels"][1:]
    net = backbones.create(name, s2_tap="stem")
    assert [spec.channels for spec in net.feature_info] == expected
    assert [spec.stride for spec in net.feature_info] == [2, 4, 8, 16, 32]


def test_stem_tap_is_the_stem_output_and_default_unchanged():
    torch.manual_seed(0)
    stage = backbones.create("efficientnet-b0").eval()
    stem = backbones.create("efficientnet-b0", s2_tap="stem").eval()
    stem.load_state_dict(stage.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a, b = stage(x), stem(x)
        expected_s2 = stage.stem(x)
    assert stage.feature_info[0].channels == 16 and a["s2"].shape[1] == 16
    torch.testing.assert_close(b["s2"], expected_s2)
    for name in ("s4", "s8", "s16", "s32"):
        torch.testing.assert_close(a[name], b[name])


def test_tap_at_moves_a_tap_inside_a_stage():
    torch.manual_seed(0)
    net = backbones.create("efficientnet-b0", tap_at={"s16": (4, 0)}).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = net(x)
        y = net.stem(x)
        for stage in net.stages[:4]:
            y = stage(y)
        expected = net.stages[4][0](y)
    torch.testing.assert_close(out["s16"], expected)
    assert net.feature_info[3].channels == 112


@pytest.mark.parametrize("tap_at, match", [({"s7": (0, 0)}, "unknown tap"), ({"s16": (9, 0)}, "no such block"),
                                            ({"s16": (4, 7)}, "no such block"), ({"s16": (2, 0)}, "stride 8")])
def test_tap_at_errors(tap_at, match):
    with pytest.raises(ValueError, match=match):
        backbones.create("efficientnet-b0", tap_at=tap_at)


def test_s2_tap_error():
    with pytest.raises(ValueError, match="s2_tap"):
        backbones.create("efficientnet-b0", s2_tap="first")
