"""BatchNorm folding: the fused model's outputs against the unfused model's (the independent reference),
every BatchNorm gone (module and parameter counts), and the cases that must be left alone."""

import pytest
import torch
from torch import nn

from backbones.blocks import Conv2dSame, ConvNormAct
from backbones.fusion import FusionError, FusionReport, fuse_for_inference
from tasks.classification import ClassificationTask, build_classifier
from tasks.detection import build_detector
from tasks.segmentation import build_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")


def _perturb_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial running statistics and affine terms (fresh ones are the identity map, too easy to fold)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(c, generator=generator) * 1.5 + 0.5)
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.2)
    return model.eval()


def _relative_error(reference: torch.Tensor, value: torch.Tensor) -> float:
    """max |a - b| / max |a|: relative to the output's scale (element-wise rtol is meaningless near 0)."""
    return ((reference - value).abs().max() / reference.abs().max()).item()


def _batchnorms(model: nn.Module) -> list[nn.BatchNorm2d]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


CLASSIFIERS = [
    ("efficientnet-b0", {}, (2, 3, 64, 64)),
    ("efficientnet-lite0", {}, (2, 3, 64, 64)),
    ("efficientnet-b0", {"padding": "same"}, (2, 3, 65, 63)),  # odd sizes: Conv2dSame pads asymmetrically
]


@pytest.mark.parametrize("name,options,shape", CLASSIFIERS, ids=["b0", "lite0", "b0-same"])
def test_classifier_logits_equal_and_every_batchnorm_gone(name, options, shape):
    torch.manual_seed(0)
    model = _perturb_batchnorms(build_classifier(name, num_classes=10, **options))
    bn_channels = sum(bn.num_features for bn in _batchnorms(model))
    report = FusionReport()
    x = torch.randn(*shape)
    fused = fuse_for_inference(model, x, report=report)  # the probe: any input the model takes
    with torch.no_grad():
        assert _relative_error(model(x), fused(x)) < 1e-5
    assert not _batchnorms(fused) and not report.left and not fused.training
    # Each BatchNorm (2C parameters) becomes the bias (C) of a conv that had none.
    assert _params(fused) == _params(model) - bn_channels
    assert _batchnorms(model), "the input model is left as it was (inplace=False)"
    if options.get("padding") == "same":  # the fused stem is still a Conv2dSame: padding follows the input
        assert isinstance(fused.backbone.stem.conv, Conv2dSame)
        x = torch.randn(1, 3, 33, 47)
        with torch.no_grad():
            assert _relative_error(model(x), fused(x)) < 1e-5


def test_unet_logits_equal():
    torch.manual_seed(0)
    model = _perturb_batchnorms(build_segmenter("efficientnet-b0", num_classes=5))
    bn_channels = sum(bn.num_features for bn in _batchnorms(model))
    x = torch.randn(1, 3, 64, 96)
    fused = fuse_for_inference(model, x)
    with torch.no_grad():
        assert _relative_error(model(x), fused(x)) < 1e-5
    assert not _batchnorms(fused)
    assert _params(fused) == _params(model) - bn_channels


def test_efficientdet_maps_equal_shared_head_convs_copied_per_level():
    torch.manual_seed(0)
    model = _perturb_batchnorms(build_detector("efficientdet-d0", num_classes=6))
    bn_channels = sum(bn.num_features for bn in _batchnorms(model))
    report = FusionReport()
    x = torch.randn(1, 3, 128, 128)
    fused = fuse_for_inference(model, x, report=report)
    with torch.no_grad():
        reference, value = model.forward_raw(x), fused.forward_raw(x)
    for a, b in zip(reference[:2], value[:2]):  # class logits, box codes
        assert _relative_error(a, b) < 1e-5
    assert not _batchnorms(fused) and not report.left
    # The class/box nets' shared pointwise convs now exist once per level (copies of the same weights).
    shared = [conv.pw for net in (model.class_net, model.box_net) for conv in net.convs]
    assert len(report.shared) == len(shared)
    extra = sum(conv.weight.numel() for conv in shared) * (len(model.levels) - 1)
    assert _params(fused) == _params(model) - bn_channels + extra


def test_task_module_with_uint8_input():
    torch.manual_seed(0)
    task = ClassificationTask(_perturb_batchnorms(build_classifier("efficientnet-lite0", num_classes=3))).eval()
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    fused = fuse_for_inference(task, images)
    with torch.no_grad():
        assert _relative_error(task(images), fused(images)) < 1e-5
    assert not _batchnorms(fused)


def test_training_model_is_an_error():
    model = build_classifier("efficientnet-lite0", num_classes=3)
    with pytest.raises(FusionError, match="training mode.*model.eval"):
        fuse_for_inference(model)


class _Mixed(nn.Module):
    """conv -> relu (no BN); a BN after an addition; a conv whose output the BN and a residual both read."""

    def __init__(self):
        super().__init__()
        self.plain = nn.Conv2d(3, 8, 3, padding=1)
        self.after_add = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.block = ConvNormAct(8, 8, 3, groups=8)  # depthwise, foldable

    def forward(self, x):
        x = torch.relu(self.plain(x))
        x = self.after_add(x + 1.0)
        y = self.conv(x)
        return self.block(self.bn(y) + y)


def test_leaves_what_cannot_be_folded():
    torch.manual_seed(0)
    model = _perturb_batchnorms(_Mixed())
    report = FusionReport()
    fused = fuse_for_inference(model, torch.randn(1, 3, 16, 16), report=report)
    assert report.folded == ["block.bn"]
    assert set(report.left) == {"after_add", "bn"}
    assert isinstance(fused.after_add, nn.BatchNorm2d) and isinstance(fused.bn, nn.BatchNorm2d)
    assert isinstance(fused.block.bn, nn.Identity) and fused.block.conv.groups == 8
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert _relative_error(model(x), fused(x)) < 1e-5
    with pytest.raises(FusionError, match="left 2"):
        fuse_for_inference(model, torch.randn(1, 3, 16, 16), strict=True)


def test_model_without_batchnorm_is_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    fused = fuse_for_inference(model)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(x), fused(x), rtol=0, atol=0)
