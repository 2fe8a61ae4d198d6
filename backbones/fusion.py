"""Fold every BatchNorm into the convolution that feeds it, for inference: ``fuse_for_inference(model)``.

In eval mode a BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals one convolution with
rescaled weights and a bias (``torch.nn.utils.fusion.fuse_conv_bn_eval``). Folding removes a kernel
launch and a pass over the activations per BatchNorm, and leaves a graph that exports as plain convs.

Which conv feeds which BatchNorm is not guessed from module names or child order: one forward pass
on a probe input records it (forward hooks on every conv and BatchNorm, and a torch-function mode
that counts every use of each conv output). A BatchNorm is folded only when, on every call, its input
is the output of one and the same convolution and nothing else reads that output. So it works on any
of our models (classifier, U-Net, EfficientDet, the task modules around them) and on foreign ones,
and it cannot fold a pair whose conv output is also used elsewhere. Two shapes are folded:

* one conv -> one BatchNorm (``ConvNormAct``, the decoder's conv units, the BiFPN's nodes and
  adapters): the conv becomes the fused conv (same class, so ``Conv2dSame`` keeps its input-size
  dependent TF padding; depthwise and grouped convs fold the same way), the BatchNorm ``nn.Identity``.
* one conv shared by several BatchNorms, one per call (EfficientDet's class/box nets: a separable
  conv shared by all pyramid levels with a BatchNorm per level): each BatchNorm becomes its own fused
  copy of the conv and the shared conv becomes ``nn.Identity`` -- ``norm(conv(x))`` then runs the
  level's fused conv. The head's convs are stored once per level afterwards (a few more parameters).

Anything else -- a BatchNorm after an addition, one the probe did not run (an unused head), a conv
whose output is also read by another op -- is left as it is and named in the log
(``strict=True`` makes it an error). State dict keys change (``bn.*`` gone, ``conv.bias`` new): save
the unfused model, fuse after loading.
"""

from __future__ import annotations

import copy
import logging
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .errors import EffdenseError

log = logging.getLogger("effdense")

__all__ = ["FusionError", "FusionReport", "fuse_for_inference", "probe_input"]

PROBE_SIZE = 128  # default probe: 1 x C x 128 x 128 (EfficientDet's P7 is then 1 x 1)


class FusionError(EffdenseError):
    """A model that cannot be fused as asked (in training mode, or BatchNorms left with ``strict``)."""


@dataclass
class FusionReport:
    """What ``fuse_for_inference`` did: BatchNorms folded, convs copied per BatchNorm, BatchNorms left."""

    folded: list[str] = field(default_factory=list)  # BatchNorm names folded into their conv
    shared: list[str] = field(default_factory=list)  # convs shared by several BatchNorms, copied into each
    left: dict[str, str] = field(default_factory=dict)  # BatchNorm name -> why it was left

    def summary(self) -> str:
        text = f"folded {len(self.folded)} BatchNorms into their convs"
        if self.shared:
            text += f" ({len(self.shared)} shared convs copied per BatchNorm)"
        if self.left:
            text += f"; left {len(self.left)}: " + ", ".join(f"{k} ({v})" for k, v in list(self.left.items())[:3])
            text += f", ... ({len(self.left)} in all)" if len(self.left) > 3 else ""
        return text


def probe_input(model: nn.Module, size: int = PROBE_SIZE) -> torch.Tensor:
    """A random (1, in_channels, size, size) float batch on the model's device; ``in_channels`` is the
    first convolution's. Values are on the 0..255 scale: task modules (uint8 in) and networks (float
    in) both run on it, and fusion only needs the data flow."""
    first = next((m for m in model.modules() if isinstance(m, _ConvNd)), None)
    if first is None:
        raise FusionError(f"{type(model).__name__} has no convolution: nothing to fuse and no input size to probe with")
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    generator = torch.Generator().manual_seed(0)
    probe = torch.rand(1, first.in_channels, size, size, generator=generator) * 255
    return probe.to(param.device, dtype)


