"""Issue 17: presets that reproduce the published recipes on any number of GPUs.

The global batch rule (tasks.engine.batching) against hand values for 1, 4 and 8 processes and in a real
training run; the EMA decay per image; soft-NMS against effdet's; the detection no-decay groups; every
preset header's target number and scoring command.
"""

from __future__ import annotations

import math
import re
import shlex
from pathlib import Path

import pytest
import torch

from tasks.config import ClassificationConfig, ConfigError, list_presets, load, resolve_preset
from tasks.engine import Trainer
from tasks.engine.batching import batch_plan, ema_step_decay
from tasks.engine.errors import EngineError
from tasks.engine.optim import scaled_lr
from tests.tasks.toy_task import ToyTask, make_config, make_loaders, trained_state

pytestmark = pytest.mark.usefixtures("one_thread")

REFERENCE = Path("/work/shared/reference")
DETECTION_PRESETS = [name for name in list_presets() if name.startswith("detection/") and name.endswith("_coco")]


def preset(name: str, *overrides: str):
    return load(resolve_preset(name), list(overrides))


# ---------------------------------------------------------------- the global batch rule


# (preset, world size) -> (global batch, micro-batch, accumulation steps, peak lr), by hand:
# share = G / W; a = ceil(share / data.batch_size); micro = share / a; lr = optim.lr * G / optim.base_batch_size.
HAND = {
    # EfficientDet-D0: G 128, at most 16 a forward, lr 0.08 per 64 -> 0.16
    ("detection/efficientdet_d0_coco", 1): (128, 16, 8, 0.16),
    ("detection/efficientdet_d0_coco", 4): (128, 16, 2, 0.16),
    ("detection/efficientdet_d0_coco", 8): (128, 16, 1, 0.16),
    # D7: at most 2 a forward
    ("detection/efficientdet_d7_coco", 1): (128, 2, 64, 0.16),
    ("detection/efficientdet_d7_coco", 4): (128, 2, 16, 0.16),
    ("detection/efficientdet_d7_coco", 8): (128, 2, 8, 0.16),
    # Cityscapes (mmseg): G 8, lr 0.01 per 8: one GPU 8, four GPUs 2 each, eight GPUs 1 each; never accumulated
    ("segmentation/unet_efficientnet_cityscapes", 1): (8, 8, 1, 0.01),
    ("segmentation/unet_efficientnet_cityscapes", 4): (8, 2, 1, 0.01),
    ("segmentation/unet_efficientnet_cityscapes", 8): (8, 1, 1, 0.01),
    # EfficientNet-B0 ImageNet: the paper's 4096 at lr 0.016 per 256 -> 0.256, at most 128 a forward
    ("classification/efficientnet_b0_imagenet", 1): (4096, 128, 32, 0.256),
    ("classification/efficientnet_b0_imagenet", 4): (4096, 128, 8, 0.256),
    ("classification/efficientnet_b0_imagenet", 8): (4096, 128, 4, 0.256),
}


@pytest.mark.parametrize("name, world", sorted(HAND))
def test_presets_global_batch_micro_batch_accumulation_and_lr(name, world):
    cfg = preset(name)
    plan = batch_plan(cfg, world)
    expected_global, micro, accum, lr = HAND[name, world]
    assert (plan.global_batch, plan.micro_batch, plan.accum) == (expected_global, micro, accum)
    assert plan.world_size * plan.accum * plan.micro_batch == plan.global_batch
    assert plan.micro_batch <= cfg.data.batch_size
    assert scaled_lr(cfg, world) == pytest.approx(lr)


@pytest.mark.parametrize("world, micro, accum", [(1, 16, 6), (4, 12, 2), (8, 12, 1)])
def test_uneven_share_takes_the_largest_micro_batch_that_divides_it(world, micro, accum):
    """G 96 at most 20 a forward. 1 process: 96 = ceil(96/20) = 5 parts does not divide, the largest divisor
    of 96 under 20 is 16 (6 forwards); 4 processes: 24 -> 2 x 12; 8 processes: 12 -> 1 x 12."""
    cfg = ClassificationConfig()
    cfg.data.global_batch_size, cfg.data.batch_size = 96, 20
    plan = batch_plan(cfg, world)
    assert (plan.micro_batch, plan.accum, plan.global_batch) == (micro, accum, 96)


