"""How a :class:`tasks.budget.BudgetResult` is shown: the printed table, ``budget.json`` and ``budget.png``."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

LIMIT_LABELS = {"latency_ms": "latency", "memory_gb": "memory", "min_throughput": "throughput"}


def _number(value, digits: int = 1, width: int = 9) -> str:
    return f"{'n/a' if value is None else f'{value:.{digits}f}':>{width}}"


def _accuracy_label(task: str) -> str:
    from tasks.registry import get

    return get(task).scales.metric


def row_status(row) -> str:
    """'fits', 'over: latency', 'oom (out of memory ...)', 'skipped (needs ~X GB ...)'; for measured rows
    also the batches lowered on the CPU ('fits; step at b72 (b128 needs ~19.7 GB of 17.5 GB usable)')."""
    m = row.measurement
    if m.status == "ok":
        status = "fits" if row.fits else "over: " + ", ".join(LIMIT_LABELS[k] for k in row.violations)
        return status + (f"; {m.note}" if m.note else "")
    return m.status + (f" ({m.note})" if m.note else "")


def _batch_cell(value, batch, header_batch, digits: int, width: int) -> str:
    """The number, with ``@bN`` when it was measured at another batch than the column's."""
    if value is None or batch in (None, header_batch):
        return _number(value, digits, width)
    return f"{f'{value:.{digits}f}@b{batch}':>{width}}"


def _count(value, width: int) -> str:
    return f"{'n/a' if value is None else f'{value:,}':>{width}}"


def _minutes_label(minutes: float) -> str:
    return f"{minutes:g}min"


def format_table(result) -> str:
    """One line per scale; ``*`` marks the chosen one; the notes say what stops the next scale. With a time
    budget (``settings["minutes"]``) two more columns: steps and images in that many minutes."""
    rows = result.rows
    extras = [r.measurement.extra for r in rows if r.measurement.extra.get("config_eval_batch")
              or r.measurement.extra.get("eval_batch")]
    eval_batch = next((e.get("config_eval_batch", e.get("eval_batch")) for e in extras), "?")
    train_batch = next((e.get("config_train_batch", e.get("train_batch")) for e in extras), "?")
    on_cuda = result.device == "cuda"  # CPU: the step per image (its batch may be lowered to fit, see the status)
    minutes = result.settings.get("minutes")
    budget = (f"{'steps/' + _minutes_label(minutes):>14}{'images/' + _minutes_label(minutes):>16}"
              if minutes is not None else "")
    header = (f"  {'scale':<20}{'input':>10}{'params(M)':>10}{'GMACs':>9}{'ms@b1':>9}{f'img/s@b{eval_batch}':>14}"
              f"{f'step ms@b{train_batch}' if on_cuda else 'train ms/img':>16}{budget}{'peak GB':>9}"
              f"{_accuracy_label(result.task):>10}  status")
    lines = [header, "-" * len(header)]
    for index, row in enumerate(rows):
        m = row.measurement
        mark = "*" if index == result.chosen else " "
        size = f"{row.image_size[0]}x{row.image_size[1]}"
        training = (_batch_cell(m.train_step_ms, m.extra.get("train_batch"), train_batch, 1, 16) if on_cuda
                    else _number(m.train_ms_per_image, 1, 16))
        if minutes is not None:
            training += _count(row.steps_in_budget, 14) + _count(row.images_in_budget, 16)
        lines.append(f"{mark} {row.scale.label:<20}{size:>10}{_number(m.params_m, 2, 10)}{_number(m.gmacs, 2)}"
                     f"{_number(m.latency_ms)}{_batch_cell(m.throughput, m.extra.get('eval_batch'), eval_batch, 1, 14)}"
                     f"{training}{_number(m.peak_memory_gb, 2)}{_number(row.accuracy, 1, 10)}  {row_status(row)}")
    limits = ", ".join(f"{LIMIT_LABELS[k]} {v:g}" for k, v in result.limits.given().items()) or "none"
    lines.append(f"device {result.device}; limits: {limits}")
    if result.chosen is not None:
        chosen = rows[result.chosen]
        override = " ".join(f"--set {arg}" for arg in chosen.set_args)
        lines.append(f"chosen: {chosen.scale.label} ({override}); stopped by: {result.stopped_by}")
    if result.device != "cuda":
        lines.append("peak GB: measured on CUDA only (n/a on CPU); train ms/img: a training step over its batch; "
                     "@bN: img/s measured at batch N (the status says why)")
    if minutes is not None:
        lines.append(f"steps/images in {minutes:g} min: training steps of {result.settings['images_per_step']} images "
                     f"(the config's global batch, one process) at the measured step time; forward, backward and "
                     f"optimizer only (no data loading, evaluation or checkpoints): an upper bound")
    return "\n".join(lines)


