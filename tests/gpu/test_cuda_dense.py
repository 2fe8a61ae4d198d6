"""Segmentation, detection, fusion and the auto batch size on a GPU. Skipped without CUDA.

Run on a GPU machine: ``.venv/bin/pytest -q -m gpu tests/gpu``.
"""

import pytest
import torch

from backbones.fusion import fuse_for_inference
from tasks.detection import build_detector
from tasks.segmentation import build_segmenter

pytestmark = pytest.mark.gpu


def _relative(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max())


def _on_gpu(build):
    torch.manual_seed(0)
    cpu = build().eval()
    gpu = build().eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def test_unet_cuda_matches_cpu_and_bf16_channels_last_is_close():
    cpu, gpu = _on_gpu(lambda: build_segmenter("efficientnet-b0", num_classes=19))
    x = torch.randn(2, 3, 256, 320)
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        reference = cpu(x)
        assert _relative(gpu(x.cuda()).cpu(), reference) < 1e-3
        gpu = gpu.to(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(x.cuda().contiguous(memory_format=torch.channels_last))
    assert low.shape == reference.shape and _relative(low.cpu(), reference) < 0.05


def test_efficientdet_cuda_maps_match_cpu_and_bf16_trains():
    cpu, gpu = _on_gpu(lambda: build_detector("efficientdet-d0", num_classes=8))
    x = torch.randn(2, 3, 256, 256)
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        ref_cls, ref_box, _ = cpu.forward_raw(x)
        cls, box, _ = gpu.forward_raw(x.cuda())
    assert _relative(cls.cpu(), ref_cls) < 1e-3 and _relative(box.cpu(), ref_box) < 1e-3
    gpu.train().to(memory_format=torch.channels_last)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 120.0, 200.0]], device="cuda"),
                "labels": torch.tensor([3], device="cuda")} for _ in range(2)]
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = gpu(x.cuda().contiguous(memory_format=torch.channels_last), targets)
    sum(losses.values()).backward()
    assert set(losses) >= {"class_loss", "box_loss"} and all(torch.isfinite(v) for v in losses.values())
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_fused_equals_unfused_on_cuda():
    _, gpu = _on_gpu(lambda: build_segmenter("efficientnet-b0", num_classes=5))
    x = torch.randn(1, 3, 128, 160, device="cuda")
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        reference = gpu(x)
        fused = fuse_for_inference(gpu)(x)
    assert _relative(fused, reference) < 1e-4


def test_auto_batch_size_finds_a_batch_that_trains():
    from tasks.budget.measure import find_batch_size
    from tasks.config import load

    cfg = load("configs/demo/segmentation.yaml", ["train.device=cuda", "data.image_size=128", "data.batch_size=2"])
    result = find_batch_size(cfg, max_batch=64)
    assert 1 <= result.batch_size <= 64 and result.probes and all(fit for _, fit, _ in result.probes[:1])
    assert result.lr > 0 and "auto batch size" in result.message
