"""Small building blocks: conv + norm + activation, MBConv and FusedMBConv.

Each module is named after its role (``expand``, ``dw``, ``se``, ``project``) so that weight
import maps names by role, and feature taps are read from the built modules.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F
from torchvision.ops import StochasticDepth

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "silu": partial(nn.SiLU, inplace=True),
    "relu6": partial(nn.ReLU6, inplace=True),
}


class Conv2dSame(nn.Conv2d):
    """Conv with TensorFlow "SAME" padding for strided convs (more padding bottom/right).

    The pad is plain integer arithmetic on the input size, so it is a constant under
    ``torch.export``/ONNX with static shapes and a symbolic expression with dynamic ones.
    """

    def __init__(self, *args, **kwargs):
        kwargs["padding"] = 0
        super().__init__(*args, **kwargs)
        # total pad = (k-1)*d + 1 - s + (-size mod s); the constant part is >= 0 for k >= s.
        self._pad_base = [(k - 1) * d + 1 - s for k, d, s in zip(self.kernel_size, self.dilation, self.stride)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.shape[-2:]
        ph = self._pad_base[0] + (-ih) % self.stride[0]
        pw = self._pad_base[1] + (-iw) % self.stride[1]
        if ph > 0 or pw > 0:
            x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return super().forward(x)


def make_conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, dilation: int = 1,
              groups: int = 1, bias: bool = False, padding: str = "symmetric") -> nn.Conv2d:
    """A conv with ``symmetric`` (PyTorch) or ``same`` (TensorFlow) padding.

    Stride-1 convs with odd kernels pad the same both ways, so only strided ones need ``Conv2dSame``.
    """
    if padding not in ("symmetric", "same"):
        raise ValueError(f"padding must be 'symmetric' or 'same', got {padding!r}")
    if padding == "same" and stride > 1:
        return Conv2dSame(in_channels, out_channels, kernel, stride=stride, dilation=dilation,
                          groups=groups, bias=bias)
    return nn.Conv2d(in_channels, out_channels, kernel, stride=stride, padding=(kernel - 1) // 2 * dilation,
                     dilation=dilation, groups=groups, bias=bias)


class ConvNormAct(nn.Sequential):
    """conv -> BatchNorm -> activation (none when ``act`` is None); the conv has no bias."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int = 1, stride: int = 1,
                 dilation: int = 1, groups: int = 1, act: str | None = "silu",
                 norm: Callable[[int], nn.Module] = nn.BatchNorm2d, padding: str = "symmetric"):
        super().__init__()
        self.conv = make_conv(in_channels, out_channels, kernel, stride, dilation, groups, padding=padding)
        self.bn = norm(out_channels)
        if act is not None:
            self.act = ACTIVATIONS[act]()

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels


class SqueezeExcite(nn.Module):
    """Squeeze-excitation: x * sigmoid(fc2(act(fc1(mean(x))))), with 1x1 convs ``fc1``/``fc2``.

    torchvision's ``SqueezeExcitation`` computes the same thing (the weights are named alike, so its
    checkpoints map 1:1), but squeezes with ``adaptive_avg_pool2d`` and multiplies ``scale * input``;
    ``mean`` over H, W and ``input * scale`` run the same arithmetic as timm's ``SqueezeExcite``,
    which measured faster on CPU (tools/bench_backbones.py).
    """

    def __init__(self, channels: int, squeeze: int, act: Callable[[], nn.Module]):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.act = act()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * gate.sigmoid()


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand -> kxk depthwise -> squeeze-excite -> 1x1 project (+ skip).

    With ``expand == 1`` there is no expand conv (the depthwise-separable block of stage 1).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int,
                 se_ratio: float, act: str, norm: Callable[[int], nn.Module], dilation: int = 1,
                 drop_path: float = 0.0, residual: bool = False, padding: str = "symmetric"):
        super().__init__()
        hidden = in_channels * expand
        self.expand = ConvNormAct(in_channels, hidden, 1, act=act, norm=norm) if expand != 1 else None
        self.dw = ConvNormAct(hidden, hidden, kernel, stride, dilation, groups=hidden, act=act, norm=norm,
                              padding=padding)
        self.se = None
        if se_ratio > 0:
            squeeze = max(1, int(in_channels * se_ratio))
            self.se = SqueezeExcite(hidden, squeeze, act=ACTIVATIONS[act])
        self.project = ConvNormAct(hidden, out_channels, 1, act=None, norm=norm)
        self.residual = residual
        self.drop_path = StochasticDepth(drop_path, "row") if residual and drop_path > 0 else None

    @property
    def out_channels(self) -> int:
        return self.project.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.expand(x) if self.expand is not None else x
        out = self.dw(out)
        if self.se is not None:
            out = self.se(out)
        out = self.project(out)
        if self.residual:
            if self.drop_path is not None:
                out = self.drop_path(out)
            out = out + x
        return out


class FusedMBConv(nn.Module):
    """EfficientNetV2's fused block: kxk conv (expand and spatial in one) -> 1x1 project (+ skip).

    With ``expand == 1`` the kxk conv maps straight to ``out_channels`` and keeps its activation.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int,
                 se_ratio: float, act: str, norm: Callable[[int], nn.Module], dilation: int = 1,
                 drop_path: float = 0.0, residual: bool = False, padding: str = "symmetric"):
        super().__init__()
        if se_ratio > 0:
            raise ValueError("FusedMBConv takes no squeeze-excitation (se_ratio must be 0)")
        hidden = in_channels * expand if expand != 1 else out_channels
        self.fused = ConvNormAct(in_channels, hidden, kernel, stride, dilation, act=act, norm=norm,
                                 padding=padding)
        self.project = ConvNormAct(hidden, out_channels, 1, act=None, norm=norm) if expand != 1 else None
        self.residual = residual
        self.drop_path = StochasticDepth(drop_path, "row") if residual and drop_path > 0 else None

    @property
    def out_channels(self) -> int:
        return (self.project if self.project is not None else self.fused).out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fused(x)
        if self.project is not None:
            out = self.project(out)
        if self.residual:
            if self.drop_path is not None:
                out = self.drop_path(out)
            out = out + x
        return out


BLOCKS: dict[str, type[nn.Module]] = {"mbconv": MBConv, "fused": FusedMBConv}
