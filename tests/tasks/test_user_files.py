"""Issue 15: nothing a user has is lost or silently wrong (the items about runs, the device, disk errors,
interrupts and scales; predict outputs and labels have their own files). Each test reproduces a failure of
the code before the fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from tasks.cli import main
from tasks.config import ConfigError, load
from tasks.data.errors import DataError
from tasks.engine import Trainer, TrainingInterrupted
from tasks.engine.errors import EngineError
from tasks.engine.runlog import LOCK_FILE

from .toy_task import ToyTask, make_config, make_loaders

pytestmark = pytest.mark.usefixtures("one_thread")


def toy(**options):
    torch.manual_seed(0)
    return ToyTask(**options)


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# 1. A resume continues in the checkpoint's own directory, whatever train.run_name says.
def test_resume_with_a_run_name_writes_into_the_checkpoints_directory(tmp_path):
    finished = tmp_path / "expA"
    Trainer(toy(), make_loaders(make_config()), make_config(), run_dir=finished).fit()
    before = snapshot(finished)
    Trainer(toy(), make_loaders(make_config()), make_config(**{"train.max_steps": 6}), run_dir=tmp_path / "expB").fit()
    cfg = make_config(**{"train.output_dir": str(tmp_path), "train.run_name": "expA"})  # what the config says
    trainer = Trainer(toy(), make_loaders(cfg), cfg)
    trainer.resume(tmp_path / "expB" / "last.pt")
    trainer.fit()
    assert snapshot(finished) == before  # the other run's best.pt, last.pt, metrics are untouched
    assert trainer.run_dir == (tmp_path / "expB").resolve()
    assert '"step": 12' in (tmp_path / "expB" / "metrics.jsonl").read_text()


def test_resume_with_another_output_is_a_one_line_error(tmp_path, capsys):
    code = main(["train", "demo/classification", "--resume", str(tmp_path / "expB" / "last.pt"),
                 "--output", str(tmp_path / "expC")])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint's own directory" in err


# 3. effdense demo --output DIR refuses a directory holding a run, unless --overwrite.
def test_demo_refuses_an_output_that_holds_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "finished"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"val/top1": 0.93}\n')
    (run / "last.pt").write_bytes(b"a finished run's checkpoint")
    before = snapshot(run)
    code = main(["demo", "--output", str(run), "--set", "train.max_steps=1", "--set", "train.progress=false",
                 "--set", "data.workers=0"])
    assert code == 2 and "already holds a run" in capsys.readouterr().err
    assert snapshot(run) == before


# 4. Two trainings into one directory: the second is refused while the first holds the lock.
def test_a_run_directory_in_use_by_a_live_process_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        (tmp_path / LOCK_FILE).write_text(f"{other.pid}\n")
        cfg = make_config(**{"train.max_steps": 1})
        with pytest.raises(EngineError, match=f"in use by process {other.pid}"):
            Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path).fit()
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        other.kill()
        other.wait()
    Trainer(toy(), make_loaders(cfg), cfg, run_dir=tmp_path).fit()  # its process is gone: a stale lock
    assert (tmp_path / "last.pt").is_file() and not (tmp_path / LOCK_FILE).exists()


def test_two_trainings_started_together_do_not_both_run(tmp_path):
    script = (f"import sys; sys.path[:0] = {[str(p) for p in sys.path[:3]]!r}\n"
              "from tests.tasks.toy_task import ToyTask, make_config, make_loaders\n"
              "from tasks.engine import Trainer\n"
              "from tasks.engine.errors import EngineError\n"
              "cfg = make_config(**{'train.max_steps': 4})\n"
              "try:\n"
              f"    Trainer(ToyTask(sleep=0.2), make_loaders(cfg), cfg, run_dir={str(tmp_path / 'run')!r}).fit()\n"
              "except EngineError as error:\n"
              "    print('REFUSED', error); sys.exit(3)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, cwd=os.getcwd(), stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(run.wait(timeout=240) for run in runs)
    assert codes == [0, 3], [run.stderr.read()[-500:] for run in runs]


# 5. last.pt is written before the evaluation, so a bad validation file loses no training.
class BrokenVal(Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise DataError("val/0003.png: not a readable mask")


def test_last_checkpoint_is_saved_before_evaluating(tmp_path):
    cfg = make_config(**{"train.epochs": 1})
    loaders = {**make_loaders(cfg), "val": DataLoader(BrokenVal(), batch_size=2)}
    with pytest.raises(DataError):
        Trainer(toy(), loaders, cfg, run_dir=tmp_path).fit()
    assert (tmp_path / "last.pt").is_file()


# 8. One line, not a traceback: disk full while saving, a CUDA device on a machine without one, Ctrl-C.
@pytest.fixture
def tiny_classification(tmp_path):
    from tasks.data.synthetic.classification import write_classification

    root = write_classification(tmp_path / "data", train_per_class=4, val_per_class=2, size=32)
    return ["--set", f"data.root={root}", "--set", "data.image_size=32", "--set", "data.batch_size=4", "--set",
            "data.workers=0", "--set", "train.progress=false", "--set", "train.device=cpu"]


def test_disk_full_while_saving_is_one_line(tmp_path, tiny_classification, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file "
                           "data/12: file write failed")

    monkeypatch.setattr("tasks.engine.checkpoint.torch.save", full_disk)
    code = main(["train", "demo/classification", "--output", str(tmp_path / "run"), "--set", "train.max_steps=1",
                 *tiny_classification])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "last.pt: could not write the file (PytorchStreamWriter failed" in err and "free disk space" in err
    assert not list((tmp_path / "run").glob(".last.pt*"))  # no temp file left behind


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_without_cuda_is_one_line(tiny_classification, capsys):
    assert main(["train", "demo/classification", *tiny_classification, "--set", "train.device=cuda"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no usable CUDA device" in err and "train.device=cpu" in err


def test_ctrl_c_during_eval_is_one_line(tmp_path, tiny_classification, monkeypatch, capsys):
    from tasks import registry
    from tasks.engine.checkpoint import meta_to_strings, save_safetensors

    cfg = load("demo/classification", tiny_classification[1::2])
    weights = save_safetensors(tmp_path / "model.safetensors", registry.build_model(cfg).net.state_dict(),
                               metadata=meta_to_strings({"task": "classification"}))

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("tasks.engine.evaluate", interrupted)
    assert main(["eval", "demo/classification", "--weights", str(weights), *tiny_classification]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "interrupted" in err


def test_an_interrupted_demo_says_how_to_continue_it(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)

    def stopped(self):
        raise TrainingInterrupted(signal.SIGINT, str(self.run_dir / "last.pt"), 0, 3, 3)

    monkeypatch.setattr(Trainer, "fit", stopped)
    assert main(["demo", "--set", "train.progress=false", "--set", "data.workers=0"]) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "effdense train" in err and "config.yaml --resume" in err


# 9. A scale beyond the published rows is refused, naming model.phi.
def test_an_out_of_table_scale_is_refused_naming_phi():
    for preset in ("demo/detection", "demo/classification"):
        with pytest.raises(ConfigError) as caught:
            load(preset, ["model.scale=9"])
        assert "model.scale='9'" in str(caught.value) and "model.phi" in str(caught.value)
    assert load("demo/detection", ["model.scale=7x", "data.image_size=256"]).model.scale == "7x"


# 5. Both splits' labels are checked before the first step: a bad val mask fails at once, naming the file.
def test_a_bad_val_mask_fails_before_the_first_step(tmp_path, capsys):
    from PIL import Image

    from tasks.data.synthetic.segmentation import write_maskfolder

    root = write_maskfolder(tmp_path / "data", train=2, val=2)
    bad = sorted((root / "masks" / "val").glob("*.png"))[-1]
    Image.new("L", Image.open(bad).size, 9).save(bad)  # class 9 of 6
    run = tmp_path / "run"
    code = main(["train", "demo/segmentation", "--output", str(run), "--set", f"data.root={root}", "--set",
                 "data.format=maskfolder", "--set", "model.num_classes=6", "--set", "data.workers=0", "--set",
                 "train.progress=false", "--set", "data.image_size=64", "--set", "data.batch_size=2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and bad.name in err, err
    assert not (run / "metrics.jsonl").exists()  # nothing trained


# 9. `data check` also says what the files cannot: a device this machine lacks, a model that does not build.
def test_data_check_reports_the_device_and_the_model(tmp_path, capsys):
    from tasks.data.synthetic.classification import write_classification

    root = write_classification(tmp_path / "data", train_per_class=2, val_per_class=1, size=32)
    sets = ["--set", f"data.root={root}", "--set", "model.segmentation.head=bifpn", "--set",
            "model.backbone=efficientnet-lite0", "--set", "data.format=maskfolder"]
    assert main(["data", "check", "demo/segmentation", *sets[:2], "--set", "train.device=cuda:7"]) == 1
    out = capsys.readouterr().out
    if not torch.cuda.is_available():
        assert "train.device='cuda:7'" in out
    assert main(["data", "check", "demo/segmentation", *sets]) == 1
    assert "the model does not build: head='bifpn' on backbone 'efficientnet-lite0'" in capsys.readouterr().out
