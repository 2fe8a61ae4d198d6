"""A corrupt image met inside a DataLoader worker reaches the user as the one line it was raised with,
naming the file, in every task (torch re-raises worker errors with a multi-line "Caught ... Original
Traceback" text; classification's CLI run is in test_cli.py)."""

import pytest

from tasks.config import load
from tasks.data import DataError, build_loaders


def _first_error(cfg):
    loader = build_loaders(cfg, splits=("train",))["train"]
    try:
        for _ in loader:
            pass
    except DataError as error:  # not pytest.raises: its traceback would keep the workers' iterator alive
        return str(error)
    pytest.fail("the corrupt image was read without an error")


def test_segmentation_worker_error_is_one_line(tmp_path):
    from tasks.data.synthetic_segmentation import write_cityscapes

    root = write_cityscapes(tmp_path / "cs", train_per_city=2, val_per_city=1, size=(64, 128))
    victim = sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))[1]
    victim.write_bytes(b"\x89PNG not a png")
    cfg = load("configs/demo/segmentation.yaml", [f"data.root={root}", "data.workers=2", "data.batch_size=2",
                                                   "data.image_size=64", "train.device=cpu"])
    message = _first_error(cfg)
    assert len(message.splitlines()) == 1 and str(victim) in message, message
    assert "Traceback" not in message and "DataLoader worker" not in message


def test_detection_worker_error_is_one_line(tmp_path):
    from tasks.data.synthetic_detection import write_coco

    root = write_coco(tmp_path / "coco", train_images=6, val_images=2, seed=1)
    victim = sorted((root / "train").glob("*.jpg"))[2]
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    cfg = load("configs/demo/detection.yaml", [f"data.root={root}", "data.workers=2", "data.batch_size=2",
                                                "data.image_size=128", "train.device=cpu"])
    message = _first_error(cfg)
    assert len(message.splitlines()) == 1 and str(victim) in message, message
    assert "Traceback" not in message and "DataLoader worker" not in message
