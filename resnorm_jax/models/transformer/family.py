"""The ``transformer`` model family: its registration, the family's config checks, the
:class:`TransformerConfig` of ``model.*``, the example inputs and the FLOPs that are not
layer calls."""

from __future__ import annotations

import jax.numpy as jnp

from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import NORMS
from resnorm_jax.models.transformer.config import (PRESETS, TransformerConfig,
                                                   transformer_preset)
from resnorm_jax.models.transformer.model import Transformer


def config_from(config, norm_ctx) -> TransformerConfig:
  """The :class:`TransformerConfig` of ``model.*``: the preset plus the overrides."""
  from resnorm_jax.models import compute_dtype
  m = config.model
  extra = {} if m.get("dropout_rate") is None else {"dropout_rate": m.dropout_rate}
  return transformer_preset(m.preset, m.vocab_size, max_len=m.max_len, skip=m.skip, **extra,
                            skip_lambda=m.skip_lambda, norm=m.norm, norm_ctx=norm_ctx,
                            dtype=compute_dtype(config))


def validate_model_section(config) -> None:
  """Preset, vocabulary, a norm that has a meaning on token sequences, the dataclass's own
  checks."""
  from resnorm_jax.models import norm_context
  m = config.model
  if m.preset not in PRESETS:
    raise ConfigError(f"model.preset={m.preset!r} is not valid; valid choices: "
                      f"{', '.join(PRESETS)}")
  if not NORMS.parse(m.norm).meta["sequences"]:
    valid = [e.name for e in NORMS if e.meta["sequences"]]
    raise ConfigError(f"model.norm={m.norm!r} makes no sense in a Transformer (it needs "
                      f"spatial axes or mixes in such statistics); valid choices: "
                      f"{', '.join(valid)}")
  if m.vocab_size < 4:
    raise ConfigError(f"model.vocab_size={m.vocab_size} must be >= 4 (pad, bos, eos, ...)")
  config_from(config, norm_context(config))


def _token_inputs(config, data) -> tuple:
  """Source and target tokens of one example: ``model.summary_length`` each (at most
  ``model.max_len``); the parameters do not depend on the length."""
  del data
  tokens = jnp.ones((1, min(config.model.summary_length, config.model.max_len)), jnp.int32)
  return tokens, tokens


def _extra_flops(config, model) -> int:
  """Per example, not layer calls: QKᵀ and AV (2 matmuls of 2·n·n·d each) per attention,
  and the tied output logits."""
  cfg, n = model.config, config.model.summary_length
  d = cfg.d_model
  attention = 4 * n * n * d * (cfg.num_encoder_layers + 2 * cfg.num_decoder_layers)
  return attention + (2 * n * d * cfg.vocab_size if cfg.tie_output else 0)


def _register():
  from resnorm_jax.models import register_model

  @register_model("transformer", "encoder-decoder Transformer (Vaswani 2017), presets base, "
                  "big, iwslt, tiny; every sublayer wrapped by `model.skip`",
                  task="translation", example_inputs=_token_inputs,
                  validate=validate_model_section, extra_flops=_extra_flops,
                  config_keys=("preset", "vocab_size", "max_len", "summary_length",
                               "dropout_rate", "norm", "skip", "skip_lambda", "bn_momentum",
                               "bn_epsilon", "dtype"),
                  title_keys=("preset", "vocab_size", "norm", "skip", "skip_lambda"))
  def build(arg, config, norm_ctx, data):
    del arg, data
    return Transformer(config_from(config, norm_ctx))


_register()
