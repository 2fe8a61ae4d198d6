"""The engine's contract beyond one training loop (issue 7): resume guards, evaluation without a trainer,
EMA in evaluation, accumulation and skipped fp16 steps, TF RMSProp, seeding, gradient checkpointing,
run-directory reuse. Each is checked against a hand computation or a plain PyTorch reference."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader

from tasks.engine import EngineError, Trainer, evaluate
from tests.tasks.toy_task import NoisyImages, ToyTask, make_config, make_loaders


def toy(seed=0, **options):
    torch.manual_seed(seed)
    return ToyTask(**options)


# ---------------------------------------------------------------- resume guards


def test_resume_refuses_a_changed_dataset_size(tmp_path):
    cfg = make_config(**{"train.epochs": 2, "train.max_steps": 6})
    Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path).fit()  # 48 images / 8 = 6 steps per epoch
    cfg = make_config(**{"train.epochs": 2})
    trainer = Trainer(toy(), make_loaders(cfg, count=32), cfg, run_dir=tmp_path)  # 4 steps per epoch now
    with pytest.raises(EngineError) as caught:
        trainer.resume(tmp_path / "last.pt")
    message = str(caught.value)
    assert "steps per epoch 6 -> 4" in message and "\n" not in message


def test_resume_refuses_a_changed_world_size_at_an_epoch_boundary(tmp_path):
    """A checkpoint written by 2 ranks (global batch 16, 3 steps per epoch) resumed by one process with
    the same per-rank batch: the schedule was built for 3 steps per epoch at twice the learning rate."""
    cfg = make_config(**{"train.epochs": 2, "train.max_steps": 6})
    Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path).fit()
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    state.update(global_batch=16, steps_per_epoch=3, world_size=2, rng=state["rng"] * 2)
    torch.save(state, tmp_path / "two_ranks.pt")
    trainer = Trainer(toy(), make_loaders(make_config(**{"train.epochs": 2})), make_config(**{"train.epochs": 2}),
                      run_dir=tmp_path)
    with pytest.raises(EngineError, match=r"steps per epoch 3 -> 6 .*global batch 16 -> 8"):
        trainer.resume(tmp_path / "two_ranks.pt")


def test_a_reused_run_directory_is_refused_unless_overwrite(tmp_path):
    cfg = make_config(**{"train.max_steps": 2})
    Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path).fit()
    with pytest.raises(EngineError) as caught:
        Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path).fit()
    message = str(caught.value)
    assert "already holds a run" in message and "--resume" in message and "--overwrite" in message
    cfg = make_config(**{"train.max_steps": 3, "train.overwrite": True})
    Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path).fit()
    records = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(records) == 1 and '"step": 3' in records[0]  # the first run's records are gone, not mixed in
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1


# ---------------------------------------------------------------- evaluation


def test_evaluate_without_a_trainer_equals_a_hand_count():
    model = toy().eval()
    loader = DataLoader(NoisyImages(24, seed=7), batch_size=5)  # a short last batch
    metrics = evaluate(model, loader, device="cpu")
    with torch.no_grad():
        correct = sum(int((model(x).argmax(1) == y).sum()) for x, y in loader)
    assert metrics["top1"] == correct / 24 and metrics["seen"] == 24


def test_ema_weights_are_what_evaluation_uses(tmp_path):
    cfg = make_config(**{"train.ema_decay": 0.5})
    trainer = Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path)
    trainer.fit()
    loader = DataLoader(NoisyImages(24, seed=7), batch_size=8)

    def logit_sum(module):
        module.eval()
        with torch.no_grad():
            return sum(float(module(x).double().sum()) for x, _ in loader)

    ema_sum, raw_sum = logit_sum(trainer.ema.module), logit_sum(trainer.model)
    assert abs(ema_sum - raw_sum) > 1e-3  # the two weight sets are told apart by this metric
    assert trainer.evaluate()["logit_sum"] == pytest.approx(ema_sum, rel=1e-9)
    assert trainer.history[-1]["val/logit_sum"] == pytest.approx(ema_sum, rel=1e-9)


def test_flat_metric_names():
    from tasks.engine.evaluate import flatten_metrics

    nested = {"mIoU": torch.tensor(0.5), "iou": {"road": 0.9, "sky": torch.tensor(0.1)}}
    assert flatten_metrics(nested) == {"mIoU": 0.5, "iou/road": 0.9, "iou/sky": pytest.approx(0.1)}


# ---------------------------------------------------------------- the step


def test_accumulation_with_a_short_last_group_matches_a_plain_loop(tmp_path):
    """6 batches with grad_accum 4: groups of 4 and 2 micro-batches; each group's loss is the mean over
    its own micro-batches (the short group is not divided by 4)."""
    cfg = make_config(**{"train.grad_accum": 4, "train.epochs": 1, "train.ema": False, "optim.momentum": 0.0,
                         "optim.weight_decay": 0.0, "schedule.name": "constant", "schedule.warmup_epochs": 0.0})
    trainer = Trainer(toy(batch_norm=False), make_loaders(cfg, shuffle=False), cfg, run_dir=tmp_path)
    trainer.fit()
    assert trainer.step == 2
    reference = toy(batch_norm=False)
    lr = cfg.optim.lr * 8 * 4 / 256
    batches = list(DataLoader(NoisyImages(48), batch_size=8))
    for group in (batches[:4], batches[4:]):
        reference.zero_grad()
        for images, labels in group:
            losses = reference(images, labels)
            ((losses["ce"] + losses["reg"]) / len(group)).backward()
        with torch.no_grad():
            for p in reference.parameters():
                p -= lr * p.grad
    for (name, ours), theirs in zip(trainer.model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)


def test_a_grad_scaler_skipped_fp16_step_leaves_the_weights_and_halves_the_scale(tmp_path):
    cfg = make_config(**{"train.amp": "fp16", "train.max_steps": 2, "train.ema": False, "train.log_every": 1})
    model = toy(batch_norm=False, inf_grad_at=1)  # the second step's gradients are not finite
    trainer = Trainer(model, make_loaders(cfg, shuffle=False), cfg, run_dir=tmp_path)
    trainer.train_cfg.max_steps = 1
    trainer.fit()
    after_first = {k: v.clone() for k, v in model.state_dict().items()}
    scale = trainer.scaler.get_scale()
    lr_before = trainer.optimizer.param_groups[0]["lr"]
    trainer.train_cfg.max_steps = 2
    trainer.fit()  # finite loss, inf gradients: GradScaler skips optimizer.step
    assert trainer.step == 2 and math.isfinite(trainer.history[-1]["train/loss"])
    assert all(torch.equal(v, after_first[k]) for k, v in model.state_dict().items())
    assert trainer.scaler.get_scale() == scale * 0.5  # GradScaler's backoff factor
    assert trainer.optimizer.param_groups[0]["lr"] != lr_before  # the schedule still advanced one step


def test_rmsprop_tf_one_step_by_hand():
    """TF1 RMSProp: ms starts at 1, eps inside the square root, lr inside the momentum buffer."""
    from tasks.engine.optim import RMSpropTF

    param = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    param.grad = torch.tensor([0.5, 4.0])
    lr, alpha, eps, momentum, wd = 0.1, 0.9, 1e-3, 0.9, 0.01
    optimizer = RMSpropTF([param], lr=lr, alpha=alpha, eps=eps, momentum=momentum, weight_decay=wd)
    optimizer.step()
    expected = []
    for p, g in ((1.0, 0.5), (-2.0, 4.0)):
        g = g + wd * p
        ms = alpha * 1.0 + (1 - alpha) * g * g
        expected.append(p - lr * g / math.sqrt(ms + eps))  # mom = 0.9 * 0 + lr * g / sqrt(ms + eps)
    assert param.detach().tolist() == pytest.approx(expected, rel=1e-6)
    # a second step: mom carries 0.9 of the first update
    param.grad = torch.tensor([0.5, 4.0])
    first_update = [1.0 - expected[0], -2.0 - expected[1]]
    optimizer.step()
    second = []
    for p0, p1, g0, u in ((1.0, expected[0], 0.5, first_update[0]), (-2.0, expected[1], 4.0, first_update[1])):
        g1 = g0 + wd * p1
        ms = alpha * (alpha + (1 - alpha) * (g0 + wd * p0) ** 2) + (1 - alpha) * g1 * g1
        second.append(p1 - (momentum * u + lr * g1 / math.sqrt(ms + eps)))
    assert param.detach().tolist() == pytest.approx(second, rel=1e-6)


def test_ema_warmup_follows_tf_num_updates_rule():
    from tasks.engine.optim import ModelEMA

    weight = torch.nn.Linear(1, 1, bias=False)
    ema = ModelEMA(weight, 0.999, warmup=True)
    values, averaged = [], None
    for n in range(5):
        with torch.no_grad():
            weight.weight.fill_(float(n + 1))
        decay = min(0.999, (1 + n) / (10 + n))  # tf.train.ExponentialMovingAverage(num_updates=n)
        averaged = float(n + 1) if averaged is None else averaged * decay + (n + 1) * (1 - decay)
        ema.update(weight)
        values.append(float(ema.module.weight))
        assert values[-1] == pytest.approx(averaged, rel=1e-6)


# ---------------------------------------------------------------- model construction


def test_train_seed_governs_initialisation():
    from tasks import registry
    from tasks.config import load

    cfg = load("configs/demo/classification.yaml", ["train.seed=5"])
    first = registry.build_model(cfg).state_dict()
    torch.rand(1000)  # whatever the process drew before, the same seed builds the same weights
    again = registry.build_model(cfg).state_dict()
    other = registry.build_model(load("configs/demo/classification.yaml", ["train.seed=6"])).state_dict()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first if first[k].is_floating_point())


def test_grad_checkpointing_is_wired_and_gives_the_same_gradients(tmp_path):
    from tasks import registry
    from tasks.config import load

    cfg = load("configs/demo/classification.yaml", ["train.grad_checkpointing=true", "train.device=cpu"])
    model = registry.build_model(cfg)
    reference = registry.build_model(cfg)
    trainer = Trainer(model, {"train": DataLoader(NoisyImages(8), batch_size=4)}, cfg, create_run_dir=False)
    assert trainer.model.net.backbone.grad_checkpointing and not reference.net.backbone.grad_checkpointing
    images, labels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), torch.tensor([0, 3])
    for module in (model, reference):
        module.train()
        torch.manual_seed(0)  # the same dropout draws
        sum(module(images, labels).values()).backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_normalize_leaves_a_float_input_alone():
    from tasks.classification import ClassificationTask, build_classifier

    task = ClassificationTask(build_classifier("efficientnet-lite0", num_classes=3))
    images = torch.rand(1, 3, 32, 32) * 255
    before = images.clone()
    out = task.normalize(images)
    assert torch.equal(images, before)
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(out, (images / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1))


@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_exact_resume_mid_epoch_through_the_real_loaders(tmp_path, workers):
    """A lite0 classifier on synthetic ImageFolder data with random crops and flips in DataLoader
    workers: stopped after 3 steps (mid-epoch) and resumed, it ends bitwise equal to a straight run."""
    from tasks import registry
    from tasks.config import load
    from tasks.data import build_loaders
    from tasks.data.synthetic.classification import write_classification

    root = write_classification(tmp_path / "data", num_classes=4, train_per_class=5, val_per_class=2, size=32)
    sets = [f"data.root={root}", "data.image_size=32", "data.batch_size=4", f"data.workers={workers}",
            "train.epochs=2", "train.progress=false", "train.device=cpu", "train.ema=true", "model.drop_path=0.2"]

    def run(run_dir, max_steps=None, resume=None):
        cfg = load("configs/demo/classification.yaml", sets + [f"train.max_steps={max_steps or 'null'}"])
        trainer = Trainer(registry.build_model(cfg), build_loaders(cfg), cfg, run_dir=run_dir)
        if resume:
            trainer.resume(resume)
        trainer.fit()
        return trainer

    straight = run(tmp_path / "straight")
    run(tmp_path / "stopped", max_steps=3)
    resumed = run(tmp_path / "stopped", resume=tmp_path / "stopped" / "last.pt")
    assert straight.step == resumed.step == 10
    for reference, other in ((straight.model.state_dict(), resumed.model.state_dict()),
                             (straight.ema.state_dict(), resumed.ema.state_dict())):
        different = [k for k in reference if not torch.equal(reference[k], other[k])]
        assert not different, different


@pytest.mark.parametrize("task", ["segmentation", "detection"])
def test_grad_checkpointing_reaches_the_dense_models(task):
    """The switch the Trainer flips (train.grad_checkpointing) reaches the backbone inside a U-Net and an
    EfficientDet, and recomputing the activations leaves the gradients as they were."""
    from tasks import registry
    from tasks.budget.measure import example_batch
    from tasks.config import load
    from tasks.engine.trainer import _enable_grad_checkpointing

    size = 64 if task == "segmentation" else 128
    cfg = load(f"configs/demo/{task}.yaml", ["train.device=cpu", f"data.image_size={size}", "model.drop_path=0"])
    model, reference = registry.build_model(cfg), registry.build_model(cfg)
    _enable_grad_checkpointing(model)
    flags = [m.grad_checkpointing for m in model.modules() if hasattr(m, "grad_checkpointing")]
    assert flags and all(flags)
    assert not any(m.grad_checkpointing for m in reference.modules() if hasattr(m, "grad_checkpointing"))
    images, targets = example_batch(cfg, 2)
    for module in (model, reference):
        module.train()
        torch.manual_seed(0)
        sum(module(images, targets).values()).backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        if theirs.grad is None:
            assert ours.grad is None, name
            continue
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-4, msg=name)
