"""Regression with a normalized MLP (examples/regression_plugin.py), one variant per norm.

    RESNORM_PLUGINS=examples/regression_plugin.py resnorm-train \
        --config=examples/regression_config.py:layer --workdir=runs/regression_layer
    RESNORM_PLUGINS=examples/regression_plugin.py resnorm-sweep \
        --config=examples/regression_config.py --variants=all --seeds=2 --workdir=runs/regr
"""

from resnorm_jax import experiments
from resnorm_jax.config import base_config

VARIANTS = ("batch", "layer", "rms", "none")
BASELINE = "none"


def get_config(arg=None):
  norm = experiments.check_variant(arg, VARIANTS, "examples/regression_config.py", "layer")
  c = base_config()
  c.model.name = "mlp_regressor"
  c.model.norm = norm
  c.model.hidden = 64
  c.model.layers = 3
  c.data.name = "sine"
  c.regression.input_dim = 4
  c.train.optimizer = "adam"
  c.train.learning_rate = 3e-3
  c.train.schedule = "constant"
  c.train.weight_decay = 0.0
  c.train.batch_size = 64
  c.train.steps = 300
  c.train.log_every_steps = 50
  c.eval.every_steps = 100
  c.checkpoint.every_steps = 100
  return c
