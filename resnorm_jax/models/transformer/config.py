"""The Transformer's hyper-parameters (:class:`TransformerConfig`), their checks, the
presets, and the resolution of its variants: the norm and each stack's skip combinator."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import (COMBINATORS, DepthInfo, NormContext, NormFactory, SkipSpec,
                                norm_factory, resolve_combinator)


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of an encoder-decoder Transformer.

  Attributes:
    vocab_size: size of the (shared) subword vocabulary, special tokens included.
    num_encoder_layers / num_decoder_layers: N and M.
    d_model, num_heads, d_ff: model width, attention heads (d_k = d_model / num_heads), FFN
      inner width.
    dropout_rate: on embeddings and sublayer outputs; attention_dropout_rate: on attention
      weights.
    max_len: longest source / target sequence (size of the positional table).
    skip, skip_lambda: combinator spec and λ (``resolve_combinator``); ``skip`` is parsed
      once at construction (a :class:`~resnorm_jax.registry.Spec`) and resolved per stack
      into ``encoder_skip`` / ``decoder_skip``.
    norm: norm spec used wherever a combinator would use LayerNorm (its pre-norm / post-norms
      for ``pre_ln``, ``post_ln``, ``xskip_ln``, ``rskip_ln``, ``deepnorm``; the ``*_bn``
      combinators keep their BatchNorm) and by the final norms; resolved once at
      construction into a :class:`~resnorm_jax.layers.NormFactory` with ``norm_ctx``.
    share_embeddings: one embedding matrix for source and target.
    tie_output: the pre-softmax projection is the (target) embedding matrix transposed.
    dtype: compute dtype (parameters are float32).
    norm_ctx: BatchNorm synchronisation, momentum and epsilon for every norm.
    final_norm: a norm on the encoder and decoder outputs; ``None`` = automatic: on for
      combinators whose output is not normalized but whose branch input is (``pre_ln``,
      Xiong et al. 2020), off otherwise.
    pad_id, bos_id, eos_id: special token ids (``bos_id`` starts every decoder input).
    attention: ``auto``, ``xla``, ``cudnn`` (``jax.nn.dot_product_attention`` with that
      implementation; ``auto``: see :func:`attention_implementation`) or ``einsum`` (the
      explicit formula; always used for attention-weights dropout in training).
  """
  vocab_size: int
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  d_model: int = 512
  num_heads: int = 8
  d_ff: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.0
  max_len: int = 512
  skip: Any = "post_ln"    # a COMBINATORS spec; a parsed Spec after construction
  skip_lambda: float | None = None
  norm: Any = "layer"      # a NORMS spec; a NormFactory after construction
  share_embeddings: bool = True
  tie_output: bool = True
  dtype: Any = jnp.float32
  norm_ctx: NormContext = NormContext()
  final_norm: bool | None = None
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  attention: str = "auto"
  # The skip combinator of each stack (DeepNorm's α, β differ), resolved at construction.
  encoder_skip: SkipSpec = dataclasses.field(init=False, repr=False, compare=False)
  decoder_skip: SkipSpec = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    validate_config(self)
    # Every variant is resolved here, once: the modules read the results, never a name.
    norm = self.norm.spec if isinstance(self.norm, NormFactory) else self.norm
    object.__setattr__(self, "norm", norm_factory(norm, self.norm_ctx))
    object.__setattr__(self, "skip", COMBINATORS.parse(self.skip))
    object.__setattr__(self, "encoder_skip", resolve_skip(self, "encoder"))
    object.__setattr__(self, "decoder_skip", resolve_skip(self, "decoder"))


ATTENTION_CHOICES = ("auto", "xla", "cudnn", "einsum")


