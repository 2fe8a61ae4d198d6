"""smp's segmentation modes (model.segmentation.mode: multiclass | binary | multilabel): losses against smp and
torch, metrics against hand counts, the mask layouts, predict's files, export / fusion, and training that learns."""

import json

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from PIL import Image
from torch.nn import functional as F

from tasks.config import ConfigError, load
from tasks.data.errors import DataError
from tasks.data.maskfolder import MaskFolderDataset, check_maskfolder
from tasks.data.seg_common import MaskError, collate_segmentation, segmentation_collate
from tasks.data.synthetic.segmentation import write_maskfolder
from tasks.data.transforms.segmentation import segmentation_train_transform
from tasks.segmentation import SegmentationTask, build_model, build_segmenter
from tasks.segmentation.evaluate import SegmentationEvaluator
from tasks.segmentation.losses import SegmentationLoss, presence_targets

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = "demo/segmentation"
TINY_DECODER = (32, 16, 16, 8, 8)


def _masks(shape, seed=0, ignore=0.15):
    g = torch.Generator().manual_seed(seed)
    masks = torch.randint(0, 2, shape, generator=g)
    masks[torch.rand(shape, generator=g) < ignore] = 255
    return masks


def _logits(shape, seed=1):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2


# -------------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("term", ["dice", "lovasz", "focal", "tversky"])
def test_binary_terms_equal_smp_in_binary_mode(term):
    logits, masks = _logits((2, 1, 12, 10)), _masks((2, 12, 10))
    ours = SegmentationLoss(1, {term: 1.0}, mode="binary")(logits, masks)[term]
    smp_class = {"dice": smp.losses.DiceLoss, "lovasz": smp.losses.LovaszLoss, "focal": smp.losses.FocalLoss,
                 "tversky": smp.losses.TverskyLoss}[term]
    theirs = smp_class("binary", from_logits=True, ignore_index=255)(logits, masks)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    # ignore pixels really leave the term: the same loss on the labelled pixels alone, without ignore_index
    valid = masks != 255
    alone = smp_class("binary", from_logits=True)(logits[:, 0][valid].view(1, 1, -1), masks[valid].view(1, 1, -1))
    torch.testing.assert_close(ours, alone, rtol=1e-5, atol=1e-6)


def test_dice_alone_equals_smp_dice_in_both_sigmoid_modes():
    for mode, channels in (("binary", 1), ("multilabel", 3)):
        logits = _logits((2, channels, 8, 8))
        masks = _masks((2, 8, 8) if mode == "binary" else (2, 3, 8, 8), ignore=0.0)
        ours = SegmentationLoss(channels, {"dice": 1.0}, mode=mode)(logits, masks)
        assert list(ours) == ["dice"]
        torch.testing.assert_close(ours["dice"], smp.losses.DiceLoss(mode, from_logits=True)(logits, masks))


@pytest.mark.parametrize("term", ["dice", "lovasz", "tversky"])
def test_multilabel_terms_equal_smp_in_multilabel_mode(term):
    logits, masks = _logits((2, 3, 10, 9)), _masks((2, 3, 10, 9))
    ours = SegmentationLoss(3, {term: 1.0}, mode="multilabel", tversky_alpha=0.3, tversky_beta=0.7)(logits, masks)
    options = {"alpha": 0.3, "beta": 0.7} if term == "tversky" else {}
    smp_class = {"dice": smp.losses.DiceLoss, "lovasz": smp.losses.LovaszLoss, "tversky": smp.losses.TverskyLoss}[term]
    theirs = smp_class("multilabel", from_logits=True, ignore_index=255, **options)(logits, masks)
    torch.testing.assert_close(ours[term], theirs, rtol=1e-6, atol=1e-7)


