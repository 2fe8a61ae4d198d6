"""The engine's errors: a run that cannot start or go on as asked (one line, printed by the CLI without a
traceback), and the two ways a run stops early (a non-finite loss, a signal)."""

import signal

from backbones.errors import EffdenseError


class EngineError(EffdenseError):
    """A run that cannot start or continue as asked (a resume mismatch, a reused run directory, a damaged
    checkpoint, unsharded loaders under DDP); the message says what to do instead."""


class NonFiniteLossError(RuntimeError):
    """A loss term became NaN/inf; names the step, the terms and the last good checkpoint."""

    def __init__(self, step: int, epoch: int, terms: dict[str, float], checkpoint: str | None):
        self.step, self.epoch, self.terms, self.checkpoint = step, epoch, terms, checkpoint
        values = ", ".join(f"{name}={value:.6g}" for name, value in terms.items())
        super().__init__(f"non-finite loss at step {step} (epoch {epoch + 1}): {values}; last good checkpoint: "
                         f"{checkpoint or 'none saved yet'} — lower optim.lr, set train.clip_grad, or check the data")


class TrainingInterrupted(RuntimeError):
    """Raised by ``fit`` after SIGTERM/SIGINT once ``last.pt`` is written; ``exit_code`` = 128 + signal."""

    def __init__(self, signum: int, checkpoint: str | None, epoch: int, step: int, batch_in_epoch: int):
        self.signum, self.checkpoint, self.exit_code = signum, checkpoint, 128 + signum
        self.epoch, self.step, self.batch_in_epoch = epoch, step, batch_in_epoch
        where = (f"state saved to {checkpoint}; continue with --resume {checkpoint}" if checkpoint
                 else "nothing saved (no run directory)")
        super().__init__(f"stopped by {signal.Signals(signum).name} at epoch {epoch + 1}, step {step} "
                         f"(batch {batch_in_epoch} of the epoch); {where}")
