"""A corrupt image met inside a DataLoader worker reaches the user as the one line it was raised with,
naming the file, in every task (torch re-raises worker errors with a multi-line "Caught ... Original
Traceback" text; classification's CLI run is in test_cli.py)."""

import pytest

from tasks.config import load
from tasks.data import DataError, build_loaders


def _cityscapes(root):
    from tasks.data.synthetic.segmentation import write_cityscapes

    root = write_cityscapes(root, train_per_city=2, val_per_city=1, size=(64, 128))
    return root, sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))[1], 64


def _coco(root):
    from tasks.data.synthetic.detection import write_coco

    root = write_coco(root, train_images=6, val_images=2, seed=1)
    return root, sorted((root / "train").glob("*.jpg"))[2], 128


@pytest.mark.parametrize("task, write", [("segmentation", _cityscapes), ("detection", _coco)])
def test_worker_error_is_one_line_naming_the_file(task, write, tmp_path):
    root, victim, size = write(tmp_path / "data")
    victim.write_bytes(b"\x89PNG not an image")
    cfg = load(f"configs/demo/{task}.yaml", [f"data.root={root}", "data.workers=2", "data.batch_size=2",
                                              f"data.image_size={size}", "train.device=cpu"])
    loader = build_loaders(cfg, splits=("train",))["train"]
    try:
        for _ in loader:
            pass
    except DataError as error:  # not pytest.raises: its traceback would keep the workers' iterator alive
        message = str(error)
    else:
        pytest.fail("the corrupt image was read without an error")
    assert len(message.splitlines()) == 1 and str(victim) in message, message
    assert "Traceback" not in message and "DataLoader worker" not in message