def test_multilabel_focal_equals_smp_and_ignores_per_channel():
    logits = _logits((2, 3, 10, 9))
    clean = _masks((2, 3, 10, 9), ignore=0.0)
    loss = SegmentationLoss(3, {"focal": 1.0}, mode="multilabel", focal_gamma=2.0)
    torch.testing.assert_close(loss(logits, clean)["focal"],
                               smp.losses.FocalLoss("multilabel", gamma=2.0)(logits, clean), rtol=1e-6, atol=1e-7)
    masks = _masks((2, 3, 10, 9))  # smp's multilabel ignore_index path fails on (N, C, H, W): ours, per channel
    single = smp.losses.FocalLoss("binary", gamma=2.0)
    expected = torch.stack([single(logits[:, c][masks[:, c] != 255], masks[:, c][masks[:, c] != 255])
                            for c in range(3)]).mean()
    torch.testing.assert_close(loss(logits, masks)["focal"], expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode,channels", [("binary", 1), ("multilabel", 3)])
def test_bce_with_pos_weight_equals_torch_on_the_unignored_pixels(mode, channels):
    logits = _logits((2, channels, 7, 6))
    masks = _masks((2, 7, 6) if mode == "binary" else (2, channels, 7, 6))
    pos_weight = [2.5] if mode == "binary" else [0.5, 2.0, 3.0]
    ours = SegmentationLoss(channels, {"bce": 1.0}, mode=mode, pos_weight=pos_weight)(logits, masks)["bce"]
    # by hand: every labelled (pixel, channel) with its channel's positive weight, one mean
    full = masks.view(2, channels, 7, 6)
    x, y, w = [], [], []
    for n in range(2):
        for c in range(channels):
            for i in range(7):
                for j in range(6):
                    if full[n, c, i, j] != 255:
                        x.append(logits[n, c, i, j])
                        y.append(float(full[n, c, i, j]))
                        w.append(pos_weight[c])
    x, y, w = torch.stack(x), torch.tensor(y), torch.tensor(w)
    expected = F.binary_cross_entropy_with_logits(x, y, pos_weight=w)
    formula = -(w * y * F.logsigmoid(x) + (1 - y) * F.logsigmoid(-x)).mean()
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ours, formula, rtol=1e-5, atol=1e-6)


def test_cross_entropy_weight_is_the_bce_weight_in_sigmoid_modes():
    logits, masks = _logits((2, 1, 6, 6)), _masks((2, 6, 6))
    presets = SegmentationLoss(1, {"cross_entropy": 0.7}, mode="binary")(logits, masks)
    explicit = SegmentationLoss(1, {"bce": 0.7}, mode="binary")(logits, masks)
    assert list(presets) == ["bce"]
    torch.testing.assert_close(presets["bce"], explicit["bce"])


def test_aux_presence_in_sigmoid_modes_marks_the_channels_with_a_positive():
    masks = torch.zeros(2, 3, 4, 4, dtype=torch.long)
    masks[0, 1, 0, 0] = 1
    masks[1, 2] = 255
    masks[1, 0, 3, 3] = 1
    assert presence_targets(masks, 3, mode="multilabel").tolist() == [[0, 1, 0], [1, 0, 0]]
    binary = torch.tensor([[[0, 255], [0, 0]], [[1, 0], [255, 0]]])
    assert presence_targets(binary, 1, mode="binary").tolist() == [[0], [1]]


@pytest.mark.parametrize("overrides,keys", [
    (["model.segmentation.mode=binary", "model.num_classes=19"], ("model.num_classes=1", "mode=binary")),
    (["model.segmentation.mode=binary", "model.num_classes=1"], ("data.format=cityscapes", "maskfolder")),
    (["loss.bce=1.0"], ("loss.bce", "multiclass")),
    (["loss.pos_weight=[2.0]"], ("loss.pos_weight", "multiclass")),
    (["data.format=maskfolder", "model.segmentation.mode=binary", "model.num_classes=1", "loss.bce=1.0"],
     ("loss.cross_entropy", "loss.bce")),
    (["data.format=maskfolder", "model.segmentation.mode=multilabel", "model.num_classes=3",
      "loss.class_weights=[1,1,1]"], ("loss.class_weights", "multilabel")),
    (["data.format=maskfolder", "model.segmentation.mode=multilabel", "model.num_classes=3", "loss.ohem=true"],
     ("loss.ohem", "multilabel")),
    (["data.format=maskfolder", "model.segmentation.mode=multilabel", "model.num_classes=3",
      "loss.pos_weight=[1.0,2.0]"], ("loss.pos_weight", "3")),
])
def test_a_loss_or_class_count_the_mode_cannot_take_is_one_config_line(overrides, keys):
    cfg = load(DEMO, ["model.backbone=efficientnet-b0", *overrides])
    with pytest.raises(ConfigError) as error:
        build_model(cfg)
    message = str(error.value)
    assert "\n" not in message and all(key in message for key in keys), message


