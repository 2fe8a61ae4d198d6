"""The classification training recipe (issue 17): RandAugment / AutoAugment on TF's scale, random erasing,
bicubic resizing, Mixup / CutMix with soft targets, and EfficientNetV2's progressive learning."""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from tasks.classification.mixup import MixupCutmix, soft_target_cross_entropy, soft_targets
from tasks.classification.progressive import epoch_callbacks, progressive_callback, progressive_stages
from tasks.config import ConfigError, load
from tasks.config.schema import ClassificationAugmentConfig
from tasks.data.images import EightBitOnly
from tasks.data.synthetic.classification import write_classification
from tasks.data.transforms import autoaugment as aa
from tasks.data.transforms.classification import (RandomErasing, classification_eval_transform,
                                                   classification_train_transform, train_transform_for)
from tasks.engine.progressive import build_stages, rebuild_loader, schedule_table, stage_index

timm_aa = pytest.importorskip("timm.data.auto_augment")

TIMM_NAMES = {"TranslateXRel": "TranslateX", "TranslateYRel": "TranslateY"}  # timm's relative translate = ours


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_classification(tmp_path_factory.mktemp("recipe") / "shapes", train_per_class=4, val_per_class=2,
                                size=32)


def demo(root, *overrides):
    return load("demo/classification", [f"data.root={root}", "data.workers=0", "data.batch_size=4",
                                        "data.image_size=32", "train.progress=false", *overrides])


# -- RandAugment / AutoAugment on TF's scale ---------------------------------------------------------


def _timm_strength(op) -> float | int | None:
    args = op.level_fn(op.magnitude, op.hparams) if op.level_fn is not None else ()
    return abs(args[0]) if args else None  # the random sign aside


def test_randaugment_m9_strengths_equal_timm_rand_m9_n2():
    reference = timm_aa.rand_augment_transform("rand-m9-n2", {})
    assert reference.num_layers == 2
    timm_ops = {TIMM_NAMES.get(op.name, op.name): op for op in reference.ops}
    # the same ops as TF's list, which also has Cutout (timm leaves it to random erasing)
    assert set(timm_ops) == set(aa.RAND_OPS) - {"Cutout"}
    for name, op in timm_ops.items():
        assert op.magnitude == 9
        assert aa.op_strength(name, 9) == pytest.approx(_timm_strength(op)), name
    # the numbers, by hand: TF's level / 10 of each maximum
    expected = {"Rotate": 27.0, "ShearX": 0.27, "ShearY": 0.27, "TranslateX": 0.405, "TranslateY": 0.405,
                "Posterize": 3, "Solarize": 230, "SolarizeAdd": 99, "Color": 1.72, "Contrast": 1.72,
                "Brightness": 1.72, "Sharpness": 1.72, "AutoContrast": None, "Equalize": None, "Invert": None}
    for name, value in expected.items():
        assert aa.op_strength(name, 9) == (pytest.approx(value) if value is not None else None), name
    assert aa.op_strength("Cutout", 9, aa.RANDAUGMENT_CONSTANTS) == pytest.approx(0.9 * 40 / 224)  # TF: 36 px at 224


def test_randaugment_rotates_by_27_degrees_at_m9_where_torchvision_rotated_9():
    image = torch.zeros(3, 33, 33, dtype=torch.uint8)
    image[:, 14:19, :] = 255  # a horizontal bar
    ours = aa.RandAugment(num_ops=1, magnitude=9, ops=("Rotate",))(image)
    assert any(torch.equal(ours, F.rotate(image, angle, fill=[128.0] * 3)) for angle in (27.0, -27.0))
    # torchvision's v2.RandAugment(magnitude=9) is 9 / 30 of the range: 9 degrees (TF's M=3)
    bins = v2.RandAugment(magnitude=9)._AUGMENTATION_SPACE["Rotate"][0](31, 33, 33)
    assert float(bins[9]) == pytest.approx(9.0)


def test_randaugment_magnitudes_above_10_are_not_clipped():
    # EfficientNetV2 raises RandAugment to 15..25 on TF's scale (TF's code does not clip; timm's default does)
    assert aa.op_strength("Rotate", 15) == pytest.approx(45.0)
    assert aa.op_strength("Posterize", 25) == 8 and aa.op_strength("Solarize", 15) == 384
    image = torch.randint(0, 256, (3, 16, 16), dtype=torch.uint8)
    assert torch.equal(aa.apply_op(image, "Solarize", 15), image)  # a threshold above 255 changes nothing


