# `make test` and `make demo` create .venv if missing and install effdense (with the dev and export extras) into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-slow demo bench bench-ultralytics gpu-report clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,export]"
	touch $(STAMP)

test: $(STAMP)  # the default run: everything but the tests marked slow (make test-slow runs those)
	$(BIN)/python -m pytest -q -m "not slow" tests

test-slow: $(STAMP)  # the demos trained to their targets and the other long tests
	$(BIN)/python -m pytest -q -m slow tests

demo: $(STAMP)
	$(BIN)/effdense demo classification
	$(BIN)/effdense demo segmentation
	$(BIN)/effdense demo detection

bench: $(STAMP)
	$(BIN)/python tools/bench_backbones.py
	$(BIN)/python tools/bench_train.py
	$(BIN)/python tools/bench_segmentation.py
	$(BIN)/python tools/bench_detection.py
	$(BIN)/python tools/bench_inference.py

# effdense's detector preset against ultralytics' YOLOv8n, same data / CPU threads / wall-clock budget (about
# 50 min with the defaults: 2 sizes x 3 seeds x 2 sides x 4 min); installs the bench extra (ultralytics, AGPL).
# Options through BENCH_ARGS, e.g. make bench-ultralytics BENCH_ARGS="--sizes 256 --seeds 0 --minutes 10"
bench-ultralytics: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python bench/detector_vs_ultralytics.py $(BENCH_ARGS)

gpu-report: $(STAMP)  # on a CUDA machine: GPU tests, benchmarks, budget per task, auto batch size
	bash tools/gpu_report.sh

clean:
	rm -rf $(VENV) runs .pytest_cache
