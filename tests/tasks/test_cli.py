"""The effdense command line end to end on a tiny synthetic dataset (CPU, a few steps)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision

from tasks.cli import main

DEMO = str(Path(__file__).resolve().parents[2] / "configs" / "demo" / "classification.yaml")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from tasks.data.synthetic.classification import write_classification

    return write_classification(tmp_path_factory.mktemp("data") / "shapes", num_classes=4, train_per_class=8,
                                val_per_class=4, size=32)


def _tiny(dataset, run_dir=None):
    sets = [f"data.root={dataset}", "data.image_size=32", "data.batch_size=8", "data.workers=0",
            "train.epochs=1", "train.progress=false"]
    args = []
    for item in sets:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["train", DEMO, *_tiny(dataset), "--output", str(run_dir)]) == 0
    return run_dir


def test_train_writes_run_directory(trained):
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "model.safetensors", "loss.png"):
        assert (trained / name).is_file(), name
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["epoch"] == 1 and record["step"] == 4  # 32 images / batch 8
    assert 0.0 <= record["val/top1"] <= 1.0


def test_eval_json_last_line_and_checkpoint_forms_agree(dataset, trained, capsys):
    results = []
    for weights in ("last.pt", "model.safetensors"):
        assert main(["eval", DEMO, *_tiny(dataset), "--weights", str(trained / weights), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[0] == results[1]
    # The engine's own evaluation at the end of training saw the same weights.
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert results[0]["top1"] == pytest.approx(record["val/top1"])


def test_predict_prints_topk_labels(dataset, trained, tmp_path, capsys):
    images = sorted((Path(dataset) / "val").glob("*/*.jpg"))[:2]
    assert main(["predict", DEMO, *_tiny(dataset), "--weights", str(trained / "model.safetensors"),
                 *map(str, images), "--topk", "3", "--out", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "predictions.json").read_text())
    classes = sorted(p.name for p in (Path(dataset) / "train").iterdir())
    assert [len(item["top"]) for item in out] == [3, 3]
    assert all(entry["label"] in classes for item in out for entry in item["top"])
    probs = [entry["prob"] for entry in out[0]["top"]]
    assert probs == sorted(probs, reverse=True)


def test_unknown_key_is_one_line_error(dataset, capsys):
    assert main(["train", DEMO, "--set", "train.epochz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train.epochz" in err


def test_negative_lr_is_one_line_error(capsys):
    assert main(["train", DEMO, "--set", "optim.lr=-0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "optim.lr" in err


def test_backbones_table(capsys):
    assert main(["backbones", "efficientnet-b0", "efficientnetv2-s"]) == 0
    out = capsys.readouterr().out
    assert "5.29" in out and "0.39" in out and "16/24/40/112/320" in out and "21.46" in out
    assert main(["backbones", "--phi", "2.5"]) == 0
    assert "phi=2.5" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["efficientnet-l2"], ["--task", "detection", "--phi", "7"]])
def test_backbones_builds_nothing_in_memory(args, capsys):
    """`effdense backbones` counts on the meta device: every parameter any module registers while the
    table is made (L2 and D7x included) lives on meta, so the table costs no memory and no init time."""
    devices = []
    hook = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, name, param: devices.append(None if param is None else param.device.type))
    try:
        assert main(["backbones", *args]) == 0
    finally:
        hook.remove()
    assert devices and set(devices) <= {"meta", None}, set(devices)
    assert capsys.readouterr().out.strip()


def test_weights_convert_torchvision_file(tmp_path):
    from tasks.classification import build_classifier

    torch.manual_seed(0)
    peer = torchvision.models.efficientnet_b0().eval()
    src = tmp_path / "tv_b0.pth"
    torch.save(peer.state_dict(), src)
    out = tmp_path / "b0.safetensors"
    assert main(["weights", "convert", str(src), "--arch", "efficientnet-b0", "-o", str(out)]) == 0
    ours = build_classifier("efficientnet-b0", weights=str(out)).eval()
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(ours(x), peer(x), rtol=1e-4, atol=1e-5)


def test_data_synth_and_check(tmp_path, capsys):
    root = tmp_path / "shapes"
    assert main(["data", "synth", "classification", str(root), "--classes", "3", "--train-per-class", "4",
                 "--val-per-class", "2", "--size", "32"]) == 0
    victim = sorted((root / "train").glob("*/*.jpg"))[0]
    victim.write_bytes(victim.read_bytes()[:40])  # truncated JPEG
    assert main(["data", "check", DEMO, "--set", f"data.root={root}", "--set", "model.num_classes=3"]) == 1
    out = capsys.readouterr().out
    assert victim.name in out and "1 problem" in out


def test_torchrun_two_processes_shard_train_and_eval(dataset, tmp_path, capsys):
    """`torchrun -m tasks.cli train` on 2 gloo processes: each rank trains on half of every epoch, and
    the sharded evaluation equals a single-process evaluation of the saved weights."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(port), "-m", "tasks.cli", "train", DEMO, *_tiny(dataset), "--output", str(run_dir)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["step"] == 2  # 32 images / (batch 8 x 2 ranks)
    assert main(["eval", DEMO, *_tiny(dataset), "--weights", str(run_dir / "model.safetensors"), "--json"]) == 0
    single = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert single["top1"] == pytest.approx(record["val/top1"])
    # eval under torchrun: sharded, printed once (rank 0), and the process group is left cleanly.
    command[command.index("train"):] = ["eval", DEMO, *_tiny(dataset), "--weights", str(run_dir / "best.pt"), "--json"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-2000:]
    printed = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1 and printed[0]["top1"] == pytest.approx(single["top1"])
    assert "destroy_process_group" not in done.stderr


