"""One knob (issue 10): what model.phi / model.scale resolve to for every task, against the papers' tables."""

import pytest

from tasks import config as C
from tasks.registry import describe_scale as describe

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
    # The paper's closed form (kept behind rule="paper") just above phi equals the paper's rule by hand, and
    # agrees with the released row except at the DEVIATIONS the note lists.
    from heads import efficientdet_preset

    free = efficientdet_preset(phi + 1e-9, rule="paper")
    rule = {"input": free.input_size, "width": free.width, "repeats": free.repeats, "head_depth": free.head_depth}
    assert rule == paper_rule(phi)
    for field, value in (("input", size), ("width", width), ("repeats", repeats), ("head_depth", depth)):
        if (phi, field) not in DEVIATIONS:
            assert rule[field] == value, (phi, field)  # where the paper's table applies, the rule gives the row
        else:
            assert rule[field] != value, (phi, field)


def test_a_fractional_phi_interpolates_between_the_neighbouring_rows():
    info = describe(C.load(DET, ["model.phi=2.5"]))
    assert info["input_size"] == [768, 768]  # sqrt(768 * 896) = 829.5, to the nearest multiple of 128
    assert info["bifpn_width"] == 136 and 112 < info["bifpn_width"] < 160  # sqrt(112 * 160) = 133.9 -> 136
    assert info["bifpn_repeats"] == 6 and info["head_depth"] == 4  # 5.5 and 3.5, rounded half up
    assert info["backbone"] == "efficientnet(phi=2.5)"  # the backbone between B2 and B3:
    import backbones

    preset = backbones.get_preset("efficientnet", phi=2.5)
    assert (preset.width, preset.depth) == (pytest.approx((1.1 * 1.2) ** 0.5, abs=1e-4),
                                            pytest.approx((1.2 * 1.4) ** 0.5, abs=1e-4))


def test_classification_phi_named_and_free():
    named = describe(C.load(CLS, ["model.phi=3"]))
    assert (named["backbone"], named["input_size"]) == ("efficientnet-b3", [300, 300])  # Table 1: B3 at 300
    free = describe(C.load(CLS, ["model.phi=2.5"]))
    assert free["width_multiplier"] == pytest.approx((1.1 * 1.2) ** 0.5, abs=1e-4)  # B2 and B3's widths
    assert free["depth_multiplier"] == pytest.approx((1.2 * 1.4) ** 0.5, abs=1e-4)
    assert free["input_size"] == [280, 280]  # sqrt(260 * 300) = 279.3, to a multiple of 8
    beyond = describe(C.load(CLS, ["model.phi=8"]))  # past B7: B7 grown by the rules' factors
    assert (beyond["width_multiplier"], beyond["depth_multiplier"]) == (pytest.approx(2.0 * 1.1), pytest.approx(3.1 * 1.2))
    below = describe(C.load(CLS, ["model.phi=-1"]))  # below B0: the rule itself (B0 is the rule at 0)
    assert below["width_multiplier"] == pytest.approx(1 / 1.1, abs=1e-4) and below["input_size"] == [192, 192]


def test_the_knob_is_monotone_across_the_named_scales():
    """What --search phi bisects on: every size grows with phi, through the integers (a switch between the
    tables and the closed-form rules would make phi = 2.95 bigger than phi = 3)."""
    import backbones

    from tasks.config.scaling import backbone_at, detector_at

    phis = [k / 20 for k in range(0, 161)]
    found = [backbone_at(phi) for phi in phis]
    for key in ("width", "depth"):
        values = [getattr(backbones.get_preset(name, **options), key) for name, options, _, _ in found]
        assert all(a <= b + 1e-9 for a, b in zip(values, values[1:])), key
    resolutions = [resolution for _, _, resolution, _ in found]
    assert all(a <= b for a, b in zip(resolutions, resolutions[1:]))
    rows = [detector_at(phi) for phi in phis]
    for key in ("input_size", "width", "repeats", "head_depth"):
        values = [getattr(row, key) for row in rows]
        assert all(a <= b for a, b in zip(values, values[1:])), key


def test_segmentation_phi_sizes_the_unet_decoder():
    assert describe(C.load(SEG, ["model.phi=2"]))["decoder_channels"] == [256, 128, 64, 32, 16]  # smp's, named
    assert describe(C.load(SEG, ["model.phi=2.5"]))["decoder_channels"] == [256, 128, 64, 32, 16]  # the same between
    widths = describe(C.load(SEG, ["model.phi=8.5"]))["decoder_channels"]

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


@pytest.mark.parametrize("task, head", [("classification", "unet"), ("segmentation", "unet"), ("segmentation", "bifpn"),
                                        ("detection", "unet")])
def test_every_task_builds_at_a_fractional_phi_between_its_neighbours(task, head):
    """The whole task model at phi 2.5 has more parameters than at 2 and fewer than at 3."""
    from tasks.summary import describe_task

    params = [describe_task(task, phi=phi, head=head, size=(128, 256))["params_m"] for phi in (2.0, 2.5, 3.0)]
    assert params[0] < params[1] < params[2], params


PHIS = (0.5, 1.5, 2.5, 3.9, 7.5)


@pytest.mark.parametrize("phi", PHIS)
def test_the_python_api_and_the_config_build_the_same_model(phi):
    """One meaning of phi: backbones.create / build_classifier / build_segmenter / build_detector with phi=...
    build the same network as the config's model.phi, for every task (compared on the meta device: the same
    parameter names and shapes, and the same input size)."""
    import torch

    from tasks import registry
    from tasks.classification import build_classifier
    from tasks.config.scaling import resolve_image_size
    from tasks.detection import build_detector
    from tasks.segmentation import build_segmenter

    def shapes(model):
        return {k: tuple(v.shape) for k, v in model.state_dict().items()}

    with torch.device("meta"):
        for preset, api in ((CLS, lambda: build_classifier("efficientnet", 1000, phi=phi)),
                            (SEG, lambda: build_segmenter("efficientnet", 19, phi=phi)),
                            (DET, lambda: build_detector("efficientdet", 80, phi=phi))):
            cfg = C.load(preset, [f"model.phi={phi}", "model.backbone_weights=null", "data.image_size=null"]
                         if preset != SEG else [f"model.phi={phi}", "model.backbone_weights=null"])
            if preset == DET:
                cfg.model.num_classes = 80
            ours = registry.get(cfg.model.task).build_model(cfg).net
            assert shapes(api()) == shapes(ours), (preset, phi)
            if preset == DET:
                assert api().input_size == resolve_image_size(cfg)[0]
            elif preset == CLS:
                import backbones

                assert backbones.get_preset("efficientnet", phi=phi).resolution == resolve_image_size(cfg)[0]


def test_sizes_grow_monotonically_with_phi_for_every_task():
    from tasks.summary import describe_task

    for task in ("classification", "segmentation", "detection"):
        params = [describe_task(task, phi=phi, size=(128, 256))["params_m"] for phi in (0, *PHIS, 8)]
        assert all(a < b for a, b in zip(params, params[1:])), (task, params)
