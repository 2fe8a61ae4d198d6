"""Export a trained network for deployment: ONNX, TorchScript or a ``torch.export`` program (.pt2).

``export(model, format, out_path, example_input)`` takes a task module (its ``.net`` is exported) or a
network (``Classifier``, ``Segmenter``, ``EfficientDetector``) and writes one file; the network is put
in eval mode, and what the task module adds in Python (segmentation TTA and sliding windows, the
evaluators) stays outside the graph. Export on the CPU: ``example_input`` lives on the model's device. Before export the
network is fused (:func:`backbones.fusion.fuse_for_inference`: BatchNorms folded into the convs) and
TF "SAME" padding is frozen to constants at the example's size (:func:`freeze_same_padding`), so the
graph has no shape arithmetic. The input's height and width are fixed to the example's; the batch is
fixed too unless ``dynamic_batch=True``.

Inputs. By default the graph takes what the network takes: ``images`` float32 (N, 3, H, W), already
normalised ((x / 255 - mean) / std). ``include_normalization=True`` puts the normalisation in the graph:
``images`` is then uint8 (N, 3, H, W) RGB 0..255, normalised with the task module's mean/std (or
``mean``/``std`` for a bare network) -- what a deployment usually wants.

Outputs, per task:

* classification: ``logits`` (N, classes).
* segmentation: ``logits`` (N, classes, H, W) (+ ``aux_logits`` (N, aux classes) with the aux head).
* detection, ``postprocess="outside"`` (default): ``class_logits`` (N, A, classes), ``box_codes``
  (N, A, 4) (ty, tx, th, tw) and ``anchors`` (N, A, 4) xyxy input pixels (the same for every image),
  A = all anchors of all levels, P3 first. Post-process outside the graph with
  ``tasks.detection.postprocess.postprocess(class_logits, box_codes, anchors[0], (H, W), PostProcess(...))``
  (the same top-k, decoding and NMS as training-time evaluation, hard or soft NMS).
* detection, ``postprocess="inside"``: top-k candidates, box decoding and hard NMS
  (``torchvision.ops.nms``, exported as ONNX ``NonMaxSuppression``) run in the graph with the
  network's ``PostProcess`` settings; outputs are padded per image (the layout of TensorRT's
  EfficientNMS plugin): ``boxes`` (N, D, 4) xyxy input pixels, ``scores`` (N, D), ``labels`` (N, D)
  int64 (-1 in empty slots), ``num_detections`` (N,) int64, D = ``max_detections``. Soft-NMS exports
  only outside the graph.

``check=True`` runs the written file (onnxruntime for ONNX, ``torch.jit.load`` / ``torch.export.load``
otherwise) on the example input (and at batch 2 with ``dynamic_batch``) and compares every output
with the unfused PyTorch network's: relative error (max |a - b| / max |a|) at most ``tolerance``
(1e-4), detection labels and counts exactly. ONNX needs the ``export`` extra (onnx, onnxruntime,
onnxscript). Every failure is one :class:`ExportError` line naming the file, the format and why.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from backbones.blocks import Conv2dSame
from backbones.errors import EffdenseError
from backbones.fusion import fuse_for_inference

from tasks.config.schema import IMAGENET_MEAN, IMAGENET_STD
from tasks.engine.normalize import PixelNormalization

log = logging.getLogger("effdense")

__all__ = ["FORMATS", "POSTPROCESS", "ExportError", "ExportResult", "export", "prepare", "freeze_same_padding",
           "Normalized", "DetectionMaps", "DetectionWithNMS"]

FORMATS = ("onnx", "torchscript", "exported-program")
POSTPROCESS = ("outside", "inside")
TOLERANCE = 1e-4
ONNX_OPSET = 18


class ExportError(EffdenseError):
    """A model that cannot be exported as asked; one line naming the file, the format and why."""


@dataclass
class ExportResult:
    """What was written: the file, its format, the graph's input/output names and the check's errors."""

    path: Path
    format: str
    input_names: list[str]
    output_names: list[str]
    errors: dict[str, float] = field(default_factory=dict)  # output name -> relative error (check=True)

    def summary(self) -> str:
        checked = ", ".join(f"{k} {v:.1e}" for k, v in self.errors.items())
        return (f"wrote {self.path} ({self.format}): {', '.join(self.input_names)} -> {', '.join(self.output_names)}"
                + (f"; max relative error vs PyTorch: {checked}" if checked else ""))


# ------------------------------------------------------------------------------------------ wrappers


class Normalized(PixelNormalization):
    """uint8 (N, 3, H, W) 0..255 -> ``net((x - 255 mean) / (255 std))``: normalisation in the graph."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__(mean, std, persistent=True)
        self.net = net

    def forward(self, images: torch.Tensor):
        return self.net(self.normalize(images))


