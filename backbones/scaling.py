"""What a compound coefficient ``phi`` means: one rule for every phi (issue 14, "One phi").

``rule="table"`` (the default everywhere: ``backbones.get_preset``/``create``, ``heads.efficientdet_preset``
and a config's ``model.phi``):

* an integral phi in 0..7 is the published row: B_phi (Tan & Le 2019, Table 1) and D_phi (the released
  EfficientDet configs);
* a fractional phi between two rows interpolates them in the compound-scaling form: width, depth and
  resolution (BiFPN width, input size) grow geometrically between the neighbouring rows, i.e. by a
  constant factor per unit of phi; counts (BiFPN repeats, head depth) and dropout linearly, then rounded;
* below 0 the paper's closed form continues from B0/D0 (each row 0 *is* the rule at 0);
* above 7 the B7/D7 rows grow by the rules' factors per unit of phi beyond 7.

So the knob is continuous and monotone in phi: every size is non-decreasing, through the integers too.
The papers' closed forms (depth 1.2^phi, width 1.1^phi, resolution 224 * 1.15^phi; BiFPN width 64 * 1.35^phi,
repeats 3 + phi, head depth 3 + floor(phi / 3), input 512 + 128 phi) agree with the tables at 0 and 1 only,
so switching between table and rule at the integers would make phi = 2.95 larger than phi = 3. The closed
form stays available as ``rule="paper"``.

This module holds the arithmetic for the B rows and the generic pieces (constants, :func:`geometric`,
:func:`round_half_up`, :func:`check_rule`) that :mod:`heads.efficientdet` uses for the D rows.
"""

from __future__ import annotations

import math

from .specs import PRESETS, Preset

__all__ = ["ALPHA_DEPTH", "BETA_WIDTH", "GAMMA_RESOLUTION", "BIFPN_WIDTH_GROWTH", "LAST_NAMED", "RULES",
           "check_rule", "geometric", "linear", "round_half_up", "named_phi", "compound_preset", "table_preset",
           "preset_at"]

# Compound-scaling constants per unit of phi (Tan & Le 2019, section 3.3).
ALPHA_DEPTH, BETA_WIDTH, GAMMA_RESOLUTION = 1.2, 1.1, 1.15
# BiFPN width growth per unit of phi (Tan, Pang & Le 2020, eq. 1).
BIFPN_WIDTH_GROWTH = 1.35
# The last phi with a published B and D row (B7, D7); past it the rows grow by the rules' factors.
LAST_NAMED = 7
RULES = ("table", "paper")

# B0's dropout and its growth per unit of phi in the closed form, kept within [0.1, 0.5].
_DROPOUT_BASE, _DROPOUT_STEP, _DROPOUT_RANGE = 0.2, 0.05, (0.1, 0.5)


def check_rule(rule: str) -> str:
    """``rule`` if it is one of :data:`RULES`, else a ValueError naming the valid ones."""
    if rule not in RULES:
        raise ValueError(f"unknown phi rule {rule!r}; expected one of {', '.join(map(repr, RULES))}")
    return rule


def geometric(a: float, b: float, fraction: float) -> float:
    """The point ``fraction`` (0..1) of the way from ``a`` to ``b`` on a log scale: a^(1-f) * b^f."""
    return a ** (1 - fraction) * b**fraction


def linear(a: float, b: float, fraction: float) -> float:
    """The point ``fraction`` (0..1) of the way from ``a`` to ``b``."""
    return a + (b - a) * fraction


def round_half_up(value: float) -> int:
    """The nearest integer, halves up (4.5 -> 5, where Python's ``round`` gives 4)."""
    return math.floor(value + 0.5)


def named_phi(phi: float) -> int | None:
    """The published row an integral ``phi`` in 0..:data:`LAST_NAMED` names, else None."""
    phi = float(phi)
    if phi.is_integer() and 0 <= phi <= LAST_NAMED:
        return int(phi)
    return None


def _check_phi(phi) -> float:
    value = float(phi)
    if not math.isfinite(value):
        raise ValueError(f"efficientnet: phi must be a finite number, got {phi!r}")
    return value


def _round_resolution(resolution: float) -> int:
    """A resolution to a multiple of 8 (the nearest one)."""
    return round(resolution / 8) * 8


