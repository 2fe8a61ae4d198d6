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
