"""CIFAR ResNets (He et al. 2016) assembled from the layer registries.

Depth 6n+2 with basic units (20, 32, 44, 56, 110, 1202) or 9n+2 with bottleneck units (164,
1001); three stages of n units with widths 16/32/64 (x4 outputs for bottleneck units), the
first unit of stages 2 and 3 downsampling by 2 with a 1x1 projection shortcut.  Any norm,
unit ordering, shortcut and skip combinator of the registries plugs in, resolved once by
the family's builder (:func:`cifar_resnet`); the stem and head follow the ordering
(``UnitOrdering.stem`` / ``head``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnorm_jax import config as config_lib, cpu_workarounds
from resnorm_jax.layers import (SHORTCUTS, UNIT_ORDERINGS, Conv, ConvUnit, DepthInfo, NormContext,
                                UnitVariant, norm_factory, resolve_unit)
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers.residual import apply_op
from resnorm_jax.layers.taps import TAPS, tap
from resnorm_jax.models.family import ModelFamily, compute_dtype, register_model

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


def stage_layout(depth: int, block: str = "auto") -> tuple[bool, int]:
  """(bottleneck units?, units per stage) of :func:`resolve_block`."""
  name, n = resolve_block(depth, block)
  return name == "bottleneck", n


class _StageUnit(nn.Module):
  """A ConvUnit with ``train`` as a field so it can be scanned and rematerialized."""
  unit_kwargs: dict
  train: bool

  @nn.compact
  def __call__(self, x, _=None):
    y = ConvUnit(**self.unit_kwargs, name="unit")(x, train=self.train)
    return tap(self, y), None        # the unit is named stage<s>_unit<i> (stage<s>_units)


class CifarResNet(nn.Module):
  """PreAct/original ResNet for 32x32 images (He et al. 2016), NHWC input.

  Attributes mirror the ``model.*`` config keys, the variants resolved once by
  :func:`cifar_resnet` into ``unit`` (a :class:`~resnorm_jax.layers.UnitVariant`: the
  ordering, norm, shortcut and skip combinator of every unit, the norm also that of the
  stem and head).  ``scan_stages`` compiles one body per stage
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
  unit: UnitVariant = resolve_unit()
  weight_standardization: bool = False
  dtype: Any = jnp.float32
  scan_stages: bool = False
  remat: bool = False
  materialize_stream_grad: bool = True   # train.cpu_workarounds (resnorm_jax/cpu_workarounds.py)

  @property
  def units_per_stage(self) -> int:
    return stage_layout(self.depth, self.block)[1]

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    bottleneck, n = stage_layout(self.depth, self.block)
    order, norm = self.unit.ordering, self.unit.norm
    x = Conv(self.width, 3, weight_standardization=self.weight_standardization,
             dtype=self.dtype, name="stem_conv")(images.astype(self.dtype))
    for i, op in enumerate(order.stem):
      x = apply_op(op, norm(name=f"stem_norm_{i}") if op == "norm" else None, x,
                   train=train)

    common = dict(bottleneck=bottleneck, variant=self.unit,
                  weight_standardization=self.weight_standardization, dtype=self.dtype,
                  materialize_stream_grad=self.materialize_stream_grad)
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
        # Tapped unit outputs (layer statistics) stack like the params.
        scanned = nn.scan(scan_cls, variable_axes={"params": 0, "batch_stats": 0, TAPS: 0},
                          split_rngs={"params": True, "dropout": True}, length=n - 1)
        x, _ = scanned(rest, train, name=f"stage{stage + 1}_units")(x, None)
      else:
        for i in range(1, n):
          x, _ = unit_cls(rest, train, name=f"stage{stage + 1}_unit{i + 1}")(x)

    for i, op in enumerate(order.head):
      x = apply_op(op, norm(name=f"head_norm_{i}") if op == "norm" else None, x,
                   train=train)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier")(x)


