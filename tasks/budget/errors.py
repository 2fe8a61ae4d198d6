"""The budget command's one error type (re-exported as ``tasks.budget.BudgetError``)."""

from __future__ import annotations

from backbones.errors import EffdenseError

__all__ = ["BudgetError"]


class BudgetError(EffdenseError):
    """No scale meets the limits (or a limit cannot be measured here); ``result`` holds the rows."""

    def __init__(self, message: str, result=None):
        super().__init__(message)
        self.result = result
