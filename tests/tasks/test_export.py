"""Export round trips: the written file's outputs (onnxruntime, torch.jit.load, torch.export.load) against
the unfused PyTorch network's outputs computed here (the independent reference), and the one-line errors."""

import warnings

import pytest
import torch
from torch import nn

from backbones.errors import EffdenseError
from tasks.classification import ClassificationTask, build_classifier
from tasks.detection import build_detector
from tasks.export import ExportError, export, load_runner, relative_errors
from tasks.segmentation import build_segmenter

onnxruntime = pytest.importorskip("onnxruntime", reason="the export extra (onnx, onnxruntime) is not installed")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so that folding them is really exercised."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
    return model.eval()


def _onnx_outputs(path, images: torch.Tensor) -> list[torch.Tensor]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in session.run(None, {"images": images.numpy()})]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def test_onnx_b0_classifier_same_padding_uint8_dynamic_batch(tmp_path):
    """TF "SAME" padding, normalisation in the graph, any batch: logits equal PyTorch's to 1e-4."""
    torch.manual_seed(0)
    task = ClassificationTask(_perturb(build_classifier("efficientnet-b0", num_classes=7, padding="same"))).eval()
    images = torch.randint(0, 256, (1, 3, 65, 63), dtype=torch.uint8)
    result = export(task, "onnx", tmp_path / "b0.onnx", images, dynamic_batch=True, include_normalization=True)
    assert result.output_names == ["logits"]
    batch = torch.randint(0, 256, (3, 3, 65, 63), dtype=torch.uint8)
    with torch.no_grad():
        expected = task(batch)
    assert _rel(expected, _onnx_outputs(result.path, batch)[0]) < 1e-4


def test_onnx_unet_b0(tmp_path):
    torch.manual_seed(0)
    net = _perturb(build_segmenter("efficientnet-b0", num_classes=4))
    x = torch.randn(1, 3, 64, 96)
    result = export(net, "onnx", tmp_path / "unet.onnx", x)
    with torch.no_grad():
        expected = net(x)
    (logits,) = _onnx_outputs(result.path, x)
    assert logits.shape == (1, 4, 64, 96) and _rel(expected, logits) < 1e-4


def test_onnx_d0_class_and_box_maps(tmp_path):
    torch.manual_seed(0)
    net = _perturb(build_detector("efficientdet-d0", num_classes=5))
    x = torch.randn(1, 3, 128, 128)
    result = export(net, "onnx", tmp_path / "d0.onnx", x)
    assert result.output_names == ["class_logits", "box_codes", "anchors"]
    with torch.no_grad():
        class_out, box_out, anchors = net.forward_raw(x)
    got = _onnx_outputs(result.path, x)
    assert _rel(class_out, got[0]) < 1e-4 and _rel(box_out, got[1]) < 1e-4
    torch.testing.assert_close(got[2][0], anchors)


def _spread_class_logits(net) -> None:
    """Distinct scores (a fresh detector scores every anchor ~0.01, so NMS order would be a matter of ties)."""
    with torch.no_grad():
        net.class_net.predict.pw.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))


@pytest.mark.slow
@pytest.mark.parametrize("format", ["onnx", "torchscript", "exported-program"])
def test_d0_nms_inside_the_graph_equals_the_detector(tmp_path, format):
    """Top-k + NMS in the graph give the detector's own eval-mode detections, padded per image."""
    torch.manual_seed(0)
    net = _perturb(build_detector("efficientdet-d0", num_classes=5, max_detections=20))
    _spread_class_logits(net)
    x = torch.randn(2, 3, 128, 128)
    result = export(net, format, tmp_path / f"d0.{'pt2' if format == 'exported-program' else format}", x,
                    postprocess="inside", dynamic_batch=True)
    boxes, scores, labels, count = load_runner(result)(x)
    with torch.no_grad():
        expected = net(x)
    assert boxes.shape == (2, 20, 4) and labels.dtype == torch.int64
    for i, detections in enumerate(expected):
        n = len(detections["scores"])
        assert int(count[i]) == n
        torch.testing.assert_close(scores[i, :n], detections["scores"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(boxes[i, :n], detections["boxes"], rtol=1e-4, atol=1e-3)
        assert torch.equal(labels[i, :n], detections["labels"]) and (labels[i, n:] == -1).all()


@pytest.mark.parametrize("format,suffix", [("torchscript", "pt"), ("exported-program", "pt2")])
def test_torchscript_and_exported_program_round_trip(tmp_path, format, suffix):
    torch.manual_seed(0)
    net = _perturb(build_classifier("efficientnet-lite0", num_classes=5, padding="same"))
    x = torch.randn(1, 3, 48, 48)
    result = export(net, format, tmp_path / f"lite0.{suffix}", x, dynamic_batch=True)
    batch = torch.randn(3, 3, 48, 48)
    with torch.no_grad():
        expected = net(batch)
    (logits,) = load_runner(result)(batch)
    assert _rel(expected, logits) < 1e-4


def test_detection_task_module_exports_its_net(tmp_path):
    from tasks.detection import DetectionTask

    torch.manual_seed(0)
    task = DetectionTask(_perturb(build_detector("efficientdet-d0", num_classes=3))).eval()
    images = torch.randint(0, 256, (1, 3, 128, 128), dtype=torch.uint8)
    result = export(task, "exported-program", tmp_path / "d0.pt2", images, include_normalization=True)
    with torch.no_grad():
        expected = task.net.forward_raw(task.normalize(images))
    got = load_runner(result)(images)
    assert _rel(expected[0], got[0]) < 1e-4 and _rel(expected[1], got[1]) < 1e-4


class _DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        return y if y.mean() > 0 else -y  # a branch on the data: no static graph


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message and isinstance(error.value, EffdenseError)
    return message


def test_errors_are_one_line(tmp_path):
    net = build_classifier("efficientnet-lite0", num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(ExportError) as error:
        export(net, "tflite", tmp_path / "a.tflite", x)
    assert "format='tflite' is not one of onnx, torchscript, exported-program" in _one_line(error)
    with pytest.raises(ExportError) as error:
        export(_DataDependent().eval(), "exported-program", tmp_path / "bad.pt2", x)
    assert "cannot export _DataDependent to exported-program" in _one_line(error)
    with pytest.raises(ExportError) as error:
        export(net, "exported-program", tmp_path / "a.onnx", x)
    assert "name the file a.pt2" in _one_line(error)
    with pytest.raises(ExportError) as error:
        export(net, "torchscript", tmp_path / "a.pt", x, include_normalization=True)
    assert "takes uint8 images" in _one_line(error)
    with pytest.raises(ExportError) as error:
        export(net, "torchscript", tmp_path / "a.pt", x, postprocess="inside")
    assert "applies to detection only" in _one_line(error)


def test_soft_nms_exports_only_outside(tmp_path):
    net = build_detector("efficientdet-d0", num_classes=3, nms="soft").eval()
    with pytest.raises(ExportError) as error:
        export(net, "onnx", tmp_path / "d0.onnx", torch.randn(1, 3, 128, 128), postprocess="inside")
    assert "hard NMS only" in _one_line(error)


def test_check_compares_every_output():
    a = (torch.tensor([1.0, 2.0]), torch.tensor([1, 2]))
    assert relative_errors(a, (torch.tensor([1.0, 2.1]), torch.tensor([1, 2])), ["x", "y"]) == pytest.approx(
        {"x": 0.05, "y": 0.0})
    assert relative_errors(a, (a[0], torch.tensor([1, 3])), ["x", "y"])["y"] == float("inf")