def test_autoaugment_is_tf_policy_v0_not_torchvisions_imagenet_policy():
    timm_policy = timm_aa.auto_augment_policy("v0", {"translate_const": 250, "img_mean": (128, 128, 128)})
    assert len(aa.POLICY_V0) == len(timm_policy) == 25
    for ours, theirs in zip(aa.POLICY_V0, timm_policy):
        assert [(name, p, level) for name, p, level in ours] == \
               [(TIMM_NAMES.get(op.name, op.name), op.prob, op.magnitude) for op in theirs]
        for (name, _, level), op in zip(ours, theirs):
            if name == "TranslateY":  # TF's AutoAugment: 250 px at level 10 (timm: 0.45 of the side)
                assert aa.op_strength(name, level, aa.AUTOAUGMENT_CONSTANTS) == pytest.approx(level / 10 * 250 / 224)
            else:
                assert aa.op_strength(name, level, aa.AUTOAUGMENT_CONSTANTS) == pytest.approx(_timm_strength(op))
    # torchvision's IMAGENET policy is the AutoAugment paper's (first sub-policy Posterize/Rotate), not v0
    tv_first = v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET)._policies[0]
    assert [step[0] for step in tv_first] == ["Posterize", "Rotate"] != [step[0] for step in aa.POLICY_V0[0]]


def test_every_op_keeps_shape_and_dtype_for_1_and_3_bands():
    torch.manual_seed(0)
    for bands in (1, 3):
        image = torch.randint(0, 256, (bands, 24, 30), dtype=torch.uint8)
        for name in aa.OPS:
            for level in (0, 9, 10, 20):
                out = aa.apply_op(image, name, level)
                assert out.shape == image.shape and out.dtype == torch.uint8, (name, level)
    auto = aa.AutoAugment()
    assert all(auto(image).shape == image.shape for _ in range(50))


# -- the train / eval transforms ----------------------------------------------------------------------


def test_train_transform_picks_the_policy_bicubic_and_erasing():
    steps = classification_train_transform(ClassificationAugmentConfig(), (32, 32)).transforms
    assert steps[0].interpolation == v2.InterpolationMode.BICUBIC
    assert isinstance(steps[-1], EightBitOnly) and isinstance(steps[-1].inner, aa.RandAugment)
    assert steps[-1].inner.magnitude == 9 and steps[-1].inner.num_ops == 2
    augment = ClassificationAugmentConfig(autoaugment=True, random_erasing=0.25, interpolation="bilinear")
    steps = classification_train_transform(augment, (32, 32), magnitude=4).transforms
    assert steps[0].interpolation == v2.InterpolationMode.BILINEAR
    assert isinstance(steps[2].inner, aa.AutoAugment)  # in place of RandAugment
    assert isinstance(steps[3], RandomErasing) and steps[3].p == 0.25
    steps = classification_train_transform(ClassificationAugmentConfig(), (32, 32), magnitude=4.5).transforms
    assert steps[-1].inner.magnitude == 4.5  # progressive learning's stage magnitude
    resize = classification_eval_transform(ClassificationAugmentConfig(), (32, 32)).transforms[0]
    assert resize.interpolation == v2.InterpolationMode.BICUBIC


def test_bicubic_on_16_bit_values_stays_in_the_images_range_and_transforms_pickle():
    import pickle

    torch.manual_seed(0)
    wide = torch.randint(1000, 4096, (4, 20, 20)).to(torch.uint16)  # noise: bicubic overshoots most here
    augment = ClassificationAugmentConfig(randaugment=False)
    for transform in (classification_train_transform(augment, (48, 48)), classification_eval_transform(augment, (48, 48))):
        out = transform(wide)
        assert out.dtype == torch.float32 and float(out.min()) >= 1000 and float(out.max()) <= 4095
        twin = pickle.loads(pickle.dumps(transform))  # DataLoader workers started by spawn get a pickled copy
        assert twin.transforms[0].interpolation == v2.InterpolationMode.BICUBIC
    # float images are resized as torchvision's uint8 kernel (PIL's) resizes 8-bit ones: within a level of
    # rounding, where one float pass differs by up to ~13 levels at bicubic's overshoots
    from tasks.data.transforms.classification import _float_resize

    eight = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    for size in ((32, 24), (12, 40), (20, 30)):
        reference = F.resize(eight, list(size), interpolation=v2.InterpolationMode.BICUBIC, antialias=True).float()
        ours = _float_resize(eight.float(), size, v2.InterpolationMode.BICUBIC, (0.0, 255.0))
        assert (ours - reference).abs().max() <= 1.05, size