class DetectionMaps(nn.Module):
    """An ``EfficientDetector`` without post-processing: (class_logits (N, A, C), box_codes (N, A, 4),
    anchors (N, A, 4)); the anchors are the same for every image, repeated so that each output is per
    image (and a traced graph computes every output from the input)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor):
        class_out, box_out, anchors = self.net.forward_raw(x)
        return class_out, box_out, anchors.unsqueeze(0).expand(x.shape[0], -1, -1)


class DetectionWithNMS(nn.Module):
    """An ``EfficientDetector`` with top-k, decoding and hard NMS in the graph; padded per-image outputs
    (boxes (N, D, 4), scores (N, D), labels (N, D), num_detections (N,)), equal to the detector's own
    eval-mode post-processing. NMS runs once over the batch: each (image, class) pair gets its own
    coordinate offset, which keeps pairs apart exactly as ``batched_nms`` per image does."""

    def __init__(self, net: nn.Module):
        super().__init__()
        if net.post.nms != "hard":
            raise ExportError(f"postprocess='inside' exports hard NMS only, this detector uses nms={net.post.nms!r}: "
                              f"export with postprocess='outside' and run tasks.detection.postprocess.postprocess")
        self.net, self.settings = net, net.post

    def forward(self, x: torch.Tensor):
        from torchvision.ops import nms

        from tasks.detection.postprocess import select_candidates

        s = self.settings
        class_out, box_out, anchors = self.net.forward_raw(x)
        boxes, scores, classes = select_candidates(class_out, box_out, anchors, (x.shape[-2], x.shape[-1]),
                                                   s.max_candidates)
        batch, k = scores.shape
        image = torch.arange(batch, device=x.device).unsqueeze(1).expand(batch, k).reshape(-1)
        boxes, scores, classes = boxes.reshape(-1, 4), scores.reshape(-1), classes.reshape(-1)
        group = (image * self.net.num_classes + classes).to(boxes.dtype)
        keep = nms(boxes + (group * (boxes.max() + 1)).unsqueeze(1), scores, s.iou_threshold)  # best first
        kept_image = image[keep]
        same = kept_image.unsqueeze(1) == torch.arange(batch, device=x.device).unsqueeze(0)  # (M, N)
        rank = (same.long().cumsum(0) * same.long()).sum(1) - 1  # place among the image's kept boxes
        valid = (rank < s.max_detections) & (scores[keep] > s.score_threshold)
        slots = batch * s.max_detections
        slot = torch.where(valid, kept_image * s.max_detections + rank, torch.full_like(rank, slots))
        out_boxes = boxes.new_zeros(slots + 1, 4).index_put((slot,), boxes[keep])
        out_scores = scores.new_zeros(slots + 1).index_put((slot,), scores[keep])
        out_labels = torch.full((slots + 1,), -1, dtype=torch.long, device=x.device).index_put((slot,), classes[keep])
        count = (same & valid.unsqueeze(1)).long().sum(0)
        shape = (batch, s.max_detections)
        return (out_boxes[:slots].reshape(*shape, 4), out_scores[:slots].reshape(shape),
                out_labels[:slots].reshape(shape), count)


class _StaticPadConv2d(nn.Conv2d):
    """A ``Conv2dSame`` whose padding was computed once for a known input size (keys unchanged)."""

    def __init__(self, conv: nn.Conv2d, pad: tuple[int, int, int, int]):
        super().__init__(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, 0, conv.dilation,
                         conv.groups, conv.bias is not None, device=conv.weight.device, dtype=conv.weight.dtype)
        self.load_state_dict(conv.state_dict())
        self.pad = pad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad) if any(self.pad) else x)


def freeze_same_padding(model: nn.Module, example_input: torch.Tensor) -> int:
    """Replace, in place, each ``Conv2dSame`` with a conv padded by constants for the input size it gets
    from ``example_input``; returns how many. One called at several sizes keeps its dynamic padding."""
    sizes: dict[nn.Module, set] = {}

    def record(module, args):
        sizes.setdefault(module, set()).add(tuple(args[0].shape[-2:]))

    handles = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, Conv2dSame)]
    try:
        with torch.no_grad():
            model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    frozen = 0
    for name, module in list(model.named_modules()):
        if module not in sizes or len(sizes[module]) != 1:
            continue
        (ih, iw), = sizes[module]
        ph = module._pad_base[0] + (-ih) % module.stride[0]
        pw = module._pad_base[1] + (-iw) % module.stride[1]
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2) if ph > 0 or pw > 0 else (0, 0, 0, 0)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _StaticPadConv2d(module, pad))
        frozen += 1
    return frozen


# ------------------------------------------------------------------------------------------ preparing


def _unwrap(model: nn.Module, mean, std):
    """(network, mean, std): a task module gives its ``.net`` and normalisation."""
    net = getattr(model, "net", None)
    if isinstance(net, nn.Module) and hasattr(model, "pixel_mean"):
        mean = (model.pixel_mean.flatten() / 255).tolist()
        std = (1.0 / (model.pixel_scale.flatten() * 255)).tolist()
        return net, mean, std
    return model, mean or IMAGENET_MEAN, std or IMAGENET_STD


def _wrap(net: nn.Module, postprocess: str) -> tuple[nn.Module, list[str]]:
    """The module to export around ``net`` and its output names."""
    if hasattr(net, "forward_raw") and hasattr(net, "post"):  # an EfficientDetector
        if postprocess == "inside":
            return DetectionWithNMS(net), ["boxes", "scores", "labels", "num_detections"]
        return DetectionMaps(net), ["class_logits", "box_codes", "anchors"]
    if postprocess != "outside":
        raise ExportError(f"postprocess={postprocess!r} applies to detection only; {type(net).__name__} has no "
                          f"post-processing")
    if getattr(net, "aux_head", None) is not None:
        return net, ["logits", "aux_logits"]
    return net, ["logits"]


def prepare(model: nn.Module, example_input: torch.Tensor, *, include_normalization: bool = False,
            postprocess: str = "outside", fuse: bool = True, mean=None, std=None):
    """(module to export, reference module, output names): the fused, padding-frozen network wrapped
    for its task, and the same wrapping around the untouched network (what ``check`` compares with).
    ``example_input`` is what the graph takes (uint8 with ``include_normalization``)."""
    if postprocess not in POSTPROCESS:
        raise ExportError(f"postprocess={postprocess!r} is not one of {', '.join(POSTPROCESS)}")
    if include_normalization and getattr(model, "percentiles", None) is not None:
        raise ExportError(f"{_model_name(model)} scales each image between its own percentiles "
                          f"(data.normalize=percentile), which the graph cannot hold; export with --float-input and "
                          f"scale the images before the graph, or train with data.input_range")
    net, mean, std = _unwrap(model, mean, std)
    net.eval()
    reference, names = _wrap(net, postprocess)
    if include_normalization:
        reference = Normalized(reference, mean, std)
    # The network itself sees float normalised input; probe fusion and padding with that.
    probe = Normalized(nn.Identity(), mean, std)(example_input) if include_normalization else example_input
    deploy_net = fuse_for_inference(net, probe) if fuse else copy.deepcopy(net)
    freeze_same_padding(deploy_net, probe)
    deploy, _ = _wrap(deploy_net, postprocess)
    if include_normalization:
        deploy = Normalized(deploy, mean, std)
    return deploy.eval(), reference.eval(), names


# ------------------------------------------------------------------------------------------ export


def export(model: nn.Module, format: str, out_path, example_input: torch.Tensor, dynamic_batch: bool = False,
           postprocess: str = "outside", *, include_normalization: bool = False, fuse: bool = True,
           check: bool = True, tolerance: float = TOLERANCE, mean=None, std=None,
           opset: int = ONNX_OPSET) -> ExportResult:
    """Write ``model`` (a task module or its network) as ``format`` to ``out_path``; see the module doc.

    ``example_input``: one batch of what the graph takes, (N, 3, H, W): float normalised, or uint8 with
    ``include_normalization``; H and W are fixed in the graph. ``dynamic_batch``: any batch size.
    ``postprocess``: ``"outside"`` or ``"inside"`` (detection only). ``fuse``: fold BatchNorms first.
    ``mean``/``std``: for ``include_normalization`` with a bare network (a task module has its own).
    Returns an :class:`ExportResult`; raises :class:`ExportError` (one line) when it cannot export.
    """
    if format not in FORMATS:
        raise ExportError(f"format={format!r} is not one of {', '.join(FORMATS)}")
    path = Path(out_path)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        raise ExportError(f"{path}: example_input must be one (N, C, H, W) tensor, got "
                          f"{getattr(example_input, 'shape', type(example_input).__name__)}")
    if include_normalization and example_input.dtype != torch.uint8:
        raise ExportError(f"{path}: include_normalization=True takes uint8 images (0..255); example_input is "
                          f"{example_input.dtype}")
    if format == "exported-program" and path.suffix != ".pt2":
        raise ExportError(f"{path}: an exported program is saved as a .pt2 archive; name the file {path.stem}.pt2")
    if format == "onnx":
        _require_onnx(path)
    deploy, reference, output_names = prepare(model, example_input, include_normalization=include_normalization,
                                              postprocess=postprocess, fuse=fuse, mean=mean, std=std)
    path.parent.mkdir(parents=True, exist_ok=True)
    what = f"{path}: cannot export {_model_name(model)} to {format}"
    # torch.export specialises a size-1 dimension to a constant: trace a dynamic batch at batch 2.
    traced_input = _batch_of_two(example_input) if dynamic_batch and example_input.shape[0] == 1 else example_input
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _WRITERS[format](deploy, traced_input, path, output_names, dynamic_batch, opset)
    except ExportError:
        raise
    except Exception as error:  # noqa: BLE001 -- any exporter failure becomes one line
        raise ExportError(f"{what}: {_first_line(error)}") from error
    result = ExportResult(path, format, ["images"], output_names)
    if check:
        result.errors = _check(result, reference, example_input, dynamic_batch, tolerance)
    return result


def _batch_of_two(images: torch.Tensor) -> torch.Tensor:
    return torch.cat([images[:1], images[:1].flip(-1)])


def _model_name(model: nn.Module) -> str:
    net = getattr(model, "net", model)
    return getattr(net, "name", None) or type(net).__name__


def _first_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


def _require_onnx(path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as error:
        raise ExportError(f"{path}: format=onnx needs the export extra ({error.name} is missing): "
                          f"pip install 'effdense[export]'") from None


def _dynamic_shapes(dynamic_batch: bool):
    return ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None


def _write_onnx(module, example, path, output_names, dynamic_batch, opset):
    large = sum(p.numel() * p.element_size() for p in module.parameters()) > 1.5 * 2**30  # protobuf's 2 GB
    program = torch.onnx.export(module, (example,), str(path), input_names=["images"], output_names=output_names,
                                opset_version=opset, dynamo=True, external_data=large,
                                dynamic_shapes=_dynamic_shapes(dynamic_batch), verbose=False)
    if program is None:
        raise ExportError(f"{path}: torch.onnx.export returned no program")


def _write_torchscript(module, example, path, output_names, dynamic_batch, opset):
    with torch.no_grad():
        traced = torch.jit.trace(module, (example,), check_trace=False)
    torch.jit.save(traced, str(path))


def _write_exported_program(module, example, path, output_names, dynamic_batch, opset):
    program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))
    torch.export.save(program, str(path))


_WRITERS = {"onnx": _write_onnx, "torchscript": _write_torchscript, "exported-program": _write_exported_program}


def load_runner(result: ExportResult):
    """A callable ``images -> tuple of tensors`` running the written file (onnxruntime for ONNX)."""
    if result.format == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])

        def run_onnx(images):
            outputs = session.run(None, {"images": images.cpu().numpy()})
            return tuple(torch.from_numpy(o) for o in outputs)
        return run_onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load's deprecation notice
        module = (torch.jit.load(str(result.path)) if result.format == "torchscript"
                  else torch.export.load(str(result.path)).module())

    def run_torch(images):
        with torch.no_grad():
            out = module(images)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)
    return run_torch


def relative_errors(reference, outputs, names) -> dict[str, float]:
    """Per output: max |a - b| / max |a| (floats), 0 or inf for integer outputs (exact or not)."""
    errors = {}
    for name, a, b in zip(names, reference, outputs):
        a, b = a.detach().cpu(), b.detach().cpu()
        if a.shape != b.shape:
            errors[name] = math.inf
        elif not a.dtype.is_floating_point:
            errors[name] = 0.0 if torch.equal(a, b.to(a.dtype)) else math.inf
        else:
            scale = a.abs().max().item() if a.numel() else 0.0
            errors[name] = (a - b.to(a.dtype)).abs().max().item() / scale if scale > 0 else 0.0
    return errors


def _untied(scores: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(N, D) mask of slots whose score differs from both neighbours' by more than ``tolerance`` relative:
    among tied scores any order is right, so boxes and labels are compared only where the order is fixed."""
    gap = tolerance * max(scores.abs().max().item(), 1e-12)
    step = (scores[:, 1:] - scores[:, :-1]).abs() > gap
    edge = torch.ones_like(scores[:, :1], dtype=torch.bool)
    return torch.cat([edge, step], 1) & torch.cat([step, edge], 1)


