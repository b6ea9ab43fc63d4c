"""Tasks: what a model is trained on and how it is scored, plugged into the one engine.

A task (:class:`resnorm_jax.tasks.base.Task`) owns its data, the global batch of a step,
the loss of a batch and the evaluation; the engine (:mod:`resnorm_jax.training`) owns the
state, the optimizer update in three execution styles, checkpointing and the loop.  A model
family names its task when it registers (:func:`resnorm_jax.models.register_model`).
"""

from __future__ import annotations

from resnorm_jax.errors import ConfigError
from resnorm_jax.registry import Registry

TASKS = Registry("task")


def task_class(config):
  """The task class ``model.name`` trains with."""
  from resnorm_jax import models
  name = models.family(config).meta["task"]
  _register_builtin()
  try:
    return TASKS.entry(name)[0].build
  except ConfigError as e:
    raise ConfigError(f"model.name={config.model.name!r} names task {name!r}: {e}") from None


def data_sets(task_name: str):
  """The registry of data sets ``task_name`` trains on (``data.name``'s valid choices)."""
  _register_builtin()
  return TASKS.entry(task_name)[0].meta["data_sets"]()


def headline(task_name: str) -> tuple[str, str, bool]:
  """(evaluation key, table label, higher is better) of the number a paper reports for
  ``task_name``; the key is also that of ``config.published``."""
  _register_builtin()
  return TASKS.entry(task_name)[0].meta["headline"]


def _register_builtin() -> None:
  """Imports the package's tasks (each registers itself); cheap after the first call."""
  # pylint: disable=import-outside-toplevel,unused-import
  from resnorm_jax.tasks import image  # noqa: F401
  from resnorm_jax.tasks.translation import task  # noqa: F401