def test_random_erasing_fills_noise_that_normalises_to_unit_normal():
    torch.manual_seed(0)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    erased = []
    for _ in range(20):
        image = torch.full((3, 64, 64), 7, dtype=torch.uint8)
        out = RandomErasing(1.0, mean, std)(image)
        assert out.dtype == torch.uint8
        box = (out != 7).any(dim=0)
        normalised = (out.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
        erased.append(normalised[:, box].flatten())
    values = torch.cat(erased)
    assert values.numel() > 1000
    assert abs(float(values.mean())) < 0.05 and 0.9 < float(values.std()) < 1.05  # clipping to 0..255 trims tails
    wide = torch.full((3, 32, 32), 3000.0)  # 16-bit values with data.input_range [0, 4095]
    out = RandomErasing(1.0, mean, std, value_range=(0.0, 4095.0))(wide)
    changed = out != 3000.0
    assert out.dtype == torch.float32 and changed.any()
    assert 0.2 < float(out[changed].mean()) / 4095 < 0.7  # the mean's value in the 12-bit range, give or take


def test_train_transform_for_uses_the_configs_normalisation(shapes):
    cfg = demo(shapes, "data.augment.random_erasing=0.5", "data.mean=[0.5,0.5,0.5]", "data.std=[0.2,0.2,0.2]")
    erasing = train_transform_for(cfg).transforms[-1]
    assert isinstance(erasing, RandomErasing) and erasing.mean == [0.5] * 3 and erasing.std == [0.2] * 3
    out = train_transform_for(cfg, (24, 24))(torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8))
    assert out.shape == (3, 24, 24) and out.dtype == torch.uint8


# -- Mixup / CutMix -------------------------------------------------------------------------------------


def test_mixup_soft_targets_and_loss_by_hand():
    torch.manual_seed(3)
    images = torch.arange(4 * 2 * 2, dtype=torch.float32).view(4, 1, 2, 2)
    labels = torch.tensor([0, 1, 2, 1])
    mix = MixupCutmix(num_classes=3, mixup=0.4, label_smoothing=0.1)
    mixed, targets = mix(images, labels)
    kind, lam = mix.last
    assert kind == "mixup" and 0 < lam < 1
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.flip(0))
    on, off = 1 - 0.1 + 0.1 / 3, 0.1 / 3  # 0.9333, 0.0333
    smooth = {0: [on, off, off], 1: [off, on, off], 2: [off, off, on]}
    partner = [1, 2, 1, 0]  # the labels reversed
    by_hand = torch.tensor([[lam * a + (1 - lam) * b for a, b in zip(smooth[int(y)], smooth[p])]
                            for y, p in zip(labels, partner)])
    assert torch.allclose(targets, by_hand)
    assert torch.allclose(targets.sum(dim=1), torch.ones(4))
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 1.0, 0.0], [0.3, 0.3, 3.0], [-1.0, 2.0, 0.5]])
    loss_by_hand = -sum(float(t) * math.log(math.exp(z) / sum(math.exp(v) for v in row))
                        for trow, row in zip(by_hand.tolist(), logits.tolist()) for t, z in zip(trow, row)) / 4
    assert float(soft_target_cross_entropy(logits, targets)) == pytest.approx(loss_by_hand, rel=1e-6)
    # the same as timm's mixup_target + SoftTargetCrossEntropy
    from timm.data.mixup import mixup_target
    from timm.loss import SoftTargetCrossEntropy

    assert torch.allclose(targets, mixup_target(labels, 3, lam=lam, smoothing=0.1))
    assert float(SoftTargetCrossEntropy()(logits, targets)) == pytest.approx(loss_by_hand, rel=1e-6)
    # unmixed, the soft targets are CrossEntropyLoss(label_smoothing)'s
    plain = nn.CrossEntropyLoss(label_smoothing=0.1)(logits, labels)
    assert float(soft_target_cross_entropy(logits, soft_targets(labels, 3, 1.0, 0.1))) == pytest.approx(float(plain))


def test_cutmix_pastes_one_box_and_weights_by_its_area():
    torch.manual_seed(1)
    images = torch.stack([torch.full((1, 10, 10), float(i)) for i in range(4)])
    labels = torch.tensor([0, 1, 2, 3])
    mix = MixupCutmix(num_classes=4, cutmix=1.0)
    for _ in range(10):
        mixed, targets = mix(images, labels)
        kind, lam = mix.last
        assert kind == "cutmix"
        pasted = mixed[0, 0] != 0  # image 0 gets image 3's pixels inside the box
        assert torch.equal(mixed[0, 0][pasted], torch.full((int(pasted.sum()),), 3.0))
        rows, cols = pasted.any(dim=1).nonzero(), pasted.any(dim=0).nonzero()
        if pasted.any():  # a rectangle
            height, width = int(rows.max()) - int(rows.min()) + 1, int(cols.max()) - int(cols.min()) + 1
            assert int(pasted.sum()) == height * width
        assert lam == pytest.approx(1 - int(pasted.sum()) / 100)
        assert torch.allclose(targets[0], torch.tensor([lam, 0, 0, 1 - lam]))


