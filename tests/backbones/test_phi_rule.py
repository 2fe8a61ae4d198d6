"""One phi (issue 14): what a compound coefficient means in the Python API, against values written by hand.

The published rows (B0..B7: Tan & Le 2019, Table 1; D0..D7: the released EfficientDet configs) are typed in
here, not read from the code's tables; fractional and extrapolated values are worked out by hand in the
comments. ``rule="table"`` is the default; ``rule="paper"`` is the closed form.
"""

import itertools
import math

import pytest
import torch

import backbones
from backbones.efficientnet import EfficientNet
from heads import efficientdet_preset

# (width, depth, resolution, dropout)
B_ROWS = [(1.0, 1.0, 224, 0.2), (1.0, 1.1, 240, 0.2), (1.1, 1.2, 260, 0.3), (1.2, 1.4, 300, 0.3),
          (1.4, 1.8, 380, 0.4), (1.6, 2.2, 456, 0.4), (1.8, 2.6, 528, 0.5), (2.0, 3.1, 600, 0.5)]
# (input size, BiFPN width, BiFPN repeats, head depth); D0..D6 use B0..B6, D7 uses B6 too.
D_ROWS = [(512, 64, 3, 3), (640, 88, 4, 3), (768, 112, 5, 3), (896, 160, 6, 4), (1024, 224, 7, 4),
          (1280, 288, 7, 4), (1280, 384, 8, 5), (1536, 384, 8, 5)]
D_BACKBONES = [0, 1, 2, 3, 4, 5, 6, 6]

GRID = [k / 20 for k in range(-20, 181)]  # -1 .. 9 in steps of 0.05


def _backbone_numbers(preset):
    return preset.width, preset.depth, preset.resolution, preset.dropout


def _detector_numbers(row):
    return row.input_size, row.width, row.repeats, row.head_depth


def _detector_backbone(row):
    """The backbone preset a detector row builds (what ``build_detector`` passes to ``backbones.create``)."""
    if row.backbone != "efficientnet":
        return backbones.get_preset(row.backbone)
    return backbones.get_preset("efficientnet", phi=row.backbone_phi, **dict(row.backbone_options))


@pytest.mark.parametrize("phi", range(8))
def test_integral_phi_is_the_published_row(phi):
    width, depth, resolution, dropout = B_ROWS[phi]
    for value in (phi, float(phi)):
        preset = backbones.get_preset("efficientnet", phi=value)
        assert _backbone_numbers(preset) == (width, depth, resolution, dropout)
        assert preset == backbones.get_preset(f"efficientnet-b{phi}")  # norm settings too (TF's from B5 on)
    assert (preset.norm_eps, preset.norm_momentum) == ((1e-3, 0.01) if phi >= 5 else (1e-5, 0.1))

    row = efficientdet_preset(phi)
    assert _detector_numbers(row) == D_ROWS[phi]
    assert row.backbone == f"efficientnet-b{D_BACKBONES[phi]}" and row.backbone_phi is None
    # The published row under the paper's rule too: the integers are the table either way.
    assert efficientdet_preset(phi, rule="paper") == row


def test_fractional_backbone_interpolates_geometrically():
    preset = backbones.get_preset("efficientnet", phi=2.5)
    assert preset.width == pytest.approx(math.sqrt(1.1 * 1.2), abs=1e-4)  # 1.1489
    assert preset.depth == pytest.approx(math.sqrt(1.2 * 1.4), abs=1e-4)  # 1.2961
    assert preset.resolution == round(math.sqrt(260 * 300) / 8) * 8 == 280  # 279.3 -> 280
    assert preset.dropout == 0.3
    assert (preset.norm_eps, preset.norm_momentum) == (1e-5, 0.1)
    # A quarter of the way from B5 to B6: dropout linear, sizes geometric.
    quarter = backbones.get_preset("efficientnet", phi=5.25)
    assert quarter.width == pytest.approx(1.6**0.75 * 1.8**0.25, abs=1e-4)
    assert quarter.resolution == 472  # 456^0.75 * 528^0.25 = 473.2 -> 472
    assert quarter.dropout == pytest.approx(0.425)
    # create builds exactly that preset.
    with torch.device("meta"):
        net = backbones.create("efficientnet", phi=2.5)
    assert net.arch == preset.arch()
    assert net.name == preset.name


def test_fractional_detector_interpolates_between_rows():
    row = efficientdet_preset(2.5)
    assert row.input_size == 128 * round(math.sqrt(768 * 896) / 128) == 768  # 829.5 -> 768
    assert row.width == 136  # sqrt(112 * 160) = 133.9 -> 136 (multiple of 8)
    assert row.repeats == 6 and row.head_depth == 4  # 5.5 and 3.5, rounded half up
    assert row.backbone == "efficientnet" and row.backbone_phi == 2.5 and row.backbone_options == ()
    assert _detector_backbone(row) == backbones.get_preset("efficientnet", phi=2.5)
    assert (row.anchor_scale, row.levels, row.fusion) == (4.0, (3, 4, 5, 6, 7), "fast")
    # D6 and D7 both sit on B6: so does everything between them; anchor scale is the nearer row's (D7: 5.0).
    late = efficientdet_preset(6.5)
    assert late.backbone == "efficientnet-b6" and late.backbone_phi is None
    assert (late.input_size, late.width, late.repeats, late.head_depth) == (1408, 384, 8, 5)  # sqrt(1280 * 1536)
    assert late.anchor_scale == 5.0 and late.fusion == "sum"
    assert efficientdet_preset(6.25).anchor_scale == 4.0
    # Names work as before.
    assert efficientdet_preset("2.5") == row
    assert efficientdet_preset("d3") is efficientdet_preset("efficientdet-d3") is efficientdet_preset(3.0)


