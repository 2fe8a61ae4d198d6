"""The one base class of user-caused problems (a bad config key, data file or weights file).

The CLI prints these as one line (``-v`` for the traceback) and keeps the traceback of anything
else, which is a bug to report rather than a mistake to fix. ``tasks`` subclasses it for config and
data errors; ``backbones.weights`` raises :class:`WeightsError`.
"""

from __future__ import annotations


class EffdenseError(ValueError):
    """A problem with the user's input; the message is one line naming the file or key, what was
    wrong and what was expected."""


class WeightsError(EffdenseError):
    """A checkpoint that cannot be read or does not fit the model."""


class FileWriteError(EffdenseError, OSError):
    """A file that could not be written (disk full, no permission); the previous file is left as it was."""


def preview(items, count: int = 3) -> str:
    items = [str(i) for i in items]
    return ", ".join(items[:count]) + (f", ... ({len(items)} in all)" if len(items) > count else "")


def mismatch_parts(missing: list, unexpected: list, shapes: list) -> str:
    """What a strict load found, as one clause: "2 missing keys (a, b); 0 unexpected keys[; 1 shape mismatches (...)]".
    Every strict loader in effdense (backbones, detectors, segmenters) words its error with it."""
    parts = [f"{len(missing)} missing keys ({preview(missing)})" if missing else "0 missing keys",
             f"{len(unexpected)} unexpected keys ({preview(unexpected)})" if unexpected else "0 unexpected keys"]
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches ({preview(shapes)})")
    return "; ".join(parts)
