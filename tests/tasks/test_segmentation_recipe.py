"""Issue 17 item 5: mmseg's Cityscapes recipe parts -- RandomCrop's cat_max_ratio, PhotoMetricDistortion,
the FCN auxiliary head on the stride-16 tap (training only) and the 160k preset."""

from __future__ import annotations

import colorsys

import pytest
import torch
import yaml
from torch.nn import functional as F
from torchvision import tv_tensors
from torchvision.transforms import v2

from heads import FCNHead
from tasks.config import ConfigError, load, resolve_preset, to_dict
from tasks.data.images import EightBitOnly
from tasks.data.transforms.segmentation import (CatMaxRatioCrop, PhotoMetricDistortion, crop_accepted,
                                                photometric_distortion, segmentation_train_transform,
                                                train_transform_for)
from tasks.segmentation import build_model
from tasks.segmentation.losses import SegmentationLoss, masked_bce

pytestmark = pytest.mark.usefixtures("one_thread")

DEMO = "demo/segmentation"
SMALL = {"unet": ["model.segmentation.decoder_channels=[32,16,16,8,8]"], "bifpn": ["model.segmentation.head=bifpn"]}


# ---------------------------------------------------------------- cat_max_ratio (mmseg RandomCrop)


def test_crop_accepted_is_mmsegs_rule():
    def crop(*counts, ignore=0):
        values = [torch.full((n,), label) for label, n in enumerate(counts)] + [torch.full((ignore,), 255)]
        return torch.cat(values).view(1, -1)

    assert crop_accepted(crop(50, 50), 0.75)
    assert not crop_accepted(crop(75, 25), 0.75)  # max / sum must be strictly below the ratio
    assert crop_accepted(crop(74, 26), 0.75)
    assert not crop_accepted(crop(100), 0.75)  # one class: len(cnt) > 1 fails, whatever the ratio
    assert not crop_accepted(crop(100), 1.0)
    assert not crop_accepted(crop(0, ignore=100), 0.75)  # all ignored: no counts
    assert crop_accepted(crop(60, 30, ignore=1000), 0.75)  # ignored pixels are not counted (60 / 90)
    assert not crop_accepted(crop(70, 10, ignore=20), 0.75)  # 70 / 80 = 0.875


def _big_region_mask() -> torch.Tensor:
    mask = torch.zeros(100, 100, dtype=torch.int64)  # class 0 covers 90%: columns 90..99 are class 1
    mask[:, 90:] = 1
    return mask


def _draws(seed: int, crop: CatMaxRatioCrop, inputs: list) -> list[dict]:
    """The windows plain v2.RandomCrop draws one after another from ``seed``: what the crop may choose from."""
    torch.manual_seed(seed)
    return [v2.RandomCrop.make_params(crop, inputs) for _ in range(11)]


def test_cat_max_ratio_redraws_crops_that_land_inside_the_big_region():
    mask = tv_tensors.Mask(_big_region_mask())
    image = tv_tensors.Image(torch.zeros(3, 100, 100, dtype=torch.uint8))
    crop = CatMaxRatioCrop((20, 20), cat_max_ratio=0.75)
    redrawn = 0
    for seed in range(40):
        draws = _draws(seed, crop, [image, mask])
        windows = [CatMaxRatioCrop.window(mask, d) for d in draws]
        passed = [i for i in range(10) if crop_accepted(windows[i], 0.75)]
        expected = passed[0] if passed else 10  # mmseg: the first of ten that passes, else the eleventh unchecked
        torch.manual_seed(seed)
        chosen = crop.make_params([image, mask])
        assert (chosen["top"], chosen["left"]) == (draws[expected]["top"], draws[expected]["left"]), seed
        if passed:
            window = CatMaxRatioCrop.window(mask, chosen)
            counts = torch.bincount(window.flatten(), minlength=2)
            assert counts.min() > 0 and counts.max() / counts.sum() < 0.75  # by hand: both classes, < 75%
            # a window accepted this way needs more than 5 of its 20 columns in 90..99: left >= 76
            assert chosen["left"] >= 76
        redrawn += expected > 0
        # the transform crops that window from image and mask alike
        torch.manual_seed(seed)
        _, out_mask = crop(image, mask)
        assert torch.equal(out_mask, CatMaxRatioCrop.window(mask, draws[expected]))
    assert redrawn >= 30  # most first draws land in the 90% region


