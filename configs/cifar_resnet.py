"""CIFAR ResNets with He et al. (2016)'s recipe.

Variants (comma-separated): a preset ``resnet20 ... resnet1202, resnet164, resnet1001`` and
optionally ``cifar100``, e.g. ``configs/cifar_resnet.py:resnet164,cifar100``.

Recipe: SGD momentum 0.9, batch 128, weight decay 1e-4, lr 0.1 divided by 10 at 32k and 48k
iterations, 64k iterations, warm-up at lr 0.01 for 400 iterations (depth >= 110), 4-pixel pad
+ random crop + horizontal flip, per-channel normalization, He-normal init.  Depths >= 1000
scan their stages (``model.scan_stages``).
"""

from resnorm_jax.config import base_config
from resnorm_jax.errors import ConfigError

PRESETS = {f"resnet{d}": d for d in (20, 32, 44, 56, 110, 164, 1001, 1202)}
DATASETS = ("cifar10", "cifar100")


def get_config(arg=None):
  parts = [p.strip() for p in (arg or "resnet110").split(",") if p.strip()]
  c = base_config()
  c.data.name = "cifar10"
  c.model.depth = 110
  for part in parts:
    if part in PRESETS:
      c.model.depth = PRESETS[part]
    elif part in DATASETS:
      c.data.name = part
    else:
      raise ConfigError(f"unknown variant {part!r} of configs/cifar_resnet.py; valid: "
                        f"{', '.join(list(PRESETS) + list(DATASETS))}")
  c.model.unit = "full_preact"
  # ResNet-1001/1202: one compiled body per stage instead of 333/600 units (cold start under
  # 20 s instead of minutes on CPU; the step is not slower, see benchmarks/compile_time.py).
  c.model.scan_stages = c.model.depth >= 1000
  c.train.steps = 64_000
  c.train.batch_size = 128
  c.train.optimizer = "sgd"
  c.train.momentum = 0.9
  c.train.learning_rate = 0.1
  c.train.schedule = "piecewise"
  c.train.boundaries = (32_000, 48_000)
  c.train.weight_decay = 1e-4
  if c.model.depth >= 110:
    c.train.warmup_steps = 400
    c.train.warmup_learning_rate = 0.01
  c.train.log_every_steps = 100
  c.eval.every_steps = 4_000
  c.eval.batch_size = 500
  c.checkpoint.every_steps = 4_000
  return c
