"""Vaswani et al. (2017)'s recipe, shared by configs/*_transformer.py."""

from resnorm_jax.config import base_config
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import LAMBDA_COMBINATORS

SKIPS = ("post_ln", "pre_ln", "xskip_ln", "rskip_ln")


def apply_variant(c, arg, config_file: str):
  """``post_ln`` | ``pre_ln`` | ``xskip_ln[λ]`` | ``rskip_ln[λ]`` (e.g. ``rskip_ln2``,
  ``xskip_ln0.5``): the skip combinator of every sublayer and its λ."""
  arg = (arg or "post_ln").strip()
  for skip in SKIPS:
    if arg.startswith(skip):
      rest = arg[len(skip):]
      if rest and skip in LAMBDA_COMBINATORS:     # the combinators that take a λ
        try:
          c.model.skip_lambda = float(rest)
        except ValueError:
          break
      elif rest:
        break
      c.model.skip = skip
      return c
  raise ConfigError(f"unknown variant {arg!r} of {config_file}; valid: post_ln, pre_ln, "
                    "xskip_ln<λ> (e.g. xskip_ln1), rskip_ln<λ> (e.g. rskip_ln2)")


def vaswani_config():
  """Base recipe: label smoothing 0.1, Adam(0.9, 0.98, 1e-9), lr = d^-0.5 · min(s^-0.5,
  s·w^-1.5) with w = 4000 (the rsqrt schedule peaks at d^-0.5 · w^-0.5 ≈ 7e-4 for d = 512),
  beam 4, length penalty 0.6, LayerNorm."""
  c = base_config()
  c.model.name = "transformer"
  c.model.norm = "layer"
  c.model.skip = "post_ln"
  c.model.max_len = 256
  c.train.optimizer = "adam"
  c.train.b1, c.train.b2, c.train.eps = 0.9, 0.98, 1e-9
  c.train.weight_decay = 0.0
  c.train.schedule = "rsqrt"
  c.train.warmup_steps = 4000
  c.train.learning_rate = 512 ** -0.5 * 4000 ** -0.5
  c.train.label_smoothing = 0.1
  c.translation.beam_size = 4
  c.translation.length_penalty = 0.6
  c.translation.max_length = 256
  c.train.log_every_steps = 100
  c.eval.batch_size = 64
  c.checkpoint.keep = 3
  return c
