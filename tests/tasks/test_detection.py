"""Detection targets, loss and post-processing against effdet's reference functions and hand-written ones."""

import math

import pytest
import torch

from heads.anchors import AnchorGenerator, decode_boxes, encode_boxes, feature_sizes, match_anchors
from tasks.detection import DetectionTask, build_detector, draw_detections, pad_targets, predict_paths
from tasks.detection.loss import detection_loss, focal_loss_sum
from tasks.detection.postprocess import PostProcess, postprocess

ASPECTS = [(1.0, 1.0), (1.4, 0.7), (0.7, 1.4)]


@pytest.mark.parametrize("size", [(512, 512), (320, 320), (256, 384)])
def test_anchors_equal_effdet(size):
    from effdet.anchors import Anchors

    theirs = Anchors(3, 7, 3, ASPECTS, 4.0, size).boxes[:, [1, 0, 3, 2]]  # effdet is y-x
    generator = AnchorGenerator(range(3, 8), 4.0)
    ours = generator(size, feature_sizes(size, range(3, 8)))
    assert torch.equal(ours, theirs)
    assert generator(size, feature_sizes(size, range(3, 8))) is ours  # cached


def _random_boxes(generator, batch, count, size):
    xy = torch.rand(batch, count, 2, generator=generator) * size * 0.8
    wh = torch.rand(batch, count, 2, generator=generator) * size * 0.4 + 2
    boxes = torch.cat([xy, (xy + wh).clamp(max=size)], -1)
    boxes[0, 0] = torch.tensor([10.0, 10.0, 13.0, 60.0])  # thin: no anchor reaches IoU 0.5, forced match only
    boxes[0, 1] = boxes[0, 2]  # duplicates compete for the same best anchor: the lower index wins
    return boxes


def test_matching_equals_effdet_anchor_labeler():
    from effdet.anchors import AnchorLabeler, Anchors

    size, batch, count = 256, 3, 7
    reference = Anchors(3, 7, 3, ASPECTS, 4.0, (size, size))
    labeler = AnchorLabeler(reference, 6, match_threshold=0.5)
    anchors = AnchorGenerator(range(3, 8), 4.0)((size, size), feature_sizes((size, size), range(3, 8)))
    generator = torch.Generator().manual_seed(0)
    boxes = _random_boxes(generator, batch, count, size)
    labels = torch.randint(0, 6, (batch, count), generator=generator)
    labels[0, 1], labels[0, 2] = 1, 4  # the duplicate boxes differ in class: the tie-break shows
    for image, valid in enumerate((7, 4, 0)):
        labels[image, valid:] = -1  # padding
    class_targets, box_targets, positives = match_anchors(anchors, boxes, labels)
    ref_class, ref_box, ref_positives = labeler.batch_label_anchors(
        [b[:, [1, 0, 3, 2]] for b in boxes], [torch.where(l >= 0, l + 1, -1).float() for l in labels])
    ref_class = torch.cat([c.reshape(batch, -1) for c in ref_class], 1)
    ref_box = torch.cat([b.reshape(batch, -1, 4) for b in ref_box], 1)
    assert torch.equal(class_targets, ref_class)
    torch.testing.assert_close(box_targets, ref_box, atol=1e-5, rtol=1e-5)
    assert torch.equal(positives, ref_positives)
    thin = torch.tensor([[10.0, 10.0, 13.0, 60.0]])
    from torchvision.ops import box_iou

    best = box_iou(thin, anchors).argmax()
    assert box_iou(thin, anchors).max() < 0.5 and class_targets[0, best] == labels[0, 0]


def test_crowd_boxes_are_ignored_never_positive():
    size = 256
    anchors = AnchorGenerator(range(3, 8), 4.0)((size, size), feature_sizes((size, size), range(3, 8)))
    boxes = torch.tensor([[[20.0, 20.0, 120.0, 120.0], [150.0, 150.0, 200.0, 200.0]]])
    labels = torch.tensor([[2, 1]])
    crowd = torch.tensor([[True, False]])
    class_targets, box_targets, positives = match_anchors(anchors, boxes, labels, crowd)
    inside = (anchors[:, 0] >= 20) & (anchors[:, 1] >= 20) & (anchors[:, 2] <= 120) & (anchors[:, 3] <= 120)
    assert (class_targets[0, inside] == -2).all()  # anchors inside the crowd region are ignored
    assert not (class_targets == 2).any()  # the crowd box never becomes a positive
    assert (class_targets == 1).sum() == positives[0] > 0
    assert torch.count_nonzero(box_targets[0][class_targets[0] < 0]) == 0


