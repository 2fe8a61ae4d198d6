"""Fit the model to the hardware: measure each scale, pick the largest that meets every limit.

``run_budget(cfg, Limits(latency_ms=20))`` builds the config's task at each scale in turn (B0..B7 for
classification and segmentation, D0..D7x for detection; B0..B2 / D0..D1 on CPU; or the named scales /
free phis asked for), measures it on the current device (``tasks.budget.measure.measure_scale``: batch-1
latency, eval-batch throughput, training step and peak training memory, parameters and GMACs) and
marks the largest scale meeting every limit, with the limit that stops the next one. Scales are
measured smallest first; once one exceeds a limit by 2x (or runs out of memory) the larger ones are
reported "not measured" (their parameters and GMACs are still counted). ``search_phi`` bisects the free
compound coefficient instead (on a 0.05 grid, up to ``max_phi``, default 8: ``tasks.budget.search``)
and returns the ``--set model.phi=...`` override.

On the CPU a scale is planned before it is started (``tasks.budget.memory``): a scale whose estimated
training peak does not fit the free memory even at batch 1 becomes a ``skipped`` row ("needs ~X GB at
batch 1, this machine has Y GB free", which stops a sweep like running out of memory does), and the
config's batches are lowered where they would not fit (said in the row). Progress names the scale being
measured and prints each one's time; ``run_command`` rewrites ``budget.json`` after every row.

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

A time budget (``minutes``, ``effdense budget --minutes N``), for every task: each measured row also says
how many optimizer steps and training images fit in N minutes on this device (``steps_in_budget``,
``images_in_budget``): the measured training step, per image, times the config's global batch (batch x
accumulation, one process) gives the step time; ``steps = floor(N * 60 / step time)``, ``images = steps *
global batch`` (``tasks.budget.rows.time_budget``). The step is timed at the row's input size (the rule
above) on a synthetic batch, with no data loading, evaluation or checkpoints: the numbers are an upper
bound, to weigh a scale's published accuracy against how much training it gets (``train.time_limit``
trains to such a budget).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from tasks.config.scaling import IMAGENET_TOP1
from tasks.detection.scale import COCO_AP
from tasks.registry import get as get_task

from .errors import BudgetError
from .measure import count_cost, measure_scale
from .rows import (
    BudgetResult,
    Limits,
    Row,
    RowLog,
    Scale,
    check_measurable,
    config_for,
    device_type,
    measure_row,
    minutes_settings,
    named_scale,
    phi_scale,
    unmeasured_row,
    time_budget,
    why_not,
)
from .search import MAX_SEARCH_PHI, PHI_STEP, PhiSearch, search_phi

__all__ = ["BudgetError", "Limits", "Scale", "Row", "BudgetResult", "PhiSearch", "default_scales", "scales_from",
           "run_budget", "search_phi", "run_command", "config_for", "phi_scale", "why_not", "IMAGENET_TOP1",
           "COCO_AP", "MAX_SEARCH_PHI", "PHI_STEP", "time_budget", "parse_image_size"]

STOP_FACTOR = 2.0  # a scale this far over a limit ends the sweep


def default_scales(task: str, device_type: str) -> list[Scale]:
    """The task's named scales on CUDA (B0..B7 / D0..D7x); its few CPU ones (B0..B2 / D0..D1) on the CPU."""
    family = get_task(task).scales
    return [named_scale(task, name) for name in (family.names if device_type == "cuda" else family.cpu_names)]


def scales_from(task: str, names: Sequence[str] = (), phis: Sequence[float] = ()) -> list[Scale]:
    """Scales named as ``effdense backbones`` prints them (``efficientnet-b3``, ``efficientnet-lite0``;
    ``efficientdet-d3`` for detection; ``3``/``7x`` also work) and free ``phis``, in the order given."""
    import re

    import backbones

    family = get_task(task).scales
    scales = []
    for name in names:
        text = str(name).strip().lower()
        named = re.fullmatch(family.pattern, text)
        if named:
            scales.append(named_scale(task, named.group(1)))
        elif not family.other_backbones:
            raise BudgetError(f"--scales {name!r}: {task} scales are {', '.join(family.prefix + n for n in family.names)}")
        elif text in backbones.list_names() and text != "efficientnet":
            scales.append(Scale(text, (("model.backbone", text), ("model.scale", None), ("model.phi", None))))
        else:
            raise BudgetError(f"--scales {name!r} is not a backbone; expected names from `effdense backbones` "
                              f"({', '.join(n for n in backbones.list_names() if n != 'efficientnet')})")
    return scales + [phi_scale(phi) for phi in phis]