def validate_config(cfg: TransformerConfig) -> None:
  """Raises ConfigError for values that cannot build a model (no compilation needed); an
  unknown ``skip`` or ``norm`` is answered by its registry when it is resolved."""
  def need(ok, message):
    if not ok:
      raise ConfigError(f"transformer: {message}")

  for field in ("vocab_size", "num_encoder_layers", "num_decoder_layers", "d_model",
                "num_heads", "d_ff", "max_len"):
    value = getattr(cfg, field)
    need(isinstance(value, (int, np.integer)) and value >= 1,
         f"{field} must be a positive integer, got {value!r}")
  need(cfg.vocab_size >= 2, f"vocab_size must be >= 2, got {cfg.vocab_size}")
  need(cfg.d_model % cfg.num_heads == 0,
       f"num_heads={cfg.num_heads} must divide d_model={cfg.d_model}; valid num_heads: "
       f"{[h for h in range(1, cfg.d_model + 1) if cfg.d_model % h == 0]}")
  need(cfg.d_model % 2 == 0, f"d_model must be even (sinusoidal positions), got {cfg.d_model}")
  for field in ("dropout_rate", "attention_dropout_rate"):
    need(0.0 <= getattr(cfg, field) < 1.0, f"{field} must be in [0, 1), got "
         f"{getattr(cfg, field)!r}")
  for field in ("pad_id", "bos_id", "eos_id"):
    need(0 <= getattr(cfg, field) < cfg.vocab_size,
         f"{field}={getattr(cfg, field)} is outside the vocabulary [0, {cfg.vocab_size})")
  need(cfg.eos_id != cfg.pad_id, f"eos_id and pad_id must differ, both are {cfg.eos_id}")
  need(cfg.bos_id != cfg.eos_id, f"bos_id and eos_id must differ, both are {cfg.eos_id}")
  need(cfg.attention in ATTENTION_CHOICES,
       f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {cfg.attention!r}")
  need(jnp.dtype(cfg.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                                jnp.dtype(jnp.float16)),
       f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")


PRESETS: dict[str, dict[str, Any]] = {
    # Vaswani et al. 2017, Table 3 "base": 65M parameters with a 37k shared vocabulary.
    "base": dict(num_encoder_layers=6, num_decoder_layers=6, d_model=512, num_heads=8,
                 d_ff=2048, dropout_rate=0.1),
    # Table 3 "big" (dropout 0.3 for EN-DE).
    "big": dict(num_encoder_layers=6, num_decoder_layers=6, d_model=1024, num_heads=16,
                d_ff=4096, dropout_rate=0.3),
    # The common IWSLT setting (fairseq transformer_iwslt_de_en).
    "iwslt": dict(num_encoder_layers=6, num_decoder_layers=6, d_model=512, num_heads=4,
                  d_ff=1024, dropout_rate=0.3),
    # For tests.
    "tiny": dict(num_encoder_layers=2, num_decoder_layers=2, d_model=32, num_heads=2,
                 d_ff=64, dropout_rate=0.1, max_len=64),
}


def transformer_preset(name: str, vocab_size: int, **overrides) -> TransformerConfig:
  """A :class:`TransformerConfig` from a preset (base, big, iwslt, tiny) plus overrides."""
  if name not in PRESETS:
    raise ConfigError(f"unknown transformer preset {name!r}; valid choices: "
                      f"{', '.join(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(TransformerConfig) if f.init} - {"vocab_size"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"unknown TransformerConfig field(s) {unknown}; valid fields: "
                      f"{', '.join(sorted(fields))}")
  return TransformerConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


def stack_depth(cfg: TransformerConfig, stack: str) -> DepthInfo:
  """DepthInfo of the ``encoder`` or ``decoder`` stack (DeepNorm's α, β need N and M)."""
  return DepthInfo(stack=stack, num_encoder=cfg.num_encoder_layers,
                   num_decoder=cfg.num_decoder_layers)


def resolve_skip(cfg: TransformerConfig, stack: str) -> SkipSpec:
  """The :class:`~resnorm_jax.layers.SkipSpec` of ``cfg.skip`` in the ``encoder`` or
  ``decoder`` stack, ``cfg.norm`` in place of LayerNorm."""
  return resolve_combinator(cfg.skip, lam=cfg.skip_lambda, ctx=cfg.norm_ctx,
                            depth=stack_depth(cfg, stack), layer_norm=cfg.norm)


def uses_final_norm(cfg: TransformerConfig, spec: SkipSpec) -> bool:
  """``cfg.final_norm``, or automatically: a pre-norm combinator's residual stream is never
  normalized, so the stack output gets one (Pre-LN Transformer, Xiong et al. 2020)."""
  if cfg.final_norm is not None:
    return bool(cfg.final_norm)
  return spec.pre_norm is not None
