"""A task and a model family from outside the package: regression of a smooth function of a
few variables with a multilayer perceptron whose hidden layers use any ``model.norm``.

Load it with ``RESNORM_PLUGINS=examples/regression_plugin.py`` (README, "Adding a model
family or a task"); ``examples/regression_config.py`` trains it.  The task is

    x ~ U[-1, 1]^d,   y = (1/d) Σ_j sin(π x_j) + σ·ε,   ε ~ N(0, 1),

the loss the mean squared error over the global batch, and its headline number the test
RMSE (lower is better).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from resnorm_jax import config as config_lib, data as data_lib, models, parallelism
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import make_norm
from resnorm_jax.registry import Registry
from resnorm_jax.tasks import Metric, Task, TaskInfo, register_task
from resnorm_jax.tasks.base import LossOutput

C = config_lib

# ---------------------------------------------------------------------------------------------
# The task: its data sets, its config section, its loss and its evaluation.
# ---------------------------------------------------------------------------------------------
REGRESSION_DATA = Registry("regression data set")


@REGRESSION_DATA.register("sine", "y = mean_j sin(π x_j) + noise, x uniform in [-1, 1]^d")
def sine(arg, config):
  del arg
  r = config.regression
  rng = np.random.default_rng(config.train.seed)

  def draw(n):
    x = rng.uniform(-1.0, 1.0, (n, r.input_dim)).astype(np.float32)
    y = np.sin(np.pi * x).mean(axis=1) + r.noise * rng.standard_normal(n)
    return x, y.astype(np.float32)
  return draw(r.train_size), draw(r.test_size)


SCHEMA = {"regression": {
    "input_dim": C.Key(4, C.TREE, C.POSITIVE_INT, "d, the number of input variables"),
    "train_size": C.Key(512, C.TRAJECTORY, C.POSITIVE_INT),
    "test_size": C.Key(256, C.TRAJECTORY, C.POSITIVE_INT),
    "noise": C.Key(0.05, C.TRAJECTORY, C.number(allow_zero=True), "σ of the label noise"),
}}


@register_task("regression", "a smooth function of a few variables: mean squared error",
               TaskInfo(headline=Metric("rmse", "test RMSE", higher_is_better=False),
                        data_sets=REGRESSION_DATA, schema=SCHEMA))
class Regression(Task):
  """Every process holds the (small) data set; a step's inputs are the global batch."""

  def __init__(self, config, mesh):
    super().__init__(config, mesh)
    (self.x, self.y), (self.test_x, self.test_y) = REGRESSION_DATA.build(
        config.data.name, config=config)
    self.data = self.static_data(config)

  @classmethod
  def validate(cls, config, replicas):
    del replicas
    if config.train.batch_size > config.regression.train_size:
      raise ConfigError(f"train.batch_size={config.train.batch_size} exceeds "
                          f"regression.train_size={config.regression.train_size}")

  @classmethod
  def static_data(cls, config):
    return models.DataInfo(input_shape=(config.regression.input_dim,))

  def setup(self, workdir):
    del workdir
    self.sharded = parallelism.batch_sharded(self.mesh)
    model = self.model

    @jax.jit
    def squared_error(state, x, y):
      pred = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                         train=False)
      return jnp.sum((pred - y) ** 2)
    self.squared_error = squared_error

  def inputs(self, step):
    t = self.config.train
    idx = data_lib.batch_indices(t.seed, step, len(self.y), t.batch_size)
    return tuple(parallelism.host_to_global(a[idx], self.sharded) for a in (self.x, self.y))

  def weight(self, batch):
    return jnp.float32(batch[1].shape[0])

  def loss(self, model, variables, batch, key, apply_kwargs):
    x, y = batch
    pred, new_vars = model.apply(variables, x, train=True, rngs={"dropout": key},
                                 **apply_kwargs)
    return LossOutput(jnp.sum((pred - y) ** 2), {}, new_vars)

  def evaluate(self, state, step, name=""):
    del step, name
    total = float(parallelism.to_host(self.squared_error(state, self.test_x, self.test_y)))
    return {"rmse": float(np.sqrt(total / len(self.test_y))), "mse": total / len(self.test_y)}

  def throughput(self, summary, steps_per_sec):
    del summary
    return {"examples_per_sec": steps_per_sec * self.config.train.batch_size}

  @staticmethod
  def describe(ev):
    return f"test RMSE {ev['rmse']:.4f}"


# ---------------------------------------------------------------------------------------------
# The model family: an MLP with a norm after every hidden layer.
# ---------------------------------------------------------------------------------------------
class NormalizedMLP(nn.Module):
  """(Dense -> norm -> ReLU) x layers -> Dense(1); the norms see (batch, 1, hidden) tokens."""
  hidden: int
  layers: int
  norm: str
  norm_ctx: models.NormContext

  @nn.compact
  def __call__(self, x, *, train=False):
    for i in range(self.layers):
      x = nn.Dense(self.hidden, name=f"dense_{i}")(x)
      x = make_norm(self.norm, self.norm_ctx, name=f"norm_{i}")(x[:, None], train=train)[:, 0]
      x = nn.relu(x)
    return nn.Dense(1, name="head")(x)[:, 0]


@models.register_model(
    "mlp_regressor", "an MLP with model.norm after every hidden layer",
    models.ModelFamily(
        task="regression",
        example_inputs=lambda config, data: (jnp.zeros((1,) + data.input_shape),),
        schema={"hidden": C.Key(64, C.TREE, C.POSITIVE_INT, "units per hidden layer"),
                "layers": C.Key(3, C.TREE, C.POSITIVE_INT, "hidden layers")},
        reads=("norm", "bn_momentum", "bn_epsilon"),
        title_keys=("hidden", "layers", "norm")))
def build(arg, config, norm_ctx, data):
  del arg, data
  m = config.model
  return NormalizedMLP(m.hidden, m.layers, m.norm, norm_ctx)
