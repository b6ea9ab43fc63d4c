"""Config validation, in one place on the engine side: before anything loads, compiles or
is written, every value is checked and the first bad one is a one-line
:class:`ConfigError` that names it and the valid choices.

Order: finite numbers; the model family (each ``model.*`` key's own check, the registries
of the shared ``model.*`` specs, then the family's checks across keys); every key's own check (:data:`resnorm_jax.config.SCHEMA`,
the engine's keys and those families and tasks added); the data set against the family's
task; the keys that depend on each other or on the machine; the task's checks; no
negative number anywhere.
"""

from __future__ import annotations

import math

import ml_collections

from resnorm_jax import config as config_lib, models, tasks
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import COMBINATORS, NORMS, bn_sync_group_size


def _spec(registry, value, key, **context) -> None:
  try:
    registry.validate(value, **context)
  except ConfigError as e:
    raise ConfigError(f"{key}: {e}") from None


def validate_model(config: ml_collections.ConfigDict) -> None:
  """The ``model`` section against the registries and the family's checks (no data, no
  devices): what ``resnorm-summary`` needs."""
  m = config.model
  config_lib.choice(m.name, models.MODELS.names(), "model.name")
  family = models.family(config)
  config_lib.check_keys(config, sections=("model",))   # before the family's own checks
  if "norm" in family.config_keys:
    _spec(NORMS, m.norm, "model.norm")
  if "skip" in family.config_keys:
    _spec(COMBINATORS, m.skip, "model.skip", lam=m.skip_lambda)
  family.validate(config)


def validate_data_set(config: ml_collections.ConfigDict) -> None:
  """``data.name`` is a data set of the family's task (a typo gets the closest name)."""
  task = tasks.task_name(config)
  data_sets = tasks.task_info(config).data_sets
  if config.data.name in data_sets.names():
    return
  everything = [n for e in tasks.TASKS for n in e.info.data_sets.names()]
  config_lib.choice(config.data.name, everything, "data.name")
  raise ConfigError(f"model.name={config.model.name!r} trains on {task} data, not "
                    f"data.name={config.data.name!r}; valid choices: "
                    f"{', '.join(data_sets.names())}")


def validate_devices(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """``parallel.*`` and the batch against the machine; returns the data-parallel devices."""
  p, t = config.parallel, config.train
  requested = p.num_devices or num_devices
  if requested > num_devices:
    raise ConfigError(f"parallel.num_devices={p.num_devices} but this machine has "
                      f"{num_devices} devices; use 0 (all) or a number <= {num_devices}")
  try:
    bn_sync_group_size(p.bn_sync, requested)
  except ConfigError as e:
    raise ConfigError(f"parallel.bn_sync: {e}") from None
  if t.batch_size % requested:
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                      f"{requested} data-parallel devices; e.g. use "
                      f"{requested * max(1, t.batch_size // requested)}")
  return requested


def validate_engine(config: ml_collections.ConfigDict) -> None:
  """The engine's checks across keys: the optimizer's and checkpoint averaging's."""
  t, ck = config.train, config.checkpoint
  if t.optimizer in ("adam", "adamw"):
    config_lib.in_range(t.eps, "train.eps", 0, math.inf, open_low=True)
  if ck.average_last and not (ck.average_every_steps or ck.every_steps):
    raise ConfigError(f"checkpoint.average_last={ck.average_last} needs an interval: set "
                      "checkpoint.average_every_steps or checkpoint.every_steps")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError for the first invalid value; compiles and writes nothing."""
  config_lib.check_numbers(config, negatives=False)
  validate_model(config)
  config_lib.check_keys(config)
  validate_data_set(config)
  replicas = validate_devices(config, num_devices)
  validate_engine(config)
  tasks.task_class(config).validate(config, replicas)
  config_lib.check_numbers(config)
