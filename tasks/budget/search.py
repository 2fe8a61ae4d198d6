"""``search_phi``: the largest free compound coefficient meeting every limit, found by bisection.

The search is bounded: it never goes above ``max_phi`` (default ``MAX_SEARCH_PHI`` = 8, the largest
published row, B8; a detector at phi 8 is already larger than D7x). When every phi up to the bound fits,
it stops there and says so ("every scale up to phi 8 fits; the limit is not binding").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import BudgetError
from .measure import measure_scale
from .rows import (
    BudgetResult,
    Limits,
    Row,
    RowLog,
    check_measurable,
    device_type,
    measure_row,
    minutes_settings,
    phi_scale,
    why_not,
)

__all__ = ["PhiSearch", "search_phi", "MAX_SEARCH_PHI", "PHI_STEP"]

PHI_STEP = 0.05
MAX_SEARCH_PHI = 8.0  # the largest published row (B8); --max-phi moves it


@dataclass
class PhiSearch:
    """The largest phi (a multiple of ``PHI_STEP``) meeting every limit, and each phi measured."""

    phi: float
    override: str  # "--set model.phi=2.35 --set model.scale=null" (+ data.image_size when it changed)
    result: BudgetResult


def search_phi(cfg, limits: Limits, low: float = 0.0, high: float | None = None, *, step: float = PHI_STEP,
               measure: Callable | None = None, device: torch.device | str | None = None,
               runs: int | None = None, image_size: str | tuple[int, int] | None = None,
               progress: bool = True, max_phi: float | None = None, out_dir: str | Path | None = None,
               minutes: float | None = None) -> PhiSearch:
    """Bisect the compound coefficient on multiples of ``step`` in [``low``, ``high``] (default high:
    7 on CUDA, 2 on CPU; widened by doubling while its top still fits, up to ``max_phi``, default
    ``MAX_SEARCH_PHI``) for the largest model meeting every limit, assuming cost grows with phi.
    Every phi returned was measured and fits. Raises :class:`BudgetError` when ``low`` does not fit.
    With ``out_dir``, ``budget.json`` there is rewritten after every phi measured (``complete: false``);
    ``minutes``: each row also gets the steps and images that fit in them (``tasks.budget`` module doc)."""

    kind = device_type(cfg, device)
    check_measurable(limits, kind)
    if not limits.given():
        raise BudgetError("--search phi needs at least one limit (--latency-ms, --memory-gb or --min-throughput)")
    bound = MAX_SEARCH_PHI if max_phi is None else float(max_phi)
    ceiling = math.floor(bound / step + 1e-9)  # the bound on the grid
    high = (7.0 if kind == "cuda" else 2.0) if high is None else high
    measure = measure or (lambda c: measure_scale(c, device=device, runs=runs))
    lo, hi = round(low / step), min(round(high / step), ceiling)
    if hi <= lo:
        what = f"--max-phi {bound:g} is not above" if ceiling <= lo else "the range is empty at"
        raise BudgetError(f"--search phi: {what} phi {low:g}, where the search starts")
    settings = {"runs": runs, "image_size": image_size, "search": "phi", "step": step,
                "max_phi": round(ceiling * step, 4), **minutes_settings(cfg, minutes)}
    rows: dict[int, Row] = {}

    def ordered() -> list[Row]:
        return [rows[k] for k in sorted(rows)]

    log = RowLog(BudgetResult(cfg.model.task, kind, limits, [], None, "", settings, complete=False),
                 progress=progress, desc="phi search", total=math.ceil(math.log2(hi - lo + 1)) + 2, out_dir=out_dir)

    def fits(k: int) -> bool:
        rows[k] = measure_row(cfg, phi_scale(k * step), limits, measure, image_size, log, minutes=minutes)
        log.finished(rows[k], ordered())
        return rows[k].fits

    top_fits = False
    try:
        if not fits(lo):
            result = BudgetResult(cfg.model.task, kind, limits, [rows[lo]], None, why_not(rows[lo]), settings)
            raise BudgetError(f"no scale fits: {why_not(rows[lo])}", result)
        while fits(hi):  # the top of the range fits: widen it (doubling), never past the bound
            lo = hi
            if hi >= ceiling:
                top_fits = True
                break
            hi = min(ceiling, max(hi * 2, hi + round(1 / step)))
        while hi - lo > 1:
            middle = (lo + hi) // 2
            lo, hi = (middle, hi) if fits(middle) else (lo, middle)
    finally:
        log.close()
    chosen = sorted(rows).index(lo)
    if top_fits:
        limit_word = "the limit is" if len(limits.given()) == 1 else "the limits are"
        stopped_by = (f"nothing: every scale up to phi {ceiling * step:g} fits; {limit_word} not binding "
                      f"(the bound of the search; --max-phi moves it)")
    else:
        stopped_by = why_not(next(rows[k] for k in sorted(rows) if k > lo))
    result = BudgetResult(cfg.model.task, kind, limits, ordered(), chosen, stopped_by, settings)
    phi = round(lo * step, 4)
    return PhiSearch(phi, " ".join(f"--set {arg}" for arg in rows[lo].set_args), result)
