"""The training engine: one loop for every task (it knows only the task protocol below).

Task protocol. ``model(images, targets)`` in train mode returns ``dict[str, Tensor]`` of scalar losses
(summed for backward, each logged); in eval mode ``model(images)`` returns predictions.
``model.make_evaluator()`` gives ``reset() / update(preds, targets) / compute() -> dict`` with
``primary_metric`` and ``higher_is_better``; optional ``model.net`` is what ``model.safetensors`` holds,
optional ``model.class_names`` (else ``loaders["train"].dataset.classes``) is stored with the weights.
Loaders: ``{"train": DataLoader, "val": DataLoader}`` of ``(uint8 NCHW images, targets)``; under DDP
their samplers must shard across the ranks (``tasks.data.build_loaders`` does, and joins the group).

Losses normalised by a global quantity. DDP averages gradients over ranks, so a loss that must be
divided by a count summed over the whole global batch (detection divides by the positive anchors of
every image on every rank) divides its local sum by ``distributed.global_mean(count)`` — the count
all-reduced and divided by the world size — inside ``forward``: every rank runs forward once per
micro-step, so the collective lines up. In one process it is the count itself.

Host syncs happen only every ``train.log_every`` optimizer steps and at epoch ends: loss terms are
stacked into a device buffer each step and read (all-reduced under DDP) in one go, which is also when
a non-finite loss is caught — before any checkpoint could store its weights.

Signals: SIGTERM/SIGINT ask the loop to stop after the current optimizer step (under DDP: at the next
``log_every`` boundary, where all ranks agree); it writes ``last.pt`` with the mid-epoch position and
raises ``TrainingInterrupted``, whose ``exit_code`` is 128 + signal (130 SIGINT, 143 SIGTERM) for the
CLI to exit with. A second SIGINT raises ``KeyboardInterrupt`` at once. Previous handlers are restored.
How ``resume`` is exact: see ``tasks.engine.checkpoint``.

``train.time_limit`` (minutes; ``train.epochs`` is then ignored): the epoch count (``trainer.epochs``) and the schedule
are refitted to the time measured, and training stops once it is spent: see ``tasks.engine.timelimit``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tasks.engine import checkpoint as ckpt
from tasks.engine import distributed as dist_utils
from tasks.engine import timelimit
from tasks.engine.batching import batch_plan, check_train_batch, ema_step_decay
from tasks.engine.distributed import to_device
from tasks.engine.errors import EngineError, NonFiniteLossError, TrainingInterrupted
from tasks.engine.evaluate import autocast, images_to_device, is_improvement, run_evaluation
from tasks.engine.optim import ModelEMA, build_optimizer, build_schedule, optimizer_step, scaled_lr, steps_per_epoch
from tasks.engine.runlog import (LossTracker, RunLog, claim_run_dir, config_dict, lock_run_dir, progress_bar,
                                 unlock_run_dir, write_config)

log = logging.getLogger(__name__)


class Trainer:
    """``Trainer(model, loaders, cfg, run_dir=None).fit()``; call ``resume(path)`` before ``fit`` to continue.

    ``run_dir`` defaults to ``train.output_dir/train.run_name`` (``run-<time>`` without a name); a resumed
    run continues in the checkpoint's own directory, always. A directory that already holds another run is
    refused unless ``train.overwrite`` (then its run files are removed first), and one that another process
    is training into (its ``.effdense.lock``) is refused too.
    ``create_run_dir=False`` writes nothing (benchmarks). ``cfg`` is a validated ``tasks.config`` config.
    ``run_files``: ``{file name: JSON-able data}`` written into the run directory when ``fit`` starts
    (the CLI's ``scale.json``: what the compound coefficient resolved to).
    ``epoch_callbacks``: callables ``(trainer, epoch)`` run at each epoch start (progressive learning's stages).
    """

    def __init__(self, model: nn.Module, loaders: dict, cfg: Any, run_dir: str | Path | None = None,
                 create_run_dir: bool = True, run_files: dict[str, Any] | None = None,
                 epoch_callbacks: list | None = None):
        try:
            batches = len(loaders["train"]) if "train" in loaders else 1  # evaluation-only without "train"
        except TypeError:
            raise EngineError("the train loader has no length (an IterableDataset?); the engine needs "
                             "len(loader) to place the schedule and to resume mid-epoch") from None
        t = self.train_cfg = cfg.train
        self.cfg, self.loaders = cfg, loaders
        self.device, self.dist = dist_utils.setup_process(t.device, t.deterministic)
        dist_utils.check_sharded(loaders, self.dist.world_size)
        ckpt.seed_everything(t.seed + self.dist.rank)
        self.scaler = torch.amp.GradScaler(self.device.type) if t.amp == "fp16" else None
        if self.scaler is not None:  # a step the scaler skips (inf grads) still advances the schedule: expected
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
        self.channels_last = bool(t.channels_last)
        if t.grad_checkpointing:
            _enable_grad_checkpointing(model)
        self.class_names = _class_names(model, loaders)
        model = model.to(self.device, memory_format=torch.channels_last if t.channels_last else torch.preserve_format)
        if cfg.model.sync_bn and self.dist.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif cfg.model.sync_bn and self.dist.enabled:
            log.warning("model.sync_bn=true ignored: SyncBatchNorm needs CUDA; CPU processes keep their own statistics")
        self.model = model  # the plain task module: what checkpoints hold and evaluation runs
        self.plan = batch_plan(cfg, self.dist.world_size)  # global batch = processes x accum x micro-batch
        self.accum, self.global_batch = self.plan.accum, self.plan.global_batch
        check_train_batch(loaders, self.plan)
        self.ema_decay = ema_step_decay(cfg, self.global_batch)  # per step: one decay per image
        self.ema = ModelEMA(model, self.ema_decay, warmup=t.ema_warmup) if t.ema else None
        self.optimizer = build_optimizer(model, cfg, self.dist.world_size)
        self.steps_per_epoch = steps_per_epoch(batches, self.accum, whole_steps=self.plan.from_global)
        self.batches_per_epoch = self.steps_per_epoch * self.accum if self.plan.from_global else batches
        self.scheduler = build_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.time_limit = timelimit.from_config(t, self.steps_per_epoch)  # None without train.time_limit
        self._params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.ddp = None
        self.train_model: nn.Module = model
        if self.dist.enabled:
            self.ddp = self.train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=not (cfg.model.sync_bn and self.device.type == "cuda"),
                gradient_as_bucket_view=True)
        if t.compile:
            self.train_model = torch.compile(self.train_model)

        if run_dir is None:
            run_dir = Path(t.output_dir) / (t.run_name or time.strftime("run-%Y%m%d-%H%M%S"))
        self.run_dir = Path(dist_utils.broadcast_object(str(run_dir)))
        self._create_run_dir = create_run_dir
        self.run_files = dict(run_files or {})
        self.epoch_callbacks = list(epoch_callbacks or [])
        self.epoch = self.step = self.batch_in_epoch = 0  # position: epoch in progress, steps done, batches used
        self.best: float | None = None
        self.history: list[dict] = []  # one record per evaluation (what metrics.jsonl holds)
        self._stop = dist_utils.StopSignals()
        self._losses = LossTracker(self.device, t.log_every * self.accum)
        self._runlog: RunLog | None = None
        self._last_checkpoint: str | None = None
        self._saved_step: int | None = None
        self._pending_rng: dict | None = None
        self._epoch_rng: dict | None = None
        self._evaluator_info: tuple[str, bool] | None = None
        self.last_evaluator = None
        if self.is_main:
            log.info("training on %s x%d: %s, lr %.4g, %d steps/epoch%s", self.device, self.dist.world_size,
                     self.plan.describe(), scaled_lr(cfg, self.dist.world_size), self.steps_per_epoch,
                     f", EMA decay {self.ema_decay:.6g} per step" if self.ema else "")

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def epochs(self) -> int:
        """The epochs planned: ``train.epochs``, or the time limit's latest refit (what callbacks read)."""
        return self.train_cfg.epochs if self.time_limit is None else self.time_limit.epochs

    # ------------------------------------------------------------------ public API

    def fit(self) -> dict[str, float]:
        """Train to ``self.epochs`` or ``train.max_steps``; returns the last evaluation's metrics."""
        t = self.train_cfg
        if "train" not in self.loaders:
            raise ValueError(f"loaders has keys {sorted(self.loaders)} but fit() needs 'train' (and 'val' to evaluate)")
        lock = self._claim() if self._create_run_dir and self.is_main else None
        self._stop.install()
        final: dict[str, float] | None = None
        first_step = self.step
        try:
            while not self._max_steps_reached() and (self.time_limit.epoch_start(self) if self.time_limit
                                                     else self.epoch < t.epochs):
                if self._stop.agreed(self.device):
                    self._interrupt()
                for callback in self.epoch_callbacks:  # they may replace self.loaders["train"] (same length)
                    callback(self, self.epoch)
                reason = self._train_epoch(self.epoch)
                if reason == "signal" and self.batch_in_epoch:  # at an epoch end, evaluate/save first as usual
                    self._interrupt()
                done = self.epoch >= self.epochs or self._max_steps_reached() or reason == "time_limit"
                epoch_end = self.batch_in_epoch == 0
                if done or (epoch_end and self.epoch % t.eval_every == 0):
                    final = self._save_and_evaluate()
                elif epoch_end and self.epoch % t.checkpoint_every == 0:
                    self._save(last=True)
            if self.step != first_step and (not self.history or self.history[-1]["step"] != self.step):
                final = self._save_and_evaluate()  # the time ran out at an epoch end: a run ends evaluated
            if final is None:  # nothing left to train (a finished run was resumed): report its metrics
                final = self.evaluate() if "val" in self.loaders else {}
            return final
        finally:
            self._stop.restore()
            if self._runlog is not None:
                self._runlog.close()
            unlock_run_dir(lock)

    def _save_and_evaluate(self) -> dict[str, float]:
        self._save(last=True)  # first: an evaluation that fails (a bad val file) loses no training
        metrics, is_best = self._evaluate_and_log()
        if is_best:  # last.pt again, now recording the new best, and copied to best.pt
            self._save(last=True, best=True)
        return metrics

    def _claim(self) -> Path:
        """Lock the run directory (before looking: two runs started together cannot both claim it), refuse
        another run's files, and write the run's files; the lock is released if any of that fails."""
        lock = lock_run_dir(self.run_dir)
        try:
            if self._last_checkpoint is None:  # resuming continues this directory's run
                claim_run_dir(self.run_dir, overwrite=self.train_cfg.overwrite)
            ckpt.remove_stale_temp_files(self.run_dir)
            self._runlog = RunLog(self.run_dir, resume_step=self.step if self._last_checkpoint else None)
            write_config(self.cfg, self.run_dir / "config.yaml")
            for name, data in self.run_files.items():
                (self.run_dir / name).write_text(json.dumps(data, indent=1) + "\n")
        except BaseException:
            unlock_run_dir(lock)
            raise
        return lock

    def evaluate(self, loader=None) -> dict[str, float]:
        """Run the evaluator over ``loader`` (default ``loaders["val"]``); EMA weights when EMA is on."""
        loader = loader if loader is not None else self.loaders.get("val")
        if loader is None:
            raise EngineError("no validation loader: pass loaders['val'] to Trainer or a loader to evaluate()")
        model = self.ema.module if self.ema is not None else self.model
        metrics, evaluator = run_evaluation(model, loader, self.device, self.train_cfg.amp, self.channels_last,
                                            progress=self._bars)
        self._evaluator_info = (evaluator.primary_metric, bool(evaluator.higher_is_better))
        self.last_evaluator = evaluator  # its save(dir)/table() give the per-class files of dense tasks
        return metrics

    def resume(self, path: str | Path) -> None:
        """Load a checkpoint written by ``fit`` so that the next ``fit`` continues exactly where it stopped."""
        state = ckpt.load_checkpoint(path)
        ckpt.check_resumable(state, path, config_dict(self.cfg), steps_per_epoch=self.steps_per_epoch,
                             global_batch=self.global_batch, world_size=self.dist.world_size)
        timelimit.resume(self, state, path)  # the budget left and the refitted schedule's length
        ckpt.restore_training_state(state, path, model=self.model, ema=self.ema, optimizer=self.optimizer,
                                    scheduler=self.scheduler, scaler=self.scaler)
        if self.ema is not None and state.get("ema") is None:  # EMA switched on now: start it from these weights
            self.ema = ModelEMA(self.model, self.ema_decay)
        self.run_dir = Path(path).resolve().parent  # a resume continues in the checkpoint's own directory, always
        self.epoch, self.step, self.batch_in_epoch = state["epoch"], state["step"], state["batch_in_epoch"]
        self.best = state["best"]["value"]
        rng = state.get("rng") or []
        if len(rng) == self.dist.world_size:
            self._pending_rng = rng[self.dist.rank]
        else:
            log.warning("checkpoint %s holds the random state of %d processes, this run has %d: data order and "
                        "random draws will differ from an uninterrupted run", path, len(rng), self.dist.world_size)
        self._last_checkpoint = str(path)
        if self.is_main:
            log.info("resumed from %s at epoch %d, step %d (batch %d of the epoch)", path, self.epoch + 1,
                     self.step, self.batch_in_epoch)

    # ------------------------------------------------------------------ one epoch

    def _start_epoch(self, loader, epoch: int):
        """The epoch's batch iterator, positioned after the batches a resumed checkpoint already used."""
        dist_utils.set_loader_epoch(loader, self.train_cfg.seed, epoch)
        skip, pending = min(self.batch_in_epoch, len(loader)), self._pending_rng
        if pending is not None:
            ckpt.restore_rng_state(pending["epoch_start"] if skip else pending["step"])
        self._epoch_rng = ckpt.capture_rng_state()
        batches = iter(loader)
        for _ in range(skip):  # replay consumed batches so that workers' random streams stay in step
            next(batches)
        if pending is not None and skip:
            ckpt.restore_rng_state(pending["step"])
        self._pending_rng = None
        return batches, skip

    def _train_epoch(self, epoch: int) -> str | None:
        """Train from ``self.batch_in_epoch`` to the epoch's end; returns why it stopped early, if it did."""
        t, loader = self.train_cfg, self.loaders["train"]
        batches, skip = self._start_epoch(loader, epoch)
        total, accum = self.batches_per_epoch, self.accum
        self.train_model.train()
        self._epoch_sums, self._epoch_rows, self._epoch_images = None, 0, 0
        self._window_images, self._window_start = 0, time.perf_counter()
        epoch_start = self._window_start
        bar = progress_bar(enabled=self._bars, desc=f"epoch {epoch + 1}/{self.epochs}", total=total, initial=skip,
                           leave=True)
        reason = None
        for index, (images, targets) in enumerate(batches, start=skip):
            group_size = min(accum, total - (index - index % accum))  # the epoch's last group may be short
            final_micro = (index + 1) % accum == 0 or index + 1 == total
            images = images_to_device(images, self.device, self.channels_last)  # uint8 travels; the task normalises
            targets = to_device(targets, self.device)
            no_sync = self.ddp.no_sync() if (self.ddp is not None and not final_micro) else contextlib.nullcontext()
            with no_sync:
                with autocast(self.device, t.amp):
                    losses = self.train_model(images, targets)
                loss = self._losses.add(losses)
                if group_size > 1:
                    loss = loss / group_size
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            self._window_images += images.shape[0]
            if bar is not None:
                bar.update(1)
            if not final_micro:
                continue
            optimizer_step(self.optimizer, self.scheduler, scaler=self.scaler, clip=t.clip_grad, params=self._params,
                           ema=self.ema, model=self.model)
            self.step += 1
            self.batch_in_epoch = index + 1
            if self._max_steps_reached():
                reason = "max_steps"
            elif self._stop.signum and not self.dist.enabled:
                reason = "signal"
            elif self.time_limit is not None and self.time_limit.after_step(self, synced=False):
                reason = "time_limit"
            if reason or self.step % t.log_every == 0 or index + 1 == total:
                self._sync_window(bar)
                if reason is None and self.dist.enabled and self._stop.agreed(self.device):
                    reason = "signal"
                if reason is None and self.time_limit is not None and self.time_limit.after_step(self, synced=True):
                    reason = "time_limit"
            if reason or index + 1 >= total:  # a global batch: the batches after the last whole step wait
                break
        if self._losses.rows:
            self._sync_window(bar)
        self._epoch_seconds = time.perf_counter() - epoch_start
        if bar is not None:
            bar.close()
        if self.batch_in_epoch >= total:
            self.epoch, self.batch_in_epoch = epoch + 1, 0
        return reason

    def _sync_window(self, bar) -> None:
        """Read the buffered loss terms (one host sync): check they are finite, log averages and img/s."""
        rows = self._losses.read()
        finite = torch.isfinite(rows).all(dim=1) & torch.isfinite(rows.sum(dim=1))
        if not bool(finite.all()):
            bad_row = int((~finite).nonzero()[0])
            accum = self.accum
            bad_step = self.step - math.ceil(len(rows) / accum) + bad_row // accum
            terms = dict(zip(self._losses.names, rows[bad_row].tolist()))
            raise NonFiniteLossError(bad_step, self.epoch, terms, self._last_checkpoint)
        sums = rows.sum(dim=0)
        self._epoch_sums = sums if self._epoch_sums is None else self._epoch_sums + sums
        self._epoch_rows += len(rows)
        now = time.perf_counter()
        images_per_s = self._window_images * self.dist.world_size / max(now - self._window_start, 1e-9)
        self._epoch_images += self._window_images
        self._window_images, self._window_start = 0, now
        means = dict(zip(self._losses.names, (sums / len(rows)).tolist()))
        means["loss"] = sum(means.values())
        lr = self.optimizer.param_groups[0]["lr"]
        if self._runlog is not None:
            self._runlog.log_train(self.step, means, lr, images_per_s)
        if bar is not None:
            bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{images_per_s:.0f}", lr=f"{lr:.3g}", refresh=False)

    # ------------------------------------------------------------------ evaluation, checkpoints

    def _evaluate_and_log(self) -> tuple[dict[str, float], bool]:
        """Evaluate, append the record (metrics.jsonl, TensorBoard, plots); returns (metrics, new best?)."""
        metrics = self.evaluate() if "val" in self.loaders else {}
        is_best = False
        if metrics:
            primary, higher_is_better = self._evaluator_info
            if primary not in metrics:
                raise KeyError(f"the evaluator's primary_metric {primary!r} is not among its metrics {sorted(metrics)}")
            # Rank 0 decides: the save that follows is collective, and ranks that disagreed would deadlock.
            is_best = bool(dist_utils.broadcast_object(is_improvement(metrics[primary], self.best, higher_is_better)))
            if is_best:
                self.best = float(dist_utils.broadcast_object(metrics[primary]))
        record = {"epoch": self.epoch, "step": self.step, "lr": self.optimizer.param_groups[0]["lr"],
                  "img_per_s": self._epoch_images * self.dist.world_size / max(self._epoch_seconds, 1e-9),
                  "epoch_time_s": self._epoch_seconds}
        if self._epoch_rows:
            means = dict(zip(self._losses.names, (self._epoch_sums / self._epoch_rows).tolist()))
            record["train/loss"] = sum(means.values())
            record.update({f"train/{name}": value for name, value in means.items()})
        record.update({f"val/{name}": value for name, value in metrics.items()})
        record.update(self.time_limit.record(self) if self.time_limit is not None else {})
        self.history.append(record)
        if self._runlog is not None:
            self._runlog.log_eval(record)
            if metrics and hasattr(self.last_evaluator, "save"):
                self.last_evaluator.save(self.run_dir)  # per-class tables, detections.json, ...
        if self.is_main and metrics:
            message = f"epoch {self.epoch} step {self.step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
            if self._bars:
                from tqdm.auto import tqdm

                tqdm.write(message)  # printed between the epoch bars
            else:
                log.info(message)
        return metrics, is_best

    def _save(self, last: bool = True, best: bool = False) -> None:
        """Write last.pt (+ model.safetensors) and/or best.pt; collective under DDP, rank 0 writes."""
        if not self._create_run_dir:
            return
        mine = {"step": ckpt.capture_rng_state(), "epoch_start": self._epoch_rng if self.batch_in_epoch else None}
        rng = dist_utils.gather_objects(mine)
        if self.is_main:
            state = ckpt.training_state(
                model=self.model, ema=self.ema, optimizer=self.optimizer, scheduler=self.scheduler,
                scaler=self.scaler, rng=rng, config=config_dict(self.cfg),
                position={"epoch": self.epoch, "step": self.step, "batch_in_epoch": self.batch_in_epoch,
                          "world_size": self.dist.world_size, "steps_per_epoch": self.steps_per_epoch,
                          "global_batch": self.global_batch,
                          "time_limit": self.time_limit.state() if self.time_limit is not None else None},
                meta=self._meta(),
                best={"value": self.best, "metric": self._evaluator_info[0] if self._evaluator_info else None})
            exported = self.ema.module if self.ema is not None else self.model
            ckpt.write_run_checkpoint(self.run_dir, state, last=last, best=best,
                                      network=getattr(exported, "net", exported), ema=self.ema is not None)
        if last:
            self._last_checkpoint, self._saved_step = str(self.run_dir / "last.pt"), self.step
        dist_utils.barrier()

    # ------------------------------------------------------------------ helpers

    def _interrupt(self) -> None:
        if self._saved_step != self.step:
            self._save()
        error = TrainingInterrupted(self._stop.signum, self._last_checkpoint if self._create_run_dir else None,
                                    self.epoch, self.step, self.batch_in_epoch)
        if self.is_main:
            log.warning("%s", error)
        raise error

    def _meta(self) -> dict:
        """What a reader of the weights needs without the dataset: the task, the class names, and what the
        task module adds (``extra_meta()``: detection's category ids)."""
        extra = getattr(self.model, "extra_meta", None)
        return {"task": self.cfg.model.task, "class_names": self.class_names, **(extra() if extra else {})}

    def _max_steps_reached(self) -> bool:
        return self.train_cfg.max_steps is not None and self.step >= self.train_cfg.max_steps

    @property
    def _bars(self) -> bool:
        return bool(self.train_cfg.progress) and self.is_main


def _enable_grad_checkpointing(model: nn.Module) -> None:
    """``train.grad_checkpointing``: every sub-module that supports it recomputes its activations."""
    modules = [m for m in model.modules() if hasattr(m, "set_grad_checkpointing")]
    if not modules:
        raise EngineError(f"train.grad_checkpointing=true but {type(model).__name__} has no module with "
                          f"set_grad_checkpointing(); turn it off")
    for module in modules:
        module.set_grad_checkpointing(True)


def _class_names(model: nn.Module, loaders: dict) -> list[str] | None:
    names = getattr(model, "class_names", None)
    if names is None and "train" in loaders:
        names = getattr(getattr(loaders["train"], "dataset", None), "classes", None)
    return [str(name) for name in names] if names is not None else None