def test_without_a_global_batch_the_batch_is_per_process():
    cfg = ClassificationConfig()
    cfg.data.batch_size, cfg.train.grad_accum, cfg.optim.lr, cfg.optim.base_batch_size = 16, 2, 0.1, 256
    for world in (1, 4, 8):
        plan = batch_plan(cfg, world)
        assert (plan.global_batch, plan.micro_batch, plan.accum) == (32 * world, 16, 2)
        assert scaled_lr(cfg, world) == pytest.approx(0.1 * 32 * world / 256)


def test_a_global_batch_that_does_not_split_is_one_line_naming_the_key_and_the_processes():
    cfg = preset("detection/efficientdet_d0_coco")
    with pytest.raises(ConfigError) as caught:
        batch_plan(cfg, 3)
    message = str(caught.value)
    assert "data.global_batch_size=128" in message and "3 processes" in message and "\n" not in message


def test_grad_accum_and_a_global_batch_together_are_refused():
    cfg = preset("detection/efficientdet_d0_coco", "train.grad_accum=2")
    with pytest.raises(ConfigError, match=r"train.grad_accum=2 and data.global_batch_size=128"):
        batch_plan(cfg, 1)


def test_every_process_count_sees_the_same_steps_per_epoch():
    """The train sampler: floor(N / W) indices per rank (DistributedSampler drop_last), cut to whole steps, so
    every rank has floor(N / G) steps of G / W images: the schedule is the same on 1 or 8 GPUs."""
    from torch.utils.data import DistributedSampler

    from tasks.data.loaders import EpochShuffleSampler, WholeSteps

    dataset, global_batch = list(range(2975)), 8  # Cityscapes train at batch 8
    for world in (1, 2, 4, 8):
        share = global_batch // world
        if world == 1:
            samplers = [WholeSteps(EpochShuffleSampler(len(dataset)), share)]
        else:
            samplers = [WholeSteps(DistributedSampler(dataset, world, rank, drop_last=True), share)
                        for rank in range(world)]
        for sampler in samplers:
            assert len(sampler) // share == 2975 // 8 == 371
            assert len(list(sampler)) == len(sampler)
        if world > 1:  # the ranks' shards stay disjoint
            seen = [i for sampler in samplers for i in sampler]
            assert len(seen) == len(set(seen))


# ---------------------------------------------------------------- EMA: one decay per image


def test_ema_decay_per_step_follows_the_global_batch():
    cfg = ClassificationConfig()
    cfg.train.ema_decay, cfg.train.ema_reference_batch = 0.9998, 256
    assert ema_step_decay(cfg, 1024) == pytest.approx(0.9998 ** 4, rel=0, abs=1e-15)
    assert ema_step_decay(cfg, 1024) == pytest.approx(0.99920024, abs=1e-8)  # 0.9998^4 by hand
    assert ema_step_decay(cfg, 256) == 0.9998
    assert ema_step_decay(cfg, 64) == pytest.approx(0.9998 ** 0.25)
    cfg.train.ema_reference_batch = None  # off: the decay as it is, whatever the batch
    assert ema_step_decay(cfg, 1024) == 0.9998


# ---------------------------------------------------------------- real training with accumulation


def test_training_on_demo_data_steps_once_per_global_batch(tmp_path):
    """Demo classification data, 28 training images, global batch 12 at most 4 a forward: 3 forwards of 4 per
    step, floor(28 / 12) = 2 steps an epoch (the last 4 images wait for the next epoch), lr and EMA by rule."""
    from tasks import registry
    from tasks.data import build_loaders
    from tasks.data.synthetic.classification import write_classification

    root = write_classification(tmp_path / "data", num_classes=4, train_per_class=7, val_per_class=2, size=32)
    cfg = preset("demo/classification", f"data.root={root}", "data.image_size=32", "data.global_batch_size=12",
                 "data.batch_size=4", "data.workers=0", "data.eval_batch_size=8", "train.epochs=1",
                 "train.device=cpu", "train.progress=false", "train.ema=true", "train.ema_decay=0.99",
                 "train.ema_reference_batch=3", "train.ema_warmup=false", "train.log_every=1")
    loaders = build_loaders(cfg)
    assert loaders["train"].batch_size == 4 and len(loaders["train"]) == 6  # 24 of the 28 images, in 6 forwards
    model = registry.build_model(cfg)
    forwards: list[int] = []
    images_at_step: list[int] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(args[0].shape[0]) if module.training else None)
    trainer = Trainer(model, loaders, cfg, run_dir=tmp_path / "run")
    trainer.optimizer.register_step_post_hook(lambda optimizer, args, kwargs: images_at_step.append(sum(forwards)))
    assert (trainer.global_batch, trainer.accum, trainer.steps_per_epoch) == (12, 3, 2)
    assert trainer.optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.002 * 12 / 16)
    assert trainer.ema.decay == pytest.approx(0.99 ** 4)  # 12 images a step, 0.99 per 3 images
    trainer.fit()
    assert forwards == [4] * 6
    assert images_at_step == [12, 24]  # one optimizer step per 12 images
    assert trainer.step == 2 and trainer.epoch == 1
    assert trainer.ema.updates == 2


