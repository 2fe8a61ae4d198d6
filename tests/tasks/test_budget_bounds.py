"""`effdense budget` finishes on any limit (issue 18): the phi search stops at its bound and says so; on the
CPU a scale that would not fit host memory is a row, not a killed process; the step is measured at a
smaller batch where the config's would not fit; budget.json holds every row measured so far."""

import json
import re
from functools import partial

import pytest

from tasks.budget import BudgetError, Limits, run_budget, scales_from, search_phi
from tasks.budget.measure import Measurement, find_batch_size, measure_scale
from tasks.budget.memory import (
    MEMORY_MARGIN,
    available_memory_gb,
    estimate_memory,
    optimizer_slots,
)
from tasks.config import load

from .test_budget import ALL_B, DEMO, FakeMeasure, _fake_cost, _index

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cfg():
    return load(DEMO, ["data.batch_size=8", "data.eval_batch_size=4", "train.device=cpu"])


@pytest.fixture
def tiny():
    """The demo classifier at 64x64 (real measurements take about a second; at 32x32 the last feature map is 1x1
    and BatchNorm refuses to train on batch 1)."""
    return load(DEMO, ["data.image_size=64", "data.batch_size=8", "data.eval_batch_size=8", "train.device=cpu"])


def _no_real_build(scaled):
    """A build that fails unless on the meta device: proves a skipped scale was never started."""
    import torch

    from tasks import registry

    if torch.empty(0).device.type != "meta":
        raise AssertionError("the guard should not have built this model")
    return registry.build_model(scaled)


# ------------------------------------------------------------------------------------------ the bound


def test_search_stops_at_the_bound_and_says_the_limit_is_not_binding(cfg):
    measure = FakeMeasure()  # every phi fits a 1e9 ms limit
    search = search_phi(cfg, Limits(latency_ms=1e9), measure=measure, progress=False)
    assert search.phi == 8.0 and max(measure.calls) == 8.0
    assert measure.calls == [0.0, 2.0, 4.0, 8.0]  # doubled up to the bound, never past it
    assert search.result.stopped_by.startswith("nothing: every scale up to phi 8 fits; the limit is not binding")
    assert "the limit is not binding" in search.result.table()


def test_max_phi_moves_the_bound(cfg):
    measure = FakeMeasure()
    search = search_phi(cfg, Limits(latency_ms=1e9, min_throughput=1e-9), measure=measure, max_phi=3.33,
                        progress=False)
    assert search.phi == pytest.approx(3.3) and max(measure.calls) == pytest.approx(3.3)  # the bound on the grid
    assert "every scale up to phi 3.3 fits; the limits are not binding" in search.result.stopped_by
    assert search.result.settings["max_phi"] == pytest.approx(3.3)
    with pytest.raises(BudgetError, match=r"--max-phi 0 is not above phi 0"):
        search_phi(cfg, Limits(latency_ms=1), measure=measure, max_phi=0, progress=False)


def test_a_binding_limit_below_the_bound_still_bisects(cfg):
    measure = FakeMeasure(base=10.0, growth=2.0)
    search = search_phi(cfg, Limits(latency_ms=10 * 2**5.01), measure=measure, progress=False)
    assert search.phi == pytest.approx(5.0) and max(measure.calls) == 8.0
    assert search.result.stopped_by.startswith("phi=5.05 needs")


# ------------------------------------------------------------------------------------------ the memory guard


def test_a_scale_that_would_not_fit_is_a_row_not_a_process_death(tiny):
    estimate = estimate_memory(tiny)
    free = estimate.train_gb(1) / MEMORY_MARGIN * 0.5  # half what batch 1 needs
    measured = measure_scale(tiny, runs=1, build=_no_real_build, free_gb=lambda: free)
    assert measured.status == "skipped" and measured.latency_ms is None
    assert measured.note == (f"needs ~{estimate.train_gb(1):.1f} GB at batch 1, this machine has {free:.1f} GB free "
                             f"(80% of it planned on)")
    assert measured.params_m > 0 and measured.gmacs > 0  # still counted on the meta device


