"""EfficientDet against effdet: parameter counts D0..D7x, outputs on the same random weights, the table."""

import logging
import math

import pytest
import torch

import backbones
from heads.efficientdet import PRESETS, efficientdet_preset
from tasks.detection import build_detector
from tasks.detection.weights import load_detector_weights

NAMES = ["0", "1", "2", "3", "4", "5", "6", "7", "7x"]
# effdet's tf_efficientdet_d* with 90 classes (google/automl's golden counts agree for D0/D1).
EFFDET_PARAMS = {"0": 3_880_067, "1": 6_625_898, "2": 8_097_039, "3": 12_032_296, "4": 20_723_675,
                 "5": 33_653_315, "6": 51_871_782, "7": 51_871_782, "7x": 77_147_166}


def _effdet(name, **kwargs):
    import effdet

    return effdet.create_model(name, pretrained=False, pretrained_backbone=False, **kwargs)


def _count(module):
    return sum(p.numel() for p in module.parameters())


def _redundant_biases(state):
    """effdet's conv biases directly before a BatchNorm (what our import folds into the BN)."""
    return sum(v.numel() for k, v in state.items()
               if k.startswith(("fpn.", "class_net.conv_rep", "box_net.conv_rep")) and k.endswith(".bias")
               and (".conv_pw." in k or ".conv.conv." in k))


@pytest.mark.parametrize("name", NAMES)
def test_parameter_counts_match_effdet(name):
    with torch.device("meta"):
        ours = build_detector(f"efficientdet-d{name}", 90)
        theirs = _effdet(f"tf_efficientdet_d{name}")
    assert _count(theirs) == EFFDET_PARAMS[name]
    assert abs(_count(ours) - EFFDET_PARAMS[name]) / EFFDET_PARAMS[name] < 0.005
    # Exactly effdet's count once its redundant (pre-BatchNorm) conv biases are added back.
    assert _count(ours) + _redundant_biases(theirs.state_dict()) == EFFDET_PARAMS[name]


def test_preset_table_and_names():
    d0 = efficientdet_preset(0)
    assert (d0.backbone, d0.input_size, d0.width, d0.repeats, d0.head_depth, d0.anchor_scale, d0.levels, d0.fusion) \
        == ("efficientnet-b0", 512, 64, 3, 3, 4.0, (3, 4, 5, 6, 7), "fast")
    d7x = efficientdet_preset("7x")
    assert (d7x.backbone, d7x.levels[-1], d7x.fusion, d7x.input_size) == ("efficientnet-b7", 8, "sum", 1536)
    assert efficientdet_preset(7).anchor_scale == 5.0 and efficientdet_preset(7).backbone == "efficientnet-b6"
    assert efficientdet_preset("d3") is efficientdet_preset("efficientdet-d3") is efficientdet_preset(3.0)
    assert [PRESETS[f"efficientdet-d{n}"].width for n in NAMES] == [64, 88, 112, 160, 224, 288, 384, 384, 384]
    with pytest.raises(ValueError, match="unknown EfficientDet scale"):
        efficientdet_preset("d9x")
    with pytest.raises(ValueError, match=">= -2"):
        efficientdet_preset(-3)


@pytest.mark.parametrize("phi", [2.5, 0.5, -1.0, 8.0])
def test_free_phi_follows_the_paper_rule(phi):
    preset = efficientdet_preset(phi, rule="paper")
    width = 64 * 1.35**phi
    assert preset.width % 8 == 0 and abs(preset.width - width) <= 4 and preset.width >= 0.9 * width
    assert preset.repeats == math.floor(3 + phi + 0.5)
    assert preset.head_depth == 3 + math.floor(phi / 3)
    assert preset.input_size == 128 * math.floor(4 + phi + 0.5)
    assert preset.backbone == "efficientnet"
    # The closed-form backbone, efficientnet(phi) under rule="paper": below 0 the default rule is the closed form
    # too, so backbone_phi names it; above 0 its width/depth multipliers do (phi= would give the table's backbone).
    paper_backbone = backbones.get_preset("efficientnet", phi=phi, rule="paper").arch()
    named = backbones.get_preset("efficientnet", phi=preset.backbone_phi, **dict(preset.backbone_options)).arch()
    assert (named.stem_channels, named.stages, named.head_channels) == \
        (paper_backbone.stem_channels, paper_backbone.stages, paper_backbone.head_channels)
    # build_detector("efficientdet", phi=...) follows the default rule="table" (which differs from the paper's
    # above 0), so the paper's row is built from the preset itself.
    with torch.device("meta"):
        model = build_detector(num_classes=10, preset=preset)
    assert model.fpn.width == preset.width and len(model.fpn.cells) == preset.repeats
    assert len(model.class_net.convs) == preset.head_depth
    assert model.backbone.arch.stages == paper_backbone.stages


def test_build_detector_phi_follows_the_default_rule():
    with torch.device("meta"):
        model = build_detector("efficientdet", 10, phi=2.5)
    # phi 2.5 = between D2 and D3: 768 px, 136 channels (sqrt(112 * 160) = 133.9), 6 cells, 4 head convs.
    assert (model.fpn.width, len(model.fpn.cells), len(model.class_net.convs)) == (136, 6, 4)
    assert model.backbone.name == "efficientnet(phi=2.5)"

    with pytest.raises(ValueError, match="'table', 'paper'"):
        efficientdet_preset(2.5, rule="closed")