def test_box_coding_round_trip():
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [10.0, 20.0, 74.0, 52.0]])
    boxes = torch.tensor([[4.0, 2.0, 30.0, 40.0], [0.0, 0.0, 100.0, 60.0]])
    torch.testing.assert_close(decode_boxes(encode_boxes(boxes, anchors), anchors), boxes, atol=1e-4, rtol=0)


def _focal_reference(logits, targets, alpha=0.25, gamma=1.5):
    """The focal loss written out from its definition, element by element."""
    total = 0.0
    for n in range(logits.shape[0]):
        for a in range(logits.shape[1]):
            if targets[n, a] == -2:
                continue
            for c in range(logits.shape[2]):
                p = 1.0 / (1.0 + math.exp(-float(logits[n, a, c])))
                if targets[n, a] == c:
                    total += alpha * (1 - p) ** gamma * -math.log(p)
                else:
                    total += (1 - alpha) * p**gamma * -math.log(1 - p)
    return total


def test_focal_loss_equals_hand_written_reference():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, 4, generator=generator) * 3
    targets = torch.tensor([[0, -1, 3, -2, 1, -1], [-1, -1, 2, 2, -2, 0]])
    ours = focal_loss_sum(logits, targets)
    assert ours.item() == pytest.approx(_focal_reference(logits, targets), rel=1e-5)
    from torchvision.ops import sigmoid_focal_loss

    dense = torch.zeros_like(logits)
    valid = targets != -2
    dense[targets >= 0, targets[targets >= 0]] = 1.0
    theirs = sigmoid_focal_loss(logits[valid], dense[valid], alpha=0.25, gamma=1.5, reduction="sum")
    torch.testing.assert_close(ours, theirs)


def test_focal_loss_is_stable_in_half_precision():
    logits = torch.tensor([[[40.0, -40.0, 0.5]], [[-30.0, 30.0, 8.0]]])
    targets = torch.tensor([[1], [0]])
    reference = focal_loss_sum(logits.double(), targets)
    for dtype in (torch.bfloat16, torch.float16):
        value = focal_loss_sum(logits.to(dtype), targets)
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert value.item() == pytest.approx(reference.item(), rel=1e-2)


def test_loss_equals_effdet_detection_loss():
    from effdet.loss import loss_fn

    generator = torch.Generator().manual_seed(0)
    size, batch, classes = 128, 2, 5
    sizes = feature_sizes((size, size), range(3, 8))
    anchors = AnchorGenerator(range(3, 8), 4.0)((size, size), sizes)
    boxes = _random_boxes(generator, batch, 4, size)
    labels = torch.randint(0, classes, (batch, 4), generator=generator)
    class_targets, box_targets, positives = match_anchors(anchors, boxes, labels)
    class_maps = [torch.randn(batch, 9 * classes, h, w, generator=generator) for h, w in sizes]
    box_maps = [torch.randn(batch, 36, h, w, generator=generator) * 0.1 for h, w in sizes]
    flat = lambda maps, k: torch.cat([m.permute(0, 2, 3, 1).reshape(batch, -1, k) for m in maps], 1)  # noqa: E731
    ours = detection_loss([flat(class_maps, classes)], [flat(box_maps, 4)], [class_targets], [box_targets], positives)
    split = [h * w * 9 for h, w in sizes]
    per_level_class = [t.reshape(batch, h, w, 9) for t, (h, w) in zip(class_targets.split(split, 1), sizes)]
    per_level_box = [t.reshape(batch, h, w, 36) for t, (h, w) in zip(box_targets.split(split, 1), sizes)]
    _, class_loss, box_loss = loss_fn(class_maps, box_maps, per_level_class, per_level_box, positives,
                                      num_classes=classes, alpha=0.25, gamma=1.5, delta=0.1, box_loss_weight=50.0)
    torch.testing.assert_close(ours["class_loss"], class_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours["box_loss"], 50.0 * box_loss, rtol=1e-5, atol=1e-6)


def _soft_nms_reference(boxes, scores, classes, sigma, limit):
    from torchvision.ops import box_iou

    scores, picked, remaining = scores.clone(), [], list(range(len(scores)))
    while remaining and len(picked) < limit:
        best = max(remaining, key=lambda i: float(scores[i]))
        picked.append((best, float(scores[best])))
        remaining.remove(best)
        for i in remaining:
            if classes[i] == classes[best]:
                iou = float(box_iou(boxes[best:best + 1], boxes[i:i + 1]))
                scores[i] *= math.exp(-iou * iou / sigma)  # automl's nms_np.soft_nms
    return picked


