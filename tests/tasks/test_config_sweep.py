"""Every key a preset shows works when a user changes it (issue 21).

For each task's schema, every leaf key is set to each valid value other than the demo preset's (every choice
of a choice field: each mode and format the task has; a number inside its range; the values in
``sweep_values.TABLE`` where the field cannot say), then the model is built and one training step and one
evaluation run on tiny synthetic data. Each setting either runs or raises the project's one-line error
naming the key. The schema stays the one source: a leaf with no derivable value and no table entry fails.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from backbones.errors import EffdenseError
from tasks import registry
from tasks.config import load, to_dict
from tasks.data import FORMATS, DataError, build_loaders, check_labels
from tasks.engine import Trainer

from .sweep_values import CPU_SKIPS, SKIP, TABLE, derived_values, leaf_fields, yaml_value

pytestmark = pytest.mark.usefixtures("one_thread")

# Per format: the synthetic writer's options and what the config needs for that data.
DATA = {
    "imagefolder": ({"train_per_class": 3, "val_per_class": 2, "size": 32}, ["data.image_size=32"]),
    "cityscapes": ({"train_per_city": 2, "val_per_city": 1, "size": (64, 128)}, ["data.image_size=64", "model.num_classes=19"]),
    "maskfolder": ({"train": 4, "val": 2, "size": (64, 96)}, ["data.image_size=64", "model.num_classes=6"]),
    "coco": ({"train_images": 4, "val_images": 2, "min_size": 64, "max_size": 96}, ["data.image_size=128"]),
    "voc": ({"train_images": 4, "val_images": 2, "min_size": 64, "max_size": 96}, ["data.image_size=128"]),
    "yolo": ({"train_images": 4, "val_images": 2, "min_size": 64, "max_size": 96}, ["data.image_size=128"]),
}
RUN = ["data.workers=0", "data.batch_size=2", "data.eval_batch_size=2", "train.device=cpu", "train.progress=false",
       "train.max_steps=1", "train.epochs=1", "train.log_every=1", "data.pin_memory=false"]
# Settings whose data must change with them (the key's value decides what the files must hold).
WITH = {"data.label_map=category_id": ["model.num_classes=11"],  # one class per category id (synthetic ids 3, 7, 11)
        "model.in_channels=1": ["data.mean=[0.45]", "data.std=[0.23]"],  # one value per band
        # a progressive schedule needs stages (and an epoch for each); its RandAugment ramp needs RandAugment on
        **{f"train.progressive.{key}": ["train.progressive.stages=2", "train.epochs=2", "data.augment.randaugment=true"]
           for key in ("image_size=[32,48]", "randaugment=[2,6]", "dropout=[0.1,0.3]", "mixup=[0.0,0.2]")}}
FILES = ("weights", "backbone_weights", "train_annotations", "val_annotations", "train_images", "val_images",
         "output_dir")
RESULTS: dict[str, list] = {}
# Keys that change what build_model makes (the network, its loss, normalisation, inference or class names): a
# setting of any other key reuses a copy of the task module built from the base config (the same seed makes
# the same weights), which keeps the sweep's time down.
MODEL_KEYS = ("model.", "loss.", "data.eval.", "data.tile.", "data.mean", "data.std", "data.input_range",
              "data.normalize", "data.percentiles", "data.format", "data.class_names", "data.ignore_index",
              "data.label_map", "data.val_annotations", "data.val_split", "data.image_size", "train.seed")
BUILT: dict[tuple, torch.nn.Module] = {}
# Keys about the run directory: only these write one (checkpoints, TensorBoard and plots cost seconds a setting)
RUN_DIR_KEYS = ("train.output_dir", "train.run_name", "train.overwrite", "train.checkpoint_every", "train.log_every",
                "train.eval_every", "train.epochs", "train.ema")


def settings() -> list[tuple[str, str, object]]:
    """(task, key, value) for every leaf of every task's schema."""
    found = []
    for name, task in registry.TASKS.items():
        cfg = load(task.demo_preset)
        context = {"task": name, "cfg": cfg, "files": {f: f"@{f}" for f in FILES}}
        for key, field, kind in leaf_fields(task.config):
            current = _get(to_dict(cfg), key)
            entry = TABLE.get(key)
            if entry is SKIP:
                continue
            values = entry(context) if entry is not None else derived_values(key, field, kind, current)
            assert values is not None, f"{name}: no sweep value for {key}: add it to tests/tasks/sweep_values.TABLE"
            found += [(name, key, value) for value in values if value != current]
    return found


