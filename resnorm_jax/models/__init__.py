"""Model registry: every model is assembled from the layer registries by config values."""

from __future__ import annotations

import jax.numpy as jnp

from resnorm_jax.layers import NORMS, NormContext
from resnorm_jax.registry import ConfigError, Registry

MODELS = Registry("model")


def norm_context(config, num_replicas: int = 1, axis_name=None) -> NormContext:
  return NormContext(bn_sync=config.parallel.bn_sync, axis_name=axis_name,
                     num_replicas=num_replicas, momentum=config.model.bn_momentum,
                     epsilon=config.model.bn_epsilon)


def compute_dtype(config):
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.model.dtype]


@MODELS.register("cifar_resnet", "CIFAR ResNet, depth 6n+2 (basic) or 9n+2 (bottleneck)")
def _cifar_resnet(arg, config, norm_ctx: NormContext, num_classes: int):
  from resnorm_jax.models.resnet import CifarResNet
  m = config.model
  return CifarResNet(depth=m.depth, num_classes=num_classes, block=m.block, width=m.width,
                     norm=m.norm, unit=m.unit, shortcut=m.shortcut, skip=m.skip,
                     skip_lambda=m.skip_lambda, weight_standardization=m.weight_standardization,
                     norm_ctx=norm_ctx, dtype=compute_dtype(config),
                     scan_stages=m.scan_stages, remat=m.remat)


@MODELS.register("transformer", "encoder-decoder Transformer (Vaswani 2017), presets base, "
                 "big, iwslt, tiny; every sublayer wrapped by `model.skip`")
def _transformer(arg, config, norm_ctx: NormContext, num_classes: int = 0):
  del num_classes
  from resnorm_jax.models.transformer import Transformer
  return Transformer(transformer_config(config, norm_ctx))


def transformer_config(config, norm_ctx: NormContext):
  from resnorm_jax.models.transformer import transformer_preset
  m = config.model
  extra = {} if m.get("dropout_rate") is None else {"dropout_rate": m.dropout_rate}
  return transformer_preset(m.preset, m.vocab_size, max_len=m.max_len, skip=m.skip, **extra,
                            skip_lambda=m.skip_lambda, norm=m.norm, norm_ctx=norm_ctx,
                            dtype=compute_dtype(config))


def build_model(config, norm_ctx: NormContext, num_classes: int):
  return MODELS.build(config.model.name, config=config, norm_ctx=norm_ctx,
                      num_classes=num_classes)


def summary_inputs(config):
  """(model, inputs with batch 1, call kwargs, FLOPs not in layers) for ``resnorm-summary``."""
  if config.model.name == "cifar_resnet":
    from resnorm_jax import data as data_lib
    shape = {"digits": (8, 8, 1)}.get(config.data.name, (32, 32, 3))
    classes = {"cifar100": 100}.get(config.data.name, 10)
    model = build_model(config, norm_context(config), classes)
    return model, (jnp.zeros((1,) + shape, jnp.float32),), {"train": False}, 0
  if config.model.name == "transformer":
    model = build_model(config, norm_context(config), 0)
    cfg, n = model.config, config.model.summary_length
    tokens = jnp.ones((1, n), jnp.int32)
    d = cfg.d_model
    # Not layers: QKᵀ and AV (2 matmuls of 2·n·n·d each) per attention, tied output logits.
    attention = 4 * n * n * d * (cfg.num_encoder_layers + 2 * cfg.num_decoder_layers)
    logits = 2 * n * d * cfg.vocab_size if cfg.tie_output else 0
    return model, (tokens, tokens), {"train": False}, attention + logits
  raise ConfigError(f"no summary inputs for model {config.model.name!r}")


TRANSFORMER_NORMS = ("layer", "rms", "batch", "group", "none")


def validate_model_config(config) -> None:
  """Model-specific checks that need no compilation (depth, G dividing channels, ...)."""
  m = config.model
  if m.name == "transformer":
    from resnorm_jax.models.transformer import PRESETS
    if m.preset not in PRESETS:
      raise ConfigError(f"model.preset={m.preset!r} is not valid; valid choices: "
                        f"{', '.join(PRESETS)}")
    norm = NORMS.entry(m.norm)[0].name
    if norm not in TRANSFORMER_NORMS:
      raise ConfigError(f"model.norm={m.norm!r} makes no sense in a Transformer (it needs "
                        f"spatial axes or mixes in such statistics); valid choices: "
                        f"{', '.join(TRANSFORMER_NORMS)}")
    if m.vocab_size < 4:
      raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 4 (pad, bos, eos, ...)")
    transformer_config(config, norm_context(config))  # the dataclass's own checks
    return
  if m.name == "cifar_resnet":
    from resnorm_jax.models.resnet import resolve_block
    try:
      block, _ = resolve_block(m.depth, m.block)
    except ConfigError as e:
      raise ConfigError(str(e)) from None
    if m.width < 1 or (block == "bottleneck" and m.width % 1):
      raise ConfigError(f"model.width={m.width} must be a positive integer")
    name, arg = NORMS.entry(m.norm)[0].name, NORMS.entry(m.norm)[1]
    if name == "group":
      groups = 32 if arg is None else int(arg)
      channels = sorted({m.width * 2 ** s * f for s in range(3)
                         for f in ((1, 4) if block == "bottleneck" else (1,))})
      bad = [c for c in channels if c % groups]
      if bad:
        valid = [g for g in range(1, channels[0] + 1) if all(c % g == 0 for c in channels)]
        raise ConfigError(
            f"model.norm={m.norm!r}: G={groups} does not divide the {bad} channels of this "
            f"network (channels {channels}); valid G: {valid}")