def _b_row(index: int) -> Preset:
    return PRESETS[f"efficientnet-b{index}"]


def compound_preset(phi: float | None = None, width: float | None = None, depth: float | None = None) -> Preset:
    """The paper's closed form for the free-coefficient family ``efficientnet``: any real ``phi``
    (negative too), or explicit ``width``/``depth`` multipliers.

    With ``phi``: width 1.1^phi, depth 1.2^phi, resolution 224 * 1.15^phi (to a multiple of 8, at least
    32), dropout 0.2 + 0.05 phi kept within [0.1, 0.5]. With ``width``/``depth`` (each 1 when left out):
    B0's resolution and dropout. This is ``rule="paper"``; :func:`preset_at` picks the rule.
    """
    if phi is None and width is None and depth is None:
        raise ValueError("efficientnet: give phi=<float> or width=/depth= multipliers (e.g. phi=2.5)")
    if phi is not None and (width is not None or depth is not None):
        raise ValueError("efficientnet: give either phi or width/depth, not both")
    if phi is not None:
        phi = _check_phi(phi)
        width, depth = BETA_WIDTH**phi, ALPHA_DEPTH**phi
        resolution = max(32, _round_resolution(224 * GAMMA_RESOLUTION**phi))
        low, high = _DROPOUT_RANGE
        dropout = min(high, max(low, round(_DROPOUT_BASE + _DROPOUT_STEP * phi, 3)))
        name = f"efficientnet(phi={phi:g})"
    else:
        width = 1.0 if width is None else float(width)
        depth = 1.0 if depth is None else float(depth)
        if width <= 0 or depth <= 0:
            raise ValueError(f"efficientnet: width and depth must be > 0, got width={width}, depth={depth}")
        resolution, dropout = 224, _DROPOUT_BASE
        name = f"efficientnet(width={width:g}, depth={depth:g})"
    return Preset(name=name, family="v1", width=width, depth=depth, resolution=resolution, dropout=dropout)


def table_preset(phi: float) -> Preset:
    """The backbone at ``phi`` under ``rule="table"`` (see the module docstring).

    An integral phi in 0..7 returns the published preset itself (``efficientnet-bN``, with B5+'s TF
    BatchNorm settings). Otherwise a ``Preset`` named ``efficientnet(phi=...)`` with PyTorch's BatchNorm
    defaults, width and depth rounded to 4 decimals, resolution to a multiple of 8 and dropout to 3
    decimals: between rows N and N+1 (fraction f) width, depth and resolution are geometric and dropout
    linear; above 7, B7's width, depth and resolution times 1.1, 1.2 and 1.15 per unit of phi past 7 (its
    dropout unchanged); below 0, :func:`compound_preset`.
    """
    phi = _check_phi(phi)
    named = named_phi(phi)
    if named is not None:
        return _b_row(named)
    if phi < 0:  # B0 is the closed form at phi 0: the closed form continues below it
        return compound_preset(phi=phi)
    if phi > LAST_NAMED:
        top, extra = _b_row(LAST_NAMED), phi - LAST_NAMED
        width, depth = top.width * BETA_WIDTH**extra, top.depth * ALPHA_DEPTH**extra
        resolution, dropout = top.resolution * GAMMA_RESOLUTION**extra, top.dropout
    else:
        index = math.floor(phi)
        low, high, fraction = _b_row(index), _b_row(index + 1), phi - index
        width, depth = geometric(low.width, high.width, fraction), geometric(low.depth, high.depth, fraction)
        resolution = geometric(low.resolution, high.resolution, fraction)
        dropout = linear(low.dropout, high.dropout, fraction)
    return Preset(name=f"efficientnet(phi={phi:g})", family="v1", width=round(width, 4), depth=round(depth, 4),
                  resolution=_round_resolution(resolution), dropout=round(dropout, 3))


def preset_at(phi: float, rule: str = "table") -> Preset:
    """The ``efficientnet`` backbone at ``phi``: :func:`table_preset` for ``rule="table"``, the closed form
    :func:`compound_preset` (at every phi, integers included) for ``rule="paper"``."""
    if check_rule(rule) == "paper":
        return compound_preset(phi=phi)
    return table_preset(phi)
