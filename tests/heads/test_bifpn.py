"""BiFPN: node graph as effdet's, sizes read off the maps (any input size), fusion variants, dtypes."""

import math

import pytest
import torch

from heads.bifpn import BiFPN, bifpn_nodes, max_pool_down


@pytest.mark.parametrize("max_level", [7, 8])
def test_node_graph_matches_effdet(max_level):
    from effdet.config.fpn_config import get_fpn_config

    theirs = get_fpn_config("bifpn_fa", min_level=3, max_level=max_level).nodes
    ours = bifpn_nodes(3, max_level)
    assert [(n.level, n.inputs) for n in ours] == [(n["feat_level"], tuple(n["inputs_offsets"])) for n in theirs]


def test_first_cell_adapters_per_consuming_node():
    fpn = BiFPN([40, 112, 320], width=64, repeats=3)
    first = [len(node.resample) for node in fpn.cells[0].nodes]
    assert first == [0, 1, 1, 1, 1, 1, 0, 0]  # P5, P4, P3, P4, P5 raw inputs each get their own 1x1 conv
    assert all(len(node.resample) == 0 for cell in fpn.cells[1:] for node in cell.nodes)
    assert fpn.extra[0].conv is not None and fpn.extra[1].conv is None  # P6 from s32 by conv + BN, P7 pooled


def _features(height, width, channels=(40, 112, 320)):
    sizes = [(height, width)]
    for _ in range(5):
        sizes.append((math.ceil(sizes[-1][0] / 2), math.ceil(sizes[-1][1] / 2)))
    return [torch.randn(1, c, *sizes[i]) for c, i in zip(channels, (3, 4, 5))], sizes


@pytest.mark.parametrize("height, width", [(320, 320), (384, 256), (200, 333), (64, 64)])
def test_any_input_size(height, width):
    fpn = BiFPN([40, 112, 320], width=16, repeats=2).eval()
    features, sizes = _features(height, width)
    with torch.no_grad():
        out = fpn(features)
    expected = [features[0].shape[-2:], features[1].shape[-2:], features[2].shape[-2:]]
    for _ in range(2):
        expected.append(torch.Size([math.ceil(s / 2) for s in expected[-1]]))
    assert [o.shape[-2:] for o in out] == expected
    assert all(o.shape[1] == 16 for o in out)


def test_d7x_levels_and_sum_fusion_have_no_weights():
    fpn = BiFPN([48, 160, 640], width=8, repeats=1, levels=range(3, 9), fusion="sum")
    assert all(node.weights is None for node in fpn.cells[0].nodes)
    features, _ = _features(512, 512, (48, 160, 640))
    out = fpn.eval()(features)
    assert len(out) == 6 and out[-1].shape[-2:] == (2, 2)  # P8 of a 512 input


def test_fast_fusion_is_normalised_relu_weights():
    fpn = BiFPN([8, 8, 8], width=8, repeats=1).eval()
    node = fpn.cells[0].nodes[0]  # P6' <- P6, P7
    with torch.no_grad():
        node.weights.copy_(torch.tensor([2.0, -1.0]))  # relu -> [2, 0]: out = 2 * P6 / (2 + 1e-4)
        x = torch.randn(1, 8, 4, 4)
        maps = [None, None, None, x, torch.randn(1, 8, 2, 2)]
        fused = node.bn(node.conv(torch.nn.functional.silu(x * 2 / (2 + 1e-4))))
        torch.testing.assert_close(node(maps, x.shape[-2:]), fused)


def test_softmax_fusion_and_bad_arguments():
    fpn = BiFPN([40, 112, 320], width=8, repeats=1, fusion="softmax").eval()
    features, _ = _features(128, 128)
    assert len(fpn(features)) == 5
    with pytest.raises(ValueError, match="fusion"):
        BiFPN([40, 112, 320], 8, 1, fusion="mean")
    with pytest.raises(ValueError, match="consecutive"):
        BiFPN([40, 112, 320], 8, 1, levels=(3, 5, 7))


def test_bf16_fusion_runs_in_the_activation_dtype():
    fpn = BiFPN([40, 112, 320], width=8, repeats=1).eval()
    features, _ = _features(64, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fpn(features)
    assert all(o.dtype == torch.bfloat16 for o in out)


@pytest.mark.parametrize("size", [7, 8, 9, 16])
def test_same_pool_matches_tf_padding(size):
    x = torch.randn(1, 2, size, size)
    out = max_pool_down(x, "same")
    assert out.shape[-1] == math.ceil(size / 2)
    # TF SAME: the window of output i starts at 2 i - pad_before; pad_before = total // 2.
    total = max((math.ceil(size / 2) - 1) * 2 + 3 - size, 0)
    padded = torch.nn.functional.pad(x, (total // 2, total - total // 2) * 2, value=float("-inf"))
    torch.testing.assert_close(out, torch.nn.functional.max_pool2d(padded, 3, 2))
    assert max_pool_down(x, "symmetric").shape == out.shape