def test_resume_with_changed_schedule_is_refused(dataset, trained, capsys):
    code = main(["train", DEMO, *_tiny(dataset), "--set", "train.epochs=3", "--output", str(trained),
                 "--resume", str(trained / "last.pt")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "train.epochs 1 -> 3" in err


def test_weights_from_a_plain_torchvision_pt_file(tmp_path):
    from tasks.classification import ClassificationTask, build_classifier
    from tasks.registry import load_task_weights

    torch.manual_seed(0)
    peer = torchvision.models.efficientnet_b0().eval()
    path = tmp_path / "tv_b0.pt"
    torch.save(peer.state_dict(), path)
    task = ClassificationTask(build_classifier("efficientnet-b0", num_classes=1000)).eval()
    load_task_weights(task, str(path))
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(task.net(x), peer(x), rtol=1e-4, atol=1e-5)



# ---------------------------------------------------------------- issue 7: the CLI's contract


def test_predict_without_the_dataset_reads_class_names_from_the_weights(dataset, trained, tmp_path, capsys):
    import shutil

    images = sorted((Path(dataset) / "val").glob("*/*.jpg"))[:1]
    copy = tmp_path / "one.jpg"
    shutil.copy(images[0], copy)
    classes = sorted(p.name for p in (Path(dataset) / "train").iterdir())
    for weights in ("best.pt", "model.safetensors"):
        assert main(["predict", DEMO, "--set", "data.root=/nonexistent", "--set", "data.image_size=32",
                     "--weights", str(trained / weights), str(copy), "--topk", "4"]) == 0
        line = capsys.readouterr().out.strip().splitlines()[-1]
        assert all(name in line for name in classes), line  # the names stored at training time


def test_predict_with_imagenet_weights_prints_imagenet_names(tmp_path, capsys):
    from torchvision.models import EfficientNet_B0_Weights
    from torchvision.io import write_png

    torch.manual_seed(0)
    path = tmp_path / "tv_b0.pth"
    torch.save(torchvision.models.efficientnet_b0().state_dict(), path)  # random weights, torchvision's layout
    photo = tmp_path / "photo.png"
    write_png(torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8), str(photo))
    config = str(Path(__file__).resolve().parents[2] / "configs" / "classification" / "efficientnet_b0_imagenet.yaml")
    assert main(["predict", config, "--set", "data.image_size=64", "--weights", str(path), str(photo),
                 "--topk", "2", "--out", str(tmp_path / "out")]) == 0
    labels = [entry["label"] for entry in json.loads((tmp_path / "out" / "predictions.json").read_text())[0]["top"]]
    categories = EfficientNet_B0_Weights.IMAGENET1K_V1.meta["categories"]
    assert len(labels) == 2 and all(label in categories for label in labels)


def test_model_weights_from_a_checkpoint_are_the_ema_weights(dataset, tmp_path):
    from tasks import registry
    from tasks.config import load

    run_dir = tmp_path / "ema"
    assert main(["train", DEMO, *_tiny(dataset), "--set", "train.ema=true", "--set", "train.ema_decay=0.5",
                 "--output", str(run_dir)]) == 0
    state = torch.load(run_dir / "last.pt", weights_only=True)
    ema = {k[len("module.net."):]: v for k, v in state["ema"].items() if k.startswith("module.net.")}
    raw = {k[len("net."):]: v for k, v in state["model"].items() if k.startswith("net.")}
    assert not all(torch.equal(ema[k], raw[k]) for k in ema)
    model = registry.build_model(load(DEMO, [f"model.weights={run_dir / 'last.pt'}"]))
    loaded = model.net.state_dict()
    assert all(torch.equal(loaded[k], ema[k]) for k in ema)


def test_reusing_a_named_run_directory_is_refused(dataset, trained, capsys):
    assert main(["train", DEMO, *_tiny(dataset), "--output", str(trained)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a run" in err and "--overwrite" in err


def test_a_corrupt_image_in_a_worker_is_one_line_naming_the_file(tmp_path, capsys):
    from tasks.data.synthetic.classification import write_classification

    root = write_classification(tmp_path / "shapes", num_classes=4, train_per_class=4, val_per_class=2, size=32)
    victim = sorted((root / "train").glob("*/*.jpg"))[3]
    victim.write_bytes(b"\xff\xd8 not a jpeg")
    code = main(["train", DEMO, "--set", f"data.root={root}", "--set", "data.image_size=32", "--set",
                 "data.batch_size=4", "--set", "data.workers=2", "--set", "train.epochs=1", "--set",
                 "train.progress=false", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(victim) in err and "not a readable image" in err and "Traceback" not in err


def test_a_bug_keeps_its_traceback_and_user_errors_say_how_to_see_one(monkeypatch, capsys):
    import tasks.cli as cli

    def broken(args):
        raise ValueError("an internal bug, not the user's input")

    monkeypatch.setattr(cli, "cmd_backbones", broken)
    with pytest.raises(ValueError, match="internal bug"):
        main(["backbones"])
    assert main(["train", DEMO, "--set", "train.epochz=3"]) == 2
    assert "(run with -v for the traceback)" in capsys.readouterr().err


def test_the_resolved_scale_is_stored_in_the_run_directory(trained):
    scale = json.loads((trained / "scale.json").read_text())
    assert scale["backbone"] == "efficientnet-lite0" and scale["input_size"] == [32, 32] and scale["named"]


def test_backbones_task_table(capsys):
    assert main(["backbones", "--task", "detection", "0", "7x"]) == 0
    out = capsys.readouterr().out
    assert "efficientdet-d0" in out and "3.88" in out and "efficientdet-d7x" in out and "77.11" in out  # effdet's counts


def test_auto_batch_size_on_cpu_keeps_the_configured_batch_and_says_why(dataset, tmp_path):
    run = tmp_path / "auto"
    assert main(["train", DEMO, *_tiny(dataset), "--set", "train.batch_size=auto", "--set", "train.max_steps=1",
                 "--output", str(run)]) == 0
    found = json.loads((run / "batch_size.json").read_text())
    assert found["batch_size"] == 8 and "needs CUDA" in found["message"]
    assert found["lr"] == pytest.approx(0.002 * 8 / 16)  # the demo's lr at base_batch_size 16, linear rule


@pytest.mark.parametrize("weights", ["model.safetensors", "best.pt"])
def test_weights_of_another_task_are_refused_before_loading(trained, weights, tmp_path, capsys):
    """Classification weights given to a segmentation config: one line saying which task they hold
    (read from the file's metadata), not a list of missing U-Net keys."""
    code = main(["predict", "configs/demo/segmentation.yaml", "--weights", str(trained / weights),
                 str(tmp_path / "any.png"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "holds classification weights but the config is for model.task=segmentation" in err


def test_overwrite_replaces_a_named_run(dataset, trained, tmp_path, capsys):
    run = tmp_path / "again"
    shutil.copytree(trained, run)
    stale = len((run / "metrics.jsonl").read_text().splitlines())
    assert main(["train", DEMO, *_tiny(dataset), "--output", str(run), "--overwrite"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == stale and [r["epoch"] for r in records if "val/top1" in r] == [1]
    assert (run / "best.pt").is_file() and (run / "model.safetensors").is_file()