# ------------------------------------------------------------------------------------------------- metrics

def _hand_counts(prediction, truth):
    """Per channel TP, FP, FN, TN over pixels whose truth is 0 or 1, counted pixel by pixel."""
    counts = np.zeros((prediction.shape[0], 4), np.int64)
    for c in range(prediction.shape[0]):
        for p, t in zip(prediction[c].ravel(), truth[c].ravel()):
            if t in (0, 1):
                counts[c, [0, 1, 2, 3][(0 if p else 2) + (0 if t == 1 else 1)]] += 1
    return counts


def _metrics_from(counts):
    tp, fp, fn, tn = counts.T.astype(float)
    iou = {c: tp[c] / (tp[c] + fp[c] + fn[c]) for c in range(len(tp)) if tp[c] + fp[c] + fn[c]}
    dice = {c: 2 * tp[c] / (2 * tp[c] + fp[c] + fn[c]) for c in iou}
    return iou, dice, (tp + tn).sum() / counts.sum()


def test_binary_metrics_equal_a_hand_count():
    truth = _masks((3, 9, 11), seed=4)
    logits = _logits((3, 1, 9, 11), seed=5)
    evaluator = SegmentationEvaluator(1, mode="binary", threshold=0.6)
    evaluator.update(logits[:2], truth[:2])
    evaluator.update(logits[2:], truth[2:])
    metrics = evaluator.compute()
    prediction = (torch.sigmoid(logits[:, 0]) > 0.6).numpy()
    counts = _hand_counts(prediction.reshape(1, -1), truth.numpy().reshape(1, -1))
    assert evaluator.counts.tolist() == counts.tolist()
    iou, dice, accuracy = _metrics_from(counts)
    assert metrics["mIoU"] == pytest.approx(iou[0], rel=1e-12) == metrics["iou/foreground"]
    assert metrics["mDice"] == pytest.approx(dice[0], rel=1e-12) == metrics["dice/foreground"]
    assert metrics["pixel_acc"] == pytest.approx(accuracy, rel=1e-12)


def test_multilabel_metrics_equal_a_hand_count_and_leave_absent_classes_out():
    truth = _masks((2, 4, 8, 8), seed=6)
    logits = _logits((2, 4, 8, 8), seed=7)
    truth[:, 3] = torch.where(truth[:, 3] == 255, 255, 0)  # class 3: never in the truth...
    logits[:, 3] = -5.0  # ...nor predicted: no IoU, left out of the means
    names = ["a", "b", "c", "d"]
    evaluator = SegmentationEvaluator(4, names, mode="multilabel")
    evaluator.update(logits, truth)
    metrics = evaluator.compute()
    prediction = (torch.sigmoid(logits) > 0.5).numpy().transpose(1, 0, 2, 3).reshape(4, -1)
    counts = _hand_counts(prediction, truth.numpy().transpose(1, 0, 2, 3).reshape(4, -1))
    assert evaluator.counts.tolist() == counts.tolist()
    iou, dice, accuracy = _metrics_from(counts)
    assert set(iou) == {0, 1, 2} and "iou/d" not in metrics and "dice/d" not in metrics
    assert metrics["mIoU"] == pytest.approx(np.mean(list(iou.values())), rel=1e-12)
    assert metrics["mDice"] == pytest.approx(np.mean(list(dice.values())), rel=1e-12)
    assert metrics["pixel_acc"] == pytest.approx(accuracy, rel=1e-12)
    for c in iou:
        assert metrics[f"iou/{names[c]}"] == pytest.approx(iou[c], rel=1e-12)
        assert metrics[f"dice/{names[c]}"] == pytest.approx(dice[c], rel=1e-12)
    assert "Dice" in evaluator.table().splitlines()[0]


