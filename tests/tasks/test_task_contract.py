"""The task contract, run over every row of ``tasks.registry.TASKS`` (timm's test_models pattern): a new
task passes it or says why. Tiny synthetic data in each row's first format, the real demo preset."""

from __future__ import annotations

import math

import pytest
import torch

from tasks import registry
from tasks.registry import build_with_weights
from tasks.config import load, resolve_image_size
from tasks.data import FORMATS, build_loaders
from tasks.engine import evaluate
from tasks.engine.checkpoint import meta_to_strings, save_safetensors
from tasks.export import prepare

pytestmark = pytest.mark.usefixtures("one_thread")

# Per format: the synthetic writer's options and the config overrides that keep one step small.
TINY = {
    "imagefolder": ({"train_per_class": 4, "val_per_class": 2, "size": 32}, ["data.image_size=32"]),
    "cityscapes": ({"train_per_city": 2, "val_per_city": 1, "size": (64, 128)}, ["data.image_size=64"]),
    "coco": ({"train_images": 4, "val_images": 2, "min_size": 64, "max_size": 96}, ["data.image_size=128"]),
}


@pytest.fixture(scope="module", params=list(registry.TASKS))
def built(request, tmp_path_factory):
    task = registry.get(request.param)
    fmt = task.formats[0]
    assert fmt in TINY, f"task {task.name}: add its format {fmt!r} to TINY"
    synth_options, overrides = TINY[fmt]
    root = FORMATS[fmt].synth(tmp_path_factory.mktemp(task.name) / "data", **synth_options)
    cfg = load(task.demo_preset, [f"data.root={root}", "data.format=" + fmt, "data.batch_size=2",
                                  "data.eval_batch_size=2", "data.workers=0", "train.device=cpu", *overrides])
    assert cfg.model.task == task.name
    return task, cfg, registry.build_model(cfg), build_loaders(cfg)


def test_a_train_step_gives_finite_named_losses_and_gradients(built):
    task, cfg, model, loaders = built
    images, targets = next(iter(loaders["train"]))
    assert images.dtype == torch.uint8 and images.shape[-2:] == resolve_image_size(cfg)
    model.train()
    losses = model(images, targets)
    assert isinstance(losses, dict) and losses and all(isinstance(name, str) for name in losses)
    assert all(value.dim() == 0 and math.isfinite(value.item()) for value in losses.values()), losses
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model.zero_grad(set_to_none=True)


def test_evaluate_gives_the_primary_metric(built):
    task, cfg, model, loaders = built
    metrics = evaluate(model.eval(), loaders["val"], "cpu")
    primary = model.make_evaluator().primary_metric
    assert primary in metrics and math.isfinite(metrics[primary]), metrics


def test_safetensors_round_trip_gives_the_same_outputs(built, tmp_path):
    task, cfg, model, loaders = built
    path = save_safetensors(tmp_path / "model.safetensors", model.net.state_dict(),
                            metadata=meta_to_strings({"task": task.name}))
    images, _ = next(iter(loaders["val"]))
    cfg.train.seed += 1  # a differently initialised model: only the file can make the outputs equal
    again = build_with_weights(cfg, str(path)).eval()
    cfg.train.seed -= 1
    with torch.no_grad():
        ours, theirs = model.eval()(images), again(images)
    flat = lambda out: [t for t in (out if isinstance(out, list) else [out]) for t in  # noqa: E731
                        (t.values() if isinstance(t, dict) else [t])]
    for a, b in zip(flat(ours), flat(theirs), strict=True):
        torch.testing.assert_close(a, b)


def test_export_prepare_matches_the_network(built):
    task, cfg, model, loaders = built
    example = torch.randint(0, 256, (1, 3, *resolve_image_size(cfg)), dtype=torch.uint8)
    deploy, reference, names = prepare(model.eval(), example, include_normalization=True)
    with torch.no_grad():
        got, want = deploy(example), reference(example)
    got, want = (list(x) if isinstance(x, (tuple, list)) else [x] for x in (got, want))
    assert len(got) == len(want) == len(names)
    for a, b in zip(got, want):
        scale = b.abs().max().clamp_min(1e-6)
        assert ((a - b).abs().max() / scale).item() < 1e-4


def test_every_row_describes_its_scale_and_makes_an_example_batch(built):
    task, cfg, model, loaders = built
    info = task.describe_scale(cfg)
    assert info["task"] == task.name and info["input_size"] == list(resolve_image_size(cfg))
    images, targets = task.example_batch(cfg, 2)
    model.train()
    assert all(math.isfinite(v.item()) for v in model(images, targets).values())
    assert set(task.scales.published) <= set(task.scales.names)
