"""``train.time_limit``: training to a time budget in minutes (as ultralytics' ``time=``).

The clock (``clock``, monotonic wall time) starts when ``fit`` starts; a resumed run goes on with what is
left of its budget (the seconds spent are stored in ``last.pt``). After each epoch -- and, until this
session's first epoch has ended, at every ``train.log_every`` sync, so that a budget shorter than one
epoch still gets a fitted schedule -- the seconds per optimizer step measured so far in this session give
the plan. The measured time is wall time with evaluation, checkpoints and data loading in it: they recur
every epoch, and a plan that left them out would overrun the budget.

    steps  = step + max(1, floor(seconds left / seconds per step))   the schedule's new length
    epochs = ceil(steps / steps per epoch)                           ``trainer.epochs``

After whole epochs that is ``epochs = ceil(time_limit / mean epoch time)``, and at least one more epoch
while time is left. The lr schedule is rebuilt for ``steps`` (``tasks.engine.optim.rebuild_schedule``), so
it reaches its floor (cosine ``min_lr_ratio``, poly 0) when the budget ends; warm-up keeps its length,
capped to leave at least one epoch for the decay (half of a plan shorter than two epochs). ``train.epochs`` only sizes the schedule until the first
refit: the budget, not ``train.epochs``, decides how long the run is (ultralytics does the same).

Training stops after the first optimizer step at which the time is spent or the planned steps are done
(one process: checked after every step; DDP: at each ``log_every`` sync, rank 0's clock deciding for all),
mid-epoch too; then it evaluates and writes ``last.pt`` as at a normal end, so the closing evaluation runs
after the budget (the plan's per-step time includes the evaluations, which leaves room for about one).
``train.max_steps`` still stops earlier. Each change of the epoch count is logged ("time_limit: 12 epochs
fit in 5.0 min"), and every evaluation record in ``metrics.jsonl`` holds ``time_limit/epochs_planned``,
``time_limit/epochs_done`` and ``time_limit/spent_min``.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from tasks.engine.distributed import broadcast_object
from tasks.engine.errors import EngineError
from tasks.engine.optim import build_schedule, rebuild_schedule

log = logging.getLogger(__name__)

clock = time.monotonic  # tests replace it with a fake clock


class TimeLimit:
    """The plan of a time-limited run: ``epochs`` (what ``trainer.epochs`` reports) and ``steps`` (the
    schedule's length); ``refits`` lists each change of ``epochs`` in this session, ``stopped`` says why and
    where the run stopped (``None`` before). The trainer calls ``start``, ``epoch_start``, ``after_step``."""

    def __init__(self, minutes: float, steps_per_epoch: int, epochs: int):
        self.minutes, self.seconds = float(minutes), 60.0 * float(minutes)
        self.steps_per_epoch = steps_per_epoch
        self.epochs, self.steps = epochs, epochs * steps_per_epoch
        self.fitted = False  # the plan comes from a measurement (the schedule was rebuilt for it)
        self.spent_before = 0.0  # seconds spent by the runs this one resumed
        self.refits: list[dict[str, float]] = []
        self.stopped: dict[str, Any] | None = None
        self._start: float | None = None
        self._start_step = 0
        self._epoch_ended = False  # this session has finished an epoch (then refits happen at epoch ends only)

    def start(self, step: int) -> None:
        self._start, self._start_step, self._epoch_ended = clock(), step, False

    def spent(self) -> float:
        """Seconds of the budget spent, earlier runs of a resumed one included."""
        return self.spent_before + (clock() - self._start if self._start is not None else 0.0)

    # ------------------------------------------------------------------ trainer hooks

    def epoch_start(self, trainer) -> bool:
        """At the top of the epoch loop (the first call starts the clock): refit after an epoch of this
        session; whether to train on."""
        if self._start is None:
            self.start(trainer.step)
        if trainer.batch_in_epoch == 0 and trainer.step > self._start_step:
            self._epoch_ended = True
            self.refit(trainer)
        return trainer.epoch < self.epochs and not self.over(trainer)

    def after_step(self, trainer, synced: bool) -> bool:
        """After an optimizer step (``synced``: at a ``log_every`` sync, where every rank is): refit while
        this session's first epoch runs, and say whether to stop (one process: every step; DDP: at syncs)."""
        if synced and not self._epoch_ended and trainer.batch_in_epoch < trainer.batches_per_epoch:
            self.refit(trainer)
        return synced == trainer.dist.enabled and self.over(trainer)

    def over(self, trainer) -> bool:
        """The time is spent or the planned steps are done (collective under DDP: rank 0 decides)."""
        spent = self.spent()
        stop = bool(broadcast_object(trainer.step >= self.steps or spent >= self.seconds))
        if stop and self.stopped is None:
            done = trainer.epoch + trainer.batch_in_epoch / trainer.batches_per_epoch
            self.stopped = {"step": trainer.step, "epochs_done": round(done, 3), "epochs_planned": self.epochs,
                            "spent_min": round(spent / 60, 3),
                            "why": "time spent" if spent >= self.seconds else "planned steps done"}
            if trainer.is_main:
                log.info("time_limit: stopping at step %d (%s): %.2f of %d planned epochs done, %.1f of %g min "
                         "spent", trainer.step, self.stopped["why"], done, self.epochs, spent / 60, self.minutes)
        return stop

    def refit(self, trainer) -> None:
        """Fit the plan to the time per step measured in this session; rebuild the schedule if it changed."""
        done = trainer.step - self._start_step
        if done <= 0:
            return
        plan = None
        if trainer.is_main:
            per_step = (clock() - self._start) / done
            left = self.seconds - self.spent()
            if left > 0:
                plan = (trainer.step + max(1, math.floor(left / max(per_step, 1e-9) + 1e-9)), per_step)
        plan = broadcast_object(plan)
        if plan is None or (self.fitted and plan[0] == self.steps):
            return
        steps, per_step = plan
        trainer.scheduler = rebuild_schedule(trainer.optimizer, trainer.cfg, self.steps_per_epoch, steps, trainer.step)
        self.steps, self.fitted = steps, True
        epochs = math.ceil(steps / self.steps_per_epoch)
        if epochs != self.epochs or not self.refits:
            self.epochs = epochs
            seconds_per_epoch = per_step * self.steps_per_epoch
            self.refits.append({"step": trainer.step, "epochs": epochs, "steps": steps,
                                "seconds_per_epoch": round(seconds_per_epoch, 3)})
            if trainer.is_main:
                log.info("time_limit: %d epochs fit in %g min (%.1f s per epoch, evaluation included; %d steps)",
                         epochs, self.minutes, seconds_per_epoch, steps)

    # ------------------------------------------------------------------ records and checkpoints

    def record(self, trainer) -> dict[str, float]:
        """The evaluation record's time-limit fields."""
        done = trainer.epoch + trainer.batch_in_epoch / trainer.batches_per_epoch
        return {"time_limit/epochs_planned": self.epochs, "time_limit/epochs_done": round(done, 4),
                "time_limit/spent_min": round(self.spent() / 60, 4)}

    def state(self) -> dict[str, Any]:
        """What ``last.pt`` keeps: seconds spent and the plan (``steps`` ``None`` until a refit)."""
        return {"spent_s": self.spent(), "epochs": self.epochs, "steps": self.steps if self.fitted else None}

    def load(self, saved: dict[str, Any], trainer) -> None:
        """Continue a checkpoint's budget and plan; its schedule is rebuilt for that plan before it is loaded."""
        self.spent_before = float(saved.get("spent_s") or 0.0)
        if saved.get("steps") is not None:
            self.epochs, self.steps, self.fitted = int(saved["epochs"]), int(saved["steps"]), True
            trainer.scheduler = build_schedule(trainer.optimizer, trainer.cfg, self.steps_per_epoch, self.steps)


def from_config(train_cfg, steps_per_epoch: int) -> TimeLimit | None:
    """The run's ``TimeLimit``, or ``None`` without ``train.time_limit``."""
    if train_cfg.time_limit is None:
        return None
    return TimeLimit(train_cfg.time_limit, steps_per_epoch, train_cfg.epochs)


def resume(trainer, state: dict[str, Any], path) -> None:
    """Before a checkpoint's scheduler is loaded: take over its budget and plan (see ``TimeLimit.load``)."""
    saved = state.get("time_limit")
    if trainer.time_limit is not None:
        if saved:
            trainer.time_limit.load(saved, trainer)
    elif saved and saved.get("steps") is not None:
        raise EngineError(f"cannot resume {path}: it was trained under train.time_limit (its schedule was refitted "
                          f"to {saved['steps']} steps); resume with train.time_limit set (minutes for the whole run, "
                          f"{saved['spent_s'] / 60:.1f} of which are spent)")
