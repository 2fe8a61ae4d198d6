"""ATSS assignment and the GIoU / CIoU box losses (issue 22), checked against references written here from the
papers' descriptions (a per-image, per-object numpy loop; formulas worked by hand), not against the code's output."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from heads.anchors import AnchorGenerator, atss_match, encode_boxes, feature_sizes
from tasks.detection.loss import detection_loss
from tasks.detection.model import build_detector, pad_targets

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE = 128


# ------------------------------------------------------------------------------- ATSS: the reference loop

def _iou(box, anchors):
    """IoU of one xyxy box with (A, 4) anchors, float64."""
    w = np.clip(np.minimum(box[2], anchors[:, 2]) - np.maximum(box[0], anchors[:, 0]), 0, None)
    h = np.clip(np.minimum(box[3], anchors[:, 3]) - np.maximum(box[1], anchors[:, 1]), 0, None)
    inter = w * h
    area_box = (box[2] - box[0]) * (box[3] - box[1])
    area_anchors = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    return inter / (area_box + area_anchors - inter), inter / area_anchors


def _encode(box, anchor, eps=1e-7):
    """Faster R-CNN codes (ty, tx, th, tw) with the effdet epsilon, written out."""
    wa, ha = anchor[2] - anchor[0] + eps, anchor[3] - anchor[1] + eps
    w, h = box[2] - box[0] + eps, box[3] - box[1] + eps
    xa, ya = (anchor[0] + anchor[2]) / 2, (anchor[1] + anchor[3]) / 2
    x, y = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return [(y - ya) / ha, (x - xa) / wa, math.log(h / ha), math.log(w / wa)]


def _atss_reference(anchors, boxes, labels, crowd, locations_per_level, per_location, topk):
    """One image at a time, one object at a time, as the paper describes ATSS (k nearest locations per level)."""
    anchors = anchors.double().numpy()
    class_targets = np.full((len(boxes), len(anchors)), -1)
    box_targets = np.zeros((len(boxes), len(anchors), 4))
    centres = (anchors[::per_location, :2] + anchors[::per_location, 2:]) / 2
    for image in range(len(boxes)):
        best = np.full(len(anchors), -1.0)  # per anchor: the IoU of the box it is positive for
        owner = np.full(len(anchors), -1)
        for j, (box, label) in enumerate(zip(boxes[image].tolist(), labels[image].tolist())):
            if label < 0 or crowd[image][j]:
                continue
            box = np.array(box, dtype=np.float64)
            iou, _ = _iou(box, anchors)
            centre = (box[:2] + box[2:]) / 2
            candidates, start = [], 0
            for count in locations_per_level:
                distance = np.sqrt(((centres[start:start + count] - centre) ** 2).sum(1))
                for location in np.argsort(distance, kind="stable")[:topk]:
                    candidates += [(start + location) * per_location + k for k in range(per_location)]
                start += count
            threshold = iou[candidates].mean() + iou[candidates].std(ddof=1)
            for a in candidates:
                cx, cy = centres[a // per_location]
                inside = min(cx - box[0], cy - box[1], box[2] - cx, box[3] - cy) > 0.01
                if iou[a] >= threshold and inside and iou[a] > best[a]:
                    best[a], owner[a] = iou[a], j
        for a in np.nonzero(owner >= 0)[0]:
            class_targets[image, a] = labels[image][owner[a]]
            box_targets[image, a] = _encode(boxes[image][owner[a]].double().numpy(), anchors[a])
        for j in range(len(boxes[image])):  # COCO's crowd rule: mostly inside a crowd box -> ignored
            if labels[image][j] >= 0 and crowd[image][j]:
                _, ioa = _iou(boxes[image][j].double().numpy(), anchors)
                class_targets[image, (ioa >= 0.5) & (owner < 0)] = -2
    return class_targets, box_targets


def _random_batch(seed):
    """Four images: five objects, three objects and a crowd box, one object then padding, nothing at all."""
    generator = torch.Generator().manual_seed(seed)
    xy = torch.rand(4, 5, 2, generator=generator) * SIZE * 0.8
    wh = torch.rand(4, 5, 2, generator=generator) * SIZE * 0.5 + 4
    boxes = torch.cat([xy, (xy + wh).clamp(max=SIZE)], -1)
    labels = torch.randint(0, 6, (4, 5), generator=generator)
    labels[1, 4] = labels[2, 1:] = labels[3] = -1
    boxes[labels < 0] = 0.0
    crowd = torch.zeros(4, 5, dtype=torch.bool)
    crowd[1, 3] = True
    boxes[1, 3] = torch.tensor([60.3, 50.7, 119.1, 109.4])  # a large crowd box (off-grid: no IoA of exactly 0.5)
    boxes[0, 1] = boxes[0, 0] + torch.tensor([2.0, 1.0, 2.0, 1.0])  # overlapping objects compete for anchors
    return boxes, labels, crowd


@pytest.mark.parametrize("seed,topk", [(0, 9), (1, 9), (2, 3)])
def test_atss_equals_a_per_object_loop(seed, topk):
    sizes = feature_sizes((SIZE, SIZE), range(3, 8))
    anchors = AnchorGenerator()((SIZE, SIZE), sizes)
    boxes, labels, crowd = _random_batch(seed)
    locations = [h * w for h, w in sizes]
    class_targets, box_targets, positives = atss_match(anchors, boxes, labels, crowd, locations_per_level=locations,
                                                       anchors_per_location=9, topk=topk)
    expected_class, expected_box = _atss_reference(anchors, boxes, labels, crowd, locations, 9, topk)
    assert class_targets.shape == (4, anchors.shape[0]) and box_targets.shape == (4, anchors.shape[0], 4)
    assert np.array_equal(class_targets.numpy(), expected_class)
    torch.testing.assert_close(box_targets, torch.from_numpy(expected_box).float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(positives, torch.from_numpy((expected_class >= 0).sum(1)).float())
    assert positives[0] > 0 and positives[1] > 0 and positives[3] == 0  # the empty image: all background
    assert (class_targets[1] == -2).any() and (class_targets[3] == -1).all()


def test_atss_without_any_box_is_all_background():
    sizes = feature_sizes((SIZE, SIZE), range(3, 8))
    anchors = AnchorGenerator()((SIZE, SIZE), sizes)
    class_targets, box_targets, positives = atss_match(
        anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long),
        locations_per_level=[h * w for h, w in sizes], anchors_per_location=9)
    assert (class_targets == -1).all() and (box_targets == 0).all() and positives.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="anchors per location"):
        atss_match(anchors, torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), locations_per_level=[1],
                   anchors_per_location=9)


def test_atss_by_hand():
    # Two levels in one strip, one anchor per location, topk 2: level A 8x8 anchors at x = 0, 8, 16, 24 (locations
    # 0-3), level B 16x16 anchors at x = 0, 16 (locations 4-5).
    anchors = torch.tensor([[0, 0, 8, 8], [8, 0, 16, 8], [16, 0, 24, 8], [24, 0, 32, 8],
                            [0, 0, 16, 16], [16, 0, 32, 16]], dtype=torch.float32)
    boxes = torch.tensor([[[0, 0, 10, 8], [6, 0, 16, 8], [0, 0, 0, 0]],
                          [[0, 0, 15, 14], [1, 1, 16, 16], [17, 9, 32, 16]]], dtype=torch.float32)
    labels = torch.tensor([[0, 1, -1], [2, 3, 4]])
    # Image 0, box [0,0,10,8] (centre 5,4): candidates anchors 0, 1 (nearest two of A) and 4, 5 (all of B), IoUs
    # 64/80 = 0.8, 16/128 = 0.125, 80/256 = 0.3125, 0: mean 0.309, std 0.351, threshold 0.661 -> anchor 0 only.
    # Box [6,0,16,8] is its mirror image -> anchor 1 only.
    # Image 1, box [0,0,15,14]: IoUs 0.305 (a0), 0.257 (a1), 210/256 = 0.820 (a4), 0 (a5): threshold 0.689 -> a4.
    # Box [1,1,16,16]: 0.204, 0.240, 225/256 = 0.879, 0: threshold 0.70 -> a4 too; a4 goes to the higher IoU,
    # label 3, and box 2 keeps no anchor (ATSS forces none). Box [17,9,32,16]: only a5 overlaps it (IoU 0.41
    # above the threshold 0.31), but a5's centre (24, 8) lies above the box's top edge y = 9 -> no positive.
    class_targets, box_targets, positives = atss_match(anchors, boxes, labels, locations_per_level=[4, 2],
                                                       anchors_per_location=1, topk=2)
    assert class_targets.tolist() == [[0, 1, -1, -1, -1, -1], [-1, -1, -1, -1, 3, -1]]
    assert positives.tolist() == [2.0, 1.0]
    torch.testing.assert_close(box_targets[1, 4], torch.tensor(_encode([1, 1, 16, 16], [0, 0, 16, 16])).float())
    # The same with box [1,1,16,16] a crowd box: a4 goes to box [0,0,15,14] (label 2); a0 and a1 lie mostly inside
    # the crowd box (49/64, 56/64 of their area) and are ignored; a2, a3, a5 do not touch it.
    crowd = torch.tensor([[False, False, False], [False, True, False]])
    class_targets, _, positives = atss_match(anchors, boxes, labels, crowd, locations_per_level=[4, 2],
                                             anchors_per_location=1, topk=2)
    assert class_targets[1].tolist() == [-2, -2, -1, -1, 2, -1] and positives.tolist() == [2.0, 1.0]


# ------------------------------------------------------------------------------- GIoU / CIoU: hand numbers

# (predicted box, target box, GIoU loss, CIoU loss), worked by hand:
# 1) two 4x4 squares offset by (2, 2): inter 4, union 28, IoU 1/7; enclosing box 6x6 = 36, so GIoU loss
#    1 - 1/7 + (36 - 28)/36; centres 2*sqrt(2) apart (rho^2 = 8), enclosing diagonal^2 = 72; same aspect (v = 0).
# 2) 2x4 against 4x2 at the origin: inter 4, union 12, IoU 1/3; enclosing 4x4 = 16; rho^2 = 1 + 1 = 2,
#    diagonal^2 = 32; v = 4/pi^2 (atan(4/2) - atan(2/4))^2, alpha = v / (1 - IoU + v).
# 3) disjoint 2x2 squares 2 px apart: IoU 0; enclosing 6x2 = 12, union 8; rho^2 = 16, diagonal^2 = 36 + 4.
_V2 = 4 / math.pi ** 2 * (math.atan(2.0) - math.atan(0.5)) ** 2
PAIRS = [
    ([0, 0, 4, 4], [2, 2, 6, 6], 1 - 1 / 7 + 8 / 36, 1 - 1 / 7 + 8 / 72),
    ([0, 0, 2, 4], [0, 0, 4, 2], 1 - 1 / 3 + 4 / 16, 1 - 1 / 3 + 2 / 32 + _V2 / (2 / 3 + _V2) * _V2),
    ([0, 0, 2, 2], [4, 0, 6, 2], 1 + 4 / 12, 1 + 16 / 40),
]


def _loss_inputs():
    """One flat part: 3 positive anchors (the pairs, each on its own anchor) and 2 others with wild codes."""
    anchors = torch.tensor([[0, 0, 4, 4], [1, 1, 3, 3], [0, 0, 3, 3], [10, 10, 20, 20], [5, 5, 6, 6]],
                           dtype=torch.float32)
    predicted = torch.tensor([p for p, _, _, _ in PAIRS], dtype=torch.float32)
    target = torch.tensor([t for _, t, _, _ in PAIRS], dtype=torch.float32)
    codes = torch.cat([encode_boxes(predicted, anchors[:3]), torch.tensor([[50.0, -50.0, 90.0, -200.0]] * 2)])
    targets = torch.cat([encode_boxes(target, anchors[:3]), torch.zeros(2, 4)])
    class_targets = torch.tensor([[0, 1, 0, -1, -2]])
    logits = torch.zeros(1, 5, 2)
    return logits, codes.unsqueeze(0), class_targets, targets.unsqueeze(0), anchors


@pytest.mark.parametrize("kind,column", [("giou", 2), ("ciou", 3)])
@pytest.mark.parametrize("weight", [2.0, 0.5])
def test_iou_losses_equal_hand_computed_values(kind, column, weight):
    logits, codes, class_targets, targets, anchors = _loss_inputs()
    codes.requires_grad_(True)
    # 3 positives in the batch, normalised by P + 1 = 4 (another image's positives count too: P = 3 + 2)
    losses = detection_loss([logits], [codes], [class_targets], [targets], torch.tensor([3.0]), box_loss=kind,
                            iou_weight=weight, anchors=[anchors])
    expected = weight * sum(row[column] for row in PAIRS) / 4.0
    assert losses["box_loss"].item() == pytest.approx(expected, rel=1e-5)
    losses["box_loss"].backward()
    assert torch.isfinite(codes.grad).all() and (codes.grad[0, 3:] == 0).all() and (codes.grad[0, :3] != 0).any()
    more = detection_loss([logits], [codes], [class_targets], [targets], torch.tensor([3.0, 2.0]), box_loss=kind,
                          iou_weight=weight, anchors=[anchors])
    assert more["box_loss"].item() == pytest.approx(expected * 4 / 6, rel=1e-5)
    assert more["class_loss"].item() == pytest.approx(losses["class_loss"].item() * 4 / 6, rel=1e-6)


def test_iou_loss_is_float32_under_half_precision_and_per_level_parts_add_up():
    logits, codes, class_targets, targets, anchors = _loss_inputs()
    whole = detection_loss([logits], [codes], [class_targets], [targets], torch.tensor([3.0]), box_loss="ciou",
                           anchors=[anchors])
    parts = detection_loss([logits[:, :2], logits[:, 2:]], [codes[:, :2].bfloat16(), codes[:, 2:].bfloat16()],
                           [class_targets[:, :2], class_targets[:, 2:]], [targets[:, :2], targets[:, 2:]],
                           torch.tensor([3.0]), box_loss="ciou", anchors=[anchors[:2], anchors[2:]])
    assert parts["box_loss"].dtype == torch.float32
    assert parts["box_loss"].item() == pytest.approx(whole["box_loss"].item(), rel=2e-2)  # bf16 codes
    with pytest.raises(ValueError, match="anchors"):
        detection_loss([logits], [codes], [class_targets], [targets], torch.tensor([3.0]), box_loss="giou")


def test_huber_path_is_unchanged():
    logits, codes, class_targets, targets, anchors = _loss_inputs()
    codes = codes.clamp(-3, 3)
    default = detection_loss([logits], [codes], [class_targets], [targets], torch.tensor([3.0]))
    named = detection_loss([logits], [codes], [class_targets], [targets], torch.tensor([3.0]), box_loss="huber",
                           iou_weight=7.0, anchors=[anchors])
    assert torch.equal(default["box_loss"], named["box_loss"])
    assert torch.equal(default["class_loss"], named["class_loss"])
    # written out: 50 * sum over the positives' 4 codes of Huber(delta 0.1) / (4 * (P + 1))
    diff = (codes - targets)[class_targets >= 0].abs()
    huber = torch.where(diff < 0.1, 0.5 * diff ** 2, 0.1 * (diff - 0.05)).sum()
    assert default["box_loss"].item() == pytest.approx(50.0 * huber.item() / 16.0, rel=1e-6)


# ------------------------------------------------------------------------------- the detector, wired

def _tiny(**options):
    return build_detector("efficientdet-d0", 3, width=16, repeats=1, head_depth=1, drop_path=0.0, **options)


def test_detector_loss_per_level_equals_the_flat_computation():
    torch.manual_seed(0)
    net = _tiny(assigner="atss", atss_topk=5, box_loss="ciou", iou_weight=1.5).train()
    images = torch.randn(2, 3, SIZE, SIZE)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0], [30.0, 30.0, 120.0, 70.0]]),
                "labels": torch.tensor([2, 0]), "iscrowd": torch.tensor([False, True])},
               {"boxes": torch.tensor([[64.0, 8.0, 100.0, 40.0]]), "labels": torch.tensor([1])}]
    losses = net(images, targets)
    class_out, box_out, anchors = net.forward_raw(images)  # BatchNorm in train mode: the same batch statistics
    sizes = feature_sizes((SIZE, SIZE), range(3, 8))
    boxes, labels, crowd = pad_targets(targets, anchors.device)
    class_targets, box_targets, positives = atss_match(anchors, boxes, labels, crowd, anchors_per_location=9,
                                                       locations_per_level=[h * w for h, w in sizes], topk=5)
    flat = detection_loss([class_out], [box_out], [class_targets], [box_targets], positives, box_loss="ciou",
                          iou_weight=1.5, anchors=[anchors])
    torch.testing.assert_close(losses["box_loss"], flat["box_loss"])
    torch.testing.assert_close(losses["class_loss"], flat["class_loss"])
    assert losses["box_loss"] > 0
    with pytest.raises(ValueError, match="assigner"):
        _tiny(assigner="nearest")
    with pytest.raises(ValueError, match="box_loss"):
        _tiny(box_loss="l1")


def test_build_model_reads_the_keys(tmp_path):
    from tasks.config import load
    from tasks.detection.model import build_model

    cfg = load("configs/demo/detection.yaml", ["model.detection.assigner=atss", "model.detection.atss_topk=4",
                                               "loss.box_loss=giou", "loss.iou_weight=3.0",
                                               f"data.root={tmp_path}", "model.detection.width=16"])
    net = build_model(cfg).net
    assert (net.assigner, net.atss_topk) == ("atss", 4)
    assert (net.loss_options["box_loss"], net.loss_options["iou_weight"]) == ("giou", 3.0)


def test_atss_giou_training_lowers_the_loss(tmp_path):
    from tasks.config import load
    from tasks.data import build_loaders
    from tasks.data.synthetic.detection import write_coco
    from tasks.detection.model import build_model

    root = write_coco(tmp_path / "coco", train_images=8, val_images=2, min_size=96, max_size=128, seed=1)
    cfg = load("configs/demo/detection.yaml", [
        f"data.root={root}", "data.image_size=128", "data.batch_size=4", "data.workers=0", "data.check=off",
        "data.augment.hflip=0", "data.augment.scale_min=1", "data.augment.scale_max=1", "train.device=cpu",
        "model.detection.assigner=atss", "loss.box_loss=giou", "model.detection.width=32",
        "model.detection.repeats=1", "model.detection.head_depth=2"])
    torch.manual_seed(0)
    task = build_model(cfg).train()
    batches = list(build_loaders(cfg, ["train"])["train"])
    optimizer = torch.optim.AdamW(task.parameters(), lr=2e-3)
    start, history = time.perf_counter(), []
    for step in range(40):
        images, targets = batches[step % len(batches)]
        losses = task(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(task.parameters(), 10.0)
        optimizer.step()
        history.append([losses["class_loss"].item(), losses["box_loss"].item()])
    history = np.array(history)
    first, last = history[:4].mean(0), history[-4:].mean(0)
    assert np.isfinite(history).all()
    assert last.sum() < 0.6 * first.sum() and last[1] < first[1], (first, last, time.perf_counter() - start)
