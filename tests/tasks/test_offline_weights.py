"""Whole-model weights replace everything: ``effdense eval|predict|export`` with a shipped preset whose
``model.backbone_weights`` is ``imagenet`` never fetch the ImageNet file (the network is off here)."""

from __future__ import annotations

import json
import socket

import pytest

from tasks import registry
from tasks.cli import main
from tasks.config import load
from tasks.data import FORMATS
from tasks.engine.checkpoint import meta_to_strings, save_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = {  # preset -> (synthetic writer options, overrides that keep it small on a CPU)
    "segmentation/unet_efficientnet_folder": ({"train": 2, "val": 2}, ["model.num_classes=6", "data.image_size=64",
                                                                       "data.eval.mode=resize"]),
    "detection/efficientdet_d0_coco": ({"train_images": 2, "val_images": 2, "min_size": 64, "max_size": 96},
                                       ["model.num_classes=3", "data.image_size=128", "data.train_split=train",
                                        "data.val_split=val"]),
}


@pytest.fixture
def network_off(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("preset", list(CASES))
def test_whole_model_weights_never_fetch_the_backbone_weights(preset, tmp_path, network_off, capsys):
    options, small = CASES[preset]
    cfg = load(preset)
    assert cfg.model.backbone_weights == "imagenet"  # what makes the build download without the fix
    root = FORMATS[cfg.data.format].synth(tmp_path / "data", **options)
    overrides = [f"data.root={root}", "data.workers=0", "data.batch_size=2", "train.device=cpu", *small]
    cfg = load(preset, [*overrides, "model.backbone_weights=null"])
    weights = save_safetensors(tmp_path / "model.safetensors", registry.build_model(cfg).net.state_dict(),
                               metadata=meta_to_strings({"task": cfg.model.task}))
    sets = [arg for override in overrides for arg in ("--set", override)]
    assert main(["eval", preset, "--weights", str(weights), "--json", *sets]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    image = next((root / ("images/val" if "folder" in preset else "val")).iterdir())
    assert main(["predict", preset, "--weights", str(weights), str(image), "--out", str(tmp_path / "pred"), *sets]) == 0
    assert main(["export", preset, "--weights", str(weights), "--format", "torchscript", "-o",
                 str(tmp_path / "model.pt"), *sets]) == 0
    assert (tmp_path / "model.pt").is_file()
