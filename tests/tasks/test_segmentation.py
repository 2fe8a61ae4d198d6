"""Segmentation task: evaluator vs hand-computed and cityscapesScripts numbers, losses, inference, task protocol."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from tasks.data.errors import DataError
from tasks.data.cityscapes import CATEGORIES, CLASS_NAMES, TRAIN_TO_LABEL_ID, CityscapesDataset
from tasks.data.seg_common import collate_segmentation
from tasks.data.synthetic.segmentation import write_cityscapes
from tasks.segmentation import SegmentationTask, build_segmenter, slide_logits
from tasks.segmentation.evaluate import SegmentationEvaluator
from tasks.segmentation.losses import SegmentationLoss, ohem_cross_entropy, presence_targets


def _one_hot_logits(labels, num_classes):
    return F.one_hot(labels, num_classes).permute(0, 3, 1, 2).float()


# ------------------------------------------------------------------------------------- evaluator

def _hand_metrics(truth, pred, num_classes, ignore=255):
    """Reference IoU from a confusion matrix counted with numpy, pixel by pixel."""
    confusion = np.zeros((num_classes, num_classes), np.int64)
    for t, p in zip(truth.ravel(), pred.ravel()):
        if t != ignore:
            confusion[t, p] += 1
    ious = {}
    for c in range(num_classes):
        tp, fp, fn = confusion[c, c], confusion[:, c].sum() - confusion[c, c], confusion[c, :].sum() - confusion[c, c]
        if tp + fp + fn:
            ious[c] = tp / (tp + fp + fn)
    return confusion, ious, np.trace(confusion) / confusion.sum()


def test_miou_equals_hand_confusion_matrix():
    g = torch.Generator().manual_seed(0)
    num_classes = 7
    truth = torch.randint(0, 5, (3, 20, 30), generator=g)  # classes 5, 6 never in the truth
    truth[torch.rand(truth.shape, generator=g) < 0.2] = 255  # ignore pixels
    pred = torch.randint(0, 4, (3, 20, 30), generator=g)  # class 4 never predicted, 5 predicted once
    pred[0, 0, 1] = 5
    evaluator = SegmentationEvaluator(num_classes, class_names=list("abcdefg"))
    evaluator.update(_one_hot_logits(pred[:2], num_classes), truth[:2])
    evaluator.update(_one_hot_logits(pred[2:], num_classes), truth[2:])
    metrics = evaluator.compute()
    confusion, ious, accuracy = _hand_metrics(truth.numpy(), pred.numpy(), num_classes)
    assert np.array_equal(evaluator.confusion.numpy(), confusion)
    if truth[0, 0, 1] == 255:  # class 5 only counts where the truth is labelled
        assert 5 not in ious
    assert metrics["mIoU"] == pytest.approx(np.mean(list(ious.values())), rel=1e-12)
    assert metrics["pixel_acc"] == pytest.approx(accuracy, rel=1e-12)
    assert {k for k in metrics if k.startswith("iou/")} == {f"iou/{'abcdefg'[c]}" for c in ious}
    assert "iou/g" not in metrics  # absent from truth and prediction: left out of the mean
    for c, value in ious.items():
        assert metrics[f"iou/{'abcdefg'[c]}"] == pytest.approx(value, rel=1e-12)
    assert [name for name, value in evaluator.per_class() if value is None] == [n for c, n in enumerate("abcdefg")
                                                                               if c not in ious]


def test_predictions_resized_to_the_labels_and_cropped():
    # A 2x-downsampled prediction of a padded canvas: cropped to its valid part, resized up to the mask.
    truth = torch.zeros(1, 8, 12, dtype=torch.int64)
    truth[0, :, 6:] = 1
    low = torch.zeros(1, 2, 5, 7)  # canvas 5x7, valid 4x6, padding column/row holds class 1
    low[0, 0, :4, :3], low[0, 1, :4, 3:] = 1.0, 1.0
    low[0, 1, 4, :] = low[0, 1, :, 6] = 5.0
    evaluator = SegmentationEvaluator(2)
    evaluator.update(low, {"masks": truth, "image_size": torch.tensor([[4, 6]]), "orig_size": torch.tensor([[8, 12]])})
    assert evaluator.confusion.sum() == 96  # every label pixel at the label's resolution
    assert evaluator.compute()["mIoU"] == 1.0


def test_category_miou_and_empty_errors():
    # trainIds of one category predicted as each other: class IoU 0, category IoU 1
    flat = dict(CATEGORIES)["flat"]
    truth = torch.full((1, 4, 4), flat[0])
    evaluator = SegmentationEvaluator(19, CLASS_NAMES, categories=CATEGORIES)
    evaluator.update(_one_hot_logits(torch.full((1, 4, 4), flat[1]), 19), truth)
    metrics = evaluator.compute()
    assert metrics["mIoU"] == 0.0 and metrics["mIoU_category"] == 1.0 and metrics["iou_category/flat"] == 1.0
    with pytest.raises(DataError, match="no labelled pixels"):
        SegmentationEvaluator(3).compute()


@pytest.fixture(scope="module")
def cityscapes(tmp_path_factory):
    return write_cityscapes(tmp_path_factory.mktemp("cs"), train_per_city=1, val_per_city=3, size=(64, 128))


def test_miou_equals_cityscapes_scripts(cityscapes, tmp_path):
    if not hasattr(np, "in1d"):  # numpy >= 2.4 removed it; the evaluator still calls it
        np.in1d = np.isin
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    dataset = CityscapesDataset(cityscapes, "val")
    evaluator = SegmentationEvaluator(19, CLASS_NAMES, categories=CATEGORIES)
    g = torch.Generator().manual_seed(0)
    predictions, truths = [], []
    for i in range(len(dataset)):
        image, target = dataset[i]
        mask = target["mask"]
        pred = torch.where(mask == 255, 0, mask)
        noise = torch.rand(mask.shape, generator=g) < 0.3
        pred[noise] = torch.randint(0, 15, (int(noise.sum()),), generator=g)  # wrong classes; 15-18 absent
        # the network's output at half resolution with the true size in the targets: the evaluator upsamples
        logits = F.interpolate(_one_hot_logits(pred[None], 19), scale_factor=0.5, mode="nearest")
        up = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False).argmax(1)[0]
        batch = collate_segmentation([(image, target)], train=False)[1]
        batch["image_size"] = torch.tensor([[32, 64]])
        evaluator.update(logits, batch)
        path = tmp_path / f"{target['image_id']}_labelIds.png"
        Image.fromarray(TRAIN_TO_LABEL_ID[up].numpy().astype(np.uint8)).save(path)
        predictions.append(str(path))
        truths.append(str(dataset.pairs[i].mask))
    ours = evaluator.compute()
    args = official.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet, args.evalPixelAccuracy = False, False, True, False
    result = official.evaluateImgLists(predictions, truths, args)
    assert sum(v != v for v in result["classScores"].values()) > 16  # the 16 void ids and the absent classes
    assert ours["mIoU"] == pytest.approx(result["averageScoreClasses"], abs=1e-12)
    assert ours["mIoU_category"] == pytest.approx(result["averageScoreCategories"], abs=1e-12)
    for name in CLASS_NAMES:
        official_iou = result["classScores"][name]
        assert ours.get(f"iou/{name}", float("nan")) == pytest.approx(official_iou, nan_ok=True, abs=1e-12)


def test_predict_files_scored_by_cityscapes_scripts_equal_our_evaluator(cityscapes, tmp_path):
    # End to end: the labelId PNGs our predict path writes, scored by the official script, against our
    # evaluator on the same network through the dataset + collate path (half-size eval input).
    if not hasattr(np, "in1d"):
        np.in1d = np.isin
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    from tasks.data.transforms.segmentation import segmentation_eval_transform
    from tasks.segmentation.predict import predict_paths

    torch.manual_seed(3)
    task = SegmentationTask(build_segmenter("efficientnet-b0", 19, decoder_channels=(32, 16, 16, 8, 8)),
                            class_names=CLASS_NAMES, categories=CATEGORIES).eval()
    with torch.no_grad():  # spread the random network's predictions over several classes
        task.net.head.conv.bias.copy_(torch.linspace(-1, 1, 19))
    transform = segmentation_eval_transform("resize", (32, 64))
    dataset = CityscapesDataset(cityscapes, "val", transform)
    evaluator = task.make_evaluator()
    with torch.no_grad():
        for i in range(len(dataset)):
            images, targets = collate_segmentation([dataset[i]], train=False)
            evaluator.update(task(images), targets)
    ours = evaluator.compute()
    results = predict_paths(task, [p.image for p in dataset.pairs], tmp_path, transform,
                            label_ids=TRAIN_TO_LABEL_ID, class_names=CLASS_NAMES)
    files = [r["files"]["label_ids"] for r in results]
    assert [f.rsplit("/", 1)[1] for f in files] == [p.image.name.replace("leftImg8bit", "labelIds")
                                                   for p in dataset.pairs]
    args = official.args
    args.evalInstLevelScore, args.JSONOutput, args.quiet, args.evalPixelAccuracy = False, False, True, False
    result = official.evaluateImgLists(files, [str(p.mask) for p in dataset.pairs], args)
    assert ours["mIoU"] == pytest.approx(result["averageScoreClasses"], abs=1e-12)
    assert ours["mIoU_category"] == pytest.approx(result["averageScoreCategories"], abs=1e-12)
    assert len([k for k in ours if k.startswith("iou/")]) >= 3


def test_evaluator_under_ddp_with_an_empty_shard(tmp_path):
    import torch.multiprocessing as mp

    from tests.tasks.seg_ddp_helper import evaluate_rank

    g = torch.Generator().manual_seed(1)
    masks = torch.randint(0, 4, (2, 8, 8), generator=g)
    logits = torch.randn(2, 4, 8, 8, generator=g)
    mp.spawn(evaluate_rank, args=(2, str(tmp_path / "init"), logits, masks, str(tmp_path)), nprocs=2)
    single = SegmentationEvaluator(4)
    single.update(logits, masks)
    expected = single.compute()
    for rank in (0, 1):
        assert torch.load(tmp_path / f"rank{rank}.pt") == expected


# ---------------------------------------------------------------------------------------- losses

def test_cross_entropy_ignore_and_class_weights_by_hand():
    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 3, 4, 5, generator=g), torch.randint(0, 3, (2, 4, 5), generator=g)
    masks[0, 0] = 255
    weights = [1.0, 2.0, 0.5]
    out = SegmentationLoss(3, class_weights=weights)(logits, masks)
    log_p = torch.log_softmax(logits, 1).permute(0, 2, 3, 1).reshape(-1, 3).numpy()
    flat = masks.reshape(-1).numpy()
    keep = flat != 255
    w = np.array(weights)[flat[keep]]
    expected = -(w * log_p[keep, flat[keep]]).sum() / w.sum()
    assert out["cross_entropy"].item() == pytest.approx(expected, rel=1e-5)
    assert SegmentationLoss(3)(logits, torch.full_like(masks, 255))["cross_entropy"].item() == 0.0


def test_ohem_keeps_hard_pixels_by_hand():
    g = torch.Generator().manual_seed(0)
    logits, masks = 3 * torch.randn(1, 4, 6, 6, generator=g), torch.randint(0, 4, (1, 6, 6), generator=g)
    masks[0, :2] = 255
    prob = torch.softmax(logits, 1)[0].permute(1, 2, 0).reshape(-1, 4).numpy()
    flat = masks.reshape(-1).numpy()
    valid = np.flatnonzero(flat != 255)
    p_true = prob[valid, flat[valid]]
    ce = -np.log(p_true)
    for thresh, min_kept in [(0.7, 5), (0.05, 10), (0.99, 1000)]:
        floor = np.sort(p_true)[min(min_kept, len(p_true) - 1)]
        kept = p_true < max(thresh, floor)
        expected = ce[kept].mean()
        got = ohem_cross_entropy(logits, masks, thresh, min_kept).item()
        assert got == pytest.approx(expected, rel=1e-5)
        assert kept.sum() >= min(min_kept, len(p_true) - 1)


def test_weighted_sum_of_named_terms_and_aux():
    from segmentation_models_pytorch.losses import DiceLoss, FocalLoss, LovaszLoss

    g = torch.Generator().manual_seed(0)
    logits, masks = torch.randn(2, 3, 8, 8, generator=g), torch.randint(0, 3, (2, 8, 8), generator=g)
    masks[:, 0] = 255
    aux = torch.randn(2, 3, generator=g)
    loss = SegmentationLoss(3, {"cross_entropy": 1.0, "dice": 0.5, "lovasz": 0.25, "focal": 2.0}, aux_weight=0.4)
    out = loss(logits, masks, aux)
    assert set(out) == {"cross_entropy", "dice", "lovasz", "focal", "aux_presence"}
    assert out["dice"].item() == pytest.approx(0.5 * DiceLoss("multiclass", ignore_index=255)(logits, masks).item())
    assert out["lovasz"].item() == pytest.approx(0.25 * LovaszLoss("multiclass", ignore_index=255)(logits, masks).item())
    assert out["focal"].item() == pytest.approx(2.0 * FocalLoss("multiclass", ignore_index=255)(logits, masks).item())
    presence = torch.tensor([[float(c in masks[i][masks[i] != 255].tolist()) for c in range(3)] for i in range(2)])
    assert torch.equal(presence_targets(masks, 3), presence)
    assert out["aux_presence"].item() == pytest.approx(
        0.4 * F.binary_cross_entropy_with_logits(aux, presence).item())
    with pytest.raises(ValueError, match="unknown terms"):
        SegmentationLoss(3, {"iou": 1.0})


# ------------------------------------------------------------------------------------- inference

def test_sliding_window_equals_whole_image_when_one_tile_covers_it():
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 3, decoder_channels=(32, 16, 16, 8, 8)).eval()
    whole = SegmentationTask(net).eval()
    for window in [(64, 96), (80, 100)]:  # the image exactly, and larger than the image
        slide = SegmentationTask(net, inference="slide", window=window, stride=(32, 32)).eval()
        images = torch.randint(0, 256, (2, 3, 64, 96), dtype=torch.uint8)
        with torch.no_grad():
            torch.testing.assert_close(slide(images), whole(images), rtol=0, atol=0)


def test_sliding_window_averages_overlaps():
    calls = []

    def pointwise(x):  # any window gives the same per-pixel values: the average must be exact
        calls.append(tuple(x.shape[-2:]))
        return torch.stack([x[:, 0] * 2, x[:, 1] - x[:, 2]], 1)

    x = torch.randn(2, 3, 50, 70)
    out = slide_logits(pointwise, x, window=(32, 32), stride=(20, 24))
    torch.testing.assert_close(out, pointwise(x))
    assert all(shape == (32, 32) for shape in calls[:-1])
    assert len(calls) == 2 * 3 + 1  # 2 rows x 3 cols (the last ones moved back), plus the reference call


def test_flip_and_multiscale_tta():
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", 3, decoder_channels=(32, 16, 16, 8, 8)).eval()
    images = torch.randint(0, 256, (1, 3, 64, 64), dtype=torch.uint8)
    task = SegmentationTask(net, flip=True, scales=(0.5, 1.0)).eval()
    with torch.no_grad():
        x = task.normalize(images)
        passes = [net(x), net(x.flip(-1)).flip(-1)]
        half = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
        for y in (net(half), net(half.flip(-1)).flip(-1)):
            passes.append(F.interpolate(y, size=(64, 64), mode="bilinear", align_corners=False))
        torch.testing.assert_close(task(images), sum(passes) / 4)


# ---------------------------------------------------------------------------------- task protocol

def test_task_train_and_eval_protocol():
    torch.manual_seed(0)
    net = build_segmenter("efficientnet", 4, phi=-1.0, aux_classes=4, decoder_channels=(32, 16, 16, 8, 8))
    task = SegmentationTask(net, class_names=list("abcd"),
                            criterion=SegmentationLoss(4, {"cross_entropy": 1.0, "dice": 1.0}))
    images = torch.randint(0, 256, (2, 3, 48, 64), dtype=torch.uint8)
    masks = torch.randint(0, 4, (2, 48, 64))
    before = images.clone()
    losses = task.train()(images, {"masks": masks})
    assert set(losses) == {"cross_entropy", "dice", "aux_presence"} and all(v.dim() == 0 for v in losses.values())
    sum(losses.values()).backward()
    assert torch.equal(images, before)
    floats = images.float()
    task.normalize(floats)
    assert torch.equal(floats, before.float())  # normalize never writes into its input
    with torch.no_grad():
        logits = task.eval()(images)
    assert logits.shape == (2, 4, 48, 64)  # the aux logits stay inside the task in eval
    evaluator = task.make_evaluator()
    evaluator.update(logits, masks)
    assert task.primary_metric == evaluator.primary_metric == "mIoU" and "iou/a" in json.dumps(evaluator.compute())
    with pytest.raises(ValueError, match="window"):
        SegmentationTask(net, inference="slide")