def test_a_global_batch_run_resumes_bitwise_exact(tmp_path):
    """The toy task at global batch 16 over micro-batches of 8 (2 forwards a step); 52 images: 7 loader
    batches, 3 whole steps an epoch, the 7th batch left. Two epochs straight == one epoch + resume."""
    cfg = make_config(**{"data.global_batch_size": 16, "data.batch_size": 8})

    def fit(run_dir, config, resume=None, seed=0):
        torch.manual_seed(seed)
        trainer = Trainer(ToyTask(dropout=0.3, flip=True), make_loaders(config, count=52, noise=True), config,
                          run_dir=run_dir)
        if resume is not None:
            trainer.resume(resume)
        trainer.fit()
        return trainer

    straight = fit(tmp_path / "a", cfg)
    assert (straight.steps_per_epoch, straight.accum, straight.step) == (3, 2, 6)
    fit(tmp_path / "b", make_config(**{"data.global_batch_size": 16, "data.batch_size": 8, "train.max_steps": 3}))
    resumed = fit(tmp_path / "b", cfg, resume=tmp_path / "b" / "last.pt", seed=9)
    reference, other = trained_state(straight), trained_state(resumed)
    assert reference.keys() == other.keys()
    assert all(torch.equal(reference[k], other[k]) for k in reference)


def test_a_hand_built_loader_with_another_batch_is_refused(tmp_path):
    cfg = make_config(**{"data.global_batch_size": 16, "data.batch_size": 8})
    loaders = make_loaders(make_config(**{"data.batch_size": 4}))
    with pytest.raises(EngineError, match="micro-batches of 8"):
        Trainer(ToyTask(), loaders, cfg, run_dir=tmp_path)


# ---------------------------------------------------------------- soft-NMS: effdet's, in TF's sigma convention


def _crafted_detections():
    """Boxes (xyxy, whole pixels), scores and classes: two clusters in class 0, one in class 2 overlapping
    class 0's first cluster (no suppression across classes), a duplicate pruned below 0.001 after decay."""
    boxes = torch.tensor([
        [10, 10, 60, 60], [12, 14, 62, 58], [20, 20, 70, 70], [10, 10, 60, 60],  # cluster A, class 0 (+ duplicate)
        [100, 100, 140, 150], [105, 98, 145, 148], [130, 130, 180, 180],         # cluster B, class 0
        [11, 9, 61, 59], [14, 15, 58, 63], [40, 40, 90, 90],                     # class 2 over cluster A
        [200, 10, 230, 40],                                                       # alone, class 1
    ], dtype=torch.float32)
    scores = torch.tensor([0.92, 0.85, 0.60, 0.002, 0.88, 0.81, 0.30, 0.90, 0.70, 0.45, 0.05])
    classes = torch.tensor([0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 1])
    return boxes, scores, classes


def _soft_nms(boxes, scores, classes, sigma, score_threshold=0.001):
    """effdense's soft-NMS through ``postprocess``: zero box codes on anchors = ``boxes``, one positive class
    per anchor (the others at logit -30: below the threshold)."""
    from tasks.detection.postprocess import PostProcess, postprocess

    logits = torch.full((1, len(boxes), 3), -30.0)
    logits[0, torch.arange(len(boxes)), classes] = torch.logit(scores)
    settings = PostProcess(nms="soft", sigma=sigma, max_detections=100, score_threshold=score_threshold)
    return postprocess(logits, torch.zeros(1, len(boxes), 4), boxes, (256, 256), settings)[0]


def _gaussian_denominator(sigma: float) -> float:
    """The d of effdense's decay exp(-IoU^2 / d) at ``sigma``, read off two boxes of IoU 0.5."""
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 50.0]])
    scores = _soft_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), sigma, score_threshold=0.0)["scores"]
    weight = float(scores[1]) / float(torch.logit(torch.tensor(0.8)).sigmoid())
    return -0.25 / math.log(weight)


