"""Config loading: presets, overrides, one-line errors for unknown keys / wrong types / bad values."""

from __future__ import annotations

import dataclasses

import pytest

from tasks import config as C
from tasks.config.schema import ClassificationAugmentConfig

IMAGENET = "configs/classification/efficientnet_b0_imagenet.yaml"
DEMO = "configs/demo/classification.yaml"


def load_error(path: str, *overrides: str) -> str:
    with pytest.raises(C.ConfigError) as caught:
        C.load(path, list(overrides))
    message = str(caught.value)
    assert "\n" not in message, message
    return message


def test_imagenet_preset_is_the_published_recipe():
    cfg = C.load(IMAGENET)
    # Tan & Le 2019 / TF reference recipe (shared/reference/efficientnet.md, "Training recipe").
    assert (cfg.model.backbone, cfg.model.num_classes, cfg.model.drop_path) == ("efficientnet-b0", 1000, 0.2)
    assert (cfg.data.format, cfg.data.root, cfg.data.image_size, cfg.data.batch_size) == ("imagefolder", "data/imagenet", None, 128)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.base_batch_size) == ("rmsprop_tf", 0.016, 256)
    assert cfg.data.global_batch_size == 4096  # the paper's batch: 0.016 x 4096 / 256 = 0.256
    assert (cfg.optim.rmsprop_alpha, cfg.optim.momentum, cfg.optim.eps, cfg.optim.weight_decay) == (0.9, 0.9, 1e-3, 1e-5)
    assert cfg.optim.no_decay_norm_and_bias
    assert (cfg.schedule.name, cfg.schedule.step_gamma, cfg.schedule.step_epochs, cfg.schedule.warmup_epochs) == ("step", 0.97, 2.4, 5)
    assert (cfg.train.epochs, cfg.loss.label_smoothing, cfg.train.ema, cfg.train.ema_decay) == (350, 0.1, True, 0.9999)
    augment = cfg.data.augment
    # the paper's B0 used AutoAugment (the reference code's policy v0), bicubic resizing
    assert (augment.autoaugment, augment.randaugment, augment.interpolation) == (True, False, "bicubic")
    assert (augment.randaugment_ops, augment.randaugment_magnitude) == (2, 9)  # the alternative, rand-m9-n2
    assert (cfg.train.amp, cfg.train.channels_last, cfg.data.workers) == ("bf16", True, 8)
    assert C.resolve_image_size(cfg) == (224, 224)  # B0's native resolution (paper, Table 1)


def test_demo_preset_is_cpu_sized():
    cfg = C.load(DEMO)
    assert cfg.data.root == "runs/demo-data/classification" and cfg.data.format == "imagefolder"
    assert C.resolve_image_size(cfg) == (64, 64)
    assert (cfg.train.amp, cfg.train.ema, cfg.data.augment.randaugment, cfg.data.pin_memory) == ("none", False, False, False)
    assert cfg.model.num_classes == 4 and cfg.data.workers <= 2 and cfg.data.batch_size <= 32


def test_every_preset_key_is_written_out():
    """Presets are complete files (no inheritance): every schema key of their task appears in the YAML."""
    from pathlib import Path

    import yaml

    presets = sorted(str(p) for p in Path("configs").glob("*/*.yaml"))
    assert len(presets) >= 15  # classification, segmentation x2, detection D0..D7x, three demos
    for path in presets:
        C.load(path)
        raw = yaml.safe_load(open(path))
        schema = C.schema_for(raw["model"]["task"])
        assert _key_paths(raw) == _key_paths(C.to_dict(schema())), path


