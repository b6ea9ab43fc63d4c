"""Model registry: a model family is one registered builder plus what the engine needs of it.

A family is registered with :func:`register_model`: its builder
``build(arg, config, norm_ctx, data) -> flax module``, the task it trains with (a name in
:data:`resnorm_jax.tasks.TASKS`), the example inputs ``init`` traces, its own config checks,
and the FLOPs ``resnorm-summary`` cannot see as layers.  Nothing else in the package names
a model: a new family is one new module that registers itself, plus a config
(``tests/test_models.py`` registers one from the test file alone and trains it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax.numpy as jnp

from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import NORMS, NormContext
from resnorm_jax.registry import Entry, Registry

MODELS = Registry("model")


@dataclasses.dataclass(frozen=True)
class DataInfo:
  """What a model needs to know of its data: the classes and the shape of one example
  (image tasks); a translation model reads its vocabulary from ``model.vocab_size``."""
  num_classes: int = 0
  input_shape: tuple[int, ...] = ()


def _no_checks(config) -> None:
  del config


def register_model(name: str, doc: str, *, task: str,
                   example_inputs: Callable[[Any, DataInfo], tuple],
                   validate: Callable[[Any], None] = _no_checks,
                   extra_flops: Callable[[Any, Any], int] = lambda config, model: 0,
                   config_keys: tuple[str, ...] = (), title_keys: tuple[str, ...] = ()):
  """Registers ``build(arg, config, norm_ctx, data)`` as model family ``name``.

  ``task``: the task it trains with; ``example_inputs(config, data)``: the positional inputs
  of a batch of one, as ``init`` and ``resnorm-summary`` trace them; ``validate(config)``:
  the family's own checks (raise :class:`ConfigError`), run before anything compiles;
  ``extra_flops(config, model)``: per-example FLOPs that are not layer calls (attention
  products, tied logits); ``config_keys``: the ``model.*`` keys the family reads (the
  others are ignored by it); ``title_keys``: the keys ``resnorm-summary`` names in its
  title."""
  return MODELS.register(name, doc, task=task, example_inputs=example_inputs,
                         validate=validate, extra_flops=extra_flops, config_keys=config_keys,
                         title_keys=title_keys)


def family(config) -> Entry:
  """The registry entry of ``model.name`` (ConfigError listing the valid names)."""
  try:
    return MODELS.entry(config.model.name)[0]
  except ConfigError as e:
    raise ConfigError(f"model.name: {e}") from None


def norm_context(config, num_replicas: int = 1, axis_name=None) -> NormContext:
  return NormContext(bn_sync=config.parallel.bn_sync, axis_name=axis_name,
                     num_replicas=num_replicas, momentum=config.model.bn_momentum,
                     epsilon=config.model.bn_epsilon)


def compute_dtype(config):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]


def build_model(config, norm_ctx: NormContext, data: DataInfo):
  return MODELS.build(config.model.name, config=config, norm_ctx=norm_ctx, data=data)


def example_inputs(config, data: DataInfo) -> tuple:
  return family(config).meta["example_inputs"](config, data)


def validate_model_config(config) -> None:
  """The family's checks that need no compilation (depth, G dividing channels, ...)."""
  family(config).meta["validate"](config)


# The families of this package register themselves on import.
from resnorm_jax.models import resnet as _resnet  # noqa: E402,F401  pylint: disable=wrong-import-position
from resnorm_jax.models import transformer as _transformer  # noqa: E402,F401  pylint: disable=wrong-import-position

__all__ = ["MODELS", "DataInfo", "register_model", "family", "norm_context", "compute_dtype",
           "build_model", "example_inputs", "validate_model_config", "NORMS"]