def test_cat_max_ratio_one_takes_the_first_draw_as_randomcrop_does():
    mask = tv_tensors.Mask(_big_region_mask())
    image = tv_tensors.Image(torch.arange(3 * 100 * 100).view(3, 100, 100).to(torch.uint8))
    for seed in range(10):
        torch.manual_seed(seed)
        ours = CatMaxRatioCrop((20, 20), cat_max_ratio=1.0)(image, mask)
        torch.manual_seed(seed)
        theirs = v2.RandomCrop((20, 20), pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: 255})(image,
                                                                                                              mask)
        assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def test_cat_max_ratio_counts_padding_as_ignored():
    mask = torch.zeros(10, 10, dtype=torch.int64)  # smaller than the crop: the padding is 255
    mask[:, 7:] = 1  # 70% / 30% inside the image
    crop = CatMaxRatioCrop((16, 16), cat_max_ratio=0.75)
    image = tv_tensors.Image(torch.zeros(3, 10, 10, dtype=torch.uint8))
    for seed in range(5):
        torch.manual_seed(seed)
        params = crop.make_params([image, tv_tensors.Mask(mask)])
        window = CatMaxRatioCrop.window(mask, params)
        assert torch.equal(window, mask)  # the whole image lies inside every padded window
        torch.manual_seed(seed)
        _, out = crop(image, tv_tensors.Mask(mask))
        assert out.shape == (16, 16) and (out == 255).sum() == 16 * 16 - 100


def test_cat_max_ratio_reaches_the_pipeline_from_the_config():
    cfg = load(DEMO, ["data.augment.cat_max_ratio=0.75"])
    steps = train_transform_for(cfg).pipeline.transforms
    crop = next(step for step in steps if isinstance(step, CatMaxRatioCrop))
    assert crop.cat_max_ratio == 0.75 and crop.ignore_index == cfg.data.ignore_index
    assert crop.size == tuple(cfg.data.image_size)
    with pytest.raises(ValueError, match="cat_max_ratio"):
        CatMaxRatioCrop(8, cat_max_ratio=0.0)


# ---------------------------------------------------------------- PhotoMetricDistortion


def _constant(value: int, shape=(3, 4, 5)) -> torch.Tensor:
    return torch.full(shape, value, dtype=torch.uint8)


def test_brightness_adds_the_delta_clips_and_truncates():
    assert (photometric_distortion(_constant(100), brightness=20.7) == 120).all()  # float + delta, truncated
    assert (photometric_distortion(_constant(100), brightness=-32.0) == 68).all()
    assert (photometric_distortion(_constant(250), brightness=20.0) == 255).all()
    assert (photometric_distortion(_constant(10), brightness=-32.0) == 0).all()


def test_contrast_scales_the_values_as_mmseg():
    assert (photometric_distortion(_constant(100), contrast=1.5) == 150).all()
    assert (photometric_distortion(_constant(200), contrast=1.5) == 255).all()
    assert (photometric_distortion(_constant(101), contrast=0.5) == 50).all()  # 50.5 truncated


def _colorsys_reference(image: torch.Tensor, saturation: float = 1.0, hue: int = 0) -> torch.Tensor:
    """HSV by the standard library: S scaled and clipped at 1, H shifted by hue / 180 of a turn."""
    out = torch.empty_like(image)
    for y in range(image.shape[1]):
        for x in range(image.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*(image[:, y, x].double() / 255).tolist())
            rgb = colorsys.hsv_to_rgb((h + hue / 180) % 1.0, min(s * saturation, 1.0), v)
            out[:, y, x] = torch.tensor([round(c * 255) for c in rgb], dtype=torch.uint8)
    return out


