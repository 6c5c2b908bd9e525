"""Training side of peft-ext (installed as ``peft_ext.trainers``).

* :class:`RegularizedTrainer` -- ``transformers.Trainer`` that adds ``model.get_regularization_loss()``.
* :class:`ContinualSchedule` -- trains a method on a stream of tasks and records the accuracy matrix.
* :mod:`.strategies` -- how each method follows the stream, derived from its ``peft_ext.registry.METHODS`` entry.
* :mod:`.hub` -- a run's model card, its safetensors-only upload to the Hub, and loading it back.
* :mod:`.task_stream` -- tasks from ``datasets.Dataset`` objects, ``TASKS.json`` files or the embedded default.
* :mod:`.metrics` -- Avg, Last, BWT, Forgetting, Transfer as a local ``evaluate`` module.
"""

from .continual import (
    ContinualResult,
    ContinualRunError,
    ContinualSchedule,
    ContinualTrainingArguments,
    format_summary,
)
from .heads import TaskHeadClassifier
from .metrics import compute_continual_metrics, load_metric
from .regularized import RegularizedTrainer, regularization_loss_of
from .strategies import (
    STRATEGIES,
    ContinualStrategy,
    available_methods,
    default_learning_rate,
    get_strategy,
    register_strategy,
)
from .task_stream import Task, TaskStreamError, default_model_path, default_task_stream, load_task_stream


__all__ = [
    "STRATEGIES",
    "ContinualResult",
    "ContinualRunError",
    "ContinualSchedule",
    "ContinualStrategy",
    "ContinualTrainingArguments",
    "RegularizedTrainer",
    "Task",
    "TaskHeadClassifier",
    "TaskStreamError",
    "available_methods",
    "compute_continual_metrics",
    "default_learning_rate",
    "default_model_path",
    "default_task_stream",
    "format_summary",
    "get_strategy",
    "load_metric",
    "load_task_stream",
    "regularization_loss_of",
    "register_strategy",
]
