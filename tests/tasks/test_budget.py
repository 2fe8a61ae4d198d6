"""Scale selection on fake measurements (injected), phi bisection on a fake monotone cost, OOM rows, the
impossible-budget message, auto batch size, the report files; one real tiny CPU measurement."""

import json
from pathlib import Path

import pytest
import torch

from tasks.budget import (
    COCO_AP,
    IMAGENET_TOP1,
    BudgetError,
    Limits,
    default_scales,
    run_budget,
    scales_from,
    search_phi,
)
from tasks.budget.measure import (
    Measurement,
    example_batch,
    find_batch_size,
    measure_scale,
)
from tasks.config import load
from tasks.config.schema import DetectionConfig

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo" / "classification.yaml"
ALL_B = [f"efficientnet-b{i}" for i in range(8)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cfg():
    return load(DEMO, ["data.batch_size=8", "data.eval_batch_size=4", "train.device=cpu"])


def _index(cfg_at_scale) -> float:
    """The compound coefficient a scaled config names (model.phi, else model.scale)."""
    model = cfg_at_scale.model
    return float(model.phi) if model.phi is not None else float(str(model.scale).rstrip("x"))


class FakeMeasure:
    """latency = base * growth^scale ms, throughput = 1000 / latency img/s; ``oom_from``: those scales OOM."""

    def __init__(self, base=5.0, growth=1.6, oom_from=None):
        self.base, self.growth, self.oom_from, self.calls = base, growth, oom_from, []

    def __call__(self, scaled):
        k = _index(scaled)
        self.calls.append(k)
        if self.oom_from is not None and k >= self.oom_from:
            return Measurement(params_m=1.0, gmacs=1.0, status="oom", note="out of memory training at batch 8")
        latency = self.base * self.growth**k
        return Measurement(params_m=5 * 1.4**k, gmacs=0.4 * 2**k, latency_ms=latency, throughput=1000 / latency,
                           train_step_ms=3 * latency, extra={"eval_batch": 4, "train_batch": 8})


def _fake_cost(scaled):
    return 1.0, 2.0


def test_chooses_the_largest_scale_under_the_limit_and_stops_at_2x(cfg):
    measure = FakeMeasure()  # B3 20.5 ms, B4 32.8 (1.09x), B5 52.4 (1.75x), B6 83.9 (2.8x: stop)
    result = run_budget(cfg, Limits(latency_ms=30), scales_from("classification", ALL_B), measure=measure,
                        cost=_fake_cost, progress=False)
    assert result.rows[result.chosen].scale.label == "B3"
    assert result.stopped_by == "B4 needs 32.8 ms at batch 1, limit 30 ms"
    assert measure.calls == [0, 1, 2, 3, 4, 5, 6]
    assert result.rows[7].measurement.status == "not measured" and result.rows[7].measurement.params_m == 1.0
    assert [row.accuracy for row in result.rows] == [IMAGENET_TOP1[str(i)] for i in range(8)]
    assert result.rows[3].set_args[:2] == ["model.scale=3", "model.phi=null"]
    assert "* B3" in result.table()


def test_throughput_limit_and_every_limit_at_once(cfg):
    result = run_budget(cfg, Limits(latency_ms=100, min_throughput=40), scales_from("classification", ALL_B),
                        measure=FakeMeasure(), cost=_fake_cost, progress=False)
    # throughput 1000 / latency >= 40 -> latency <= 25 ms -> B3 (20.5); B4 gives 30.5 img/s
    assert result.rows[result.chosen].scale.label == "B3"
    assert result.stopped_by == "B4 runs 30.5 img/s, limit at least 40 img/s"


def test_out_of_memory_is_a_row_and_stops_the_sweep(cfg):
    result = run_budget(cfg, Limits(latency_ms=1000), scales_from("classification", ALL_B),
                        measure=FakeMeasure(oom_from=5), cost=_fake_cost, progress=False)
    statuses = [row.measurement.status for row in result.rows]
    assert statuses == ["ok"] * 5 + ["oom", "not measured", "not measured"]
    assert result.rows[result.chosen].scale.label == "B4"
    assert result.stopped_by == "B5 runs out of memory training at batch 8"


def test_impossible_budget_is_one_line(cfg):
    with pytest.raises(BudgetError) as error:
        run_budget(cfg, Limits(latency_ms=5), scales_from("classification", ALL_B[:3]),
                   measure=FakeMeasure(base=41.0), cost=_fake_cost, progress=False)
    assert str(error.value) == "no scale fits: B0 needs 41.0 ms at batch 1, limit 5 ms"
    assert error.value.result is not None and error.value.result.chosen is None
    assert "\n" not in str(error.value)


def test_memory_limit_needs_cuda(cfg):
    with pytest.raises(BudgetError, match="measured on CUDA only"):
        run_budget(cfg, Limits(memory_gb=8), measure=FakeMeasure(), device="cpu", progress=False)


def test_phi_bisection_on_a_monotone_cost(cfg):
    measure = FakeMeasure(base=10.0, growth=2.0)
    search = search_phi(cfg, Limits(latency_ms=10 * 2**2.37), low=0.0, high=7.0, measure=measure, progress=False)
    assert search.phi == pytest.approx(2.35)  # the largest multiple of 0.05 with 10 * 2^phi <= 10 * 2^2.37
    assert search.override.startswith("--set model.phi=2.35 --set model.scale=null")
    assert len(measure.calls) <= 12  # ~log2(140) + 2
    assert all(abs(k / 0.05 - round(k / 0.05)) < 1e-6 for k in measure.calls)
    rows = search.result.rows
    assert rows[search.result.chosen].scale.label == "phi=2.35"
    assert search.result.stopped_by.startswith("phi=2.4 needs")
    with pytest.raises(BudgetError, match="no scale fits: phi=0 needs 10.0 ms"):
        search_phi(cfg, Limits(latency_ms=5), measure=measure, progress=False)


def test_scale_names_and_default_ranges():
    assert [s.label for s in default_scales("classification", "cpu")] == ["B0", "B1", "B2"]
    assert [s.label for s in default_scales("detection", "cpu")] == ["D0", "D1"]
    assert [s.label for s in default_scales("detection", "cuda")][-2:] == ["D7", "D7x"]
    assert len(default_scales("segmentation", "cuda")) == 8
    named = scales_from("classification", ["efficientnet-b3", "efficientnet-lite0"], phis=[0.5])
    assert [s.label for s in named] == ["B3", "efficientnet-lite0", "phi=0.5"]
    assert [s.label for s in scales_from("detection", ["efficientdet-d7x", "efficientdet-d2"])] == ["D7x", "D2"]
    with pytest.raises(BudgetError, match="--scales 'resnet50' is not a backbone"):
        scales_from("classification", ["resnet50"])
    assert COCO_AP["7x"] == 54.4


def test_detection_scales_use_the_native_input_size():
    cfg = DetectionConfig()
    cfg.train.device = "cpu"
    result = run_budget(cfg, Limits(latency_ms=100), scales_from("detection", ["efficientdet-d0", "efficientdet-d7x"]),
                        measure=FakeMeasure(growth=1.0), cost=_fake_cost, progress=False)
    assert [row.image_size for row in result.rows] == [(512, 512), (1536, 1536)]
    assert [row.accuracy for row in result.rows] == [34.3, 54.4]


def test_report_files(cfg, tmp_path):
    result = run_budget(cfg, Limits(latency_ms=30), scales_from("classification", ALL_B[:5]), measure=FakeMeasure(),
                        cost=_fake_cost, progress=False)
    json_path, png_path = result.write(tmp_path)
    record = json.loads(json_path.read_text())
    assert record["chosen"]["scale"] == "B3" and record["limits"] == {"latency_ms": 30}
    assert record["rows"][4]["violations"]["latency_ms"]["limit"] == 30
    assert png_path.read_bytes()[:4] == b"\x89PNG"


def test_find_batch_size(cfg):
    on_cpu = find_batch_size(cfg, device="cpu", free_gb=lambda: 64.0)  # the CPU guard: test_budget_bounds.py
    assert on_cpu.batch_size == 8 and "needs CUDA" in on_cpu.message

    def step(trial, batch):  # "fits" up to 100 images
        if batch > 100:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return batch * 0.1

    found = find_batch_size(cfg, device="cpu", step=step)
    assert max(b for b, ok, _ in found.probes if ok) == 100
    assert found.batch_size == 88  # 90% of 100, down to a multiple of 8
    assert found.lr == pytest.approx(cfg.optim.lr * 88 / cfg.optim.base_batch_size)


def test_example_batches_follow_the_training_formats():
    from tasks.config.schema import SegmentationConfig

    seg = SegmentationConfig()
    seg.data.image_size = [32, 48]
    images, targets = example_batch(seg, 2)
    assert images.dtype == torch.uint8 and images.shape == (2, 3, 32, 48)
    assert targets["masks"].shape == (2, 32, 48) and targets["masks"].dtype == torch.int64
    assert set(targets["masks"].unique().tolist()) <= set(range(seg.model.num_classes)) | {255}
    det = DetectionConfig()
    det.data.image_size = [128, 256]
    images, targets = example_batch(det, 3)
    assert images.shape == (3, 3, 128, 256) and len(targets) == 3
    boxes = targets[0]["boxes"]
    assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes[:, 2] <= 256).all() and (boxes[:, 3] <= 128).all()