@pytest.mark.parametrize("factor", [0.5, 0.8, 1.0, 1.3, 1.5])
def test_saturation_scales_hsv_s_against_colorsys(factor):
    image = torch.randint(0, 256, (3, 6, 7), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    ours = photometric_distortion(image, saturation=factor)
    diff = (ours.int() - _colorsys_reference(image, saturation=factor).int()).abs()
    assert diff.max() <= 1
    assert torch.equal(photometric_distortion(_constant(77), saturation=1.5), _constant(77))  # grey stays grey
    if factor == 1.0:
        assert torch.equal(ours, image)


@pytest.mark.parametrize("delta", [-18, -7, 5, 17])
def test_hue_shifts_by_delta_of_180_against_colorsys(delta):
    image = torch.randint(0, 256, (3, 6, 7), generator=torch.Generator().manual_seed(4), dtype=torch.uint8)
    ours = photometric_distortion(image, hue=delta)
    assert (ours.int() - _colorsys_reference(image, hue=delta).int()).abs().max() <= 1


def test_contrast_goes_first_or_last():
    pixel = torch.tensor([200, 100, 40], dtype=torch.uint8).view(3, 1, 1)
    first = photometric_distortion(pixel, contrast=1.4, saturation=1.5, contrast_first=True)
    last = photometric_distortion(pixel, contrast=1.4, saturation=1.5, contrast_first=False)
    assert torch.equal(first, photometric_distortion(photometric_distortion(pixel, contrast=1.4), saturation=1.5))
    assert torch.equal(last, photometric_distortion(photometric_distortion(pixel, saturation=1.5), contrast=1.4))
    assert not torch.equal(first, last)


def test_draws_each_op_with_p_half_in_mmsegs_ranges():
    torch.manual_seed(0)
    op = PhotoMetricDistortion()
    draws = [op.make_params([]) for _ in range(4000)]
    for key in ("brightness", "contrast", "saturation", "hue"):
        rate = sum(d[key] is not None for d in draws) / len(draws)
        assert abs(rate - 0.5) < 0.04, (key, rate)
    assert abs(sum(d["contrast_first"] for d in draws) / len(draws) - 0.5) < 0.04
    brightness = [d["brightness"] for d in draws if d["brightness"] is not None]
    assert -32 <= min(brightness) < -31 and 31 < max(brightness) <= 32
    for key in ("contrast", "saturation"):
        values = [d[key] for d in draws if d[key] is not None]
        assert 0.5 <= min(values) < 0.51 and 1.49 < max(values) <= 1.5
    hues = {d["hue"] for d in draws if d["hue"] is not None}
    assert hues == set(range(-18, 18))  # numpy's randint(-18, 18): 18 itself is never drawn
    assert all(isinstance(h, int) for h in hues)


def test_the_transform_changes_the_image_only_and_skips_16_bit(monkeypatch):
    fixed = {"brightness": 10.0, "contrast": None, "saturation": None, "hue": None, "contrast_first": True}
    monkeypatch.setattr(PhotoMetricDistortion, "make_params", lambda self, flat: fixed)
    transform = segmentation_train_transform(None, scale_range=None, hflip=0.0, photometric=True)
    mask = torch.randint(0, 3, (4, 5))
    image, target = transform(_constant(100), {"mask": mask})
    assert (image == 110).all() and torch.equal(target["mask"], mask)
    assert isinstance(transform.pipeline.transforms[-1], EightBitOnly)
    wide = torch.full((3, 4, 5), 3000, dtype=torch.uint16)
    image, _ = transform(wide, {"mask": mask})
    assert image.dtype == torch.float32 and (image == 3000).all()  # 16-bit values kept, not distorted


# ---------------------------------------------------------------- the FCN auxiliary head


def test_fcn_head_is_mmsegs_aux_head():
    head = FCNHead(112, 19)
    conv, bn = head.convs[0].conv, head.convs[0].bn
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (112, 256, (3, 3), None)
    assert isinstance(bn, torch.nn.BatchNorm2d) and isinstance(head.convs[0].act, torch.nn.ReLU)
    assert len(head.convs) == 1 and head.conv_cat is None
    assert isinstance(head.dropout, torch.nn.Dropout2d) and head.dropout.p == 0.1
    assert head.classifier.kernel_size == (1, 1) and head.classifier.bias is not None
    assert head.classifier.weight.std().item() == pytest.approx(0.01, rel=0.1) and not head.classifier.bias.any()
    assert head(torch.randn(2, 112, 8, 16)).shape == (2, 19, 8, 16)
    assert FCNHead(40, 5, channels=32, num_convs=2, concat_input=True)(torch.randn(1, 40, 5, 7)).shape == (1, 5, 5, 7)


def test_fcn_loss_term_by_hand():
    g = torch.Generator().manual_seed(0)
    logits, fcn = torch.randn(2, 4, 32, 48, generator=g), torch.randn(2, 4, 2, 3, generator=g)
    masks = torch.randint(0, 4, (2, 32, 48), generator=g)
    masks[:, :5] = 255
    out = SegmentationLoss(4, {"cross_entropy": 1.0}, fcn_aux_weight=0.4)(logits, masks, fcn_logits=fcn)
    resized = F.interpolate(fcn, size=(32, 48), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out["fcn_aux"], 0.4 * F.cross_entropy(resized, masks, ignore_index=255))
    torch.testing.assert_close(out["cross_entropy"], F.cross_entropy(logits, masks, ignore_index=255))
    assert "fcn_aux" not in SegmentationLoss(4)(logits, masks)
    binary = SegmentationLoss(1, {"cross_entropy": 1.0}, mode="binary", fcn_aux_weight=0.5)
    masks01 = masks.clamp(max=1).masked_fill(masks == 255, 255)
    got = binary(logits[:, :1], masks01, fcn_logits=fcn[:, :1])["fcn_aux"]
    expected = 0.5 * masked_bce(F.interpolate(fcn[:, :1], size=(32, 48), mode="bilinear"), masks01.unsqueeze(1))
    torch.testing.assert_close(got, expected)


def _task(*overrides: str, head: str = "unet"):
    torch.manual_seed(0)
    return build_model(load(DEMO, ["data.image_size=[64,64]", *SMALL[head], *overrides]))


@pytest.mark.parametrize("head", ["unet", "bifpn"])
def test_fcn_aux_in_training_only(head):
    task = _task("model.segmentation.fcn_aux=true", "loss.fcn_aux_weight=0.4", head=head)
    assert isinstance(task.fcn_head, FCNHead) and task.fcn_head.convs[0].conv.in_channels == 112  # B0's s16
    seen = {}
    task.fcn_head.register_forward_hook(lambda module, args, out: seen.update(tap=args[0], logits=out))
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    masks = torch.randint(0, 19, (2, 64, 64))
    masks[:, :, :8] = 255
    task.train()
    losses = task(images, {"masks": masks})
    assert seen["tap"].shape == (2, 112, 4, 4)  # the stride-16 tap
    resized = F.interpolate(seen["logits"].float(), size=(64, 64), mode="bilinear", align_corners=False)
    torch.testing.assert_close(losses["fcn_aux"], 0.4 * F.cross_entropy(resized, masks, ignore_index=255))
    sum(losses.values()).backward()
    assert task.fcn_head.classifier.weight.grad.abs().sum() > 0
    # eval: the main logits only, the same as without the head; the head never runs
    plain = _task(head=head)
    plain.net.load_state_dict(task.net.state_dict())
    task.eval(), plain.eval()
    seen.clear()
    with torch.no_grad():
        torch.testing.assert_close(task(images), plain(images), rtol=0, atol=0)
    assert not seen
    assert not any("fcn" in key for key in task.net.state_dict())  # model.safetensors holds net's weights
    assert any(key.startswith("fcn_head.") for key in task.state_dict())  # last.pt (resume) holds it


def test_fcn_aux_stays_out_of_exported_graphs(tmp_path):
    from tasks.export import export, prepare

    task = _task("model.segmentation.fcn_aux=true").eval()
    example = torch.randn(1, 3, 64, 64)
    module, reference, names = prepare(task, example)
    assert names == ["logits"]
    for net in (module, reference):
        assert not any(isinstance(m, FCNHead) for m in net.modules())
    result = export(task, "torchscript", tmp_path / "seg.pt", example)
    graph = torch.jit.load(str(result.path))
    assert not any("fcn" in key for key in graph.state_dict()) and result.output_names == ["logits"]


def test_fcn_aux_needs_the_s16_tap():
    with pytest.raises(ConfigError, match="model.segmentation.fcn_aux reads the backbone's s16 tap"):
        _task("model.segmentation.fcn_aux=true", "model.segmentation.bifpn_levels=[2,3]", head="bifpn")


# ---------------------------------------------------------------- presets


CITYSCAPES = ["segmentation/unet_efficientnet_cityscapes", "segmentation/bifpn_efficientnet_cityscapes",
              "segmentation/unet_efficientnet_cityscapes_160k"]


@pytest.mark.parametrize("name", CITYSCAPES)
def test_cityscapes_presets_use_cat_max_ratio_and_the_fcn_aux_head(name):
    cfg = load(resolve_preset(name))
    assert cfg.data.augment.cat_max_ratio == 0.75 and cfg.data.augment.photometric
    assert cfg.model.segmentation.fcn_aux and cfg.loss.fcn_aux_weight == 0.4


def test_160k_preset_is_the_80k_preset_on_160k_iterations():
    long, short = (load(resolve_preset(f"segmentation/unet_efficientnet_cityscapes{s}")) for s in ("_160k", ""))
    a, b = to_dict(long), to_dict(short)
    assert a.pop("train").pop("epochs") == 431 and b.pop("train").pop("epochs") == 215
    assert a == b  # everything else: the same recipe (lr policy: poly 0.9 per iteration)
    steps = 2975 // long.data.global_batch_size
    assert steps == 371 and abs(431 * steps - 160_000) < steps and abs(215 * steps - 80_000) < 2 * steps
    header = resolve_preset("segmentation/unet_efficientnet_cityscapes_160k").read_text().split("\n\n")[0]
    assert "mIoU 69.1" in header and "160k" in header and "datasets.md" in header
    assert "effdense eval segmentation/unet_efficientnet_cityscapes_160k --weights" in header
    raw = yaml.safe_load(resolve_preset("segmentation/unet_efficientnet_cityscapes_160k").read_text())
    assert raw["model"]["segmentation"]["fcn_aux"] is True


def test_160k_preset_builds_on_the_meta_device():
    cfg = load(resolve_preset("segmentation/unet_efficientnet_cityscapes_160k"), ["model.backbone_weights=null"])
    with torch.device("meta"):
        task = build_model(cfg)
    assert isinstance(task.fcn_head, FCNHead) and task.fcn_head.classifier.out_channels == 19
    assert next(task.fcn_head.parameters()).device.type == "meta"
    crop = next(step for step in train_transform_for(cfg).pipeline.transforms if isinstance(step, CatMaxRatioCrop))
    assert crop.cat_max_ratio == 0.75 and crop.size == (512, 1024)
