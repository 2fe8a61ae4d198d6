"""The README's first Python block runs as written. The weight files it names are written first, here,
from peers' models with random weights (torchvision, timm, smp, effdet), and torchvision's ImageNet files
that ``weights="imagenet"`` asks for are placed in a private torch hub cache: nothing is downloaded."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def first_python_block() -> str:
    return re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)


def write_named_files(folder: Path, hub: Path) -> None:
    import effdet
    import segmentation_models_pytorch as smp
    import timm
    import torchvision

    from backbones.weights import imagenet_url

    torch.manual_seed(0)
    b0 = torchvision.models.efficientnet_b0().state_dict()
    torch.save(b0, folder / "efficientnet_b0_rwightman-7f5810bc.pth")
    (hub / "checkpoints").mkdir(parents=True)
    for arch, state in (("efficientnet-b0", b0), ("efficientnet-b3", torchvision.models.efficientnet_b3().state_dict())):
        torch.save(state, hub / "checkpoints" / Path(imagenet_url(arch)).name)
    torch.save(timm.create_model("tf_efficientnet_b0", pretrained=False).state_dict(), folder / "tf_efficientnet_b0.pth")
    torch.save(smp.Unet("efficientnet-b3", encoder_weights=None, classes=19).state_dict(), folder / "smp_unet_b3.pth")
    config = effdet.get_efficientdet_config("tf_efficientdet_d3")
    torch.save(effdet.EfficientDet(config, pretrained_backbone=False).state_dict(), folder / "tf_efficientdet_d3_b0d2.pth")


@pytest.mark.usefixtures("one_thread")
def test_the_readme_python_block_runs(tmp_path, monkeypatch, capsys):
    hub = tmp_path / "hub"
    write_named_files(tmp_path, hub)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.setattr(torch.hub, "download_url_to_file",
                        lambda *a, **k: pytest.fail(f"the README block tried to download {a[0]}"))
    namespace: dict = {}
    exec(compile(first_python_block(), "README.md", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "FeatureSpec(name='s2', channels=24, stride=2)" in printed  # the comment beside it says so
    assert "380" in printed  # get_preset("efficientnet-b4").resolution, as the README says
    assert namespace["unet"](torch.randn(1, 3, 64, 64)).shape == (1, 19, 64, 64)
    assert namespace["det"].num_classes == 80 and namespace["tf_d3"].num_classes == 90