def to_json(result) -> dict:
    """Everything in the table, as plain JSON values (``budget.json``)."""
    rows = []
    for index, row in enumerate(result.rows):
        rows.append({"scale": row.scale.label, "set": row.set_args, "image_size": list(row.image_size),
                     **asdict(row.measurement), "accuracy": row.accuracy,
                     "steps_in_budget": row.steps_in_budget, "images_in_budget": row.images_in_budget,
                     "fits": row.fits, "chosen": index == result.chosen,
                     "violations": {k: {"value": v, "limit": lim, "times_over": over}
                                    for k, (v, lim, over) in row.violations.items()}})
    chosen = result.rows[result.chosen] if result.chosen is not None else None
    return {"task": result.task, "device": result.device, "complete": getattr(result, "complete", True),
            "device_name": torch.cuda.get_device_name() if result.device == "cuda" and torch.cuda.is_available()
            else "cpu", "torch": torch.__version__, "limits": result.limits.given(), "settings": result.settings,
            "accuracy_metric": _accuracy_label(result.task),
            "chosen": None if chosen is None else {"scale": chosen.scale.label, "set": chosen.set_args},
            "stopped_by": result.stopped_by, "rows": rows}


def _value(row, key: str):
    return getattr(row, key) if key.endswith("_in_budget") else getattr(row.measurement, key)


def plot(result, path: str | Path) -> Path:
    """Latency at batch 1 and peak training memory (training time per image on CPU) per scale -- and with a
    time budget the training images that fit in it -- the limits as dashed lines, the chosen scale highlighted
    and the published accuracy written beside each point."""
    from matplotlib.figure import Figure  # Agg through a bare Figure, as tasks.engine.runlog does

    rows = result.rows
    labels = [row.scale.label for row in rows]
    positions = list(range(len(rows)))
    memory_on = result.device == "cuda"
    panels = [("latency_ms", "latency at batch 1 (ms)", result.limits.latency_ms),
              ("peak_memory_gb" if memory_on else "train_ms_per_image",
               "peak training memory (GB)" if memory_on else "training time per image (ms)",
               result.limits.memory_gb if memory_on else None)]
    if result.settings.get("minutes") is not None:
        panels.append(("images_in_budget", f"training images in {result.settings['minutes']:g} min", None))
    figure = Figure(figsize=(5.5 * len(panels), 4))
    figure.subplots_adjust(left=0.08, right=0.98, bottom=0.18, top=0.88, wspace=0.25)
    for column, (key, title, limit) in enumerate(panels):
        axes = figure.add_subplot(1, len(panels), column + 1)
        points = [(x, _value(row, key)) for x, row in zip(positions, rows) if _value(row, key) is not None]
        if points:
            axes.plot(*zip(*points), "o-", color="tab:blue")
        for x, row in zip(positions, rows):
            value = _value(row, key)
            if value is None:
                continue
            if x == result.chosen:
                axes.plot([x], [value], "o", color="tab:green", markersize=11, zorder=3)
            if row.accuracy is not None:
                axes.annotate(f"{_accuracy_label(result.task)} {row.accuracy:.1f}", (x, value),
                              textcoords="offset points", xytext=(6, -10), fontsize=8, color="dimgray")
        if limit is not None:
            axes.axhline(limit, linestyle="--", color="tab:red", label=f"limit {limit:g}")
            axes.legend(loc="upper left")
        axes.set_xticks(positions, labels, rotation=30 if len(rows) > 6 else 0)
        axes.set_xlim(-0.5, len(rows) - 0.3)
        axes.set_title(title)
        axes.grid(alpha=0.3)
        if points and max(v for _, v in points) / max(min(v for _, v in points), 1e-9) > 30:
            axes.set_yscale("log")
    chosen = rows[result.chosen].scale.label if result.chosen is not None else "none"
    figure.suptitle(f"{result.task} on {result.device}: chosen {chosen}; grey numbers: published "
                    f"{_accuracy_label(result.task)}", fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=90)
    return path
