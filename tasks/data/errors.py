"""The data layer's error: one line naming the file, what was wrong and what was expected."""

from __future__ import annotations

from backbones.errors import EffdenseError


class DataError(EffdenseError):
    """A bad dataset: a missing folder, an empty class, an unreadable image, a wrong label. One-line
    message naming the path, what was wrong and what was expected.

    Raised inside a DataLoader worker, torch re-raises it in the main process as the same class built
    from a multi-line "Caught ... in DataLoader worker process N ... Original Traceback" text; the
    constructor recovers the original one-line message from it, so every subclass, in every task,
    reaches the user as the line it was raised with.
    """

    def __init__(self, message: object = ""):
        super().__init__(_original_message(str(message)))


def _original_message(text: str) -> str:
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    last = text.rstrip().splitlines()[-1]  # "package.module.SomeDataError: <the original message>"
    name, sep, message = last.partition(": ")
    return message if sep and " " not in name else last
