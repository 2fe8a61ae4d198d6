"""The task-agnostic training engine: trainer, evaluation loop, checkpoints, distributed helpers,
optimizers/schedules and the run directory. Nothing here imports a task module.

>>> from tasks.engine import Trainer, evaluate
>>> Trainer(task_model, loaders, cfg).fit()
>>> evaluate(task_model, loaders["val"], device="cpu")
"""

from .errors import EngineError
from .evaluate import evaluate
from .trainer import NonFiniteLossError, Trainer, TrainingInterrupted

__all__ = ["EngineError", "NonFiniteLossError", "Trainer", "TrainingInterrupted", "evaluate"]
