"""Multi-head attention (Vaswani et al. 2017, Sec. 3.2), its masks and implementations.

Attention runs through ``jax.nn.dot_product_attention`` (``TransformerConfig.attention``):
``auto`` picks cuDNN's fused kernel on a GPU for bfloat16/float16 compute and XLA's
implementation elsewhere (:func:`attention_implementation`), falling back to XLA where cuDNN
has no kernel (:func:`fused_attention`); weights dropout (``attention_dropout_rate`` > 0 in
training), which the fused function has no place for, and ``einsum`` use the explicit
softmax(QKᵀ/sqrt(d_k) + mask)V written out here (:func:`einsum_attention`).
"""

from __future__ import annotations

import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """(B, Tq), (B, Tk) segment ids -> (B, 1, Tq, Tk) bool, True where query and key belong
  to the same segment (packed rows: attention never crosses pairs)."""
  return (query_segments[:, :, None] == key_segments[:, None, :])[:, None]


def causal_mask(length: int) -> Array:
  """(1, 1, T, T) bool, True where key position <= query position."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


def key_mask(mask: Array) -> Array:
  """(B, Tk) token mask -> (B, 1, 1, Tk) attention mask."""
  return mask[:, None, None, :]


def scaled_init(gain: float):
  """Xavier-uniform (Glorot & Bengio 2010) with its standard deviation multiplied by ``gain``
  (DeepNet's β on the value/output projections and the FFN; 1 elsewhere)."""
  return nn.initializers.variance_scaling(gain ** 2, "fan_avg", "uniform")


def attention_implementation(requested: str, dtype) -> str:
  """The ``jax.nn.dot_product_attention`` implementation for ``requested``: ``auto`` is
  ``cudnn`` (fused flash attention) on a GPU for bfloat16/float16 compute, where cuDNN has
  its kernels, and ``xla`` otherwise (float32, CPU, TPU)."""
  if requested != "auto":
    return requested
  low_precision = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  return "cudnn" if low_precision and jax.default_backend() == "gpu" else "xla"


def einsum_attention(q: Array, k: Array, v: Array, mask: Array, dropout=lambda w: w) -> Array:
  """softmax(q kᵀ / sqrt(d_k) + mask) v written out: (B, T, heads, d_k) queries, (B, S, heads,
  d_k) keys and values; logits and softmax in float32; ``dropout`` on the weights."""
  q = q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = dropout(jax.nn.softmax(logits, axis=-1))
  return jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)


_CUDNN_FALLBACKS: set = set()


def fused_attention(q: Array, k: Array, v: Array, mask: Array, implementation: str = "auto"):
  """The same attention through ``jax.nn.dot_product_attention`` (logits and softmax in
  float32 there too).  ``auto`` (see :func:`attention_implementation`) falls back to XLA,
  with one log line per shape, where cuDNN has no kernel for the shapes or dtype; an
  explicit ``cudnn`` raises instead."""
  chosen = attention_implementation(implementation, q.dtype)
  if chosen == "cudnn" and implementation == "auto":
    try:
      return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError) as e:
      key = (q.shape, k.shape, str(q.dtype))
      if key not in _CUDNN_FALLBACKS:
        _CUDNN_FALLBACKS.add(key)
        logging.info("cuDNN attention unavailable for q %s, k %s, %s (%s); using XLA's",
                     q.shape, k.shape, q.dtype, e)
      chosen = "xla"
  return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=chosen)


class MultiHeadAttention(nn.Module):
  """MultiHead(Q, K, V) = Concat(head_1..head_h) W_O, head_i = softmax(Q W_Qi (K W_Ki)ᵀ /
  sqrt(d_k) + mask) V W_Vi (Vaswani et al. 2017, Sec. 3.2).

  ``project_kv`` and ``attend`` are separate so that a decoder can cache the projected keys
  and values.  ``mask`` is boolean, broadcastable to (B, heads, T_q, T_k), True = attend;
  a fully masked row gives uniform weights (never NaN).  ``implementation``: see
  :class:`TransformerConfig`'s ``attention``.  W_V and W_O are initialised with
  gain ``value_init_scale`` (DeepNet's β), W_Q and W_K with gain 1.
  """
  features: int
  num_heads: int
  dropout_rate: float = 0.0
  value_init_scale: float = 1.0
  dtype: Any = jnp.float32
  implementation: str = "auto"

  def setup(self):
    dense = lambda gain: nn.Dense(self.features, dtype=self.dtype, param_dtype=jnp.float32,
                                  kernel_init=scaled_init(gain))
    self.query = dense(1.0)
    self.key = dense(1.0)
    self.value = dense(self.value_init_scale)
    self.out = dense(self.value_init_scale)
    self.dropout = nn.Dropout(self.dropout_rate)

  def _heads(self, x):
    return x.reshape(x.shape[:-1] + (self.num_heads, self.features // self.num_heads))

  def project_kv(self, source: Array) -> tuple[Array, Array]:
    """(B, T, d) -> keys and values (B, T, heads, d_k)."""
    return self._heads(self.key(source)), self._heads(self.value(source))

  def attend(self, x: Array, k: Array, v: Array, mask: Array, *, train: bool = False):
    q = self._heads(self.query(x))
    if self.implementation == "einsum" or (train and self.dropout_rate > 0):
      out = einsum_attention(q, k, v, mask, lambda w: self.dropout(w, deterministic=not train))
    else:
      out = fused_attention(q, k, v, mask, self.implementation)
    return self.out(out.reshape(out.shape[:2] + (self.features,)))

  def __call__(self, x: Array, source: Array, mask: Array, *, train: bool = False):
    k, v = self.project_kv(source)
    return self.attend(x, k, v, mask, train=train)
