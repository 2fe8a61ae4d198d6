"""Fit the model to the hardware: measure each scale, pick the largest that meets every limit.

``run_budget(cfg, Limits(latency_ms=20))`` builds the config's task at each scale in turn (B0..B7 for
classification and segmentation, D0..D7x for detection; B0..B2 / D0..D1 on CPU; or the named scales /
free phis asked for), measures it on the current device (``tasks.budget_measure.measure_scale``: batch-1
latency, eval-batch throughput, training step and peak training memory, parameters and GMACs) and
marks the largest scale meeting every limit, with the limit that stops the next one. Scales are
measured smallest first; once one exceeds a limit by 2x (or runs out of memory) the larger ones are
reported "not measured" (their parameters and GMACs are still counted). ``search_phi`` bisects the free
compound coefficient instead (on a 0.05 grid) and returns the ``--set model.phi=...`` override.

Each scale is the config with ``model.scale`` (``"0"``..``"7"``; ``"7x"`` for detection) or
``model.phi`` set and ``model.backbone`` for other backbone names. Classification and detection run at
each scale's native input size (B0 224 ... B7 600; D0 512 ... D7x 1536: the resolution is part of the
scale; ``data.image_size`` is set to null); segmentation keeps the config's ``data.image_size`` (a crop
is a data choice). ``image_size=(h, w)`` forces one size for all.

No scale fitting is a :class:`BudgetError` ("no scale fits: B0 needs 41 ms at batch 1, limit 5 ms")
that carries the :class:`BudgetResult`, so the table can still be printed and written.
Output: :meth:`BudgetResult.table`, ``budget.json`` and ``budget.png`` (:meth:`BudgetResult.write`).
Published accuracy is shown beside each named scale: ImageNet top-1 (EfficientNet paper, Table 2)
for B0..B7 -- for segmentation that of the backbone -- and COCO val AP (official) for D0..D7x.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from backbones.errors import EffdenseError

from tasks.config import resolve_image_size, validate
from tasks.config.scaling import IMAGENET_TOP1
from tasks.detection.scale import COCO_AP
from tasks.registry import get as get_task

from .measure import Measurement, count_cost, measure_scale

__all__ = ["BudgetError", "Limits", "Scale", "Row", "BudgetResult", "PhiSearch", "default_scales", "scales_from",
           "run_budget", "search_phi", "IMAGENET_TOP1", "COCO_AP"]

STOP_FACTOR = 2.0  # a scale this far over a limit ends the sweep
PHI_STEP = 0.05


class BudgetError(EffdenseError):
    """No scale meets the limits (or a limit cannot be measured here); ``result`` holds the rows."""

    def __init__(self, message: str, result: "BudgetResult | None" = None):
        super().__init__(message)
        self.result = result


@dataclass(frozen=True)
class Limits:
    """The budget: any of batch-1 latency (ms), peak training memory (GB), eval throughput (img/s)."""

    latency_ms: float | None = None
    memory_gb: float | None = None
    min_throughput: float | None = None

    def violations(self, m: Measurement) -> dict[str, tuple[float, float, float]]:
        """limit name -> (measured, limit, how many times over) for each limit ``m`` breaks."""
        out = {}
        checks = (("latency_ms", m.latency_ms, self.latency_ms, False),
                  ("memory_gb", m.peak_memory_gb, self.memory_gb, False),
                  ("min_throughput", m.throughput, self.min_throughput, True))
        for name, value, limit, at_least in checks:
            if limit is None or value is None:
                continue
            over = (limit / value if value > 0 else math.inf) if at_least else value / limit
            if over > 1.0:
                out[name] = (value, limit, over)
        return out

    def given(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class Scale:
    """One model size: its label (``B3``, ``D7x``, ``phi=2.35``, ``efficientnet-lite0``) and config overrides."""

    label: str
    overrides: tuple[tuple[str, object], ...]  # (dotted key, value)
    key: str | None = None  # the published-table key ("3", "7x") when it is a named scale

    def set_args(self) -> list[str]:
        """``--set`` arguments that reproduce this scale."""
        return [f"{k}={'null' if v is None else v}" for k, v in self.overrides]


def _named(task: str, index: str) -> Scale:
    prefix = get_task(task).scales.prefix
    return Scale(f"{prefix}{index}", (("model.scale", index), ("model.phi", None)), key=index)


def phi_scale(phi: float) -> Scale:
    phi = round(float(phi), 4)
    return Scale(f"phi={phi:g}", (("model.phi", phi), ("model.scale", None)))


def default_scales(task: str, device_type: str) -> list[Scale]:
    """The task's named scales on CUDA (B0..B7 / D0..D7x); its few CPU ones (B0..B2 / D0..D1) on the CPU."""
    family = get_task(task).scales
    return [_named(task, name) for name in (family.names if device_type == "cuda" else family.cpu_names)]


