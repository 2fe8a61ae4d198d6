"""The classification task module and its evaluator, against hand-computed and torchvision values."""

import pytest
import torch
from torch.nn import functional as F
from torchvision.transforms import v2

from tasks.classification import ClassificationTask, TopKEvaluator, build_classifier


def test_topk_by_hand():
    logits = torch.tensor([
        [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # target 0: top-1 hit
        [0.1, 0.9, 0.8, 0.7, 0.6, 0.5],  # target 5: 6th best -> miss at top-5
        [0.5, 0.4, 0.3, 0.2, 0.1, 0.6],  # target 4: 5th best -> top-5 hit only
        [0.0, 0.0, 1.0, 0.0, 0.0, 0.0],  # target 2: top-1 hit
    ])
    targets = torch.tensor([0, 5, 4, 2])
    evaluator = TopKEvaluator()
    evaluator.update(logits[:2], targets[:2])
    evaluator.update(logits[2:], targets[2:])
    assert evaluator.compute() == {"top1": 0.5, "top5": 0.75}
    evaluator.reset()
    with pytest.raises(RuntimeError):
        evaluator.compute()


def test_normalisation_matches_torchvision():
    net = build_classifier("efficientnet-lite0", num_classes=3)
    task = ClassificationTask(net, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    expected = v2.Normalize(mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])(images.float() / 255)
    torch.testing.assert_close(task.normalize(images), expected, rtol=1e-5, atol=1e-5)
    assert images.dtype == torch.uint8  # the input batch is not modified


def test_train_returns_losses_eval_returns_logits():
    torch.manual_seed(0)
    net = build_classifier("efficientnet-lite0", num_classes=3, dropout=0.0)
    task = ClassificationTask(net, label_smoothing=0.1)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    targets = torch.tensor([0, 1, 2, 1])
    task.eval()
    logits = task(images)
    assert logits.shape == (4, 3)
    # In train mode BN uses batch statistics, so compare with the loss of a train-mode forward.
    task.train()
    losses = task(images, targets)
    assert set(losses) == {"cross_entropy"}
    task.eval()
    net.train()
    reference = F.cross_entropy(net(task.normalize(images)), targets, label_smoothing=0.1)
    torch.testing.assert_close(losses["cross_entropy"], reference, rtol=1e-4, atol=1e-5)
    assert "net.backbone.stem.conv.weight" in task.state_dict()
    assert not any("pixel" in key for key in task.state_dict())
