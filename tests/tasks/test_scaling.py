"""One knob (issue 10): what model.phi / model.scale resolve to for every task, against the papers' tables."""

import pytest

from tasks import config as C
from tasks.scaling import describe

CLS = "configs/classification/efficientnet_b0_imagenet.yaml"
DET = "configs/detection/efficientdet_d0_coco.yaml"
SEG = "configs/segmentation/unet_efficientnet_cityscapes.yaml"

# Released EfficientDet configs (shared/reference/efficientdet.md): input, BiFPN width, repeats, head depth.
RELEASED = {0: (512, 64, 3, 3), 1: (640, 88, 4, 3), 2: (768, 112, 5, 3), 3: (896, 160, 6, 4), 4: (1024, 224, 7, 4),
            5: (1280, 288, 7, 4), 6: (1280, 384, 8, 5), 7: (1536, 384, 8, 5)}
# Where the released configs deviate from the paper's rule (W = 64 * 1.35^phi to a multiple of 8,
# D = 3 + phi, D_head = 3 + floor(phi / 3), R = 512 + 128 phi): the note lists these.
DEVIATIONS = {(2, "width"), (4, "width"), (5, "input"), (5, "repeats"), (6, "repeats"), (7, "input"),
              (7, "width"), (7, "repeats")}


def paper_rule(phi: int) -> dict:
    from backbones.specs import make_divisible

    return {"input": 512 + 128 * phi, "width": make_divisible(64 * 1.35**phi, 8), "repeats": 3 + phi,
            "head_depth": 3 + phi // 3}


@pytest.mark.parametrize("phi", range(8))
def test_an_integral_phi_is_the_released_detector(phi):
    info = describe(C.load(DET, [f"model.phi={phi}"]))
    named = describe(C.load(DET, [f"model.scale={phi}"]))
    assert {k: v for k, v in info.items() if k not in ("phi", "scale")} == \
        {k: v for k, v in named.items() if k not in ("phi", "scale")}
    size, width, repeats, depth = RELEASED[phi]
    assert (info["input_size"], info["bifpn_width"], info["bifpn_repeats"], info["head_depth"]) == ([size, size], width,
                                                                                                      repeats, depth)
    rule = paper_rule(phi)
    for field, value in (("input", size), ("width", width), ("repeats", repeats), ("head_depth", depth)):
        if (phi, field) not in DEVIATIONS:
            assert rule[field] == value, (phi, field)  # where the paper's table applies, the rule gives the row
        else:
            assert rule[field] != value, (phi, field)


def test_a_fractional_phi_follows_the_rules_between_the_named_scales():
    info = describe(C.load(DET, ["model.phi=2.5"]))
    assert info["input_size"] == [896, 896]  # 512 + 128 * 2.5 = 832, to the next multiple of 128
    assert info["bifpn_width"] == 136 and 112 < info["bifpn_width"] < 160  # 64 * 1.35^2.5 = 135.6
    assert info["bifpn_repeats"] == 6 and info["head_depth"] == 3
    assert info["backbone"] == "efficientnet(phi=2.5)"


def test_classification_phi_named_and_free():
    named = describe(C.load(CLS, ["model.phi=3"]))
    assert (named["backbone"], named["input_size"]) == ("efficientnet-b3", [300, 300])  # Table 1: B3 at 300
    free = describe(C.load(CLS, ["model.phi=2.5"]))
    assert free["width_multiplier"] == pytest.approx(1.1**2.5, abs=1e-4)
    assert free["depth_multiplier"] == pytest.approx(1.2**2.5, abs=1e-4)
    assert free["input_size"] == [8 * round(224 * 1.15**2.5 / 8)] * 2  # gamma 1.15


def test_segmentation_phi_sizes_the_unet_decoder():
    assert describe(C.load(SEG, ["model.phi=2"]))["decoder_channels"] == [256, 128, 64, 32, 16]  # smp's, named
    widths = describe(C.load(SEG, ["model.phi=1.5"]))["decoder_channels"]

    def paper_rounding(value):  # to a multiple of 8, never more than 10% down (Tan & Le's rule)
        rounded = max(8, int(value + 4) // 8 * 8)
        return rounded + 8 if rounded < 0.9 * value else rounded

    assert widths == [paper_rounding(c * 1.1**1.5) for c in (256, 128, 64, 32, 16)] == [296, 144, 72, 40, 24]


def test_effdense_backbones_task_detection_gmacs_against_the_paper():
    """GMACs of the D0..D7x networks (without NMS) at their input sizes vs the paper's FLOPs (Table 2)."""
    from tasks.summary import describe_task

    paper = {"0": 2.54, "3": 24.9, "7x": 410}
    for scale, flops in paper.items():
        row = describe_task("detection", scale=scale)
        assert row["gmacs"] == pytest.approx(flops, rel=0.04), scale