def scales_from(task: str, names: Sequence[str] = (), phis: Sequence[float] = ()) -> list[Scale]:
    """Scales named as ``effdense backbones`` prints them (``efficientnet-b3``, ``efficientnet-lite0``;
    ``efficientdet-d3`` for detection; ``3``/``7x`` also work) and free ``phis``, in the order given."""
    import backbones

    family = get_task(task).scales
    scales = []
    for name in names:
        text = str(name).strip().lower()
        named = re.fullmatch(family.pattern, text)
        if named:
            scales.append(_named(task, named.group(1)))
        elif not family.other_backbones:
            raise BudgetError(f"--scales {name!r}: {task} scales are {', '.join(family.prefix + n for n in family.names)}")
        elif text in backbones.list_names() and text != "efficientnet":
            scales.append(Scale(text, (("model.backbone", text), ("model.scale", None), ("model.phi", None))))
        else:
            raise BudgetError(f"--scales {name!r} is not a backbone; expected names from `effdense backbones` "
                              f"({', '.join(n for n in backbones.list_names() if n != 'efficientnet')})")
    return scales + [phi_scale(phi) for phi in phis]


def _set_args(cfg, scaled, scale: Scale) -> list[str]:
    args = scale.set_args()
    if scaled.data.image_size != cfg.data.image_size:
        size = scaled.data.image_size
        args.append(f"data.image_size={'null' if size is None else list(size)}".replace(" ", ""))
    return args


def config_for(cfg, scale: Scale, image_size: str | tuple[int, int] | None = None):
    """A validated copy of ``cfg`` at ``scale`` (see the module doc for the input size)."""
    scaled = copy.deepcopy(cfg)
    for key, value in scale.overrides:
        section, name = key.split(".")
        setattr(getattr(scaled, section), name, value)
    if image_size is None:
        image_size = get_task(cfg.model.task).scales.image_size
    if image_size == "native":
        scaled.data.image_size = None
    elif image_size != "config":
        scaled.data.image_size = [int(image_size[0]), int(image_size[1])]
    return validate(scaled)


@dataclass
class Row:
    """One scale's line of the table."""

    scale: Scale
    image_size: tuple[int, int]
    measurement: Measurement
    accuracy: float | None = None
    violations: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    set_args: list[str] = field(default_factory=list)  # --set arguments that reproduce the row from the config

    @property
    def fits(self) -> bool:
        return self.measurement.status == "ok" and not self.violations


@dataclass
class BudgetResult:
    """Every row, the chosen one (index or None) and what stops the next scale up."""

    task: str
    device: str
    limits: Limits
    rows: list[Row]
    chosen: int | None
    stopped_by: str
    settings: dict = field(default_factory=dict)

    def table(self) -> str:
        from tasks.budget.report import format_table

        return format_table(self)

    def to_json(self) -> dict:
        from tasks.budget.report import to_json

        return to_json(self)

    def write(self, out_dir: str | Path) -> tuple[Path, Path]:
        """``budget.json`` and ``budget.png`` in ``out_dir``; returns both paths."""
        from tasks.budget.report import plot

        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        json_path = folder / "budget.json"
        json_path.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        return json_path, plot(self, folder / "budget.png")


def _accuracy(task: str, scale: Scale) -> float | None:
    if scale.key is None:
        return None
    return get_task(task).scales.published.get(scale.key)


def _describe(name: str, value: float, limit: float) -> str:
    if name == "latency_ms":
        return f"needs {value:.1f} ms at batch 1, limit {limit:g} ms"
    if name == "memory_gb":
        return f"needs {value:.2f} GB to train, limit {limit:g} GB"
    return f"runs {value:.1f} img/s, limit at least {limit:g} img/s"


def why_not(row: Row) -> str:
    """'B3 needs 41.0 ms at batch 1, limit 20 ms' (each limit broken), 'B5 runs out of memory ...'."""
    m = row.measurement
    if m.status == "oom":
        return f"{row.scale.label} runs {m.note}"
    if m.status != "ok":
        return f"{row.scale.label} was {m.status}"
    return "; ".join(f"{row.scale.label} {_describe(name, value, limit)}"
                     for name, (value, limit, _) in row.violations.items())