@pytest.mark.parametrize("sigma", [0.5, 0.3])
def test_soft_nms_is_effdets_algorithm_on_the_same_boxes(sigma):
    """Greedy gaussian soft-NMS per class, pruning below 0.001 after each decay: the same picks, order and
    decayed scores as effdet's ``batched_soft_nms`` at effdet's sigma for the same gaussian (effdet decays
    by exp(-IoU^2 / sigma); effdense's width is read off two boxes, so this holds whichever convention
    postprocess uses: the next test pins the convention)."""
    from effdet.soft_nms import batched_soft_nms

    boxes, scores, classes = _crafted_detections()
    result = _soft_nms(boxes, scores, classes, sigma)
    exact = torch.logit(scores).sigmoid()  # the scores effdense sees
    keep, kept_scores = batched_soft_nms(boxes, exact, classes, method_gaussian=True,
                                         sigma=_gaussian_denominator(sigma), score_threshold=0.001)
    assert len(keep) == len(result["scores"]) == 10  # the decayed duplicate (0.002 -> < 0.001) is gone
    torch.testing.assert_close(result["boxes"], boxes[keep])
    torch.testing.assert_close(result["labels"], classes[keep])
    torch.testing.assert_close(result["scores"], kept_scores, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sigma", [0.5])
def test_soft_nms_at_sigma_is_the_official_gaussian(sigma):
    """Same boxes, same sigma: effdense's soft-NMS equals effdet's (and automl's) exp(-IoU^2 / sigma)."""
    from effdet.soft_nms import batched_soft_nms

    assert _gaussian_denominator(sigma) == pytest.approx(sigma, rel=1e-4)
    boxes, scores, classes = _crafted_detections()
    result = _soft_nms(boxes, scores, classes, sigma)
    _, kept_scores = batched_soft_nms(boxes, torch.logit(scores).sigmoid(), classes, sigma=sigma,
                                         score_threshold=0.001)
    torch.testing.assert_close(result["scores"], kept_scores, rtol=1e-5, atol=1e-7)


def test_coco_presets_evaluate_with_gaussian_soft_nms():
    for name in DETECTION_PRESETS:
        detection = preset(name).model.detection
        assert detection.nms == "soft", name


# ---------------------------------------------------------------- detection weight decay groups


def test_d0_decays_only_conv_weights_not_norms_biases_or_fusion_weights():
    from tasks import registry
    from tasks.engine.optim import build_optimizer

    cfg = preset("detection/efficientdet_d0_coco", "model.backbone_weights=null")
    assert cfg.optim.no_decay_norm_and_bias
    model = registry.build_model(cfg)
    names = {id(p): name for name, p in model.named_parameters()}
    groups = build_optimizer(model, cfg).param_groups
    assert [group["weight_decay"] for group in groups] == [4e-5, 0.0]
    decayed = {names[id(p)]: p for p in groups[0]["params"]}
    undecayed = {names[id(p)]: p for p in groups[1]["params"]}
    assert len(decayed) + len(undecayed) == len(names)
    fusion = [name for name in undecayed if re.fullmatch(r"net\.fpn\.cells\.\d+\.nodes\.\d+\.weights", name)]
    assert len(fusion) == 3 * 8  # D0: 3 BiFPN cells of 8 fused nodes, every fusion weight undecayed
    assert not [name for name in decayed if "fpn" in name and name.endswith(".weights")]
    assert all(p.ndim == 4 for p in decayed.values())  # conv kernels only (the heads have no linear layers)
    assert all(p.ndim == 1 for p in undecayed.values())
    assert all(name.endswith((".bias", ".weights")) or _is_norm(model, name) for name in undecayed)


def _is_norm(model, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(module, torch.nn.modules.batchnorm._BatchNorm)


# ---------------------------------------------------------------- preset headers


def _header(name: str) -> str:
    return resolve_preset(name).read_text().split("\n\n", 1)[0]


def _header_field(header: str, field: str) -> str:
    """The text of ``# Field:`` and its continuation lines (indented ``#         ...``)."""
    lines = header.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"# {field}:"))
    text = [lines[start].split(":", 1)[1].strip()]
    for line in lines[start + 1:]:
        if not line.startswith("#   "):
            break
        text.append(line.lstrip("# "))
    return " ".join(text)