def test_class_bias_prior_and_shared_convs():
    model = build_detector("efficientdet-d0", 7)
    torch.testing.assert_close(model.class_net.predict.pw.bias, torch.full((63,), -math.log(99.0)))
    assert torch.count_nonzero(model.box_net.predict.pw.bias) == 0
    assert len(model.class_net.convs) == 3 and [len(n) for n in model.class_net.norms] == [5, 5, 5]


def _randomised_effdet(name, seed=0, score_spread=8.0, **kwargs):
    """effdet's model with random BatchNorm statistics, biases and fusion weights (what a strict import must carry
    over); the class predictor scaled by ``score_spread`` so the scores rank without near-ties."""
    torch.manual_seed(seed)
    theirs = _effdet(name, **kwargs)
    with torch.no_grad():
        for module in theirs.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
        for key, param in theirs.named_parameters():
            if key.endswith("bias") and "predict" not in key:
                param.uniform_(-0.1, 0.1)  # redundant biases must be folded, not dropped
            elif key.endswith("edge_weights"):
                param.uniform_(0.2, 1.5)
        theirs.class_net.predict.conv_pw.weight.mul_(score_spread)
    return theirs.eval()


def _relative(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-12)).item()


def _compare(effdet_name, ours_name, size, tmp_path):
    from effdet.bench import DetBenchPredict

    theirs = _randomised_effdet(effdet_name, image_size=(size, size))
    path = tmp_path / f"{effdet_name}.pth"
    torch.save({"state_dict": theirs.state_dict()}, path)
    ours = build_detector(ours_name, 90, weights=str(path)).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        class_theirs, box_theirs = theirs(x)
        class_ours, box_ours = super(type(ours), ours).forward(x)
        for a, b in zip(class_ours + box_ours, class_theirs + box_theirs):
            assert a.shape == b.shape
            assert _relative(a, b) < 1e-4
        reference = DetBenchPredict(theirs).eval()(x, img_info={"img_scale": torch.ones(1),
                                                                  "img_size": torch.tensor([[size, size]]).float()})[0]
        detections = ours(x)[0]
    assert len(detections["boxes"]) == 100
    # The same detections; scores equal to 1e-7 may come out in either order, so match them by box.
    distance = (detections["boxes"][:, None] - reference[None, :, :4]).abs().amax(-1)
    distance += 1e9 * (detections["labels"][:, None] + 1 != reference[None, :, 5].long())
    match = distance.argmin(1)
    assert len(set(match.tolist())) == 100
    assert _relative(detections["boxes"], reference[match, :4]) < 1e-4
    assert _relative(detections["scores"], reference[match, 4]) < 1e-4
    assert (match - torch.arange(100)).abs().max() <= 2  # only near-ties swap places


def test_d0_outputs_equal_effdet_tf(tmp_path):
    _compare("tf_efficientdet_d0", "tf_efficientdet_d0", 512, tmp_path)


def test_d0_outputs_equal_effdet_pytorch_flavour(tmp_path):
    _compare("efficientdet_d0", "efficientdet-d0", 384, tmp_path)  # symmetric padding, no redundant biases


@pytest.mark.slow
def test_d3_outputs_equal_effdet_tf(tmp_path):
    _compare("tf_efficientdet_d3", "tf_efficientdet_d3", 896, tmp_path)


def test_class_count_change_reinitialises_only_the_class_predictor(tmp_path, caplog):
    theirs = _randomised_effdet("tf_efficientdet_d0")
    path = tmp_path / "d0.pth"
    torch.save(theirs.state_dict(), path)
    with caplog.at_level(logging.INFO, logger="effdense"):
        ours = build_detector("tf_efficientdet_d0", 5, weights=str(path))
    assert "class predictor re-initialised" in caplog.text and "90 classes, the model 5" in caplog.text
    torch.testing.assert_close(ours.class_net.predict.pw.bias, torch.full((45,), -math.log(99.0)))
    torch.testing.assert_close(ours.class_net.predict.dw.weight, theirs.class_net.predict.conv_dw.weight)
    torch.testing.assert_close(ours.box_net.predict.pw.weight, theirs.box_net.predict.conv_pw.weight)


def test_effdense_round_trip_and_strict_errors(tmp_path):
    from backbones.weights import save_safetensors

    model = build_detector("efficientdet-d0", 4)
    with torch.no_grad():
        model.fpn.cells[0].nodes[0].weights.fill_(0.5)
    path = save_safetensors(model, tmp_path / "model.safetensors")
    again = build_detector("efficientdet-d0", 4, weights=path)
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key
    with pytest.raises(ValueError, match=r"model.safetensors: effdense detector checkpoint does not fit this model: "
                                         r"\d+ missing keys"):
        build_detector("efficientdet-d1", 4, weights=path)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("box_net.predict")}
    with pytest.raises(ValueError, match=r"3 missing keys \(box_net.predict.dw.weight"):
        load_detector_weights(build_detector("efficientdet-d0", 4), state, "partial")


def test_backbone_weights_load_into_the_backbone_only(tmp_path):
    from backbones.weights import save_safetensors
    from tasks.classification import build_classifier

    classifier = build_classifier("efficientnet-b0", num_classes=10)
    path = save_safetensors(classifier, tmp_path / "classifier.safetensors")
    detector = build_detector("efficientdet-d0", 3, backbone_weights=path)
    for key, value in detector.backbone.state_dict().items():
        assert torch.equal(value, classifier.backbone.state_dict()[key]), key
    with pytest.raises(ValueError, match="holds no detector"):
        build_detector("efficientdet-d0", 3, weights=path)