def test_multiclass_dice_per_class_equals_a_hand_count():
    g = torch.Generator().manual_seed(8)
    truth = torch.randint(0, 4, (2, 10, 10), generator=g)
    truth[torch.rand(truth.shape, generator=g) < 0.1] = 255
    prediction = torch.randint(0, 4, (2, 10, 10), generator=g)
    evaluator = SegmentationEvaluator(4)
    evaluator.update(F.one_hot(prediction, 4).permute(0, 3, 1, 2).float(), truth)
    metrics = evaluator.compute()
    dice = []
    for c in range(4):
        labelled = truth != 255
        tp = ((prediction == c) & (truth == c)).sum().item()
        fp = ((prediction == c) & (truth != c) & labelled).sum().item()
        fn = ((prediction != c) & (truth == c)).sum().item()
        dice.append(2 * tp / (2 * tp + fp + fn))
        assert metrics[f"dice/{c}"] == pytest.approx(dice[-1], rel=1e-12)
    assert metrics["mDice"] == pytest.approx(np.mean(dice), rel=1e-12)


def test_sigmoid_evaluation_targets_scored_at_the_original_resolution():
    # Two images of different sizes on one padded canvas: the dict path equals scoring each image alone.
    g = torch.Generator().manual_seed(9)
    samples, logits = [], []
    for h, w in ((6, 8), (8, 5)):
        mask = torch.randint(0, 2, (3, h, w), generator=g)
        samples.append((torch.zeros(3, h, w, dtype=torch.uint8), {"mask": mask, "image_id": "x", "orig_size": (h, w)}))
        logits.append(torch.randn(3, h, w, generator=g))
    _, targets = collate_segmentation(samples, train=False)
    assert targets["masks"].shape == (2, 3, 8, 8) and (targets["masks"][0, :, 6:] == 255).all()
    canvas = torch.full((2, 3, 8, 8), 9.0)  # padding logits would count as positives if they were scored
    for i, lg in enumerate(logits):
        canvas[i, :, : lg.shape[1], : lg.shape[2]] = lg
    batched, alone = SegmentationEvaluator(3, mode="multilabel"), SegmentationEvaluator(3, mode="multilabel")
    batched.update(canvas, targets)
    for lg, (_, target) in zip(logits, samples):
        alone.update(lg.unsqueeze(0), target["mask"].unsqueeze(0))
    assert batched.counts.tolist() == alone.counts.tolist()


# ---------------------------------------------------------------------------------------------- data layouts

def test_maskfolder_binary_and_multilabel_layouts(tmp_path):
    binary = write_maskfolder(tmp_path / "b", train=2, val=1, mode="binary")
    image, target = MaskFolderDataset(binary, "train", 1, mode="binary")[0]
    assert target["mask"].shape == image.shape[-2:] and set(target["mask"].unique().tolist()) == {0, 1, 255}
    assert check_maskfolder(binary, 1, mode="binary") == []
    pngs = write_maskfolder(tmp_path / "m", train=2, val=1, mode="multilabel")
    stack = write_maskfolder(tmp_path / "s", train=2, val=1, mode="multilabel", stack=True)
    assert sorted(p.name for p in (pngs / "masks" / "val").iterdir()) == ["0000_0.png", "0000_1.png", "0000_2.png"]
    a = MaskFolderDataset(pngs, "train", 3, mode="multilabel")[1][1]["mask"]
    b = MaskFolderDataset(stack, "train", 3, mode="multilabel")[1][1]["mask"]
    assert a.shape == (3, 64, 96) and torch.equal(a, b)
    assert set(a.unique().tolist()) == {0, 1, 255}
    # with data.class_names the per-class files are named by the class name
    for path in sorted((pngs / "masks" / "train").iterdir()):
        path.rename(path.with_name(path.name.replace("_0.png", "_road.png").replace("_1.png", "_car.png")
                                   .replace("_2.png", "_paved.png")))
    named = MaskFolderDataset(pngs, "train", 3, mode="multilabel", class_names=["road", "car", "paved"])
    assert torch.equal(named[1][1]["mask"], a)
    (pngs / "masks" / "train" / "0001_car.png").unlink()
    problems = check_maskfolder(pngs, 3, splits=("train",), mode="multilabel", class_names=["road", "car", "paved"])
    assert any("0001.png: per-class masks missing: 0001_car.png" in p for p in problems), problems


