"""Field declarations with their allowed values: ``choice``, ``number``, ``numbers``, ``size_field`` and the
``Range`` they take. The schema declares each field's choices and range once, on the field;
``tasks.config.loader.validate`` is the only place that checks them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass(frozen=True)
class Range:
    """A numeric interval; ``None`` bounds are open-ended. Values must also be finite."""

    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        above = self.low is None or (value > self.low if self.low_open else value >= self.low)
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def describe(self) -> str:
        if self.low is None:  # ranges here are bounded below or not at all
            return "must be a finite number"
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"must be in {left}{self.low:g}, {self.high:g}{right}"


ANY_NUMBER = Range()
POSITIVE = Range(0, low_open=True)
AT_LEAST_ONE = Range(1)
NON_NEGATIVE = Range(0)
FRACTION = Range(0, 1)  # [0, 1]
FRACTION_BELOW_ONE = Range(0, 1, high_open=True)  # [0, 1)
FRACTION_ABOVE_ZERO = Range(0, 1, low_open=True)  # (0, 1]
OPEN_UNIT = Range(0, 1, low_open=True, high_open=True)  # (0, 1)


def choice(default: Any, *options: Any, doc: str = "") -> Any:
    """A field whose value must be one of ``options`` (``default`` among them)."""
    assert default in options, (default, options)
    return field(default=default, metadata={"choices": options, "doc": doc})


def number(default: Any, allowed: Range, doc: str = "") -> Any:
    """A numeric field (``None`` allowed when the annotation is Optional) within ``allowed``."""
    return field(default=default, metadata={"range": allowed, "doc": doc})


def numbers(default: list, each: Range, length: int | tuple[int, ...] | None = None, doc: str = "") -> Any:
    """A list-of-numbers field: every element within ``each``; ``length`` = the allowed length(s)."""
    lengths = (length,) if isinstance(length, int) else length
    return field(default_factory=lambda: list(default) if default is not None else None,
                 metadata={"each": each, "lengths": lengths, "doc": doc})


def size_field(doc: str = "") -> Any:
    """An optional [h, w] size in pixels; an int in YAML or ``--set`` means a square."""
    return field(default=None, metadata={"each": Range(32), "lengths": (2,), "size": True, "doc": doc})