class _UseCounter(TorchFunctionMode):
    """Counts, for each watched tensor (the conv outputs), the torch calls that read its data."""

    def __init__(self):
        super().__init__()
        self.watched: dict[int, torch.Tensor] = {}  # id -> tensor (kept alive, so ids stay unique)
        self.uses: dict[int, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        if self.watched and any(isinstance(leaf, torch.Tensor) for leaf in tree_leaves(result)):
            # A call that returns tensors uses its tensor arguments; .shape, .dim() and the like do not.
            for leaf in tree_leaves((args, kwargs)):
                if isinstance(leaf, torch.Tensor) and id(leaf) in self.watched:
                    self.uses[id(leaf)] += 1
        return result


def _trace_pairs(model: nn.Module, example_input) -> tuple[dict, dict, set, set]:
    """One probe forward -> (conv name -> BN names it fed, BN name -> conv names that fed it,
    convs with a call whose output was not read by exactly one BN, BNs with a call not fed that way)."""
    names: dict[int, str] = {}
    for name, module in model.named_modules():
        names.setdefault(id(module), name)
    counter = _UseCounter()
    conv_calls: list[tuple[str, int]] = []  # (conv name, output id) per call
    bn_calls: list[tuple[str, int]] = []  # (bn name, input id) per call
    producer: dict[int, str] = {}

    def on_conv(module, args, output):
        if isinstance(output, torch.Tensor):
            counter.watched[id(output)] = output
            producer[id(output)] = names[id(module)]
            conv_calls.append((names[id(module)], id(output)))

    def on_bn(module, args):
        bn_calls.append((names[id(module)], id(args[0]) if args and isinstance(args[0], torch.Tensor) else -1))

    handles = []
    for module in model.modules():
        if isinstance(module, _ConvNd):
            handles.append(module.register_forward_hook(on_conv))
        elif isinstance(module, _BatchNorm):
            handles.append(module.register_forward_pre_hook(on_bn))
    try:
        with torch.no_grad(), counter:
            model(*example_input) if isinstance(example_input, tuple) else model(example_input)
    finally:
        for handle in handles:
            handle.remove()
    consumers, producers = defaultdict(set), defaultdict(set)
    fed_outputs, blocked_bns = set(), set()
    for bn_name, input_id in bn_calls:
        if input_id in producer and counter.uses[input_id] == 1:
            consumers[producer[input_id]].add(bn_name)
            producers[bn_name].add(producer[input_id])
            fed_outputs.add(input_id)
        else:
            blocked_bns.add(bn_name)
    blocked_convs = {conv for conv, output_id in conv_calls if conv in consumers and output_id not in fed_outputs}
    return consumers, producers, blocked_convs, blocked_bns


def _set(model: nn.Module, target: nn.Module, replacement: nn.Module) -> None:
    """Put ``replacement`` wherever ``target`` is registered in ``model`` (shared modules: every place)."""
    places = [name for name, module in model.named_modules(remove_duplicate=False) if module is target]
    for name in places:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def fuse_for_inference(model: nn.Module, example_input=None, *, inplace: bool = False, strict: bool = False,
                       report: FusionReport | None = None) -> nn.Module:
    """``model`` (in eval mode) with every BatchNorm folded into the conv before it; see the module doc.

    ``example_input``: what ``model`` is called with for the one probe forward (a tensor or a tuple of
    arguments; default :func:`probe_input`, 1 x C x 128 x 128); only its data flow matters, any size
    the model accepts will do. Returns a fused copy in eval mode (``inplace=True``: ``model`` itself).
    Outputs equal the unfused model's up to float rounding (~1e-6 relative in float32).
    ``strict``: raise :class:`FusionError` when a BatchNorm is left unfolded. ``report``: filled with
    what was folded and what was left. A model in training mode is an error: its BatchNorms normalise
    with batch statistics, which cannot be folded.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training]
    if training:
        raise FusionError(f"fuse_for_inference: {type(model).__name__} is in training mode ({training[0]}); "
                          f"BatchNorm folds only with running statistics: call model.eval() first")
    report = report if report is not None else FusionReport()
    fused = model if inplace else copy.deepcopy(model)
    if example_input is None:
        example_input = probe_input(fused)
    consumers, producers, blocked_convs, blocked_bns = _trace_pairs(fused, example_input)
    modules = dict(fused.named_modules())
    for conv_name, bn_names in sorted(consumers.items()):
        bns = sorted(bn_names)
        if conv_name in blocked_convs:
            for bn in bns:
                report.left[bn] = f"{conv_name}'s output is also read elsewhere"
            continue
        if any(producers[bn] != {conv_name} or bn in blocked_bns for bn in bns):
            for bn in bns:
                report.left[bn] = "fed by more than one conv or by another op"
            continue
        conv = modules[conv_name]
        if len(bns) == 1:
            _set(fused, conv, fuse_conv_bn_eval(conv, modules[bns[0]]))
            _set(fused, modules[bns[0]], nn.Identity())
        else:  # one conv per BatchNorm: each BatchNorm's place runs its own fused copy
            for bn in bns:
                _set(fused, modules[bn], fuse_conv_bn_eval(conv, modules[bn]))
            _set(fused, conv, nn.Identity())
            report.shared.append(conv_name)
        report.folded += bns
    for name, module in modules.items():
        if isinstance(module, _BatchNorm) and name not in report.folded and name not in report.left:
            report.left[name] = "fed by another op" if name in blocked_bns else "not run by the probe input"
    fused.eval()
    if report.left:
        message = f"fuse_for_inference({type(model).__name__}): {report.summary()}"
        if strict:
            raise FusionError(message)
        log.info(message)
    return fused
