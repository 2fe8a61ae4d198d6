"""``train.time_limit`` (issue 22) on the toy task with a fake clock, checked against hand computations; and
``effdense budget --minutes`` (steps and images a scale trains in N minutes) on injected step times.

The fake clock advances only when the toy model runs: ``STEP_S`` seconds per training forward (one optimizer
step: no accumulation here) and ``EVAL_S`` per evaluation batch, so every plan below is exact arithmetic.
Toy config: 48 images at batch 8 -> 6 steps per epoch; 24 validation images at 8 -> 3 evaluation batches.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch

from tasks.engine import EngineError, Trainer, timelimit
from tasks.engine.optim import build_optimizer, build_schedule
from tests.tasks.toy_task import ToyTask, hand_lr, make_config, make_loaders

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO_CLS = Path(__file__).resolve().parents[2] / "configs" / "demo" / "classification.yaml"
DEMO_DET = DEMO_CLS.with_name("detection.yaml")
STEPS_PER_EPOCH = 6
EVAL_S = 0.5  # per evaluation batch: 1.5 s per evaluation


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


CLOCK = FakeClock()  # a module global: the EMA's deep copy of the model must not copy it


class TimedToy(ToyTask):
    """Advances the fake clock by ``step_s(step)`` per training forward and ``EVAL_S`` per evaluation batch, and
    records the learning rate each optimizer step uses (``lrs``)."""

    def __init__(self, step_s=lambda step: 1.0):
        torch.manual_seed(0)
        super().__init__()
        self.step_s, self.lrs, self.optimizer = step_s, [], None

    def forward(self, images, targets=None):
        if self.training:
            CLOCK.now += self.step_s(len(self.lrs))
            self.lrs.append(self.optimizer.param_groups[0]["lr"])
        else:
            CLOCK.now += EVAL_S
        return super().forward(images, targets)


@pytest.fixture(autouse=True)
def fake_clock(monkeypatch):
    CLOCK.now = 0.0
    monkeypatch.setattr(timelimit, "clock", CLOCK)
    return CLOCK


def config(**overrides):
    return make_config(**{"train.ema": False, "train.time_limit": 0.5, **overrides})  # 30 s


def trainer_for(cfg, tmp_path, model=None, callbacks=None):
    model = model or TimedToy()
    trainer = Trainer(model, make_loaders(cfg), cfg, run_dir=tmp_path, epoch_callbacks=callbacks)
    model.optimizer = trainer.optimizer  # the same optimizer object throughout (the scheduler is rebuilt)
    return trainer, model


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_epochs_refit_to_the_time_and_the_lr_ends_at_its_floor(tmp_path, caplog):
    """1 s a step, 1.5 s an evaluation: 7.5 s an epoch, so 30 s hold ceil(30 / 7.5) = 4 epochs.

    Until the first epoch ends the plan comes from the step time alone: at step 4 (the first log_every sync)
    4 s are spent, 26 s hold 26 more steps -> 30 steps, 5 epochs. After epoch 1 (7.5 s, evaluation included)
    1.25 s a step: 22.5 s hold 18 more -> 24 steps, 4 epochs; it stays so. Step 24 ends the plan at 28.5 s,
    the closing evaluation brings the clock to 30 s."""
    cfg = config(**{"train.epochs": 2})
    seen = []
    trainer, model = trainer_for(cfg, tmp_path, callbacks=[lambda t, epoch: seen.append((epoch, t.epochs))])
    with caplog.at_level(logging.INFO, logger="tasks.engine.timelimit"):
        metrics = trainer.fit()
    assert "top1" in metrics
    assert seen == [(0, 2), (1, 4), (2, 4), (3, 4)]  # what a close-mosaic callback reads at each epoch start
    assert trainer.epochs == trainer.time_limit.epochs == math.ceil(30 / 7.5) == 4
    assert trainer.step == trainer.time_limit.steps == 24 and trainer.epoch == 4
    assert [(r["step"], r["epochs"], r["steps"]) for r in trainer.time_limit.refits] == [(4, 5, 30), (6, 4, 24)]
    assert trainer.time_limit.refits[1]["seconds_per_epoch"] == pytest.approx(7.5)
    assert CLOCK.now == pytest.approx(30.0)
    assert trainer.time_limit.stopped["why"] == "planned steps done"
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("time_limit: ")]
    assert messages[0].startswith("time_limit: 5 epochs fit in 0.5 min")
    assert messages[1].startswith("time_limit: 4 epochs fit in 0.5 min (7.5 s per epoch")
    assert len([m for m in messages if "epochs fit in" in m]) == 2  # logged once per change

    peak, floor = 0.4 * 8 / 256, 0.4 * 8 / 256 * 0.05
    # From step 6 on: warm-up 3 steps (0.5 epoch, unchanged), cosine over the 24 planned steps to the floor.
    start = cfg.schedule.warmup_start_factor
    assert model.lrs[6:] == pytest.approx([hand_lr(s, peak, 3, 24, start, 0.05) for s in range(6, 24)], rel=1e-9)
    assert model.lrs[4:6] == pytest.approx([hand_lr(s, peak, 3, 30, start, 0.05) for s in (4, 5)], rel=1e-9)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(floor, rel=1e-9)  # after the last step
    last = records(tmp_path)[-1]
    assert last["lr"] == pytest.approx(floor, rel=1e-9)
    assert last["time_limit/epochs_planned"] == 4 and last["time_limit/epochs_done"] == 4.0
    assert last["time_limit/spent_min"] == pytest.approx(0.5, abs=1e-4)
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 24


def test_stops_mid_epoch_when_the_time_is_spent_and_still_evaluates_and_saves(tmp_path):
    """No evaluation before the end (eval_every 5): 1 s a step, so at 12 s the plan is 30 steps (5 epochs).
    Then steps slow to 4 s: the time is spent at step 17 (12 + 5 x 4 = 32 s), 5 batches into epoch 3 (2.83 of
    5 planned epochs); the closing evaluation and last.pt follow."""
    cfg = config(**{"train.epochs": 50, "train.eval_every": 5, "train.checkpoint_every": 5})
    trainer, _ = trainer_for(cfg, tmp_path, TimedToy(step_s=lambda step: 1.0 if step < 12 else 4.0))
    metrics = trainer.fit()
    assert "top1" in metrics and trainer.step == 17 and (trainer.epoch, trainer.batch_in_epoch) == (2, 5)
    stopped = trainer.time_limit.stopped
    assert stopped == {"step": 17, "epochs_done": 2.833, "epochs_planned": 5, "spent_min": round(32 / 60, 3),
                       "why": "time spent"}
    assert stopped["epochs_done"] < stopped["epochs_planned"]
    (last,) = records(tmp_path)  # eval_every 5: the closing evaluation is the only one
    assert last["step"] == 17 and "val/top1" in last
    assert last["time_limit/epochs_done"] == pytest.approx(2 + 5 / 6, abs=1e-4)
    assert last["time_limit/epochs_planned"] == 5
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["batch_in_epoch"]) == (17, 2, 5)
    assert state["time_limit"]["steps"] == 30
    assert state["time_limit"]["spent_s"] == pytest.approx(33.5)  # saved again as the best, after the evaluation
    assert (tmp_path / "model.safetensors").is_file()


def test_the_closing_evaluation_after_the_loop_runs_when_the_time_ends_between_epochs(tmp_path, monkeypatch):
    """Evaluations every 3 epochs, and the time (7 s) runs out in epoch 1's checkpoint-only end: the run must
    not end without metrics and a last.pt for its last step."""
    cfg = config(**{"train.epochs": 1, "train.eval_every": 3, "train.time_limit": 7 / 60})
    trainer, _ = trainer_for(cfg, tmp_path)
    original = trainer._save

    def slow_save(*args, **kwargs):  # a checkpoint that takes 5 s (fake): epoch 1 ends at 6 s, the save at 11 s
        CLOCK.now += 5.0
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer, "_save", slow_save)
    metrics = trainer.fit()
    assert trainer.step == 6 and "top1" in metrics
    assert [r["step"] for r in records(tmp_path)] == [6]
    assert torch.load(tmp_path / "last.pt", weights_only=True)["step"] == 6


def test_warmup_is_capped_when_the_plan_is_short():
    """warmup_epochs 3 in a plan of 2 epochs (12 steps): warm-up 1 epoch (epochs - 1), the cosine the other."""
    cfg = config(**{"schedule.warmup_epochs": 3.0, "schedule.warmup_start_factor": 0.1})
    optimizer = build_optimizer(ToyTask(), cfg)
    schedule = build_schedule(optimizer, cfg, STEPS_PER_EPOCH, total_steps=12)
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    peak = 0.4 * 8 / 256
    assert lrs == pytest.approx([hand_lr(s, peak, 6, 12, 0.1, 0.05) for s in range(12)], rel=1e-9)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(peak * 0.05)
    short = build_schedule(build_optimizer(ToyTask(), cfg), cfg, STEPS_PER_EPOCH, total_steps=9)  # < 2 epochs
    assert short._milestones == [4]  # half of the plan
    # Without a time-limit plan the configured length is kept (train.epochs 2: all 12 steps warm up).
    plain = build_schedule(build_optimizer(ToyTask(), cfg), cfg, STEPS_PER_EPOCH)
    assert plain._milestones == [12]


def test_warmup_longer_than_the_fitted_run_in_a_real_fit(tmp_path):
    cfg = config(**{"schedule.warmup_epochs": 5.0, "train.epochs": 10, "train.time_limit": 15 / 60})
    trainer, _ = trainer_for(cfg, tmp_path)
    trainer.fit()  # 7.5 s an epoch: 2 epochs fit; warm-up 30 steps capped at 1 epoch
    assert trainer.epochs == 2 and trainer.step == 12
    assert trainer.scheduler._milestones == [STEPS_PER_EPOCH]


def test_resume_continues_the_budget_and_the_plan(tmp_path):
    """A run stopped by max_steps at step 9 (10.5 s spent when last.pt is written) is resumed with the rest of
    its 30 s: its schedule continues where it stopped and still ends at the floor."""
    first, model = trainer_for(config(**{"train.max_steps": 9}), tmp_path)
    first.fit()
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["time_limit"]
    assert saved == {"spent_s": pytest.approx(10.5), "epochs": 4, "steps": 24}
    next_lr = first.optimizer.param_groups[0]["lr"]  # what step 10 would use

    cfg = config()
    resumed, model = trainer_for(cfg, tmp_path)
    resumed.resume(tmp_path / "last.pt")
    assert resumed.epochs == 4 and resumed.time_limit.spent_before == pytest.approx(10.5)
    resumed.fit()
    assert model.lrs[0] == pytest.approx(next_lr, rel=1e-12)
    # The resumed session (clock from 12 s): 3 steps + an evaluation = 4.5 s, 1.5 s a step; 30 - 10.5 - 4.5 =
    # 15 s hold 10 more -> 22. After epoch 3 (24 s): 12 s for 9 steps; 7.5 s left hold 5 more -> 23.
    assert [r["steps"] for r in resumed.time_limit.refits] == [22]  # logged once: 4 epochs both times
    assert resumed.step == resumed.time_limit.steps == 23 and resumed.epochs == 4
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.4 * 8 / 256 * 0.05, rel=1e-9)
    assert records(tmp_path)[-1]["step"] == 23


def test_resume_of_a_time_limited_run_needs_a_time_limit(tmp_path):
    first, _ = trainer_for(config(**{"train.max_steps": 9}), tmp_path)
    first.fit()
    plain = make_config(**{"train.ema": False})
    trainer = Trainer(TimedToy(), make_loaders(plain), plain, run_dir=tmp_path)
    with pytest.raises(EngineError, match=r"trained under train.time_limit .* resume with train.time_limit set"):
        trainer.resume(tmp_path / "last.pt")


def test_max_steps_still_applies(tmp_path):
    trainer, _ = trainer_for(config(**{"train.max_steps": 8}), tmp_path)
    trainer.fit()
    assert trainer.step == 8 and records(tmp_path)[-1]["step"] == 8


def test_a_budget_already_spent_trains_nothing_more(tmp_path):
    first, _ = trainer_for(config(**{"train.time_limit": 6 / 60}), tmp_path)
    first.fit()  # 6 steps at 6 s: the time is spent at the epoch's end
    assert first.step == 6
    again, model = trainer_for(config(**{"train.time_limit": 6 / 60}), tmp_path)
    again.resume(tmp_path / "last.pt")
    metrics = again.fit()
    assert again.step == 6 and model.lrs == [] and "top1" in metrics


# ---------------------------------------------------------------- effdense budget --minutes


def _scale_index(scaled) -> float:
    """0, 1, ... for B/D scales and phis; 10 + n for Lite n."""
    model = scaled.model
    if model.phi is not None:
        return float(model.phi)
    scale = str(model.scale)
    return 10 + int(scale[4:]) if scale.startswith("lite") else float(scale.rstrip("x"))


def fake_step(scaled, device=None, runs=None):
    """A measurement whose training step costs 10 * (index + 2) ms per image (phi -1 -> 10 ms, D0 -> 20 ms)."""
    from tasks.budget.measure import Measurement

    per_image = 10.0 * (_scale_index(scaled) + 2)
    return Measurement(params_m=1.0, gmacs=1.0, latency_ms=5.0, throughput=200.0, train_step_ms=per_image * 2,
                       train_ms_per_image=per_image, extra={"eval_batch": 2, "train_batch": 2})


def hand_budget(minutes, ms_per_image, images_per_step):
    """steps = floor(minutes * 60 s / (ms per image x images per step)), in exact decimal arithmetic."""
    from fractions import Fraction

    step_ms = Fraction(str(ms_per_image)) * images_per_step
    steps = math.floor(Fraction(str(minutes)) * 60_000 / step_ms)
    return steps, steps * images_per_step


def test_budget_minutes_arithmetic_on_a_known_step_time(tmp_path):
    from tasks.budget import Limits, run_budget, scales_from
    from tasks.config import load

    # global batch 16 a step: 8 images x 2 accumulated forwards
    cfg = load(DEMO_DET, ["data.batch_size=8", "train.grad_accum=2", "train.device=cpu"])
    scales = scales_from("detection", ["lite0", "d0", "efficientdet-d1"], phis=[-1, -0.5])
    result = run_budget(cfg, Limits(), scales, measure=fake_step, progress=False, minutes=5)
    rows = {row.scale.label: row for row in result.rows}
    assert list(rows) == ["Lite0", "D0", "D1", "phi=-1", "phi=-0.5"]
    # D0: 20 ms an image x 16 = 0.32 s a step; 300 s hold 937 steps (937.5 rounded down), 14992 images
    assert (rows["D0"].steps_in_budget, rows["D0"].images_in_budget) == (937, 14992) == hand_budget(5, 20, 16)
    assert (rows["phi=-1"].steps_in_budget, rows["phi=-1"].images_in_budget) == (1875, 30000)
    for label, row in rows.items():
        per_image = row.measurement.train_ms_per_image
        assert (row.steps_in_budget, row.images_in_budget) == hand_budget(5, per_image, 16), label
    assert rows["D0"].accuracy == 34.3 and rows["D1"].accuracy == 40.2  # the published COCO AP beside them
    assert rows["Lite0"].image_size == (320, 320) and rows["phi=-1"].image_size[0] < 512
    assert result.settings["minutes"] == 5 and result.settings["images_per_step"] == 16
    table = result.table()
    assert "steps/5min" in table and "images/5min" in table and "14,992" in table
    json_path, png_path = result.write(tmp_path)
    record = json.loads(json_path.read_text())
    assert [(r["scale"], r["steps_in_budget"], r["images_in_budget"]) for r in record["rows"]][:2] == [
        ("Lite0", *hand_budget(5, 10 * 12, 16)), ("D0", 937, 14992)]
    assert record["settings"]["minutes"] == 5 and png_path.read_bytes()[:4] == b"\x89PNG"


def test_budget_without_minutes_keeps_its_table():
    from tasks.budget import Limits, run_budget, scales_from
    from tasks.config import load

    cfg = load(DEMO_DET, ["train.device=cpu"])
    result = run_budget(cfg, Limits(), scales_from("detection", ["d0"]), measure=fake_step, progress=False)
    assert result.rows[0].steps_in_budget is None and "min" not in result.table().splitlines()[0]


def test_budget_minutes_for_classification_and_a_bad_value():
    from tasks.budget import BudgetError, Limits, run_budget, scales_from
    from tasks.config import load

    cfg = load(DEMO_CLS, ["data.batch_size=4", "train.device=cpu"])
    result = run_budget(cfg, Limits(), scales_from("classification", ["b1"], phis=[-1.5]), measure=fake_step,
                        progress=False, minutes=0.5)
    assert [(r.scale.label, r.steps_in_budget, r.images_in_budget) for r in result.rows] == [
        ("B1", *hand_budget(0.5, 30, 4)), ("phi=-1.5", *hand_budget(0.5, 5, 4))]
    assert result.rows[0].accuracy == 79.1  # ImageNet top-1 beside it
    with pytest.raises(BudgetError, match="--minutes 0: the time budget must be a positive number"):
        run_budget(cfg, Limits(), scales_from("classification", ["b1"]), measure=fake_step, progress=False, minutes=0)


def test_budget_cli_minutes_negative_phis_and_lite_scales(tmp_path, capsys, monkeypatch):
    from tasks import budget
    from tasks.cli import main

    monkeypatch.setattr(budget, "measure_scale", fake_step)
    assert main(["budget", str(DEMO_DET), "--set", "data.batch_size=4", "--set", "train.device=cpu",
                 "--minutes", "2", "--scales", "efficientdet-lite2", "d0", "--phis", "-1", "-0.25",
                 "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "steps/2min" in out and "images/2min" in out
    record = json.loads((tmp_path / "budget.json").read_text())
    rows = [(r["scale"], r["image_size"], r["steps_in_budget"], r["images_in_budget"]) for r in record["rows"]]
    assert [r[0] for r in rows] == ["Lite2", "D0", "phi=-1", "phi=-0.25"]
    assert rows[1] == ("D0", [512, 512], *hand_budget(2, 20, 4))
    assert rows[2][2:] == hand_budget(2, 10, 4) and rows[3][2:] == hand_budget(2, 17.5, 4)
    assert rows[0][1] == [448, 448] and rows[0][2:] == hand_budget(2, 140, 4)

    assert main(["budget", str(DEMO_DET), "--set", "train.device=cpu", "--minutes", "2", "--scales", "d0",
                 "--image-size", "256x384", "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "budget.json").read_text())["rows"][0]["image_size"] == [256, 384]
    assert main(["budget", str(DEMO_DET), "--image-size", "big", "--output", str(tmp_path)]) == 2
    assert "error: --image-size 'big': expected native, config, or HxW" in capsys.readouterr().err


def test_budget_cli_minutes_real_measurement(tmp_path, capsys):
    """One real (tiny) CPU measurement: B0 at 64x64, batch 2."""
    from tasks.cli import main

    assert main(["budget", str(DEMO_CLS), "--set", "data.batch_size=2", "--set", "data.eval_batch_size=2",
                 "--set", "train.device=cpu", "--scales", "efficientnet-b0", "--image-size", "64",
                 "--minutes", "1", "--runs", "1", "--threads", "1", "--output", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "budget.json").read_text())["rows"]
    assert row["image_size"] == [64, 64] and row["train_ms_per_image"] > 0
    assert (row["steps_in_budget"], row["images_in_budget"]) == hand_budget(1, row["train_ms_per_image"], 2)


def test_train_command_on_the_demo_preset_stops_at_the_time_limit(tmp_path, monkeypatch):
    """`effdense train` on synthetic ImageFolder data (32 images, batch 8: 4 steps an epoch) with a budget that
    any real step overruns (6 microseconds): one step, then the closing evaluation and last.pt."""
    import time

    from tasks.cli import main
    from tasks.data.synthetic.classification import write_classification

    monkeypatch.setattr(timelimit, "clock", time.monotonic)
    root = write_classification(tmp_path / "shapes", num_classes=4, train_per_class=8, val_per_class=4, size=32)
    sets = [f"data.root={root}", "data.image_size=32", "data.batch_size=8", "data.workers=0", "train.epochs=3",
            "train.progress=false", "train.time_limit=1e-7"]
    args = [arg for item in sets for arg in ("--set", item)]
    assert main(["train", str(DEMO_CLS), *args, "--output", str(tmp_path / "run")]) == 0
    (record,) = records(tmp_path / "run")
    assert record["step"] == 1 and 0.0 <= record["val/top1"] <= 1.0
    assert record["time_limit/epochs_done"] == 0.25 and record["time_limit/epochs_planned"] == 3
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["step"] == 1