def test_the_guard_in_a_search_turns_larger_phis_into_rows(tiny, tmp_path):
    from tasks.budget.rows import config_for, phi_scale

    phi0 = estimate_memory(config_for(tiny, phi_scale(0), (64, 64)))
    free = phi0.train_gb(1) / MEMORY_MARGIN * 1.02  # phi 0 just fits at batch 1; every larger phi does not
    measure = partial(measure_scale, runs=1, free_gb=lambda: free)
    search = search_phi(tiny, Limits(latency_ms=1e9), measure=measure, image_size=(64, 64), progress=False,
                        out_dir=tmp_path)
    statuses = {row.scale.label: row.measurement.status for row in search.result.rows}
    assert search.phi == 0.0 and statuses["phi=0"] == "ok" and statuses["phi=2"] == "skipped"
    assert set(statuses.values()) == {"ok", "skipped"} and len(statuses) <= 8
    assert search.result.stopped_by.startswith("phi=0.05 needs ~") and "GB free" in search.result.stopped_by
    zero = search.result.rows[0].measurement
    assert zero.extra["train_batch"] == 1 and zero.note.startswith("step at b1 (b8 needs ~")
    record = json.loads((tmp_path / "budget.json").read_text())  # rewritten after each phi
    assert record["complete"] is False and len(record["rows"]) == len(statuses)


def test_a_sweep_stops_at_a_skipped_scale(cfg):
    def measure(scaled):
        if _index(scaled) >= 2:
            return Measurement(status="skipped", note="needs ~30.0 GB at batch 1, this machine has 17.9 GB free")
        return FakeMeasure()(scaled)

    result = run_budget(cfg, Limits(latency_ms=1e6), scales_from("classification", ALL_B[:5]), measure=measure,
                        cost=_fake_cost, progress=False)
    assert [row.measurement.status for row in result.rows] == ["ok", "ok", "skipped", "not measured", "not measured"]
    assert result.stopped_by == "B2 needs ~30.0 GB at batch 1, this machine has 17.9 GB free"
    assert "skipped (needs ~30.0 GB at batch 1" in result.table()


def test_the_step_is_measured_at_a_batch_that_fits(tiny):
    estimate = estimate_memory(tiny)
    free = estimate.train_gb(3) / MEMORY_MARGIN + 1e-6  # batch 3 fits, the config's 8 does not
    measured = measure_scale(tiny, runs=1, free_gb=lambda: free)
    assert measured.status == "ok" and measured.extra["train_batch"] == 3 and measured.extra["config_train_batch"] == 8
    assert measured.train_ms_per_image == pytest.approx(measured.train_step_ms / 3)
    assert measured.note.startswith(f"step at b3 (b8 needs ~{estimate.train_gb(8):.1f} GB")


def test_each_phase_keeps_to_the_time_cap(tiny):
    measured = measure_scale(tiny, runs=1, free_gb=lambda: 1e3, max_seconds=1e-6)
    assert measured.extra["eval_batch"] == 1 and measured.extra["train_batch"] == 2  # BatchNorm trains 2 at least
    assert measured.note == "img/s at b1 (time cap 1e-06 s); step at b2 (time cap 1e-06 s)"
    from tasks.budget.rows import BudgetResult, Row, Scale

    result = BudgetResult("classification", "cpu", Limits(latency_ms=1e6),
                          [Row(Scale("x", ()), (64, 64), measured)], 0, "")
    line = result.table().splitlines()[2]
    assert "@b1" in line and "fits; img/s at b1" in line and "train ms/img" in result.table()