def cifar_resnet(depth: int = 110, *, block: str = "auto", norm: str = "batch",
                 unit: str = "full_preact", shortcut: str = "identity", skip: str = "skip",
                 skip_lambda: float | None = None, norm_ctx: NormContext = NormContext(),
                 **fields) -> CifarResNet:
  """A :class:`CifarResNet` from the variant names of ``model.*``, each resolved once here
  (the combinator with the network's depth, for DeepNorm); ``fields``: the model's other
  fields (``num_classes``, ``width``, ``dtype``, ...)."""
  _, n = stage_layout(depth, block)
  variant = resolve_unit(unit, norm, shortcut, skip, skip_lambda=skip_lambda, ctx=norm_ctx,
                         depth=DepthInfo("encoder_only", 3 * n))
  return CifarResNet(depth=depth, block=block, unit=variant, **fields)


# ----------------------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------------------
def stage_channels(width: int, bottleneck: bool) -> list[int]:
  """Every channel count a norm sees in a CIFAR ResNet of this width and block."""
  return sorted({width * 2 ** s * f for s in range(3)
                 for f in ((1, 4) if bottleneck else (1,))})


def validate_config(config) -> None:
  """Depth, width and a GroupNorm G that divides every stage's channels."""
  m = config.model
  for registry, key in ((UNIT_ORDERINGS, "unit"), (SHORTCUTS, "shortcut")):
    try:
      registry.parse(m[key])
    except ConfigError as e:
      raise ConfigError(f"model.{key}: {e}") from None
  bottleneck, _ = stage_layout(m.depth, m.block)
  groups = norm_factory(m.norm).channel_groups
  if groups > 1:
    channels = stage_channels(m.width, bottleneck)
    bad = [c for c in channels if c % groups]
    if bad:
      valid = [g for g in range(1, channels[0] + 1) if all(c % g == 0 for c in channels)]
      raise ConfigError(
          f"model.norm={m.norm!r}: G={groups} does not divide the {bad} channels of this "
          f"network (channels {channels}); valid G: {valid}")


def _image_inputs(config, data) -> tuple:
  del config
  return (jnp.zeros((1,) + tuple(data.input_shape), jnp.float32),)


# The model.* keys the family adds to the schema, and the engine's model keys it reads.
_C = config_lib
SCHEMA = {
    "depth": _C.Key(20, _C.TREE, _C.int_at_least(1), "6n+2 (basic) or 9n+2 (bottleneck)"),
    "block": _C.Key("auto", _C.TREE, _C.one_of(*BLOCKS), "auto | basic | bottleneck"),
    "width": _C.Key(16, _C.TREE, _C.POSITIVE_INT, "channels of the first stage"),
    "unit": _C.Key("full_preact", _C.TREE, _C.name, "UNIT_ORDERINGS name"),
    "shortcut": _C.Key("identity", _C.TREE, _C.name, "SHORTCUTS spec"),
    "weight_standardization": _C.Key(False, _C.TRAJECTORY, _C.boolean),
    "scan_stages": _C.Key(False, _C.TREE, _C.boolean,
                          "one scanned body per stage (stacked params)"),
}
READS = ("norm", "skip", "skip_lambda", "bn_momentum", "bn_epsilon", "dtype", "remat")


@register_model("cifar_resnet", "CIFAR ResNet, depth 6n+2 (basic) or 9n+2 (bottleneck)",
                ModelFamily(task="image_classification", example_inputs=_image_inputs,
                            schema=SCHEMA, reads=READS, validate=validate_config,
                            title_keys=("depth", "unit", "shortcut", "norm", "skip",
                                        "skip_lambda"),
                            summary_overrides={"scan_stages": False, "remat": False}))
def build(arg, config, norm_ctx, data):
  del arg
  m = config.model
  return cifar_resnet(m.depth, block=m.block, norm=m.norm, unit=m.unit,
                      shortcut=m.shortcut, skip=m.skip, skip_lambda=m.skip_lambda,
                      norm_ctx=norm_ctx, num_classes=data.num_classes, width=m.width,
                      weight_standardization=m.weight_standardization,
                      dtype=compute_dtype(config), scan_stages=m.scan_stages,
                      remat=m.remat, materialize_stream_grad=cpu_workarounds.enabled(config))
