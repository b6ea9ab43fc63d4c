"""The training loss: label-smoothed cross entropy, also over chunks of target positions
so that a large batch's logits never exist at once."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array


def label_smoothed_cross_entropy(logits: Array, targets: Array, pad_id: int = 0,
                                 smoothing: float = 0.1) -> tuple[Array, Array]:
  """Label-smoothed cross entropy summed over non-pad target tokens (Szegedy et al. 2016).

  With p = softmax(logits) and the smoothed target q_y = 1 − ε, q_v = ε / (V − 1) for
  v ≠ y: loss = −Σ_v q_v log p_v = (1 − ε − ε/(V−1)) · (−log p_y) + ε/(V−1) · Σ_v −log p_v.
  ε = 0 gives the negative log-likelihood.  Returns (sum of the loss over positions whose
  target is not ``pad_id``, number of such positions as float32).
  """
  vocab = logits.shape[-1]
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  off = smoothing / (vocab - 1)
  loss = (1.0 - smoothing - off) * nll + off * (-jnp.sum(logp, axis=-1))
  mask = (targets != pad_id).astype(jnp.float32)
  return jnp.sum(loss * mask), jnp.sum(mask)


# Logits a training loss materializes at once (float32, global batch): above this, the
# output projection and the loss run over chunks of positions (chunked_cross_entropy).
LOSS_CHUNK_BYTES = 64 * 2 ** 20


def loss_chunks(shape: tuple[int, ...], vocab: int) -> int:
  """How many chunks of target positions keep each chunk's float32 logits of a (B, T)
  batch within :data:`LOSS_CHUNK_BYTES` (1: no chunking)."""
  batch, length = shape
  return int(min(length, max(1, -(-batch * length * vocab * 4 // LOSS_CHUNK_BYTES))))


def chunked_cross_entropy(h: Array, w: Array, targets: Array, pad_id: int,
                          smoothing: float, chunks: int) -> Array:
  """Σ over non-pad targets of :func:`label_smoothed_cross_entropy` of the logits
  ``h @ w`` (float32), computed ``chunks`` target positions slices at a time.

  Each slice's logits are recomputed in the backward pass (``jax.checkpoint``), so at most
  one slice's logits and their gradient exist at once instead of the whole (B, T, vocab)
  tensor, its log-softmax and its gradient: with a 37k vocabulary a 25k-token batch has
  3.7 GB of float32 logits.  Slices run along T (the batch axis stays whole, so a
  batch-sharded h is never gathered).  The value equals the unchunked one up to the order of
  the final sum."""
  batch, length = targets.shape
  size = -(-length // chunks)
  pad = size * chunks - length
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=pad_id)
  hs = jnp.moveaxis(h.reshape(batch, chunks, size, h.shape[-1]), 1, 0)
  ts = jnp.moveaxis(targets.reshape(batch, chunks, size), 1, 0)

  @jax.checkpoint
  def chunk_loss(h_chunk, t_chunk):
    logits = jnp.dot(h_chunk, w).astype(jnp.float32)
    return label_smoothed_cross_entropy(logits, t_chunk, pad_id, smoothing)[0]
  return jnp.sum(lax.map(lambda args: chunk_loss(*args), (hs, ts)))
