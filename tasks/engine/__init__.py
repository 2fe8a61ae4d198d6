"""The task-agnostic training engine: trainer, evaluation loop, checkpoints, distributed helpers,
optimizers/schedules and the run directory. Nothing here imports a task module.

>>> from tasks.engine import Trainer, evaluate
>>> Trainer(task_model, loaders, cfg).fit()
>>> evaluate(task_model, loaders["val"], device="cpu")
"""

from tasks.engine.errors import EngineError, NonFiniteLossError, TrainingInterrupted
from tasks.engine.evaluate import evaluate
from tasks.engine.trainer import Trainer

__all__ = ["EngineError", "NonFiniteLossError", "Trainer", "TrainingInterrupted", "evaluate"]