def _check_measurable(limits: Limits, device_type: str) -> None:
    if limits.memory_gb is not None and device_type != "cuda":
        raise BudgetError(f"--memory-gb {limits.memory_gb:g}: peak training memory is measured on CUDA only "
                          f"(torch.cuda.max_memory_allocated); on {device_type} drop the memory limit")


def _device_type(cfg, device) -> str:
    from tasks.engine.distributed import pick_device

    return (pick_device(cfg.train.device) if device is None else torch.device(device)).type


def run_budget(cfg, limits: Limits = Limits(), scales: Sequence[Scale] | None = None, *,
               measure: Callable | None = None, device: torch.device | str | None = None, runs: int | None = None,
               image_size: str | tuple[int, int] | None = None, progress: bool = True,
               cost: Callable | None = count_cost) -> BudgetResult:
    """Measure ``scales`` (default :func:`default_scales`) smallest first and choose; see the module doc.

    ``measure(cfg_at_scale) -> Measurement`` replaces the real measurement (tests inject fakes);
    ``cost(cfg) -> (params M, GMACs)`` fills the rows that are not measured (``None``: left empty).
    Raises :class:`BudgetError` when no scale fits (``error.result`` has the rows).
    """
    from tasks.engine.runlog import progress_bar

    device_type = _device_type(cfg, device)
    _check_measurable(limits, device_type)
    task = cfg.model.task
    scales = list(scales) if scales else default_scales(task, device_type)
    measure = measure or (lambda c: measure_scale(c, device=device, runs=runs))
    rows: list[Row] = []
    stop = None
    bar = progress_bar(scales, enabled=progress, desc="budget", total=len(scales))
    for scale in bar:
        scaled = config_for(cfg, scale, image_size)
        if stop is None:
            if progress:
                bar.set_postfix_str(scale.label)
            measurement = measure(scaled)
        else:
            measurement = Measurement(status="not measured", note=f"stopped after {stop}")
            if cost is not None:
                measurement.params_m, measurement.gmacs = cost(scaled)
        row = Row(scale, resolve_image_size(scaled), measurement, _accuracy(task, scale),
                  limits.violations(measurement), _set_args(cfg, scaled, scale))
        rows.append(row)
        if stop is None and (measurement.status == "oom"
                             or any(over >= STOP_FACTOR for _, _, over in row.violations.values())):
            stop = scale.label
    return _choose(task, device_type, limits, rows, {"runs": runs, "image_size": image_size})


def _choose(task: str, device: str, limits: Limits, rows: list[Row], settings: dict) -> BudgetResult:
    fitting = [i for i, row in enumerate(rows) if row.fits]
    chosen = fitting[-1] if fitting else None
    if chosen is None:
        reason = why_not(rows[0]) if rows else "no scales were given"
        raise BudgetError(f"no scale fits: {reason}", BudgetResult(task, device, limits, rows, None, reason, settings))
    if chosen + 1 < len(rows):
        stopped_by = why_not(rows[chosen + 1]) or f"{rows[chosen + 1].scale.label} does not fit"
    else:
        stopped_by = "nothing: the largest scale tried fits (try larger --scales, or --search phi)"
    return BudgetResult(task, device, limits, rows, chosen, stopped_by, settings)


# ------------------------------------------------------------------------------------------ phi search


@dataclass
class PhiSearch:
    """The largest phi (a multiple of ``PHI_STEP``) meeting every limit, and each phi measured."""

    phi: float
    override: str  # "--set model.phi=2.35 --set model.scale=null" (+ data.image_size when it changed)
    result: BudgetResult


MAX_SEARCH_PHI = 8.0