def test_train_transform_moves_every_multilabel_channel_with_the_image():
    g = torch.Generator().manual_seed(10)
    base = torch.randint(0, 2, (30, 40), generator=g)
    image = (base * 200).to(torch.uint8).expand(3, -1, -1).contiguous()  # the image shows channel 0
    masks = torch.stack([base, 1 - base, base])
    transform = segmentation_train_transform((48, 48), (0.6, 1.4), photometric=False)
    for seed in range(5):
        torch.manual_seed(seed)
        out_image, target = transform(image, {"mask": masks, "image_id": "x", "orig_size": (30, 40)})
        out = target["mask"]
        assert out.shape == (3, 48, 48)
        labelled = out[0] != 255
        assert torch.equal(out[0], out[2]) and torch.equal(out[1] == 255, ~labelled)  # one geometry for all
        assert torch.equal(out[1][labelled], 1 - out[0][labelled])
        inside = labelled & ((out_image[0] < 20) | (out_image[0] > 180))  # away from the resized edges
        assert torch.equal(out[0][inside], (out_image[0][inside] > 100).long())


def test_sigmoid_masks_with_other_values_are_one_line_errors(tmp_path):
    root = write_maskfolder(tmp_path / "b", train=1, val=1, mode="binary")
    mask = root / "masks" / "train" / "0000.png"
    Image.fromarray(np.full((64, 96), 2, np.uint8)).save(mask)
    with pytest.raises(MaskError, match=r"0000.png: label values 2 are not 0/1; expected 0 \(background\) or 1"):
        MaskFolderDataset(root, "train", 1, mode="binary")[0]
    stack = write_maskfolder(tmp_path / "s", train=1, val=1, mode="multilabel", stack=True)
    np.save(stack / "masks" / "train" / "0000.npy", np.zeros((2, 64, 96), np.uint8))
    with pytest.raises(MaskError, match=r"0000.npy: mask has 2 channels; expected one per class"):
        MaskFolderDataset(stack, "train", 3, mode="multilabel")[0]
    with pytest.raises(ValueError, match="expected num_classes=1"):
        MaskFolderDataset(root, "train", 2, mode="binary")


def test_tiff_masks_need_tifffile_and_say_so(tmp_path, monkeypatch):
    root = write_maskfolder(tmp_path / "s", train=1, val=1, mode="multilabel", stack=True)
    array = np.load(root / "masks" / "train" / "0000.npy")
    (root / "masks" / "train" / "0000.npy").unlink()
    path = root / "masks" / "train" / "0000.tif"
    path.write_bytes(b"II*\x00")  # replaced by a real file below when tifffile is installed
    monkeypatch.setitem(__import__("sys").modules, "tifffile", None)
    with pytest.raises(DataError, match=r"0000.tif: reading TIFF masks needs the tifffile package; install it"):
        MaskFolderDataset(root, "train", 3, mode="multilabel")[0]
    monkeypatch.undo()
    tifffile = pytest.importorskip("tifffile")
    tifffile.imwrite(path, array)
    assert torch.equal(MaskFolderDataset(root, "train", 3, mode="multilabel")[0][1]["mask"],
                       torch.from_numpy(array).long())


# ------------------------------------------------------------------------------------ predict, export, fusion

def _task(mode, channels, **options):
    torch.manual_seed(0)
    net = build_segmenter("efficientnet-b0", channels, decoder_channels=TINY_DECODER)
    return SegmentationTask(net, mode=mode, **options).eval()


@pytest.mark.parametrize("mode,channels", [("binary", 1), ("multilabel", 3)])
def test_predict_writes_16bit_probabilities_masks_and_an_overlay(tmp_path, mode, channels):
    from tasks.segmentation.predict import predict_paths, predict_probabilities

    names = ["foreground"] if mode == "binary" else ["road", "car", "paved"]
    task = _task(mode, channels, class_names=names, threshold=0.5)
    image_path = tmp_path / "in" / "scene.png"
    image_path.parent.mkdir()
    image = torch.randint(0, 256, (3, 40, 52), dtype=torch.uint8)
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(image_path)
    with torch.no_grad():
        task.net.head.conv.bias.fill_(0.0)  # probabilities on both sides of the threshold
    results = predict_paths(task, [image_path], tmp_path / "out")
    probabilities = predict_probabilities(task, image)
    parts = [""] if mode == "binary" else [f"_{n}" for n in names]
    for k, part in enumerate(parts):
        stored = np.array(Image.open(tmp_path / "out" / f"scene{part}_prob.png"))
        assert stored.dtype == np.uint16 and stored.shape == (40, 52)
        # round(p * 65535), up to the last float bits of p (two forward passes): png / 65535 within half a step
        assert np.abs(stored - probabilities[k].double().numpy() * 65535).max() <= 0.5 + 0.02
        mask = np.array(Image.open(tmp_path / "out" / f"scene{part}_mask.png"))
        assert np.array_equal(mask, (probabilities[k] > 0.5).numpy().astype(np.uint8))
    assert (tmp_path / "out" / "scene_overlay.png").is_file()
    assert set(results[0]["classes"]) == set(names)
    assert set(results[0]["files"]) == {"overlay", *(f"{kind}/{n}" for kind in ("prob", "mask") for n in names)}


