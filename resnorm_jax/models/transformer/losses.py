"""The training loss: label-smoothed cross entropy, also over chunks of target positions
so that a large batch's logits never exist at once."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

Array = jax.Array


def label_smoothed_cross_entropy(logits: Array, targets: Array, pad_id: int = 0,
                                 smoothing: float = 0.1) -> tuple[Array, Array]:
  """Label-smoothed cross entropy summed over non-pad target tokens (Szegedy et al. 2016).

  With p = softmax(logits) and the smoothed target q_y = 1 − ε, q_v = ε / (V − 1) for
  v ≠ y: loss = −Σ_v q_v log p_v = (1 − ε − ε/(V−1)) · (−log p_y) + ε/(V−1) · Σ_v −log p_v.
  ε = 0 gives the negative log-likelihood.  Returns (sum of the loss over positions whose
  target is not ``pad_id``, number of such positions as float32).
  """
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return _smoothed_loss(logp, targets, pad_id, smoothing)


def _smoothed_loss(logp: Array, targets: Array, pad_id: int,
                   smoothing: float) -> tuple[Array, Array]:
  """:func:`label_smoothed_cross_entropy` from the log-probabilities ``logp``."""
  vocab = logp.shape[-1]
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


def smoothed_targets_gradient(logits: Array, targets: Array, pad_id: int,
                              smoothing: float) -> tuple[Array, Array]:
  """(loss, d loss / d logits) of :func:`label_smoothed_cross_entropy`'s sum, in one pass.

  With p = softmax(z) and the smoothed target distribution q (q_y = 1 − ε, q_v = ε/(V − 1)
  otherwise, Σ_v q_v = 1), loss = −Σ_v q_v log p_v and ∂loss/∂z_v = p_v − q_v at every
  non-pad position (0 at pad positions): the softmax minus the smoothed one-hot, written
  without the scatter, the broadcast and the second exponential that autodiff of the
  log-softmax produces.  ``logits`` are float32."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  loss, _ = _smoothed_loss(logp, targets, pad_id, smoothing)
  onehot = targets[..., None] == lax.broadcasted_iota(targets.dtype, logits.shape,
                                                       logits.ndim - 1)
  q = jnp.where(onehot, 1.0 - smoothing, smoothing / (logits.shape[-1] - 1))
  mask = (targets != pad_id).astype(jnp.float32)
  return loss, (jnp.exp(logp) - q) * mask[..., None]


def chunked_cross_entropy(h: Array, w: Array, targets: Array, pad_id: int,
                          smoothing: float, chunks: int) -> Array:
  """Σ over non-pad targets of :func:`label_smoothed_cross_entropy` of the logits
  ``h @ w`` (float32), computed ``chunks`` target positions slices at a time.

  At most one slice's logits exist at once instead of the whole (B, T, vocab) tensor, its
  log-softmax and its gradient: with a 37k vocabulary a 25k-token batch has 3.7 GB of
  float32 logits.  Slices run along T (the batch axis stays whole, so a batch-sharded h is
  never gathered).  The value equals the unchunked one up to the order of the final sum.

  Differentiated, each slice's gradients are computed where its logits are, in the forward
  pass (:func:`smoothed_targets_gradient`, then ∂h = ∂z·wᵀ and ∂w += hᵀ·∂z), and the
  backward pass only scales them by the incoming cotangent: the logits are computed once
  per step, not recomputed as a rematerialized slice would be (a third of the output
  projection's matmul FLOPs saved).  ∂w sums the slices in another order than autodiff
  of the whole logits, so the gradients equal it up to float32 rounding."""
  return _chunked_loss(h, w, targets, pad_id, float(smoothing), int(chunks))


def _slices(h: Array, targets: Array, pad_id: int, chunks: int):
  """h and targets as ``chunks`` slices of target positions, the leading axis; T padded
  with pad targets to a multiple of ``chunks``."""
  batch, length = targets.shape
  size = -(-length // chunks)
  pad = size * chunks - length
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=pad_id)
  hs = jnp.moveaxis(h.reshape(batch, chunks, size, h.shape[-1]), 1, 0)
  ts = jnp.moveaxis(targets.reshape(batch, chunks, size), 1, 0)
  return hs, ts, pad


def _slice_logits(h_chunk: Array, w: Array) -> Array:
  """One slice's logits, float32 (the projection runs in ``h``'s dtype)."""
  return jnp.dot(h_chunk, w).astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _chunked_loss(h, w, targets, pad_id, smoothing, chunks):
  hs, ts, _ = _slices(h, targets, pad_id, chunks)

  def chunk_loss(args):
    h_chunk, t_chunk = args
    return label_smoothed_cross_entropy(_slice_logits(h_chunk, w), t_chunk, pad_id,
                                        smoothing)[0]
  return jnp.sum(lax.map(chunk_loss, (hs, ts)))


def _chunked_loss_fwd(h, w, targets, pad_id, smoothing, chunks):
  hs, ts, pad = _slices(h, targets, pad_id, chunks)

  def chunk(dw, args):
    h_chunk, t_chunk = args
    loss, dz = smoothed_targets_gradient(_slice_logits(h_chunk, w), t_chunk, pad_id,
                                         smoothing)
    dz = dz.astype(h.dtype)
    dh = jnp.dot(dz, w.T).astype(h.dtype)
    dw = dw + jnp.einsum("btd,btv->dv", h_chunk, dz,
                         preferred_element_type=jnp.float32)
    return dw, (loss, dh)
  dw, (losses, dhs) = lax.scan(chunk, jnp.zeros(w.shape, jnp.float32), (hs, ts))
  batch, length = targets.shape
  dh = jnp.moveaxis(dhs, 0, 1).reshape(batch, length + pad, h.shape[-1])[:, :length]
  return jnp.sum(losses), (dh, dw.astype(w.dtype), targets)


def _chunked_loss_bwd(pad_id, smoothing, chunks, residuals, cotangent):
  del pad_id, smoothing, chunks
  dh, dw, targets = residuals
  zero_targets = np.zeros(targets.shape, dtype=jax.dtypes.float0)
  return (cotangent * dh).astype(dh.dtype), (cotangent * dw).astype(dw.dtype), zero_targets


_chunked_loss.defvjp(_chunked_loss_fwd, _chunked_loss_bwd)
