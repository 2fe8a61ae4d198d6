"""DDP with gloo on CPU: two torchrun processes equal one process on the same global batch."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.tasks.toy_task import ToyTask, make_config, plain_loop

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_on_two_ranks(helper: str, out: Path) -> list[dict]:
    """torchrun ``helper OUT`` on 2 gloo processes; each writes OUT/rank<R>.pt."""
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(REPO / "tests" / "tasks" / helper), str(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    return out, run_on_two_ranks("ddp_helper.py", out)


def test_ranks_agree_and_equal_one_process_on_the_global_batch(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["world_size"] == rank1["world_size"] == 2
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name  # DDP keeps replicas identical
    cfg = make_config(**{"data.batch_size": 4, "train.ema": False})
    torch.manual_seed(0)
    reference, epoch_losses = plain_loop(ToyTask(batch_norm=False), cfg, batch_size=8, steps_per_epoch=6)
    for (name, ours), theirs in zip(rank0["params"].items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5, msg=name)
    # The logged training loss is the mean over both ranks' batches: the plain loop's epoch means.
    for rank in (rank0, rank1):
        logged = [record["train/loss"] for record in rank["history"]]
        assert logged == pytest.approx(epoch_losses, rel=1e-5)


def test_evaluator_reduces_across_ranks(ddp_run):
    _, (rank0, rank1) = ddp_run
    assert rank0["metrics"] == rank1["metrics"]
    assert rank0["metrics"]["seen"] == 24  # 12 validation images on each rank, counted once


def test_only_rank_zero_writes_the_run_directory(ddp_run):
    out, (rank0, rank1) = ddp_run
    assert rank0["run_dir"] == rank1["run_dir"]  # the timestamped name is rank 0's, broadcast
    runs = list((out / "runs").iterdir())
    assert [str(r) for r in runs] == [rank0["run_dir"]]
    run = runs[0]
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # not written twice
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng"]) == 2  # every rank's RNG state, for exact resume
    assert not any(p.name.startswith(".") for p in run.iterdir())
    assert math.isfinite(json.loads(lines[-1])["train/loss"])


def test_signal_on_one_rank_stops_all_and_resume_is_bitwise_exact(ddp_run):
    _, ranks = ddp_run
    for rank in ranks:  # rank 1's signal during step 7 is agreed at the next log_every=2 boundary, step 8
        assert rank["stop"] == {"exit_code": 143, "step": 8, "batch_in_epoch": 2}
        for name, value in rank["straight"].items():
            assert torch.equal(value, rank["resumed"][name]), name


@pytest.fixture(scope="module")
def ddp_eval(tmp_path_factory):
    return run_on_two_ranks("ddp_eval_helper.py", tmp_path_factory.mktemp("ddp_eval"))


def test_evaluation_with_uneven_and_empty_shards_counts_every_image_once(ddp_eval):
    from torch.utils.data import DataLoader

    from tests.tasks.toy_task import NoisyImages

    rank0, rank1 = ddp_eval
    assert (rank0["shard3"], rank1["shard3"]) == (2, 1) and (rank0["shard1"], rank1["shard1"]) == (1, 0)
    torch.manual_seed(0)
    model = ToyTask().eval()
    for count in (3, 1):  # the whole split by hand, in one process
        with torch.no_grad():
            images, labels = next(iter(DataLoader(NoisyImages(count, seed=7), batch_size=count)))
            expected = float((model(images).argmax(1) == labels).sum()) / count
        for rank in ddp_eval:
            assert rank[f"eval{count}"]["seen"] == count and rank[f"eval{count}"]["top1"] == expected


def test_rank_zero_decides_best_when_ranks_disagree(ddp_eval):
    rank0, rank1 = ddp_eval
    assert rank0["best"] == rank1["best"]  # rank 0's value, on both
    assert rank0["best_step"] is not None


def test_loaders_built_without_the_process_group_are_refused(ddp_eval):
    for rank in ddp_eval:
        assert rank["unsharded"] is not None and "is not sharded across the 2 processes" in rank["unsharded"]