def test_the_estimate_counts_optimizer_state_and_ema(tiny):
    assert optimizer_slots(tiny) == 2  # adamw
    tiny.optim.name, tiny.optim.momentum = "sgd", 0.9
    assert optimizer_slots(tiny) == 1
    plain, with_ema = estimate_memory(tiny), estimate_memory(tiny, ema=True)
    assert plain.state_copies == 3 and with_ema.state_copies == 4
    assert with_ema.train_gb(8) - plain.train_gb(8) == pytest.approx(plain.params_gb)
    assert plain.train_gb(16) - plain.train_gb(8) == pytest.approx(8 * plain.activations_gb)
    half = load(DEMO, ["data.image_size=64", "train.amp=bf16", "train.device=cpu"])
    assert estimate_memory(half).activations_gb == pytest.approx(estimate_memory(
        load(DEMO, ["data.image_size=64", "train.device=cpu"])).activations_gb / 2)


def test_free_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   18874368 kB\n")
    assert available_memory_gb(str(meminfo)) == pytest.approx(18.0)
    assert available_memory_gb(str(tmp_path / "missing")) > 0  # psutil or sysconf


# ------------------------------------------------------------------------------------------ auto batch on CPU


def test_auto_batch_size_on_the_cpu_keeps_lowers_or_refuses(tiny):
    estimate = estimate_memory(tiny, ema=tiny.train.ema)
    kept = find_batch_size(tiny, device="cpu", free_gb=lambda: 1e3)
    assert kept.batch_size == 8 and "needs CUDA to probe" in kept.message and "keeping it" in kept.message
    lowered = find_batch_size(tiny, device="cpu", free_gb=lambda: estimate.train_gb(5) / MEMORY_MARGIN + 1e-6)
    assert lowered.batch_size == 5 and "data.batch_size=8 needs ~" in lowered.message
    assert lowered.lr == pytest.approx(tiny.optim.lr * 5 / tiny.optim.base_batch_size)
    with pytest.raises(BudgetError, match=r"train.batch_size=auto: this model needs ~.* GB to train at batch 1"):
        find_batch_size(tiny, device="cpu", free_gb=lambda: 1e-6)


# ------------------------------------------------------------------------------------------ progress and files


def test_budget_json_holds_every_row_measured_so_far(cfg, tmp_path):
    seen = []

    def measure(scaled):
        path = tmp_path / "budget.json"
        seen.append(len(json.loads(path.read_text())["rows"]) if path.exists() else 0)
        if len(seen) == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third scale
        return FakeMeasure()(scaled)

    with pytest.raises(KeyboardInterrupt):
        run_budget(cfg, Limits(latency_ms=1e6), scales_from("classification", ALL_B[:5]), measure=measure,
                   cost=_fake_cost, progress=False, out_dir=tmp_path)
    assert seen == [0, 1, 2]
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["complete"] is False and [row["scale"] for row in record["rows"]] == ["B0", "B1"]
    assert record["rows"][1]["extra"]["seconds"] >= 0
    assert not list(tmp_path.glob(".budget.json*"))  # no temp file left behind


def test_progress_names_each_phi_and_its_time(cfg, capsys):
    search_phi(cfg, Limits(latency_ms=1e9), measure=FakeMeasure(), max_phi=2, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"\bphi=0 \(\d+x\d+\): 0 s, fits\n", err) and re.search(r"\bphi=2 \(\d+x\d+\): 0 s, fits\n", err)
    assert "measuring phi=2 (" in err  # the bar names the scale being measured


def test_cli_max_phi(tmp_path, capsys):
    from tasks.cli import main

    assert main(["budget", str(DEMO), "--set", "data.batch_size=2", "--set", "data.eval_batch_size=2",
                 "--set", "train.device=cpu", "--search", "phi", "--max-phi", "0.05", "--latency-ms", "1e6",
                 "--runs", "1", "--threads", "1", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "every scale up to phi 0.05 fits; the limit is not binding" in out
    record = json.loads((tmp_path / "budget.json").read_text())
    assert record["complete"] is True and [row["scale"] for row in record["rows"]] == ["phi=0", "phi=0.05"]
    assert main(["budget", str(DEMO), "--max-phi", "3", "--latency-ms", "5", "--output", str(tmp_path)]) == 2
    assert "error: --max-phi 3 bounds --search phi; add --search phi" in capsys.readouterr().err
