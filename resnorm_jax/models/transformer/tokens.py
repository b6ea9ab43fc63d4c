"""Token-level inputs of the Transformer: sinusoidal positions, the token masks, and the
teacher-forcing decoder input (also of packed rows)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


@functools.lru_cache(maxsize=16)
def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
  """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)); (max_len, d)."""
  pos = np.arange(max_len, dtype=np.float64)[:, None]
  inv_freq = np.exp(-np.log(10000.0) * np.arange(0, d_model, 2, dtype=np.float64) / d_model)
  table = np.zeros((max_len, d_model), np.float64)
  table[:, 0::2] = np.sin(pos * inv_freq)
  table[:, 1::2] = np.cos(pos * inv_freq)
  return table.astype(np.float32)


def padding_mask(tokens: Array, pad_id: int) -> Array:
  """(B, T) bool, True at real tokens."""
  return tokens != pad_id


def target_mask(tgt_in: Array, pad_id: int) -> Array:
  """Real positions of a decoder input: non-pad tokens, and always position 0 (BOS, which
  may share the pad id as in shift-right-with-pad conventions)."""
  return (tgt_in != pad_id) | (jnp.arange(tgt_in.shape[1]) == 0)[None, :]


def shift_right(targets: Array, bos_id: int) -> Array:
  """Teacher-forcing decoder input: [BOS, y_1, ..., y_{T−1}]."""
  bos = jnp.full(targets.shape[:1] + (1,), bos_id, targets.dtype)
  return jnp.concatenate([bos, targets[:, :-1]], axis=1)


def shift_right_segments(targets: Array, segments: Array, bos_id: int,
                         pad_id: int = 0) -> Array:
  """Decoder input of packed rows: shift_right within each segment (BOS at every segment's
  first position), ``pad_id`` on padding (segment 0)."""
  shifted = shift_right(targets, bos_id)
  previous = jnp.concatenate([jnp.zeros_like(segments[:, :1]), segments[:, :-1]], axis=1)
  shifted = jnp.where(segments != previous, jnp.asarray(bos_id, targets.dtype), shifted)
  return jnp.where(segments > 0, shifted, jnp.asarray(pad_id, targets.dtype))
