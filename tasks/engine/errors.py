"""The engine's user-facing error (one line, printed by the CLI without a traceback)."""

from backbones.errors import EffdenseError


class EngineError(EffdenseError):
    """A run that cannot start or continue as asked (a resume mismatch, a reused run directory, a damaged
    checkpoint, unsharded loaders under DDP); the message says what to do instead."""
