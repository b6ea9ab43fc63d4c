"""Quick start: a small PreAct-ResNet on scikit-learn's handwritten digits (offline, CPU).

    resnorm-train                                   # this config, workdir runs/quickstart
    resnorm-train --config.model.norm=group:4       # any override works
"""

from resnorm_jax.config import base_config


def get_config(arg=None):
  del arg
  c = base_config()
  c.data.name = "digits"
  c.data.augment = "crop"          # digits are not mirror-symmetric: no flips
  c.data.pad = 1
  c.model.depth = 20
  c.model.unit = "full_preact"
  c.model.norm = "batch"
  c.train.steps = 600
  c.train.batch_size = 64
  c.train.learning_rate = 0.1
  c.train.schedule = "cosine"
  c.train.warmup_steps = 50
  c.train.weight_decay = 5e-4
  c.train.log_every_steps = 50
  c.eval.every_steps = 200
  c.eval.batch_size = 360
  c.checkpoint.every_steps = 200
  c.checkpoint.keep = 2
  return c