def run_budget(cfg, limits: Limits = Limits(), scales: Sequence[Scale] | None = None, *,
               measure: Callable | None = None, device: torch.device | str | None = None, runs: int | None = None,
               image_size: str | tuple[int, int] | None = None, progress: bool = True,
               cost: Callable | None = count_cost, out_dir: str | Path | None = None,
               minutes: float | None = None) -> BudgetResult:
    """Measure ``scales`` (default :func:`default_scales`) smallest first and choose; see the module doc.
    ``minutes``: each row also gets the steps and images that fit in them (the module doc's time budget).

    ``measure(cfg_at_scale) -> Measurement`` replaces the real measurement (tests inject fakes);
    ``cost(cfg) -> (params M, GMACs)`` fills the rows that are not measured (``None``: left empty).
    With ``out_dir``, ``budget.json`` there is rewritten after every row (``complete: false``).
    Raises :class:`BudgetError` when no scale fits (``error.result`` has the rows).
    """
    kind = device_type(cfg, device)
    check_measurable(limits, kind)
    task = cfg.model.task
    scales = list(scales) if scales else default_scales(task, kind)
    measure = measure or (lambda c: measure_scale(c, device=device, runs=runs))
    settings = {"runs": runs, "image_size": image_size, **minutes_settings(cfg, minutes)}
    rows: list[Row] = []
    stop = None
    log = RowLog(BudgetResult(task, kind, limits, [], None, "", settings, complete=False), progress=progress,
                 desc="budget", total=len(scales), out_dir=out_dir)
    try:
        for scale in scales:
            if stop is None:
                row = measure_row(cfg, scale, limits, measure, image_size, log, minutes=minutes)
            else:
                row = unmeasured_row(cfg, scale, limits, f"stopped after {stop}", cost, image_size)
            rows.append(row)
            log.finished(row, rows)
            if stop is None and (row.measurement.status in ("oom", "skipped")
                                 or any(over >= STOP_FACTOR for _, _, over in row.violations.values())):
                stop = scale.label
    finally:
        log.close()
    return _choose(task, kind, limits, rows, settings)


def parse_image_size(text: str | tuple[int, int] | None) -> str | tuple[int, int] | None:
    """``--image-size``: ``native``, ``config``, ``HxW`` or one number (a square); ``None`` and tuples pass."""
    if text is None or isinstance(text, tuple):
        return text
    if text in ("native", "config"):
        return text
    parts = str(text).lower().split("x")
    if 1 <= len(parts) <= 2 and all(part.strip().isdigit() and int(part) >= 32 for part in parts):
        return (int(parts[0]), int(parts[-1]))
    raise BudgetError(f"--image-size {text!r}: expected native, config, or HxW (e.g. 384x640, sides of 32 or more)")


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


# ------------------------------------------------------------------------------------------ the command


def run_command(cfg, *, latency_ms: float | None = None, memory_gb: float | None = None,
                min_throughput: float | None = None, scales: Sequence[str] = (), phis: Sequence[float] = (),
                search: str | None = None, fit_batch: bool = False, out_dir: str | Path = "runs/budget",
                runs: int | None = None, device: torch.device | str | None = None, progress: bool = True,
                max_phi: float | None = None, minutes: float | None = None,
                image_size: str | tuple[int, int] | None = None, echo: Callable[[str], None] = print) -> BudgetResult:
    """Everything ``effdense budget CONFIG ...`` does, for the CLI to call with its parsed arguments:
    measure (``scales`` names / ``phis``, or the device's default range; ``search="phi"`` bisects
    instead, up to ``max_phi``), print the table, write ``budget.json`` and ``budget.png`` into ``out_dir``
    (``budget.json`` also after every row measured, and when no scale fits), then with ``fit_batch`` print
    the auto batch size of the chosen scale. ``minutes``: the steps and images each scale trains in them;
    ``image_size``: ``"native"``, ``"config"``, ``"HxW"`` or (h, w) (default: the task's rule, see the module
    doc). Raises :class:`BudgetError` (one line) when no scale fits, after writing the files."""
    from tasks.budget.measure import find_batch_size

    limits = Limits(latency_ms, memory_gb, min_throughput)
    image_size = parse_image_size(image_size)
    if search not in (None, "phi"):
        raise BudgetError(f"--search {search!r}: the only search is 'phi'")
    if max_phi is not None and search != "phi":
        raise BudgetError(f"--max-phi {max_phi:g} bounds --search phi; add --search phi (or measure --phis)")

    def measure(scaled):  # looked up here at each call, so tests can replace tasks.budget.measure_scale
        return measure_scale(scaled, device=device, runs=runs)

    try:
        if search == "phi":
            found = search_phi(cfg, limits, measure=measure, device=device, runs=runs, progress=progress,
                               max_phi=max_phi, out_dir=out_dir, minutes=minutes, image_size=image_size)
            result = found.result
        else:
            chosen_scales = scales_from(cfg.model.task, scales, phis) if (scales or phis) else None
            result = run_budget(cfg, limits, chosen_scales, measure=measure, device=device, runs=runs,
                                progress=progress, out_dir=out_dir, minutes=minutes, image_size=image_size)
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