def search_phi(cfg, limits: Limits, low: float = 0.0, high: float | None = None, *, step: float = PHI_STEP,
               measure: Callable | None = None, device: torch.device | str | None = None,
               runs: int | None = None, image_size: str | tuple[int, int] | None = None,
               progress: bool = True) -> PhiSearch:
    """Bisect the compound coefficient on multiples of ``step`` in [``low``, ``high``] (default high:
    7 on CUDA, 2 on CPU; widened by doubling, up to ``MAX_SEARCH_PHI``, while its top still fits) for the
    largest model meeting every limit, assuming cost grows with phi.
    Every phi returned was measured and fits. Raises :class:`BudgetError` when ``low`` does not fit."""
    from tasks.engine.runlog import progress_bar

    device_type = _device_type(cfg, device)
    _check_measurable(limits, device_type)
    if not limits.given():
        raise BudgetError("--search phi needs at least one limit (--latency-ms, --memory-gb or --min-throughput)")
    high = (7.0 if device_type == "cuda" else 2.0) if high is None else high
    measure = measure or (lambda c: measure_scale(c, device=device, runs=runs))
    lo, hi = round(low / step), round(high / step)
    if hi <= lo:
        raise BudgetError(f"--search phi: the range [{low:g}, {high:g}] is empty")
    rows: dict[int, Row] = {}
    bar = progress_bar(enabled=progress, desc="phi search", total=math.ceil(math.log2(hi - lo + 1)) + 2)

    def fits(k: int) -> bool:
        scale = phi_scale(k * step)
        scaled = config_for(cfg, scale, image_size)
        measurement = measure(scaled)
        rows[k] = Row(scale, resolve_image_size(scaled), measurement, None, limits.violations(measurement),
                      _set_args(cfg, scaled, scale))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(scale.label)
        return rows[k].fits

    try:
        if not fits(lo):
            ordered = [rows[lo]]
            result = BudgetResult(cfg.model.task, device_type, limits, ordered, None, why_not(rows[lo]))
            raise BudgetError(f"no scale fits: {why_not(rows[lo])}", result)
        ceiling = round(MAX_SEARCH_PHI / step)
        while fits(hi):  # the top of the range fits: widen it (doubling) up to MAX_SEARCH_PHI
            lo = hi
            if hi >= ceiling:
                break
            hi = min(ceiling, max(hi * 2, hi + round(1 / step)))
        while hi - lo > 1:
            middle = (lo + hi) // 2
            lo, hi = (middle, hi) if fits(middle) else (lo, middle)
    finally:
        if bar is not None:
            bar.close()
    ordered = [rows[k] for k in sorted(rows)]
    chosen = sorted(rows).index(lo)
    above = next((rows[k] for k in sorted(rows) if k > lo), None)
    stopped_by = why_not(above) if above is not None else f"nothing: the end of the search range (phi {high:g})"
    result = BudgetResult(cfg.model.task, device_type, limits, ordered, chosen, stopped_by,
                          {"runs": runs, "image_size": image_size, "search": "phi", "step": step})
    phi = round(lo * step, 4)
    search = PhiSearch(phi, " ".join(f"--set {arg}" for arg in rows[lo].set_args), result)
    return search


# ------------------------------------------------------------------------------------------ the command


def run_command(cfg, *, latency_ms: float | None = None, memory_gb: float | None = None,
                min_throughput: float | None = None, scales: Sequence[str] = (), phis: Sequence[float] = (),
                search: str | None = None, fit_batch: bool = False, out_dir: str | Path = "runs/budget",
                runs: int | None = None, device: torch.device | str | None = None, progress: bool = True,
                echo: Callable[[str], None] = print) -> BudgetResult:
    """Everything ``effdense budget CONFIG ...`` does, for the CLI to call with its parsed arguments:
    measure (``scales`` names / ``phis``, or the device's default range; ``search="phi"`` bisects
    instead), print the table, write ``budget.json`` and ``budget.png`` into ``out_dir`` (also when no
    scale fits), then with ``fit_batch`` print the auto batch size of the chosen scale. Raises
    :class:`BudgetError` (one line) when no scale fits, after writing the files."""
    from tasks.budget.measure import find_batch_size

    limits = Limits(latency_ms, memory_gb, min_throughput)
    if search not in (None, "phi"):
        raise BudgetError(f"--search {search!r}: the only search is 'phi'")
    try:
        if search == "phi":
            found = search_phi(cfg, limits, measure=None, device=device, runs=runs, progress=progress)
            result = found.result
        else:
            chosen_scales = scales_from(cfg.model.task, scales, phis) if (scales or phis) else None
            result = run_budget(cfg, limits, chosen_scales, device=device, runs=runs, progress=progress)
    except BudgetError as error:
        if error.result is not None:
            echo(error.result.table())
            json_path, png_path = error.result.write(out_dir)
            echo(f"wrote {json_path} and {png_path}")
        raise
    echo(result.table())
    if search == "phi":
        echo(f"largest phi meeting the limits: {found.phi:g}; reproduce it with {found.override}")
    json_path, png_path = result.write(out_dir)
    echo(f"wrote {json_path} and {png_path}")
    if fit_batch:
        chosen = result.rows[result.chosen]
        scaled = config_for(cfg, chosen.scale, result.settings.get("image_size"))
        echo(f"{chosen.scale.label}: {find_batch_size(scaled, device=device).message}")
    return result
