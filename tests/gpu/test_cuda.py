"""What only a GPU shows: AMP bf16, channels_last, torch.compile. Skipped without CUDA.

Run on a GPU machine: ``.venv/bin/pytest -q -m gpu tests/gpu``.
"""

import pytest
import torch

from tasks.classification import build_classifier

pytestmark = pytest.mark.gpu


def _pair(name="efficientnet-b0", **options):
    torch.manual_seed(0)
    cpu = build_classifier(name, **options).eval()
    gpu = build_classifier(name, **options).eval()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.cuda()


def test_cuda_fp32_matches_cpu():
    cpu, gpu = _pair(padding="same", norm_eps=1e-3)
    x = torch.randn(2, 3, 97, 97)
    torch.backends.cudnn.allow_tf32 = False
    torch.testing.assert_close(gpu(x.cuda()).cpu(), cpu(x), rtol=1e-3, atol=1e-4)


def test_bf16_channels_last_close_to_fp32_and_trains():
    cpu, gpu = _pair()
    gpu = gpu.to(memory_format=torch.channels_last)
    x = torch.randn(8, 3, 224, 224, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        reference = gpu(x).float()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = gpu(x).float()
    assert (low - reference).abs().max() < 0.05 * reference.abs().max()
    gpu.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = gpu(x).logsumexp(dim=1).mean()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in gpu.parameters() if p.grad is not None)


def test_compile_matches_eager():
    _, gpu = _pair()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    compiled = torch.compile(gpu)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), gpu(x), rtol=1e-2, atol=1e-2)


def test_engine_step_bf16_channels_last_compile(tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from tasks.classification import ClassificationTask
    from tasks.config import Config
    from tasks.engine import Trainer

    images = torch.randint(0, 256, (32, 3, 64, 64), dtype=torch.uint8)
    labels = torch.randint(0, 10, (32,))
    loader = DataLoader(TensorDataset(images, labels), batch_size=8, pin_memory=True)
    cfg = Config()
    cfg.model.num_classes, cfg.data.batch_size = 10, 8
    cfg.train.epochs, cfg.train.amp, cfg.train.channels_last, cfg.train.compile = 1, "bf16", True, True
    cfg.train.progress, cfg.train.ema = False, True
    task = ClassificationTask(build_classifier("efficientnet-b0", num_classes=10))
    metrics = Trainer(task, {"train": loader, "val": loader}, cfg, run_dir=tmp_path).fit()
    assert 0.0 <= metrics["top1"] <= 1.0
    assert (tmp_path / "model.safetensors").is_file()