def detection_errors(reference, outputs, tolerance: float = TOLERANCE) -> dict[str, float]:
    """``relative_errors`` for the padded detections of ``postprocess="inside"``: counts exactly, scores
    slot by slot, boxes and labels in the slots whose score is not tied with a neighbour's."""
    names = ["boxes", "scores", "labels", "num_detections"]
    errors = relative_errors(reference, outputs, names)
    if errors["num_detections"] == 0.0 and errors["scores"] <= tolerance:
        keep = _untied(reference[1].detach().cpu(), tolerance)
        picked = [(r.detach().cpu()[keep], o.detach().cpu()[keep]) for r, o in zip(reference[:3:2], outputs[:3:2])]
        errors.update(relative_errors([p[0] for p in picked], [p[1] for p in picked], ["boxes", "labels"]))
    return errors


def _check(result: ExportResult, reference: nn.Module, example: torch.Tensor, dynamic_batch: bool,
           tolerance: float) -> dict[str, float]:
    """Run the file and the unfused reference on the example (and at batch 2 when dynamic); compare."""
    try:
        run = load_runner(result)
    except ImportError as error:
        raise ExportError(f"{result.path}: checking needs {error.name}: pip install 'effdense[export]' "
                          f"(or check=False)") from None
    inputs = [example]
    if dynamic_batch:
        inputs.append(_batch_of_two(example[:1]) if example.shape[0] == 1 else example[:1])
    worst: dict[str, float] = {}
    for images in inputs:
        with torch.no_grad():
            expected = reference(images.to(next(reference.parameters()).device))
        expected = tuple(expected) if isinstance(expected, (tuple, list)) else (expected,)
        outputs = run(images)
        if result.output_names[-1] == "num_detections":
            errors = detection_errors(expected, outputs, tolerance)
        else:
            errors = relative_errors(expected, outputs, result.output_names)
        worst = {k: max(v, worst.get(k, 0.0)) for k, v in errors.items()}
    bad = {k: v for k, v in worst.items() if v > tolerance}
    if bad:
        shown = ", ".join(f"{k} {v:.2g}" for k, v in bad.items())
        raise ExportError(f"{result.path}: the exported {result.format} model differs from PyTorch: {shown} "
                          f"(relative error; expected <= {tolerance:g})")
    return worst