def _get(tree, key):
    for part in key.split("."):
        tree = tree[part]
    return tree


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Per format: its synthetic root; plus the files some keys name (weights, annotation files)."""
    roots = {}
    for name, (options, _) in DATA.items():
        roots[name] = FORMATS[name].synth(tmp_path_factory.mktemp(name) / "data", **options)
    files = {"output_dir": str(tmp_path_factory.mktemp("runs"))}
    coco = roots["coco"]
    for split in ("train", "val"):
        files[f"{split}_annotations"] = str(coco / "annotations" / f"instances_{split}.json")
        files[f"{split}_images"] = str(coco / split)
    return roots, files, tmp_path_factory


def _weights(task: str, base: list[str], files: dict, tmp_path_factory) -> None:
    """A whole-model file (an earlier run's model.safetensors) and an ImageNet classifier file (torchvision's
    layout, random weights) for the backbone."""
    import torchvision

    from tasks.engine.checkpoint import meta_to_strings, save_safetensors

    folder = tmp_path_factory.mktemp(f"weights-{task}")
    cfg = load(registry.get(task).demo_preset, base)
    files["weights"] = str(save_safetensors(folder / "model.safetensors", registry.build_model(cfg).net.state_dict(),
                                            metadata=meta_to_strings({"task": task})))
    backbone = cfg.model.backbone
    path = folder / "classifier.pth"
    if backbone == "efficientnet-b0":
        torch.save(torchvision.models.efficientnet_b0().state_dict(), path)
    else:  # lite0 has no torchvision model: our own classifier file
        from tasks.classification import build_classifier

        torch.save(build_classifier(backbone).state_dict(), path)
    files["backbone_weights"] = str(path)


@pytest.mark.parametrize("task, key, value", settings(), ids=lambda v: v if isinstance(v, str) else yaml_value(v))
def test_every_key_works_or_says_why_in_one_line(task, key, value, data):
    roots, files, factory = data
    row = registry.get(task)
    setting = f"{key}={yaml_value(value)}"
    if setting in CPU_SKIPS or (key == "train.device" and str(value).startswith("cuda")):
        pytest.skip(CPU_SKIPS.get(setting, "no CUDA here"))
    fmt = value if key == "data.format" else load(row.demo_preset).data.format
    run_name = f"{task}-{key}-{len(RESULTS.get(task, []))}"
    base = [f"data.root={roots[fmt]}", f"data.format={fmt}", *DATA[fmt][1], *RUN,
            f"train.output_dir={files['output_dir']}", f"train.run_name={run_name}"]
    if any(f"@{name}" in yaml_value(value) for name in ("weights", "backbone_weights")) and task not in files:
        files[task] = {}
        _weights(task, base, files[task], factory)  # each task's own backbone
    for name, path in {**files, **files.get(task, {})}.items():
        if isinstance(path, str):
            setting = setting.replace(f"@{name}", path)
    outcome = _run(row, base + WITH.get(setting, []) + [setting], key, base)
    RESULTS.setdefault(task, []).append((setting, outcome))


def _model(row, cfg, key: str, base: list[str]):
    if key.startswith(MODEL_KEYS):
        return registry.build_model(cfg)
    cache = (row.name, cfg.data.format)
    if cache not in BUILT:
        BUILT[cache] = registry.build_model(load(row.demo_preset, base))
    return copy.deepcopy(BUILT[cache])


def _run(row, overrides: list[str], key: str, base: list[str]) -> str:
    try:
        cfg = load(row.demo_preset, overrides)
        problems = check_labels(cfg, cfg.data.check)  # as `effdense train` does before the first step
        if problems:
            raise DataError(problems[0])
        model = _model(row, cfg, key, base)
        loaders = build_loaders(cfg)
        trainer = Trainer(model, loaders, cfg, create_run_dir=key in RUN_DIR_KEYS)
        metrics = trainer.fit()
    except EffdenseError as error:
        message = str(error)
        assert "\n" not in message, message
        assert key.rsplit(".", 1)[-1] in message or key in message, f"{key}: the error does not name the key: {message}"
        return f"error: {message}"
    primary = model.make_evaluator().primary_metric
    assert primary in metrics, metrics
    return "ran"


def test_report(tmp_path_factory):
    """Writes the sweep's outcome (runs after the sweep in file order) for the resolve note."""
    if not RESULTS:
        pytest.skip("run with the sweep")
    report = {task: {"ran": sum(o == "ran" for _, o in rows), "errors": [(s, o) for s, o in rows if o != "ran"]}
              for task, rows in RESULTS.items()}
    out = os.environ.get("EFFDENSE_SWEEP_REPORT")
    if out:
        with open(out, "w") as handle:
            json.dump(report, handle, indent=1)
