"""Tasks: what a model is trained on and how it is scored, plugged into the one engine.

A task (:class:`resnorm_jax.tasks.base.Task`, registered with
:func:`resnorm_jax.tasks.base.register_task` and a :class:`TaskInfo`) owns its data, the
global batch of a step, the loss of a batch and the evaluation; the engine
(:mod:`resnorm_jax.training`) owns the state, the optimizer update in three execution
styles, checkpointing and the loop.  A model family names its task when it registers
(:func:`resnorm_jax.models.register_model`).  The package's own tasks, image
classification and translation, register themselves when imported here.
"""

from __future__ import annotations

from resnorm_jax import models
from resnorm_jax.errors import ConfigError
from resnorm_jax.tasks import image as _image  # noqa: F401  (registers image_classification)
from resnorm_jax.tasks.base import TASKS, Metric, Task, TaskInfo, register_task
from resnorm_jax.tasks.translation import task as _translation  # noqa: F401  (translation)


def task_name(config) -> str:
  """The task ``model.name``'s family trains with."""
  return models.family(config).task


def _entry(config):
  name = task_name(config)
  try:
    return TASKS.entry(name)[0]
  except ConfigError as e:
    raise ConfigError(f"model.name={config.model.name!r} names task {name!r}: {e}") from None


def task_class(config) -> type[Task]:
  """The :class:`Task` subclass ``model.name`` trains with."""
  return _entry(config).build


def task_info(config) -> TaskInfo:
  """The :class:`TaskInfo` of the task ``model.name`` trains with."""
  return _entry(config).info


def measure(config) -> Metric:
  """The metric a results table shows for ``config``: ``published.measure`` when set, else
  the task's headline metric."""
  info = task_info(config)
  return info.measure(info, config)


__all__ = ["TASKS", "Metric", "Task", "TaskInfo", "register_task", "task_name", "task_class",
           "task_info", "measure"]