def test_measure_scale_reports_out_of_memory(cfg):
    from tasks import registry

    def build(scaled):
        if torch.empty(0).device.type != "meta":  # the meta-device cost count still works
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return registry.build_model(scaled)

    small = load(DEMO, ["data.image_size=32", "train.device=cpu"])
    measured = measure_scale(small, runs=1, build=build)
    assert measured.status == "oom" and measured.note == "out of memory building the model"
    assert measured.params_m > 0 and measured.latency_ms is None


def test_real_cpu_measurement_lite0_tiny():
    small = load(DEMO, ["data.image_size=32", "data.batch_size=2", "data.eval_batch_size=2", "train.device=cpu"])
    measured = measure_scale(small, runs=1)
    assert measured.status == "ok" and measured.peak_memory_gb is None
    assert measured.latency_ms > 0 and measured.throughput > 0 and measured.train_step_ms > 0
    assert measured.params_m == pytest.approx(3.38, abs=0.01)  # lite0 with 4 classes
    assert measured.extra["image_size"] == [32, 32]


def test_run_command_prints_and_writes_even_when_nothing_fits(cfg, tmp_path, monkeypatch):
    from tasks import budget

    monkeypatch.setattr(budget, "measure_scale", lambda scaled, device=None, runs=None: FakeMeasure(base=41.0)(scaled))
    monkeypatch.setattr(budget, "count_cost", _fake_cost)
    lines = []
    with pytest.raises(BudgetError, match="no scale fits: B0 needs 41.0 ms"):
        budget.run_command(cfg, latency_ms=5, scales=["efficientnet-b0", "efficientnet-b1"], out_dir=tmp_path,
                           progress=False, echo=lines.append)
    assert (tmp_path / "budget.json").is_file() and (tmp_path / "budget.png").is_file()
    assert "B0" in lines[0] and lines[-1].startswith("wrote")
    lines.clear()
    result = budget.run_command(cfg, latency_ms=100, scales=["efficientnet-b0"], fit_batch=True, out_dir=tmp_path,
                                progress=False, echo=lines.append)
    assert result.chosen == 0 and "needs CUDA" in lines[-1]