def test_soft_nms_matches_a_plain_loop_and_hard_nms_keeps_the_limit():
    generator = torch.Generator().manual_seed(0)
    anchors = torch.tensor([[0.0, 0.0, 32.0, 32.0], [8.0, 8.0, 40.0, 40.0], [50.0, 50.0, 90.0, 80.0]])
    class_out = torch.randn(2, 3, 4, generator=generator)
    box_out = torch.randn(2, 3, 4, generator=generator) * 0.1
    settings = PostProcess(nms="soft", max_detections=7)
    soft = postprocess(class_out, box_out, anchors, (100, 100), settings)
    from tasks.detection.postprocess import select_candidates

    boxes, scores, classes = select_candidates(class_out, box_out, anchors, (100, 100), 5000)
    for i in range(2):
        expected = _soft_nms_reference(boxes[i], scores[i], classes[i], 0.5, 7)
        assert [int(classes[i, j]) for j, _ in expected] == soft[i]["labels"].tolist()
        torch.testing.assert_close(soft[i]["scores"], torch.tensor([s for _, s in expected]))
    hard = postprocess(class_out, box_out, anchors, (100, 100), PostProcess(max_detections=3))
    assert all(len(d["boxes"]) == 3 and (d["scores"][:-1] >= d["scores"][1:]).all() for d in hard)


def test_train_and_eval_contract():
    model = build_detector("efficientdet-d0", 3)
    task = DetectionTask(model)
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    before = images.clone()
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([2]),
                "iscrowd": torch.tensor([False])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    task.train()
    losses = task(images, targets)
    assert set(losses) == {"class_loss", "box_loss"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    empty = task(images, [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}] * 2)
    assert empty["box_loss"].item() == 0.0 and torch.isfinite(empty["class_loss"])
    with pytest.raises(ValueError, match="needs targets"):
        model(images.float())
    task.eval()
    with torch.no_grad():
        detections = task(images)
    assert torch.equal(images, before)  # normalisation leaves the input alone
    assert len(detections) == 2 and set(detections[0]) == {"boxes", "scores", "labels"}
    assert detections[0]["boxes"].shape == (100, 4) and detections[0]["labels"].dtype == torch.long
    assert (detections[0]["boxes"] >= 0).all() and (detections[0]["boxes"] <= 128).all()
    drawn = draw_detections(images[0], detections[0], ["a", "b", "c"], score_threshold=0.0)
    assert drawn.shape == images[0].shape and drawn.dtype == torch.uint8


def test_pad_targets_shapes():
    boxes, labels, crowd = pad_targets([{"boxes": torch.ones(2, 4), "labels": torch.tensor([0, 1])},
                                        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}],
                                       torch.device("cpu"))
    assert boxes.shape == (2, 2, 4) and labels.tolist() == [[0, 1], [-1, -1]] and crowd is None


def test_detect_and_predict_paths_map_back_to_the_original_image(tmp_path, capsys):
    import json

    from torchvision.io import encode_png

    task = DetectionTask(build_detector("efficientdet-d0", 2, max_detections=5), class_names=["a", "b"],
                         cat_ids=[4, 9])
    image = torch.randint(0, 255, (3, 90, 140), dtype=torch.uint8)
    path = tmp_path / "photo.png"
    path.write_bytes(encode_png(image).numpy().tobytes())
    detections = task.detect([image], size=(64, 128))
    boxes = detections[0]["boxes"]
    assert len(boxes) == 5 and (boxes[:, 2] <= 140).all() and (boxes[:, 3] <= 90).all()
    results = predict_paths(task, [str(path)], out=str(tmp_path / "out"), size=(64, 128), score_threshold=0.0)
    assert "photo.png: 5 detections above 0" in capsys.readouterr().out
    rows = json.loads((tmp_path / "out" / "detections.json").read_text())
    assert len(rows) == 5 and {r["category_id"] for r in rows} <= {4, 9} and len(results) == 1
    assert (tmp_path / "out" / "photo_boxes.png").stat().st_size > 0


def test_bf16_autocast_train_step():
    task = DetectionTask(build_detector("efficientdet-d0", 3)).train()
    images = torch.randint(0, 255, (2, 3, 128, 128), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[10.0, 20.0, 60.0, 90.0]]), "labels": torch.tensor([1])}] * 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = task(images, targets)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert torch.isfinite(task.net.class_net.predict.pw.weight.grad).all()