def _key_paths(tree: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in tree.items():
        paths |= _key_paths(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}"}
    return paths


def test_overrides_are_parsed_as_typed_yaml_values():
    cfg = C.load(IMAGENET, ["train.epochs=3", "optim.lr=1e-3", "model.weights=ckpt.pt", "model.weights=null",
                            "data.mean=[0.5,0.5,0.5]", "train.run_name=a=b", "train.ema=false"])
    assert cfg.train.epochs == 3 and type(cfg.train.epochs) is int
    assert cfg.optim.lr == 0.001 and type(cfg.optim.lr) is float
    assert cfg.model.weights is None
    assert cfg.data.mean == [0.5, 0.5, 0.5] and type(cfg.data.mean) is list
    assert cfg.train.run_name == "a=b" and cfg.train.ema is False
    assert isinstance(cfg, C.Config) and isinstance(cfg.data.augment, ClassificationAugmentConfig)


@pytest.mark.parametrize("backbone, native", [("efficientnet-b0", 224), ("efficientnet-b4", 380), ("efficientnet-b7", 600)])
def test_native_resolution_follows_the_backbone(backbone, native):
    # Published input sizes (paper Table 1 / torchvision weights).
    assert C.resolve_image_size(C.load(IMAGENET, [f"model.backbone={backbone}"])) == (native, native)


@pytest.mark.parametrize("phi, expected", [(0, 224), (1.5, 248), (3, 300), (-1, 192)])
def test_native_resolution_follows_gamma_for_a_free_phi(phi, expected):
    # An integral phi is the published size (B3: 300); between two rows the size grows geometrically,
    # sqrt(240 * 260) = 249.8 -> 248 (a multiple of 8); below B0, gamma = 1.15 per unit of phi (paper,
    # section 3.3): 224 / 1.15 = 194.8 -> 192.
    assert C.resolve_image_size(C.load(IMAGENET, [f"model.phi={phi}"])) == (expected, expected)


def test_a_pinned_image_size_wins_over_the_backbone():
    assert C.resolve_image_size(C.load(IMAGENET, ["model.backbone=efficientnet-b4", "data.image_size=300"])) == (300, 300)
    assert C.resolve_image_size(C.load(IMAGENET, ["data.image_size=[256,320]"])) == (256, 320)
    assert C.load(IMAGENET, ["data.image_size=300"]).data.image_size == [300, 300]  # an int means a square


def test_model_scale_names_the_b_number():
    cfg = C.load(IMAGENET, ["model.scale=3"])
    assert C.resolve_image_size(cfg) == (300, 300)  # B3's published resolution
    assert "model.scale='9' must be one of: null, 0, 1, 2, 3, 4, 5, 6, 7 (the published rows; any other size is model.phi" \
        in load_error(IMAGENET, "model.scale=9")


def test_sections_of_another_task_are_refused_naming_their_task():
    message = load_error(IMAGENET, "model.segmentation.head=unet")
    assert "config key 'model.segmentation' is unknown for model.task=classification (it is a segmentation key)" in message
    assert "valid keys in 'model':" in message and "dropout" in message
    message = load_error(IMAGENET, "loss.huber_delta=0.2")
    assert "it is a detection key" in message and "label_smoothing" in message


def test_each_task_has_its_own_schema_and_native_size():
    # A classification preset holds classification keys: switching its task names the first foreign one.
    assert "is unknown for model.task=segmentation" in load_error(IMAGENET, "model.task=segmentation")
    seg = C.SegmentationConfig()
    assert C.validate(seg) is seg and seg.native_image_size() == [512, 512]
    assert seg.data.ignore_index == 255 and seg.model.segmentation.decoder_channels == [256, 128, 64, 32, 16]


def test_cross_field_rules():
    assert "optim.nesterov=true needs optim.momentum > 0" in load_error(IMAGENET, "optim.nesterov=true", "optim.momentum=0")


def test_unknown_key_names_the_path_and_the_valid_keys():
    message = load_error(IMAGENET, "train.epochz=3")
    assert "config key 'train.epochz' is unknown; valid keys in 'train': amp, batch_size, channels_last," in message
    assert "epochs" in message and "did you mean 'train.epochs'" in message
    assert "valid keys at the top level: data, loss, model" in load_error(IMAGENET, "trian.epochs=3")


def test_unknown_key_in_a_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  learning_rate: 0.1\n")
    message = load_error(str(path))
    assert str(path) in message and "'optim.learning_rate' is unknown" in message and "lr" in message


@pytest.mark.parametrize("override, expected", [
    ("train.epochs=ten", "config key 'train.epochs' has the wrong type: got 'ten'; expected int"),
    ("train.epochs=2.5", "got 2.5; expected int"),
    ("train.epochs=null", "got None; expected int"),
    ("optim.lr=fast", "'optim.lr' has the wrong type: got 'fast'; expected float"),
    ("train.ema=maybe", "expected bool"),
    ("data.image_size=big", "expected an int (square), [height, width] or null"),
    ("data.mean=0.5", "'data.mean' has the wrong type: got 0.5; expected list of float"),
    ("train=3", "config key 'train' is a section"),
])
def test_wrong_type_names_key_value_and_expected_type(override, expected):
    message = load_error(IMAGENET, override)
    assert expected in message and f"--set {override}" in message


@pytest.mark.parametrize("override, expected", [
    ("optim.lr=-0.1", "optim.lr=-0.1 must be > 0"),
    ("optim.lr=0", "optim.lr=0.0 must be > 0"),
    ("train.epochs=0", "train.epochs=0 must be >= 1"),
    ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ("train.grad_accum=0", "train.grad_accum=0 must be >= 1"),
    ("model.drop_path=1.0", "model.drop_path=1.0 must be in [0, 1)"),
    ("loss.label_smoothing=-0.1", "loss.label_smoothing=-0.1 must be in [0, 1)"),
    ("train.ema_decay=1", "train.ema_decay=1.0 must be in (0, 1)"),
    ("data.image_size=16", "data.image_size=[16, 16]: each value must be >= 32"),
    ("data.image_size=[1,2,3]", "data.image_size=[1, 2, 3] must have [height, width]"),
    ("data.std=[0.2,0.0,0.2]", "data.std=[0.2, 0.0, 0.2]: each value must be in (0, 1]"),
    ("data.mean=[0.5,0.5]", "data.mean=[0.5, 0.5] has 2 values; expected one per band, model.in_channels=3"),
    ("data.mean=[123.7,116.3,103.5]", "0..1 pixel scale"),
    ("train.amp=fp8", "train.amp='fp8' must be one of: none, bf16, fp16"),
    ("optim.name=adam", "optim.name='adam' must be one of: sgd, rmsprop, rmsprop_tf, adamw"),
    ("schedule.name=linear", "schedule.name='linear' must be one of: cosine, step, poly, constant"),
    ("model.task=pose", "model.task='pose' must be one of: classification, segmentation, detection"),
    ("data.format=voc", "data.format='voc' must be one of: imagefolder"),
    ("data.format=coco", "data.format='coco' must be one of: imagefolder"),
    ("data.on_bad_sample=ignore", "data.on_bad_sample='ignore' must be one of: error, skip"),
    ("model.padding=valid", "model.padding='valid' must be one of: symmetric, same"),
    ("train.device=gpu", "train.device='gpu' must be auto, cpu, cuda or cuda:N"),
    ("model.backbone=resnet50", "model.backbone='resnet50' is unknown; known backbones: efficientnet-b0,"),
    ("model.backbone=efficientnet", "model.backbone='efficientnet' needs model.phi"),
])
def test_out_of_range_and_bad_choices_name_the_key_and_the_valid_values(override, expected):
    assert expected in load_error(IMAGENET, override)


def test_several_problems_are_reported_together_on_one_line():
    message = load_error(IMAGENET, "optim.lr=-1", "train.epochs=0")
    assert message.startswith("2 config problems:") and "optim.lr=-1.0" in message and "train.epochs=0" in message


def test_validate_checks_a_config_built_in_code():
    cfg = C.ClassificationConfig()
    assert C.validate(cfg) is cfg
    cfg.optim.lr = -0.1
    with pytest.raises(C.ConfigError, match=r"optim\.lr=-0\.1 must be > 0"):
        C.validate(cfg)


def test_bad_files_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    assert f"config file '{missing}' not found" in load_error(str(missing))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: 3\n  amp: [bf16\n")
    assert f"{broken}: invalid YAML at line 4" in load_error(str(broken))
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "top level must be a mapping" in load_error(str(listing))
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text("train:\n  epochs: 3\n  epochs: 4\n")
    assert "line 3" in load_error(str(duplicate)) and "duplicate key" in load_error(str(duplicate))
    assert "expected key.path=value" in load_error(IMAGENET, "train.epochs")


def test_save_then_load_gives_an_equal_config(tmp_path):
    cfg = C.load(IMAGENET, ["model.phi=2.5", "data.mean=[0.5,0.4,0.3]", "optim.weight_decay=4e-5", "train.run_name=x"])
    path = C.save(cfg, tmp_path / "run" / "config.yaml")
    again = C.load(path)
    assert again == cfg
    assert dataclasses.asdict(again) == C.to_dict(cfg)
    assert C.to_dict(cfg)["model"]["phi"] == 2.5 and C.to_dict(cfg)["optim"]["weight_decay"] == 4e-5


def test_an_unquoted_yaml_off_is_the_word_off(tmp_path):
    """YAML 1.1 reads `check: off` as false; a choice field that holds the word takes it back."""
    import yaml

    raw = yaml.safe_load(open(IMAGENET))
    raw["data"]["check"] = False  # what `check: off` parses to
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert C.load(path).data.check == "off"
    assert C.load(IMAGENET, ["data.check=off"]).data.check == "off"
    assert "must be one of" in load_error(IMAGENET, "data.check=true")  # no word for true there
