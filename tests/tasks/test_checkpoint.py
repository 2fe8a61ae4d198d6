"""Checkpoint files: atomic under SIGKILL, readable with weights_only=True, RNG states round-trip."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from tasks.engine import EngineError
from tasks.engine import checkpoint as ckpt
from tasks.engine.optim import ModelEMA, build_optimizer, build_schedule
from tests.tasks.toy_task import ToyTask, make_config

REPO = Path(__file__).resolve().parents[2]


def draws():
    return (torch.rand(5).tolist(), np.random.rand(5).tolist(), np.random.randn(3).tolist(),
            [random.random() for _ in range(5)], random.gauss(0, 1))


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leave a cached gaussian in numpy's state
    random.gauss(0, 1)  # and in python's
    state = ckpt.capture_rng_state()
    expected = draws()
    torch.save({"rng": state}, tmp_path / "rng.pt")
    ckpt.seed_everything(12345)  # scramble everything
    ckpt.restore_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert draws() == expected


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\(\)`")
def test_training_state_loads_with_weights_only_and_restores(tmp_path):
    cfg = make_config(**{"train.amp": "fp16"})
    torch.manual_seed(0)
    model = ToyTask()
    ema = ModelEMA(model, 0.9)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg, steps_per_epoch=6)
    scaler = torch.amp.GradScaler("cpu")
    for _ in range(3):  # some optimizer/scheduler/EMA history
        losses = model(torch.randint(0, 255, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
        scaler.scale(losses["ce"]).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        ema.update(model)
    state = ckpt.training_state(model=model, ema=ema, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                                position={"epoch": 0, "step": 3, "batch_in_epoch": 3},
                                rng=[{"step": ckpt.capture_rng_state(), "epoch_start": None}],
                                config={"train": {"epochs": 2}}, best={"value": None, "metric": None})
    ckpt.save_checkpoint(tmp_path / "last.pt", state)
    loaded = ckpt.load_checkpoint(tmp_path / "last.pt")  # weights_only=True inside

    torch.manual_seed(7)
    model2 = ToyTask()
    ema2 = ModelEMA(model2, 0.9)
    optimizer2 = build_optimizer(model2, cfg)
    scheduler2 = build_schedule(optimizer2, cfg, steps_per_epoch=6)
    scaler2 = torch.amp.GradScaler("cpu")
    ckpt.restore_training_state(loaded, tmp_path / "last.pt", model=model2, ema=ema2, optimizer=optimizer2,
                                scheduler=scheduler2, scaler=scaler2)
    for key, value in model.state_dict().items():
        assert torch.equal(value, model2.state_dict()[key]), key
    assert ema2.updates == 3
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()))
    assert scheduler2.get_last_lr() == scheduler.get_last_lr() and scaler2.get_scale() == scaler.get_scale()
    scheduler.step()
    scheduler2.step()
    assert optimizer2.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    net = ckpt.network_state(loaded)  # the EMA's network, keys as model.net's
    assert net.keys() == model.net.state_dict().keys()
    assert all(torch.equal(net[k], v) for k, v in ema.module.net.state_dict().items())


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "last.pt"
    ckpt.save_checkpoint(target, {"format": ckpt.FORMAT, "version": 1})

    def broken(handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    with pytest.raises(OSError):
        ckpt.atomic_write(target, broken)
    assert ckpt.load_checkpoint(target)["version"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_sigkill_during_writes_never_breaks_last_pt(tmp_path):
    target, numel = tmp_path / "last.pt", 8_000_000  # 32 MB a write
    rng = random.Random(0)
    killed_mid_write = 0
    for trial in range(5):
        first = trial * 1000
        writer = subprocess.Popen([sys.executable, str(REPO / "tests/tasks/ckpt_writer.py"), str(target), str(numel),
                                   str(first)], cwd=REPO, stdout=subprocess.PIPE, text=True)
        written = [int(writer.stdout.readline())]  # one complete version exists
        time.sleep(rng.uniform(0.0, 0.8))
        os.kill(writer.pid, signal.SIGKILL)
        rest, _ = writer.communicate()
        written += [int(v) for v in rest.split()]
        assert writer.returncode == -signal.SIGKILL
        state = torch.load(target, weights_only=True)
        version = state["version"]
        assert version in (written[-1], written[-1] + 1)  # the last one printed, or one done but not yet printed
        assert state["weights"].shape == (numel,) and bool((state["weights"] == version).all())
        assert state["tail"]["text"] == f"version {version}" and bool((state["tail"]["marker"] == version).all())
        assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["last.pt"]  # temp files never look like it
        assert all(p.name.startswith(".last.pt.tmp-") for p in tmp_path.iterdir() if p.name != "last.pt")
        killed_mid_write += bool(ckpt.remove_stale_temp_files(tmp_path))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert killed_mid_write >= 1  # writing is most of the loop's time: some kill did land inside a write


def test_load_checkpoint_errors_are_one_line(tmp_path):
    with pytest.raises(EngineError) as missing:  # a user error: the CLI prints it as one line
        ckpt.load_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a zip file at all" * 10)
    with pytest.raises(EngineError) as garbage:
        ckpt.load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"state_dict": {}}, tmp_path / "foreign.pt")
    with pytest.raises(EngineError) as foreign:
        ckpt.load_checkpoint(tmp_path / "foreign.pt")
    for error, name in [(missing, "nope.pt"), (garbage, "garbage.pt"), (foreign, "foreign.pt")]:
        assert name in str(error.value) and "\n" not in str(error.value)


def test_mismatched_checkpoint_is_a_one_line_error(tmp_path):
    cfg = make_config()
    model = ToyTask()
    optimizer = build_optimizer(model, cfg)
    scheduler = build_schedule(optimizer, cfg, 6)
    state = ckpt.training_state(model=model, ema=None, optimizer=optimizer, scheduler=scheduler, scaler=None,
                                position={"epoch": 0, "step": 0, "batch_in_epoch": 0}, rng=None, config={},
                                best={"value": None, "metric": None})
    other = nn.Sequential(nn.Linear(3, 3))
    other_optimizer = torch.optim.SGD(other.parameters(), lr=0.1)
    with pytest.raises(EngineError) as caught:
        ckpt.restore_training_state(state, "x/last.pt", model=other, ema=None, optimizer=other_optimizer,
                                    scheduler=torch.optim.lr_scheduler.ConstantLR(other_optimizer), scaler=None)
    assert "x/last.pt" in str(caught.value) and "\n" not in str(caught.value)


def test_safetensors_export_is_atomic_contiguous_and_unshared(tmp_path):
    from safetensors.torch import load_file

    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"transposed": base.t(), "same_storage": base, "row": base[1]}
    ckpt.save_safetensors(tmp_path / "model.safetensors", tensors, metadata={"step": "3"})
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