@pytest.mark.parametrize("mode,channels", [("binary", 1), ("multilabel", 3)])
def test_export_prepare_and_fused_inference_match_the_network(mode, channels):
    from backbones import fuse_for_inference
    from tasks.export import prepare

    task = _task(mode, channels)
    with torch.no_grad():
        for m in task.net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    deploy, reference, names = prepare(task, images, include_normalization=True)
    assert names == ["logits"]
    with torch.no_grad():
        expected = reference(images)
        assert expected.shape == (2, channels, 64, 64)
        torch.testing.assert_close(deploy(images), expected, rtol=1e-4, atol=1e-4)
        x = task.normalize(images)
        torch.testing.assert_close(fuse_for_inference(task.net, x)(x), task.net(x), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------- training learns

@pytest.mark.parametrize("mode,channels", [("binary", 1), ("multilabel", 3)])
def test_a_short_run_learns_in_the_sigmoid_modes(tmp_path, mode, channels):
    # ~5 s each on one CPU thread: 30 steps of a small U-Net on the synthetic scenes (binary: the road)
    root = write_maskfolder(tmp_path / mode, train=16, val=4, size=(48, 64), mode=mode)
    torch.manual_seed(0)
    transform = segmentation_train_transform((48, 48), (0.75, 1.25), photometric=False)
    train = MaskFolderDataset(root, "train", channels, transform, mode=mode)
    val = MaskFolderDataset(root, "val", channels, mode=mode)
    task = SegmentationTask(build_segmenter("efficientnet-b0", channels, decoder_channels=TINY_DECODER), mode=mode,
                            criterion=SegmentationLoss(channels, {"bce": 1.0, "dice": 1.0}, mode=mode))
    optimizer = torch.optim.AdamW(task.parameters(), lr=3e-3, weight_decay=0.01)
    loader = torch.utils.data.DataLoader(train, batch_size=8, shuffle=True, collate_fn=segmentation_collate(True))
    losses = []
    for _ in range(15):
        task.train()
        for images, targets in loader:
            loss = sum(task(images, targets).values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    task.eval()
    evaluator = task.make_evaluator()
    with torch.no_grad():
        for i in range(len(val)):
            images, targets = collate_segmentation([val[i]], train=False)
            evaluator.update(task(images), targets)
    metrics = evaluator.compute()
    masks = torch.stack([val[i][1]["mask"].reshape(channels, -1) for i in range(len(val))], 1).reshape(channels, -1)
    share = ((masks == 1).sum(1) / (masks != 255).sum(1)).max().item()  # "everything positive" scores this IoU
    assert np.mean(losses[-4:]) < 0.6 * np.mean(losses[:4]), losses
    assert metrics["mIoU"] > max(0.6, 2 * share), (metrics, share)


@pytest.mark.slow
def test_demo_learns_in_binary_mode(tmp_path, capsys, monkeypatch):
    # ~45 s: the CLI demo on the synthetic mask folder, which the demo writes with 0/1 road masks in binary mode
    from tasks.cli import main

    monkeypatch.chdir(tmp_path)
    overrides = ["model.segmentation.mode=binary", "train.progress=false"]  # the demo picks the mode's data
    assert main(["demo", "segmentation", "--output", str(tmp_path / "run"),
                 *[arg for item in overrides for arg in ("--set", item)]]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    root = tmp_path / "runs" / "demo-data" / "segmentation-binary"
    masks = np.stack([np.array(Image.open(p)) for p in sorted((root / "masks" / "val").glob("*.png"))])
    assert set(np.unique(masks)) == {0, 1, 255}
    share = (masks == 1).sum() / (masks != 255).sum()  # the IoU of "everything is road"
    assert metrics["iou/road"] == metrics["mIoU"] >= max(0.6, 2 * share) and metrics["mDice"] >= 0.75, metrics