def test_beyond_the_table():
    # Above 7: B7 grown by 1.1 / 1.2 / 1.15 per unit of phi; dropout stays B7's.
    b8 = backbones.get_preset("efficientnet", phi=8)
    assert (b8.width, b8.depth, b8.resolution, b8.dropout) == (pytest.approx(2.2), pytest.approx(3.72), 688, 0.5)
    # D7 grown: 1536 + 128, 384 * 1.35 = 518.4 -> 520, 8 + 1, 5 + 1/3 -> 5; D7's backbone (B6) and anchor scale.
    d8 = efficientdet_preset(8)
    assert _detector_numbers(d8) == (1664, 520, 9, 5)
    assert d8.backbone == "efficientnet-b6" and d8.anchor_scale == 5.0 and d8.fusion == "sum"
    # Below 0: the closed form (B0 and D0 are the rule at 0).
    below = backbones.get_preset("efficientnet", phi=-1)
    assert below.width == pytest.approx(1 / 1.1) and below.depth == pytest.approx(1 / 1.2)
    assert below.resolution == 192 and below.dropout == 0.15  # 224 / 1.15 = 194.8 -> 192
    d_1 = efficientdet_preset(-1)
    assert _detector_numbers(d_1) == (384, 48, 2, 2)  # 64 / 1.35 = 47.4 -> 48; 3 + floor(-1/3) = 2
    assert d_1 == efficientdet_preset(-1, rule="paper") and d_1.backbone_phi == -1
    with pytest.raises(ValueError, match=">= -2"):
        efficientdet_preset(-2.5)


def test_paper_rule_on_request():
    b = backbones.get_preset("efficientnet", phi=2.5, rule="paper")
    assert b.width == pytest.approx(1.1**2.5) and b.depth == pytest.approx(1.2**2.5)
    assert b.resolution == 320  # 224 * 1.15^2.5 = 224 * 1.4182 = 317.7 -> 320
    d = efficientdet_preset(2.5, rule="paper")
    assert (d.input_size, d.head_depth) == (896, 3)  # 128 * (4 + 2.5), half up: 896; 3 + floor(2.5 / 3) = 3
    assert d.width == 136  # 64 * 1.35^2.5 = 135.5 -> 136
    assert d.repeats == 6  # 3 + 2.5, half up
    assert _detector_backbone(d).arch().stages == b.arch().stages
    for bad in ("closed", "Table", None):
        with pytest.raises(ValueError, match="'table', 'paper'"):
            backbones.get_preset("efficientnet", phi=2.5, rule=bad)
        with pytest.raises(ValueError, match="'table', 'paper'"):
            backbones.create("efficientnet", phi=2.5, rule=bad)
        with pytest.raises(ValueError, match="'table', 'paper'"):
            efficientdet_preset(2.5, rule=bad)


def test_width_depth_multipliers_unchanged():
    explicit = backbones.get_preset("efficientnet", width=1.2, depth=1.4)
    assert (explicit.width, explicit.depth, explicit.resolution, explicit.dropout) == (1.2, 1.4, 224, 0.2)
    assert explicit.arch().stages == backbones.get_preset("efficientnet-b3").arch().stages
    with pytest.raises(ValueError, match="either phi or width/depth"):
        backbones.get_preset("efficientnet", phi=1, width=1.2)
    with pytest.raises(ValueError, match="only to 'efficientnet'"):
        backbones.get_preset("efficientnet-b3", phi=1)


_PARAMS: dict = {}


def _params(arch) -> int:
    """Parameters of the backbone an arch builds (on the meta device; cached per arch)."""
    if arch not in _PARAMS:
        with torch.device("meta"):
            _PARAMS[arch] = sum(p.numel() for p in EfficientNet(arch).parameters())
    return _PARAMS[arch]


def _non_decreasing(values) -> bool:
    return all(a <= b for a, b in itertools.pairwise(values))


def test_every_size_grows_with_phi():
    """What ``--search phi`` bisects on: from -1 to 9 nothing shrinks, through the integers too (switching
    between the tables and the closed forms at the integers would make phi = 2.95 bigger than phi = 3)."""
    presets = [backbones.get_preset("efficientnet", phi=phi) for phi in GRID]
    for key in ("width", "depth", "resolution"):
        assert _non_decreasing([getattr(p, key) for p in presets]), key
    archs = [p.arch() for p in presets]
    for stage in range(len(archs[0].stages)):
        for key in ("repeats", "out_channels"):
            assert _non_decreasing([getattr(a.stages[stage], key) for a in archs]), (stage, key)
    assert _non_decreasing([a.stem_channels for a in archs]) and _non_decreasing([a.head_channels for a in archs])
    # Every stage wider and deeper means more parameters; built and counted on a coarser grid (each build
    # takes a while on two cores), and across every integer.
    coarse = [i for i, phi in enumerate(GRID) if (phi * 4).is_integer()]
    assert _non_decreasing([_params(archs[i]) for i in coarse])
    assert _params(archs[0]) < _params(archs[GRID.index(0.0)]) < _params(archs[-1])

    rows = [efficientdet_preset(phi) for phi in GRID]
    for key in ("input_size", "width", "repeats", "head_depth"):
        assert _non_decreasing([getattr(row, key) for row in rows]), key
    row_archs = [_detector_backbone(row).arch() for row in rows]
    for stage in range(len(row_archs[0].stages)):
        for key in ("repeats", "out_channels"):
            assert _non_decreasing([getattr(a.stages[stage], key) for a in row_archs]), (stage, key)
    assert _non_decreasing([_params(row_archs[i]) for i in coarse])
