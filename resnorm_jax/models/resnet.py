"""CIFAR ResNets (He et al. 2016) assembled from the layer registries.

Depth 6n+2 with basic units (20, 32, 44, 56, 110, 1202) or 9n+2 with bottleneck units (164,
1001); three stages of n units with widths 16/32/64 (x4 outputs for bottleneck units), the
first unit of stages 2 and 3 downsampling by 2 with a 1x1 projection shortcut.  Any norm,
unit ordering, shortcut and skip combinator of the registries plugs in; the stem and head
follow the ordering (``UnitOrdering.stem`` / ``head``).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnorm_jax.layers import (UNIT_ORDERINGS, Conv, ConvUnit, DepthInfo, NormContext,
                                make_norm)
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers.residual import apply_op

BLOCKS = ("auto", "basic", "bottleneck")
BASIC_DEPTHS = (20, 32, 44, 56, 110, 1202)
BOTTLENECK_DEPTHS = (164, 1001)


def resolve_block(depth: int, block: str = "auto") -> tuple[str, int]:
  """Returns (block, units per stage) for a depth: 6n+2 basic, 9n+2 bottleneck.

  ``auto`` picks bottleneck units for depths >= 164 that are 9n+2 (the paper's 164 and
  1001), basic units otherwise.
  """
  if block not in BLOCKS:
    raise ConfigError(f"unknown model.block {block!r}; valid choices: {', '.join(BLOCKS)}")
  basic_ok = depth >= 8 and (depth - 2) % 6 == 0
  bottleneck_ok = depth >= 11 and (depth - 2) % 9 == 0
  if block == "auto":
    block = "bottleneck" if bottleneck_ok and (depth >= 164 or not basic_ok) else "basic"
  if block == "basic" and basic_ok:
    return "basic", (depth - 2) // 6
  if block == "bottleneck" and bottleneck_ok:
    return "bottleneck", (depth - 2) // 9
  raise ConfigError(
      f"model.depth={depth} is not a CIFAR ResNet depth for {block} units: basic units need "
      f"depth = 6n+2 (e.g. {', '.join(map(str, BASIC_DEPTHS))}), bottleneck units 9n+2 "
      f"(e.g. {', '.join(map(str, BOTTLENECK_DEPTHS))})")


class _StageUnit(nn.Module):
  """A ConvUnit with ``train`` as a field so it can be scanned and rematerialized."""
  unit_kwargs: dict
  train: bool

  @nn.compact
  def __call__(self, x, _=None):
    y = ConvUnit(**self.unit_kwargs, name="unit")(x, train=self.train)
    return y, None


class CifarResNet(nn.Module):
  """PreAct/original ResNet for 32x32 images (He et al. 2016), NHWC input.

  Attributes mirror the ``model.*`` config keys.  ``scan_stages`` compiles one body per stage
  (``nn.scan`` over its identical units: ResNet-1001's train step compiles in seconds
  instead of minutes); a scanned unit keeps only its convolution outputs for the backward
  pass and recomputes the norms and activations from them (``jax.checkpoint_policies.
  checkpoint_dots``), which on CPU makes the step faster and its memory a fraction of
  stacking every intermediate.  ``remat`` rematerializes each unit entirely in the backward
  pass, and ``dtype`` is the compute dtype (parameters and norm statistics stay float32).
  """
  depth: int = 110
  num_classes: int = 10
  block: str = "auto"
  width: int = 16
  norm: str = "batch"
  unit: str = "full_preact"
  shortcut: str = "identity"
  skip: str = "skip"
  skip_lambda: float | None = None
  weight_standardization: bool = False
  norm_ctx: NormContext = NormContext()
  dtype: Any = jnp.float32
  scan_stages: bool = False
  remat: bool = False

  @property
  def units_per_stage(self) -> int:
    return resolve_block(self.depth, self.block)[1]

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    block, n = resolve_block(self.depth, self.block)
    bottleneck = block == "bottleneck"
    order = UNIT_ORDERINGS.build(self.unit)
    x = Conv(self.width, 3, weight_standardization=self.weight_standardization,
             dtype=self.dtype, name="stem_conv")(images.astype(self.dtype))
    for i, op in enumerate(order.stem):
      x = apply_op(op, make_norm(self.norm, self.norm_ctx, name=f"stem_norm_{i}")
                   if op == "norm" else None, x, train=train)

    common = dict(bottleneck=bottleneck, ordering=self.unit, norm=self.norm,
                  shortcut=self.shortcut, skip=self.skip, skip_lambda=self.skip_lambda,
                  ctx=self.norm_ctx, depth=DepthInfo("encoder_only", 3 * n),
                  weight_standardization=self.weight_standardization, dtype=self.dtype)
    unit_cls = nn.remat(_StageUnit) if self.remat else _StageUnit
    scan_cls = unit_cls if self.remat else nn.remat(
        _StageUnit, policy=jax.checkpoint_policies.checkpoint_dots)
    for stage in range(3):
      features = self.width * 2 ** stage * (4 if bottleneck else 1)
      first = dict(common, features=features, strides=1 if stage == 0 else 2)
      x, _ = unit_cls(first, train, name=f"stage{stage + 1}_unit1")(x)
      rest = dict(common, features=features, strides=1)
      if n == 1:
        continue
      if self.scan_stages:
        # "intermediates": captured unit outputs (layer statistics) stack like the params.
        scanned = nn.scan(scan_cls, variable_axes={"params": 0, "batch_stats": 0,
                                                   "intermediates": 0},
                          split_rngs={"params": True, "dropout": True}, length=n - 1)
        x, _ = scanned(rest, train, name=f"stage{stage + 1}_units")(x, None)
      else:
        for i in range(1, n):
          x, _ = unit_cls(rest, train, name=f"stage{stage + 1}_unit{i + 1}")(x)

    for i, op in enumerate(order.head):
      x = apply_op(op, make_norm(self.norm, self.norm_ctx, name=f"head_norm_{i}")
                   if op == "norm" else None, x, train=train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(x)
