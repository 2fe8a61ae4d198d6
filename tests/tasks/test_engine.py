"""Trainer behaviour on a toy task (CPU), checked against hand computations and a plain PyTorch loop."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tasks.engine import NonFiniteLossError, Trainer, TrainingInterrupted
from tests.tasks.toy_task import NoisyImages, ToyTask, hand_lr, make_config, make_loaders, plain_loop, trained_state

REPO = Path(__file__).resolve().parents[2]


def toy(seed=0, **options):
    torch.manual_seed(seed)
    return ToyTask(**options)


def fit(model, cfg, run_dir, *, resume=None, **loader_options):
    trainer = Trainer(model, make_loaders(cfg, **loader_options), cfg, run_dir=run_dir)
    if resume is not None:
        trainer.resume(resume)
    trainer.fit()
    return trainer


def assert_bitwise_equal(reference: dict, other: dict):
    assert reference.keys() == other.keys()
    different = [key for key in reference if not torch.equal(reference[key], other[key])]
    assert not different, f"not bitwise equal: {different}"


RANDOM_TOY = dict(dropout=0.3, flip=True)  # model-side randomness: RNG restore matters


# ---------------------------------------------------------------- exact resume


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_at_epoch_end_is_bitwise_exact(tmp_path, workers):
    cfg = make_config()
    straight = fit(toy(**RANDOM_TOY), cfg, tmp_path / "a", noise=True, workers=workers)
    # First half: stop after epoch 1 (same schedule: max_steps, not epochs=1), then a fresh process-like restart.
    fit(toy(**RANDOM_TOY), make_config(**{"train.max_steps": 6}), tmp_path / "b", noise=True, workers=workers)
    resumed = fit(toy(seed=99, **RANDOM_TOY), cfg, tmp_path / "b", resume=tmp_path / "b" / "last.pt",
                  noise=True, workers=workers)
    assert resumed.step == straight.step == 12
    assert_bitwise_equal(trained_state(straight), trained_state(resumed))
    assert resumed.history[-1]["val/top1"] == straight.history[-1]["val/top1"]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()  # epoch 1 from the first process, 2 resumed
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("workers,accum,signal_at", [(0, 1, 8), (2, 2, 15), (0, 1, 5)])
def test_resume_after_sigterm_is_bitwise_exact(tmp_path, workers, accum, signal_at):
    """Signal during epoch 2 (6 or 12 micro-batches an epoch) or during epoch 1's last batch (5)."""
    cfg = make_config(**{"train.grad_accum": accum, "data.batch_size": 8 // accum})
    straight = fit(toy(**RANDOM_TOY), cfg, tmp_path / "a", noise=True, workers=workers)
    stopper = toy(signal_at=signal_at, **RANDOM_TOY)
    trainer = Trainer(stopper, make_loaders(cfg, noise=True, workers=workers), cfg, run_dir=tmp_path / "b")
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(TrainingInterrupted) as caught:
        trainer.fit()
    assert signal.getsignal(signal.SIGTERM) is previous
    stop = caught.value
    assert stop.exit_code == 143 and stop.checkpoint == str(tmp_path / "b" / "last.pt")
    if signal_at == 5:  # the epoch had ended: evaluated and saved as usual, then stopped at the boundary
        assert (stop.epoch, stop.batch_in_epoch) == (1, 0) and len(trainer.history) == 1
    else:  # mid-epoch, at an optimizer-step boundary
        assert stop.epoch == 1 and stop.batch_in_epoch > 0 and stop.batch_in_epoch % accum == 0
    resumed = fit(toy(seed=5, **RANDOM_TOY), cfg, tmp_path / "b", resume=tmp_path / "b" / "last.pt",
                  noise=True, workers=workers)
    assert_bitwise_equal(trained_state(straight), trained_state(resumed))


def test_external_sigterm_subprocess_then_resume_is_bitwise_exact(tmp_path):
    cfg = make_config()
    straight = fit(toy(**RANDOM_TOY), cfg, tmp_path / "a", noise=True)
    run_dir = tmp_path / "b"
    process = subprocess.Popen([sys.executable, str(REPO / "tests/tasks/train_helper.py"), str(run_dir)],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in process.stdout:  # wait until training is under way, then signal at an arbitrary moment
        if line.startswith("forward 3"):
            break
    time.sleep(0.12)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    assert "SIGTERM" in stderr and "--resume" in stderr
    resumed = fit(toy(seed=5, **RANDOM_TOY), cfg, run_dir, resume=run_dir / "last.pt", noise=True)
    assert_bitwise_equal(trained_state(straight), trained_state(resumed))


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("bad_step", [3, 9])
def test_non_finite_loss_names_step_and_last_good_checkpoint(tmp_path, bad_step):
    cfg = make_config(**{"train.log_every": 4})
    with pytest.raises(NonFiniteLossError) as caught:
        fit(toy(nan_at=bad_step), cfg, tmp_path)
    error = caught.value
    assert error.step == bad_step and f"step {bad_step} " in str(error)
    assert math.isnan(error.terms["ce"]) and "\n" not in str(error)
    if bad_step < 6:  # still in epoch 1: nothing saved yet
        assert "none saved yet" in str(error) and not (tmp_path / "last.pt").exists()
    else:  # epoch 1's checkpoint is the last good one, and it holds finite weights
        assert str(tmp_path / "last.pt") in str(error)
        state = torch.load(tmp_path / "last.pt", weights_only=True)
        assert state["step"] == 6
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_bad_config_values_are_one_line_errors_from_the_one_validator():
    # Choices and ranges live on the schema's fields; tasks.config.validate is the one place that checks them.
    from tasks.config import ConfigError, validate

    for key, value, needle in [("train.amp", "fp32", "train.amp"), ("train.device", "tpu", "train.device"),
                               ("optim.name", "lamb", "optim.name"), ("schedule.name", "linear", "schedule.name"),
                               ("train.grad_accum", 0, "train.grad_accum"), ("train.ema_decay", 1.5, "train.ema_decay"),
                               ("schedule.warmup_start_factor", 0.0, "schedule.warmup_start_factor")]:
        with pytest.raises(ConfigError) as caught:
            validate(make_config(**{key: value}))
        assert needle in str(caught.value) and "\n" not in str(caught.value)


# ---------------------------------------------------------------- the step against a plain PyTorch loop


@pytest.mark.parametrize("batch_size,accum", [(8, 1), (4, 2)])
def test_training_matches_plain_loop(tmp_path, batch_size, accum):
    cfg = make_config(**{"data.batch_size": batch_size, "train.grad_accum": accum, "train.ema": False})
    trainer = Trainer(toy(batch_norm=False), make_loaders(cfg, shuffle=False), cfg, run_dir=tmp_path)
    trainer.fit()
    reference, _ = plain_loop(toy(batch_norm=False), cfg, batch_size=8, steps_per_epoch=6)
    assert trainer.step == 12
    for (name, ours), theirs in zip(trainer.model.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)


def test_clipping_caps_the_update_at_clip_norm(tmp_path):
    clip = 1e-3
    cfg = make_config(**{"train.clip_grad": clip, "train.max_steps": 1, "train.ema": False, "optim.momentum": 0.0,
                         "optim.weight_decay": 0.0, "schedule.name": "constant", "schedule.warmup_epochs": 0.0})
    lr = cfg.optim.lr * 8 / 256
    model = toy(batch_norm=False)
    reference = toy(batch_norm=False)
    images, labels = next(iter(DataLoader(NoisyImages(48), batch_size=8)))
    losses = reference(images, labels)
    (losses["ce"] + losses["reg"]).backward()
    grads = [p.grad.clone() for p in reference.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert norm > 10 * clip  # clipping is active
    before = [p.detach().clone() for p in model.parameters()]
    Trainer(model, make_loaders(cfg, shuffle=False), cfg, run_dir=tmp_path).fit()
    for start, end, grad in zip(before, model.parameters(), grads):  # p1 = p0 - lr * g * clip / |g|
        torch.testing.assert_close(end.detach(), start - lr * grad * clip / norm, atol=1e-8, rtol=1e-4)


# ---------------------------------------------------------------- run directory and precision


def test_run_directory_contents(tmp_path):
    cfg = make_config()
    trainer = fit(toy(), cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 6), (2, 12)]
    for record in records:
        assert 0.0 <= record["val/top1"] <= 1.0 and record["img_per_s"] > 0
        assert math.isclose(record["train/loss"], record["train/ce"] + record["train/reg"], rel_tol=1e-9)
    for name in ("loss.png", "metrics.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars = EventAccumulator(str(events[0])).Reload()
    assert [e.step for e in scalars.Scalars("val/top1")] == [6, 12]
    assert "train/ce" in scalars.Tags()["scalars"]
    from omegaconf import OmegaConf

    assert OmegaConf.load(tmp_path / "config.yaml").train.epochs == 2
    for name in ("last.pt", "best.pt"):
        assert torch.load(tmp_path / name, weights_only=True)["format"] == "effdense-checkpoint-v1"
    from safetensors.torch import load_file

    exported = load_file(tmp_path / "model.safetensors")
    ema_net = trainer.ema.module.net.state_dict()
    assert exported.keys() == ema_net.keys()
    assert all(torch.equal(exported[k], ema_net[k]) for k in exported)
    assert not all(torch.equal(exported[k], v) for k, v in trainer.model.net.state_dict().items())


def test_no_run_directory_when_asked_for_none(tmp_path):
    cfg = make_config(**{"train.max_steps": 2})
    trainer = Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path / "run", create_run_dir=False)
    trainer.fit()
    assert trainer.step == 2 and not (tmp_path / "run").exists()


def test_without_ema_evaluation_scores_the_raw_model(tmp_path):
    """With the EMA dropped, evaluate() scores the raw weights (top-1 counted by hand); that evaluation
    uses the EMA weights when there are some is test_engine_protocol's test_ema_weights_are_what_evaluation_uses."""
    cfg = make_config()
    trainer = fit(toy(), cfg, tmp_path)
    ema_metrics = trainer.evaluate()
    trainer.ema = None
    raw_metrics = trainer.evaluate()
    manual = trainer.model  # the raw model by hand
    manual.eval()
    correct = sum(int((manual(x).argmax(1) == y).sum()) for x, y in DataLoader(NoisyImages(24, seed=7), batch_size=8))
    assert raw_metrics["top1"] == correct / 24 and ema_metrics["seen"] == 24


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_on_cpu_runs_a_step(tmp_path, amp):
    cfg = make_config(**{"train.amp": amp, "train.max_steps": 2, "train.channels_last": True})
    trainer = fit(toy(), cfg, tmp_path)
    assert trainer.step == 2 and math.isfinite(trainer.history[-1]["train/loss"])
    assert trainer.model.net[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert (trainer.scaler is not None) == (amp == "fp16")


# ---------------------------------------------------------------- optimizer, schedule, EMA by hand


def test_linear_lr_scaling_with_ranks_and_accumulation():
    from tasks.engine.optim import build_optimizer, scaled_lr

    cfg = make_config(**{"data.batch_size": 64, "train.grad_accum": 2, "optim.lr": 0.1, "optim.base_batch_size": 256})
    assert scaled_lr(cfg, world_size=2) == pytest.approx(0.1)  # 64 x 2 ranks x 2 accum = 256
    assert scaled_lr(cfg, world_size=1) == pytest.approx(0.05)
    optimizer = build_optimizer(toy(), cfg, world_size=4)
    assert all(group["lr"] == pytest.approx(0.2) for group in optimizer.param_groups)


def test_no_decay_group_holds_exactly_the_1d_params():
    from tasks.engine.optim import build_optimizer

    model = toy()
    optimizer = build_optimizer(model, make_config(**{"optim.weight_decay": 0.05}))
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(p) for p in model.parameters() if p.ndim > 1}
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in model.parameters() if p.ndim <= 1}
    names_1d = {n for n, p in model.named_parameters() if p.ndim <= 1}
    assert names_1d == {"net.1.weight", "net.1.bias", "net.3.bias", "net.8.bias"}  # BN weight/bias + conv/linear biases
    single = build_optimizer(model, make_config(**{"optim.no_decay_norm_and_bias": False}))
    assert len(single.param_groups) == 1 and len(single.param_groups[0]["params"]) == len(list(model.parameters()))


def lrs_over(cfg, steps_per_epoch):
    from tasks.engine.optim import build_optimizer, build_schedule

    optimizer = build_optimizer(toy(), cfg)
    schedule = build_schedule(optimizer, cfg, steps_per_epoch)
    lrs = []
    for _ in range(cfg.train.epochs * steps_per_epoch):
        lrs.append(optimizer.param_groups[0]["lr"])  # the LR the next optimizer step uses
        optimizer.step()
        schedule.step()
    return lrs


def test_warmup_cosine_schedule_by_hand():
    cfg = make_config(**{"train.epochs": 3, "schedule.warmup_epochs": 1.0, "schedule.warmup_start_factor": 0.1,
                         "schedule.min_lr_ratio": 0.1, "optim.lr": 0.256})
    peak = 0.256 * 8 / 256  # 0.008
    lrs = lrs_over(cfg, steps_per_epoch=10)
    assert lrs[0] == pytest.approx(0.0008)  # start factor
    assert lrs[5] == pytest.approx(0.0008 + (0.008 - 0.0008) * 5 / 10)  # half-way up the linear warm-up
    assert lrs[10] == pytest.approx(peak)  # warm-up done: cosine starts at the peak
    assert lrs[20] == pytest.approx(0.0008 + (peak - 0.0008) * 0.5)  # half-way down the cosine (cos(pi/2) = 0)
    assert lrs[29] == pytest.approx(0.0008 + (peak - 0.0008) * (1 + math.cos(math.pi * 19 / 20)) / 2)
    assert all(a == pytest.approx(hand_lr(i, peak, 10, 30, 0.1, 0.1), rel=1e-9) for i, a in enumerate(lrs))


def test_step_poly_constant_schedules_by_hand():
    base = {"train.epochs": 4, "schedule.warmup_epochs": 0.5, "schedule.warmup_start_factor": 0.5, "optim.lr": 0.32}
    peak = 0.01
    step = lrs_over(make_config(**base, **{"schedule.name": "step", "schedule.step_epochs": 1.0,
                                           "schedule.step_gamma": 0.5}), steps_per_epoch=10)
    assert step[:5] == pytest.approx([peak * (0.5 + 0.5 * i / 5) for i in range(5)])
    assert step[5] == pytest.approx(peak) and step[14] == pytest.approx(peak)  # decays every 10 steps after warm-up
    assert step[15] == pytest.approx(peak / 2) and step[39] == pytest.approx(peak / 8)
    poly = lrs_over(make_config(**base, **{"schedule.name": "poly", "schedule.poly_power": 2.0}), steps_per_epoch=10)
    assert poly[5] == pytest.approx(peak) and poly[25] == pytest.approx(peak * (1 - 20 / 35) ** 2)
    constant = lrs_over(make_config(**base, **{"schedule.name": "constant"}), steps_per_epoch=10)
    assert constant[0] == pytest.approx(peak / 2) and constant[5:] == pytest.approx([peak] * 35)


def test_model_ema_matches_averaged_model_update_parameters():
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from tasks.engine.optim import ModelEMA

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 4, 3),
                                torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1, bias=False))
    ours = ModelEMA(model, 0.8)
    reference = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.8), use_buffers=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(4):
        model(torch.randn(4, 3, 8, 8)).square().mean().backward()  # BN statistics move too (use_buffers=True)
        optimizer.step()
        optimizer.zero_grad()
        ours.update(model)
        reference.update_parameters(model)
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
