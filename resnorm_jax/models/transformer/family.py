"""The ``transformer`` model family: its registration, the family's config checks, the
:class:`TransformerConfig` of ``model.*``, the example inputs and the FLOPs that are not
layer calls."""

from __future__ import annotations

import jax.numpy as jnp

from resnorm_jax import config as config_lib
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import NORMS
from resnorm_jax.models.family import (ModelFamily, compute_dtype, norm_context,
                                       register_model)
from resnorm_jax.models.transformer.config import (PRESETS, TransformerConfig,
                                                   transformer_preset)
from resnorm_jax.models.transformer.model import Transformer


def config_from(config, norm_ctx) -> TransformerConfig:
  """The :class:`TransformerConfig` of ``model.*``: the preset plus the overrides."""
  m = config.model
  extra = {} if m.get("dropout_rate") is None else {"dropout_rate": m.dropout_rate}
  return transformer_preset(m.preset, m.vocab_size, max_len=m.max_len, skip=m.skip, **extra,
                            skip_lambda=m.skip_lambda, norm=m.norm, norm_ctx=norm_ctx,
                            dtype=compute_dtype(config))


def validate_model_section(config) -> None:
  """A norm that has a meaning on token sequences, and the dataclass's own checks."""
  m = config.model
  if not NORMS.parse(m.norm).info.sequences:
    valid = [e.name for e in NORMS if e.info.sequences]
    raise ConfigError(f"model.norm={m.norm!r} makes no sense in a Transformer (it needs "
                      f"spatial axes or mixes in such statistics); valid choices: "
                      f"{', '.join(valid)}")
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


_C = config_lib
# The model.* keys the family adds to the schema, and the engine's model keys it reads.
SCHEMA = {
    "preset": _C.Key("base", _C.TREE, _C.one_of(*PRESETS), "base | big | iwslt | tiny"),
    "vocab_size": _C.Key(37_000, _C.TREE, _C.int_at_least(4, " (pad, bos, eos, unk, ...)"),
                         "shared source/target subword vocabulary"),
    "max_len": _C.Key(512, _C.TRAJECTORY, _C.POSITIVE_INT,
                      "longest sequence (sinusoidal positions)"),
    "summary_length": _C.Key(128, _C.NEUTRAL, _C.POSITIVE_INT,
                             "tokens per side for resnorm-summary"),
    "dropout_rate": _C.Key(None, _C.TRAJECTORY,
                           _C.interval(0, 1, closed_high=False, optional=True),
                           "None = the preset's", optional=float),
}
READS = ("norm", "skip", "skip_lambda", "bn_momentum", "bn_epsilon", "dtype")


@register_model("transformer", "encoder-decoder Transformer (Vaswani 2017), presets base, "
                "big, iwslt, tiny; every sublayer wrapped by `model.skip`",
                ModelFamily(task="translation", example_inputs=_token_inputs, schema=SCHEMA,
                            reads=READS, validate=validate_model_section,
                            extra_flops=_extra_flops,
                            title_keys=("preset", "vocab_size", "norm", "skip",
                                        "skip_lambda")))
def build(arg, config, norm_ctx, data):
  del arg, data
  return Transformer(config_from(config, norm_ctx))
