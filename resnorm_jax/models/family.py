"""The model registry: a model family is one registered builder plus what the engine needs.

A family is registered with :func:`register_model`, decorating its builder
``build(arg, config, norm_ctx, data) -> flax module``; its :class:`ModelFamily` says which
task it trains with (a name in :data:`resnorm_jax.tasks.TASKS`), the example inputs
``init`` traces, the ``model.*`` keys it adds to the schema and those it reads, its own
checks, and the FLOPs ``resnorm-summary`` cannot see as layers.  Nothing else in the package
names a model: a new family is one new module that registers itself, plus a config
(README, "Adding a model family or a task").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import jax.numpy as jnp

from resnorm_jax import config as config_lib
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import NormContext
from resnorm_jax.registry import Entry, KeyedRegistry


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model needs to know of its data: the classes and the shape of one example
  (image tasks); a translation model reads its vocabulary from ``model.vocab_size``."""
  num_classes: int = 0
  input_shape: tuple[int, ...] = ()


def _no_checks(config) -> None:
  del config


def _no_extra_flops(config, model) -> int:
  del config, model
  return 0


@dataclasses.dataclass(frozen=True)
class ModelFamily:
  """What the engine and the commands know of a model family.

  ``task``: the task it trains with; ``example_inputs(config, data)``: the positional
  inputs of a batch of one, as ``init`` and ``resnorm-summary`` trace them; ``schema``: the
  ``model.*`` keys the family adds (:class:`resnorm_jax.config.Key`); ``reads``: the
  engine's shared ``model.*`` keys it reads (``norm``, ``skip``, ...; the others are neutral
  for it on resume); ``validate(config)``: its checks across keys and registries (raise
  :class:`ConfigError`), run before anything compiles; ``extra_flops(config, model)``:
  per-example FLOPs that are not layer calls (attention products, tied logits);
  ``title_keys``: the keys ``resnorm-summary`` and ``resnorm-sweep`` name in titles;
  ``summary_overrides``: ``model.*`` values ``resnorm-summary`` traces the model with (e.g.
  unrolled stages, so each unit is counted)."""
  task: str
  example_inputs: Callable[[Any, DataInfo], tuple]
  schema: Mapping[str, config_lib.Key] = dataclasses.field(default_factory=dict)
  reads: tuple[str, ...] = ()
  validate: Callable[[Any], None] = _no_checks
  extra_flops: Callable[[Any, Any], int] = _no_extra_flops
  title_keys: tuple[str, ...] = ()
  summary_overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def config_keys(self) -> tuple[str, ...]:
    """Every ``model.*`` key the family reads."""
    return tuple(self.schema) + tuple(k for k in self.reads if k not in self.schema)


MODELS = KeyedRegistry("model", ModelFamily)


def register_model(name: str, doc: str, family_info: ModelFamily):
  """Registers the decorated ``build(arg, config, norm_ctx, data)`` as model family
  ``name``, and its ``schema`` keys in the config schema's ``model`` section."""
  return MODELS.register_with_keys(name, doc, family_info, {"model": family_info.schema})


def family_entry(config) -> Entry:
  """The registry entry of ``model.name`` (ConfigError listing the valid names)."""
  try:
    return MODELS.entry(config.model.name)[0]
  except ConfigError as e:
    raise ConfigError(f"model.name: {e}") from None


def family(config) -> ModelFamily:
  """The :class:`ModelFamily` of ``model.name`` (ConfigError listing the valid names)."""
  return family_entry(config).info


def norm_context(config, num_replicas: int = 1, axis_name=None) -> NormContext:
  return NormContext(bn_sync=config.parallel.bn_sync, axis_name=axis_name,
                     num_replicas=num_replicas, momentum=config.model.bn_momentum,
                     epsilon=config.model.bn_epsilon)


def compute_dtype(config):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]


def build_model(config, norm_ctx: NormContext, data: DataInfo):
  return MODELS.build(config.model.name, config=config, norm_ctx=norm_ctx, data=data)


def example_inputs(config, data: DataInfo) -> tuple:
  return family(config).example_inputs(config, data)
