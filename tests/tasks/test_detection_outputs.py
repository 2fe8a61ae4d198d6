"""Clean detector outputs (issue 22, item 2): size codes are clamped when decoded and empty boxes never come
out of post-processing, whatever the network emits."""

from __future__ import annotations

import math

import torch

from heads.anchors import SIZE_CODE_CLIP, decode_boxes
from tasks.detection.postprocess import PostProcess, postprocess


def test_size_codes_are_clamped_as_torchvision_does():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0]])  # a 16 px anchor centred at (8, 8)
    codes = torch.tensor([[0.0, 0.0, 55.0, 55.0]])  # th, tw of 55: exp(55) would overflow any image
    boxes = decode_boxes(codes, anchors)
    assert SIZE_CODE_CLIP == math.log(1000 / 16)  # torchvision's bbox_xform_clip
    side = 16 * 1000 / 16  # the largest box: 1000/16 times the anchor
    torch.testing.assert_close(boxes, torch.tensor([[8 - side / 2, 8 - side / 2, 8 + side / 2, 8 + side / 2]]))
    small = decode_boxes(torch.tensor([[0.5, -0.25, math.log(2), 0.0]]), anchors)  # below the clip: unchanged
    # by hand: centre (8 - 0.25 * 16, 8 + 0.5 * 16) = (4, 16), size (16, 32)
    torch.testing.assert_close(small, torch.tensor([[-4.0, 0.0, 12.0, 32.0]]))


def test_empty_and_degenerate_boxes_never_come_out():
    anchors = torch.tensor([[0.0, 0.0, 16.0, 16.0], [16.0, 16.0, 32.0, 32.0], [40.0, 40.0, 56.0, 56.0]])
    # logits: every anchor scores high for class 0
    class_out = torch.full((1, 3, 2), -10.0)
    class_out[0, :, 0] = 9.6
    box_out = torch.zeros(1, 3, 4)
    box_out[0, 1, 2] = -60.0  # th -> a zero-height box
    box_out[0, 2, 1] = 10.0  # tx -> the centre moves far right: the box lies outside the 64 px image
    for nms in ("hard", "soft"):
        out = postprocess(class_out, box_out, anchors, (64, 64), PostProcess(nms=nms))[0]
        sides = out["boxes"][:, 2:] - out["boxes"][:, :2]
        assert (sides > 0).all(), (nms, out)
        # every anchor's class-1 candidate scores ~0 but is a real box; of the class-0 ones only the first is
        assert out["boxes"][out["labels"] == 0].tolist() == [[0.0, 0.0, 16.0, 16.0]], (nms, out)