def test_with_both_alphas_each_batch_is_mixup_or_cutmix():
    torch.manual_seed(0)
    mix = MixupCutmix(num_classes=2, mixup=0.2, cutmix=1.0)
    kinds = set()
    for _ in range(30):
        mix(torch.rand(2, 1, 8, 8), torch.tensor([0, 1]))
        kinds.add(mix.last[0])
    assert kinds == {"mixup", "cutmix"}


class _TinyNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.head = SimpleNamespace(num_classes=classes)
        self.fc = nn.Linear(3 * 4 * 4, classes)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_classification_task_trains_on_the_mixed_batch():
    from tasks.classification.model import ClassificationTask

    task = ClassificationTask(_TinyNet(), label_smoothing=0.1, mixup=0.5, cutmix=0.0).train()
    images = torch.randint(0, 256, (4, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([0, 1, 2, 0])
    torch.manual_seed(5)
    loss = task(images, labels)["cross_entropy"].detach()
    torch.manual_seed(5)
    mixed, targets = MixupCutmix(3, 0.5, 0.0, 0.1)(task.normalize(images), labels)
    with torch.no_grad():
        assert float(loss) == pytest.approx(float(soft_target_cross_entropy(task.net(mixed), targets)))
        task.mix.mixup = 0.0  # off: the plain label-smoothed cross-entropy
        plain = nn.CrossEntropyLoss(label_smoothing=0.1)(task.net(task.normalize(images)), labels)
        assert float(task(images, labels)["cross_entropy"]) == pytest.approx(float(plain))


# -- progressive learning -------------------------------------------------------------------------------

V2_S_TABLE = """\
progressive learning: 4 stages
stage   epochs  image_size  randaugment  dropout  mixup
  1/4     1-88         128            5      0.1      0
  2/4   89-175         184        8.333   0.1667      0
  3/4  176-263         240        11.67   0.2333      0
  4/4  264-350         300           15      0.3      0"""


def test_v2_s_schedule_matches_table_6_by_hand():
    # EfficientNetV2-S, Table 6: 4 stages, size 128 -> 300, RandAugment 5 -> 15, mixup 0 -> 0, dropout 0.1 -> 0.3;
    # 350 epochs; stage i at first + (last - first) * i / 3; in-between sizes rounded to a multiple of 8
    stages = build_stages(350, 4, {"image_size": (128, 300), "randaugment": (5, 15), "dropout": (0.1, 0.3),
                                   "mixup": (0, 0)}, multiple={"image_size": 8})
    by_hand = [(range(0, 88), 128, 5, 0.1, 0), (range(88, 175), 184, 5 + 10 / 3, 0.1 + 0.2 / 3, 0),
               (range(175, 263), 240, 5 + 20 / 3, 0.1 + 0.4 / 3, 0), (range(263, 350), 300, 15, 0.3, 0)]
    for stage, (epochs, size, magnitude, dropout, mixup) in zip(stages, by_hand):
        assert stage.epochs == epochs
        assert stage.values == {"image_size": size, "randaugment": pytest.approx(magnitude),
                                "dropout": pytest.approx(dropout), "mixup": mixup}
    assert schedule_table(stages) == V2_S_TABLE
    assert [stage_index(e, 350, 4) for e in (0, 87, 88, 174, 175, 262, 263, 349)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_config_schedule_and_its_one_line_errors(shapes):
    cfg = demo(shapes, "train.epochs=6", "train.progressive.stages=3", "train.progressive.image_size=[32,64]",
               "train.progressive.dropout=[0.1,0.3]", "data.augment.randaugment=true")
    stages = progressive_stages(cfg)
    assert [s.values["image_size"] for s in stages] == [32, 48, 64]
    assert [s.values["randaugment"] for s in stages] == [9, 9, 9]  # null pair: data.augment's, in every stage
    assert [s.values["mixup"] for s in stages] == [0.0] * 3 and [len(s.epochs) for s in stages] == [2, 2, 2]
    assert progressive_callback(demo(shapes)) is None and epoch_callbacks(demo(shapes)) == []
    with pytest.raises(ConfigError, match=r"train.progressive.image_size set but train.progressive.stages=1"):
        progressive_stages(demo(shapes, "train.progressive.image_size=[32,64]"))
    with pytest.raises(ConfigError, match=r"stages=4 is more than train.epochs=3"):
        progressive_stages(demo(shapes, "train.epochs=3", "train.progressive.stages=4"))
    with pytest.raises(ConfigError, match=r"data.augment.autoaugment=true"):
        progressive_stages(demo(shapes, "train.epochs=3", "train.progressive.stages=3", "data.augment.autoaugment=true",
                                "train.progressive.randaugment=[2,6]"))


def test_three_stage_cpu_run_changes_size_randaugment_dropout_and_mixup(shapes, tmp_path, caplog):
    from tasks.data import build_loaders
    from tasks.engine import Trainer
    from tasks.registry import build_model

    cfg = demo(shapes, "train.epochs=3", "train.progressive.stages=3", "train.progressive.image_size=[32,64]",
               "train.progressive.randaugment=[2,6]", "train.progressive.dropout=[0.1,0.3]",
               "train.progressive.mixup=[0,0.2]", "data.augment.randaugment=true", "data.image_size=40",
               "train.eval_every=3", f"train.output_dir={tmp_path}", "train.run_name=progressive")
    hook = progressive_callback(cfg)
    seen = []

    def record(trainer, epoch):  # runs after the hook: what the epoch's batches will get
        randaugment = trainer.loaders["train"].dataset.transform.transforms[-1].inner
        seen.append({"epoch": epoch, "randaugment": randaugment.magnitude,
                     "dropout": trainer.model.net.head.dropout.p, "mixup": trainer.model.mix.mixup})

    model = build_model(cfg)
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append((module.training, tuple(args[0].shape[-2:]))))
    caplog.set_level(logging.INFO, logger="effdense")
    trainer = Trainer(model, build_loaders(cfg), cfg, epoch_callbacks=[hook, record])
    trainer.fit()
    assert hook.applied == [0, 1, 2]
    assert seen == [{"epoch": 0, "randaugment": 2, "dropout": 0.1, "mixup": 0.0},
                    {"epoch": 1, "randaugment": 4.0, "dropout": pytest.approx(0.2), "mixup": pytest.approx(0.1)},
                    {"epoch": 2, "randaugment": 6, "dropout": 0.3, "mixup": 0.2}]
    batches = len(trainer.loaders["train"])  # 16 images / 4
    train_sizes = [size for training, size in sizes if training]
    assert train_sizes == [(32, 32)] * batches + [(48, 48)] * batches + [(64, 64)] * batches
    assert {size for training, size in sizes if not training} == {(40, 40)}  # evaluation stays at data.image_size
    assert trainer.model.mix.last[0] == "mixup"  # the last stage mixed its batches
    assert "progressive learning (EfficientNetV2): 3 stages" in caplog.text
    assert "stage 3/3 from epoch 3: image_size 64, randaugment 6, dropout 0.3, mixup 0.2" in caplog.text


def test_hook_applies_the_resumed_epochs_stage_and_rebuilds_persistent_loaders(shapes):
    from tasks.data import build_loaders
    from tasks.registry import build_model

    cfg = demo(shapes, "train.epochs=3", "train.progressive.stages=3", "train.progressive.image_size=[32,64]",
               "data.workers=1", "data.persistent_workers=true")
    loaders = build_loaders(cfg, splits=("train",))
    trainer = SimpleNamespace(loaders=loaders, model=build_model(cfg), is_main=True)
    hook = progressive_callback(cfg)
    hook(trainer, 0)
    first = trainer.loaders["train"]
    assert next(iter(first))[0].shape[-1] == 32  # its persistent worker now holds the stage-1 dataset
    hook(trainer, 2)  # a run resumed in the last stage
    assert hook.applied == [0, 2] and trainer.loaders["train"] is not first
    assert next(iter(trainer.loaders["train"]))[0].shape[-1] == 64
    hook(trainer, 2)
    assert hook.applied == [0, 2]  # the same stage is not applied twice


def test_rebuild_loader_keeps_sampler_batches_and_settings(shapes):
    from tasks.data import build_loaders

    loader = build_loaders(demo(shapes), splits=("train",))["train"]
    twin = rebuild_loader(loader)
    assert twin.dataset is loader.dataset and twin.sampler is loader.sampler and twin.generator is loader.generator
    assert (len(twin), twin.batch_size, twin.drop_last, twin.collate_fn) == \
           (len(loader), loader.batch_size, loader.drop_last, loader.collate_fn)
