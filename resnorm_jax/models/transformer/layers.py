"""The Transformer's residual layers and stacks: the FFN, encoder and decoder layers whose
sublayers are each wrapped by the stack's skip combinator, and the encoder and decoder.

Every residual sublayer (encoder self-attention, decoder self-attention, cross-attention,
FFN) is ``y = combinator(x, F)`` with ``F(h) = Dropout(Sublayer(h))``; the combinator is
tapped as a residual unit of the model (``layers/taps.py``).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

from resnorm_jax.layers import SkipSpec
from resnorm_jax.models.transformer.attention import (MultiHeadAttention, causal_mask,
                                                      key_mask, scaled_init, segment_mask)
from resnorm_jax.models.transformer.config import TransformerConfig


class FeedForward(nn.Module):
  """FFN(h) = max(0, h W_1 + b_1) W_2 + b_2; both kernels with gain ``init_scale`` (β)."""
  features: int
  hidden: int
  init_scale: float = 1.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h):
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.float32,
                                     kernel_init=scaled_init(self.init_scale), name=name)
    return dense(self.features, "wo")(nn.relu(dense(self.hidden, "wi")(h)))


def _attention(cfg: TransformerConfig, beta: float, name: str) -> MultiHeadAttention:
  return MultiHeadAttention(cfg.d_model, cfg.num_heads, cfg.attention_dropout_rate,
                            value_init_scale=beta, dtype=jnp.dtype(cfg.dtype),
                            implementation=cfg.attention, name=name)


def _ffn(cfg: TransformerConfig, beta: float) -> FeedForward:
  return FeedForward(cfg.d_model, cfg.d_ff, init_scale=beta, dtype=jnp.dtype(cfg.dtype),
                     name="ffn")


# ----------------------------------------------------------------------------------------
# Layers and stacks.
# ----------------------------------------------------------------------------------------
class EncoderLayer(nn.Module):
  """x ← C_attn(x, Dropout∘SelfAttention); x ← C_ffn(x, Dropout∘FFN); C = the combinator."""
  config: TransformerConfig
  skip: SkipSpec   # the stack's combinator, resolved by TransformerConfig

  @nn.compact
  def __call__(self, x, mask, *, train: bool = False, attn_mask=None):
    cfg, beta = self.config, self.skip.init_scale
    drop = nn.Dropout(cfg.dropout_rate)
    attn = _attention(cfg, beta, "self_attn")
    attn_mask = key_mask(mask) if attn_mask is None else attn_mask
    x = self.skip.build("self_attn_skip", tap_output=True)(
        x, lambda h: drop(attn(h, h, attn_mask, train=train), deterministic=not train),
        train=train, mask=mask)
    ffn = _ffn(cfg, beta)
    return self.skip.build("ffn_skip", tap_output=True)(
        x, lambda h: drop(ffn(h), deterministic=not train), train=train, mask=mask)


class DecoderLayer(nn.Module):
  """Causal self-attention, cross-attention over the encoder output, FFN; each wrapped.

  ``cache`` is None for a whole (teacher-forced) sequence, or for one decoding step a dict
  with ``k``, ``v`` (B, L, heads, d_k) self-attention keys/values, ``cross_k``, ``cross_v``
  (B, S, heads, d_k) or None (then computed from ``encoded``), and the step ``index``.
  Returns (y, the updated cache or None).
  """
  config: TransformerConfig
  skip: SkipSpec

  @nn.compact
  def __call__(self, x, encoded, self_mask, cross_mask, token_mask, *, train: bool = False,
               cache: dict | None = None):
    cfg, beta = self.config, self.skip.init_scale
    drop = nn.Dropout(cfg.dropout_rate)
    new_cache = {}

    self_attn = _attention(cfg, beta, "self_attn")

    def self_branch(h):
      if cache is None:
        out = self_attn(h, h, self_mask, train=train)
      else:
        k_new, v_new = self_attn.project_kv(h)
        start = (0, cache["index"], 0, 0)
        k = lax.dynamic_update_slice(cache["k"], k_new.astype(cache["k"].dtype), start)
        v = lax.dynamic_update_slice(cache["v"], v_new.astype(cache["v"].dtype), start)
        new_cache.update(k=k, v=v)
        out = self_attn.attend(h, k, v, self_mask, train=train)
      return drop(out, deterministic=not train)

    x = self.skip.build("self_attn_skip", tap_output=True)(x, self_branch, train=train, mask=token_mask)

    cross_attn = _attention(cfg, beta, "cross_attn")

    def cross_branch(h):
      if cache is not None and cache.get("cross_k") is not None:
        k, v = cache["cross_k"], cache["cross_v"]
      else:
        k, v = cross_attn.project_kv(encoded)
      if cache is not None:
        new_cache.update(cross_k=k, cross_v=v)
      return drop(cross_attn.attend(h, k, v, cross_mask, train=train), deterministic=not train)

    x = self.skip.build("cross_attn_skip", tap_output=True)(x, cross_branch, train=train, mask=token_mask)

    ffn = _ffn(cfg, beta)
    x = self.skip.build("ffn_skip", tap_output=True)(
        x, lambda h: drop(ffn(h), deterministic=not train), train=train, mask=token_mask)
    return x, (new_cache if cache is not None else None)


class Encoder(nn.Module):
  """N encoder layers, then the final norm when ``final_norm``.  ``segments`` (packed rows):
  self-attention stays within a segment."""
  config: TransformerConfig
  skip: SkipSpec
  final_norm: bool

  @nn.compact
  def __call__(self, x, mask, *, train: bool = False, segments=None):
    cfg = self.config
    attn_mask = None if segments is None else key_mask(mask) & segment_mask(segments, segments)
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, self.skip, name=f"layer_{i}")(x, mask, train=train,
                                                          attn_mask=attn_mask)
    if self.final_norm:
      x = cfg.norm(name="final_norm")(x, train=train, mask=mask)
    return x


class Decoder(nn.Module):
  """M decoder layers, then the final norm when ``final_norm``.

  Whole sequence (``cache=None``): self-attention mask = causal ∧ real target keys.  One
  step (``cache`` = {"index", "layers"}): the query at position ``index`` attends to cached
  positions 0..index.  ``segments`` = (source, target) segment ids of packed rows:
  self- and cross-attention stay within a segment.  Returns (hidden states, updated cache or
  None).
  """
  config: TransformerConfig
  skip: SkipSpec
  final_norm: bool

  @nn.compact
  def __call__(self, x, encoded, src_mask, tgt_mask, *, train: bool = False, cache=None,
               segments=None):
    cfg = self.config
    if cache is None:
      self_mask = causal_mask(x.shape[1]) & key_mask(tgt_mask)
    else:
      max_len = cache["layers"][0]["k"].shape[1]
      self_mask = (jnp.arange(max_len) <= cache["index"])[None, None, None, :]
    cross_mask = key_mask(src_mask)
    if segments is not None:
      src_segments, tgt_segments = segments
      self_mask = self_mask & segment_mask(tgt_segments, tgt_segments)
      cross_mask = cross_mask & segment_mask(tgt_segments, src_segments)
    layers = []
    for i in range(cfg.num_decoder_layers):
      layer_cache = None if cache is None else dict(cache["layers"][i], index=cache["index"])
      x, new = DecoderLayer(cfg, self.skip, name=f"layer_{i}")(
          x, encoded, self_mask, cross_mask, tgt_mask, train=train, cache=layer_cache)
      layers.append(new)
    if self.final_norm:
      x = cfg.norm(name="final_norm")(x, train=train, mask=tgt_mask)
    new_cache = None if cache is None else {"index": cache["index"], "layers": tuple(layers)}
    return x, new_cache