PUBLISHED = {  # preset -> (metric, number, reference file holding the number)
    "classification/efficientnet_b0_imagenet": ("top-1", "77.1", "efficientnet.md"),
    **{f"detection/efficientdet_d{s}_coco": ("AP", ap, "efficientdet.md") for s, ap in
       [("0", "34.3"), ("1", "40.2"), ("2", "43.5"), ("3", "46.8"), ("4", "49.3"), ("5", "51.2"), ("6", "52.1"),
        ("7", "53.4"), ("7x", "54.4")]},
    "segmentation/unet_efficientnet_cityscapes": ("mIoU", "69.1", "datasets.md"),
    "segmentation/unet_efficientnet_cityscapes_160k": ("mIoU", "69.1", "datasets.md"),
    "segmentation/bifpn_efficientnet_cityscapes": ("mIoU", "73.6", "datasets.md"),
    "segmentation/unet_efficientnet_folder": ("mIoU", "69.1", "datasets.md"),
    "segmentation/bifpn_efficientnet_folder": ("mIoU", "73.6", "datasets.md"),
}


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_header_names_a_target_number_and_a_command_that_scores_it(name):
    from tasks.cli import build_parser

    header = _header(name)
    target = _header_field(header, "Target")
    match = re.search(r"(top-1|AP|mIoU|mAP50) (\d+(?:\.\d+)?)", target)
    assert match, f"{name}: no metric and number in its Target line: {target!r}"
    cited = re.search(r"shared/reference/(\w+\.md)", target)
    if cited:  # a number from the shared references is in the file it cites
        assert match.group(2) in (REFERENCE / cited.group(1)).read_text(), f"{match.group(2)} not in {cited.group(1)}"
    if name in PUBLISHED:
        metric, number, source = PUBLISHED[name]
        assert (match.group(1), match.group(2)) == (metric, number)
        assert number in (REFERENCE / source).read_text(), f"{number} is not in {source}"
        if name.endswith("_folder"):  # the user's data: the number is the same recipe's on Cityscapes
            assert "nothing published" in target and name.replace("_folder", "_cityscapes") in target
        else:
            assert cited and cited.group(1) == source
    elif name.startswith("demo/"):
        assert "nothing published" in target
    else:  # a preset added later: its number must name where it was published
        assert cited or re.search(r"\S+\.md", target), f"{name}: the Target line cites no source: {target!r}"
    command = shlex.split(_header_field(header, "Score"))
    assert command[:2] == ["effdense", "eval"], command
    args = build_parser().parse_args(command[1:])
    assert args.command == "eval" and args.weights
    assert resolve_preset(args.config).resolve() == resolve_preset(name).resolve()
    load(resolve_preset(args.config), args.set or [])  # the scored config is valid as written


@pytest.mark.parametrize("name", [n for n in list_presets() if not n.startswith("demo/")])
def test_every_published_preset_states_its_global_batch(name):
    cfg = preset(name)
    expected = {"classification": 4096, "detection": 128, "segmentation": 8}[name.split("/")[0]]
    if name.endswith("_custom"):  # a user's small data: the batch issue 22's benchmark measured, on any world size
        expected = 16
    assert cfg.data.global_batch_size == expected and cfg.train.grad_accum == 1
    if cfg.train.ema:
        assert cfg.train.ema_reference_batch == expected
    if name.startswith("detection/"):
        assert cfg.optim.no_decay_norm_and_bias
    if name in DETECTION_PRESETS:  # COCO: scored with the official soft-NMS; a user's data with hard NMS
        assert cfg.model.detection.nms == "soft"
    assert not math.isnan(scaled_lr(cfg))


# ---------------------------------------------------------------- two processes (gloo on CPU)


def test_two_processes_split_the_global_batch_and_keep_the_schedule(tmp_path):
    """build_loaders + Trainer under torchrun, 2 ranks, global batch 12 at most 4 a forward, 28 images: each
    rank takes 6 a step in 2 forwards of 3 (4 a forward would not split 6 evenly), 14 -> 12 images an
    epoch, disjoint; floor(28 / 12) = 2 steps an epoch as on one process; lr and EMA as on one process."""
    from tasks.data.synthetic.classification import write_classification
    from tests.tasks.test_ddp import run_on_two_ranks

    root = write_classification(tmp_path / "data", num_classes=4, train_per_class=7, val_per_class=2, size=32)
    assert root == tmp_path / "data"
    ranks = run_on_two_ranks("global_batch_helper.py", tmp_path)
    for result in ranks:
        assert result["plan"] == [12, 2, 3, 2]
        assert (result["loader_batch"], result["batches"], result["steps_per_epoch"], result["step"]) == (3, 4, 2, 4)
        assert result["forwards"] == [3] * 8
        assert result["images_at_step"] == [6, 12, 18, 24]  # 6 per rank per step: 12 over both
        assert result["lr"] == pytest.approx(0.002 * 12 / 16) and result["ema_decay"] == pytest.approx(0.99 ** 4)
        assert len(result["first_epoch"]) == 12
    assert not set(ranks[0]["first_epoch"]) & set(ranks[1]["first_epoch"])
    assert all(torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]) for k in ranks[0]["params"])
