"""`effdense budget` and `effdense export` as users run them (tiny CPU sizes), and their one-line errors."""

import json
from pathlib import Path

import pytest
import torch

from tasks.cli import main

REPO = Path(__file__).resolve().parents[2]
CLS = str(REPO / "configs" / "demo" / "classification.yaml")
SEG = str(REPO / "configs" / "demo" / "segmentation.yaml")


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
    from tasks import registry
    from tasks.config import load

    torch.manual_seed(0)
    model = registry.build_model(load(CLS))
    path = tmp_path_factory.mktemp("w") / "model.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.net.state_dict().items()}, str(path))
    return path


def test_export_onnx_from_the_cli_checks_against_pytorch(classifier_weights, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "clf.onnx"
    assert main(["export", CLS, "--weights", str(classifier_weights), "--format", "onnx", "-o", str(out),
                 "--set", "data.image_size=64"]) == 0
    assert out.is_file() and out.stat().st_size > 1_000_000


def test_export_weights_of_another_model_is_one_line(classifier_weights, tmp_path, capsys):
    code = main(["export", SEG, "--weights", str(classifier_weights), "--format", "torchscript",
                 "-o", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(classifier_weights) in err


def test_export_an_exported_program_needs_pt2(classifier_weights, tmp_path, capsys):
    code = main(["export", CLS, "--weights", str(classifier_weights), "--format", "exported-program",
                 "-o", str(tmp_path / "x.onnx")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and ".pt2" in err


def test_budget_on_cpu_writes_the_table_and_an_impossible_limit_is_one_line(tmp_path, capsys):
    assert main(["budget", CLS, "--set", "data.image_size=32", "--set", "data.batch_size=2", "--scales",
                 "efficientnet-lite0", "--runs", "1", "--threads", "1", "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "budget.json").read_text())
    assert (tmp_path / "budget.png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    code = main(["budget", CLS, "--set", "data.image_size=32", "--set", "data.batch_size=2", "--scales",
                 "efficientnet-lite0", "--runs", "1", "--latency-ms", "0.001", "--output", str(tmp_path)])
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar
    assert code == 2 and last.startswith("effdense: error: no scale fits: efficientnet-lite0 needs")
    assert "ms at batch 1, limit 0.001 ms" in last
