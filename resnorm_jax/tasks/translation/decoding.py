"""Batched greedy decoding and beam search for :class:`~resnorm_jax.models.transformer.Transformer`.

Both run the model's incremental step (``init_cache`` / ``decode_step``) inside one
``lax.while_loop`` under ``jax.jit``; shapes are static (the cache holds ``max_decode_len``
positions), and the loop ends when every batch element is finished or the length is reached.

Notation: a hypothesis y = (y_1, ..., y_n) has log-probability log P(y|x) = Σ_t log p(y_t |
y_<t, x) (full softmax over the vocabulary; the pad and BOS ids are never generated) and
length n, counting its EOS when it has one.  Its beam-search score is the GNMT
length-normalized log-probability (Wu et al. 2016, eq. 14)

    s(y) = log P(y|x) / lp(n),   lp(n) = ((5 + n) / 6)^α.

Beam search with K beams keeps, per batch element, K alive hypotheses (no EOS yet) and a
buffer of the K best finished ones.  At step n every alive hypothesis is extended by every
token; among the K·V candidates ranked by log P:

* a candidate ending in EOS and ranked in the top K is finished with score s(y) (an EOS
  outside the top K is dropped, as in fairseq; so with K = 1 beam search is exactly greedy
  decoding);
* the K best candidates not ending in EOS stay alive (their keys/values are gathered from
  their parents' cache entries);
* at n = ``max_decode_len`` the top K candidates are finished whether or not they end in EOS.

A batch element is done once K hypotheses have been finished for it (or none can continue);
from then on its results are frozen, independently of the other elements.  Finished
hypotheses stop growing: their tokens after EOS are ``pad_id``.  When the beam is wide enough
to hold every partial hypothesis (K ≥ number of candidates per step), the search is exact.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from resnorm_jax.models.transformer import Transformer, padding_mask, shift_right

Array = jax.Array
NEG_INF = -jnp.inf


class BeamSearchOutput(NamedTuple):
  """Finished hypotheses per batch element, best first.

  tokens: (B, K, max_decode_len) int32, ``pad_id`` after EOS / in empty slots.
  scores: (B, K) float32 length-normalized log-probabilities s(y) (−inf in empty slots).
  log_probs: (B, K) float32 log P(y|x).
  """
  tokens: Array
  scores: Array
  log_probs: Array


def length_penalty(length, alpha):
  """GNMT length penalty lp(n) = ((5 + n) / 6)^α (Wu et al. 2016, eq. 14)."""
  return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def default_max_decode_len(model: Transformer, src_len: int) -> int:
  """min(src_len + 50, max_len): the usual a·|x| + b cap with a = 1, b = 50."""
  return min(src_len + 50, model.config.max_len)


def _resolve_len(model: Transformer, src: Array, max_decode_len: int | None) -> int:
  length = default_max_decode_len(model, src.shape[1]) if max_decode_len is None else \
      int(max_decode_len)
  if not 1 <= length <= model.config.max_len:
    raise ValueError(f"max_decode_len={length} must be in [1, max_len={model.config.max_len}]")
  return length


def _next_log_probs(model: Transformer, variables, token: Array, cache: dict,
                    src_mask: Array) -> tuple[Array, dict]:
  """log p(· | prefix) for each row, with the pad and BOS ids forbidden (−inf)."""
  cfg = model.config
  logits, cache = model.apply(variables, token, cache, src_mask, method=model.decode_step)
  logp = jax.nn.log_softmax(logits, axis=-1)
  forbidden = jnp.zeros((cfg.vocab_size,), bool).at[cfg.pad_id].set(True).at[cfg.bos_id].set(True)
  return jnp.where(forbidden, NEG_INF, logp), cache


def _start(model: Transformer, variables, src: Array, max_len: int):
  """Encodes the source and primes the cache."""
  src_mask = padding_mask(src, model.config.pad_id)
  encoded = model.apply(variables, src, method=model.encode)
  cache = model.apply(variables, encoded, src_mask, max_len, method=model.init_cache)
  return src_mask, cache


def _write(seqs: Array, position, tokens: Array) -> Array:
  """seqs[..., position] = tokens for a traced position."""
  return jnp.where(jnp.arange(seqs.shape[-1]) == position, tokens[..., None], seqs)


# ----------------------------------------------------------------------------------------
# Greedy.
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model", "max_len"))
def _greedy(model: Transformer, variables, src: Array, max_len: int):
  cfg = model.config
  batch = src.shape[0]
  src_mask, cache = _start(model, variables, src, max_len)
  seqs = jnp.full((batch, max_len + 1), cfg.pad_id, jnp.int32).at[:, 0].set(cfg.bos_id)
  state = (jnp.zeros((), jnp.int32), seqs, jnp.zeros((batch,), bool),
           jnp.zeros((batch,), jnp.float32), cache)

  def cond(state):
    i, _, done, _, _ = state
    return (i < max_len) & ~jnp.all(done)

  def body(state):
    i, seqs, done, total, cache = state
    logp, cache = _next_log_probs(model, variables, seqs[:, i], cache, src_mask)
    token = jnp.argmax(logp, axis=-1).astype(jnp.int32)
    step_logp = jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]
    total = total + jnp.where(done, 0.0, step_logp)
    token = jnp.where(done, cfg.pad_id, token)
    return i + 1, _write(seqs, i + 1, token), done | (token == cfg.eos_id), total, cache

  _, seqs, _, total, _ = lax.while_loop(cond, body, state)
  return seqs[:, 1:], total


def greedy_decode(model: Transformer, variables, src: Array, *,
                  max_decode_len: int | None = None, return_log_probs: bool = False):
  """Greedy decoding: y_t = argmax_v p(v | y_<t, x) until EOS or ``max_decode_len``.

  Returns (B, max_decode_len) int32 tokens (``pad_id`` after EOS), and with
  ``return_log_probs`` also (B,) log P(y|x).  Each batch element stops at its own EOS.
  """
  tokens, log_probs = _greedy(model, variables, src, _resolve_len(model, src, max_decode_len))
  return (tokens, log_probs) if return_log_probs else tokens


# ----------------------------------------------------------------------------------------
# Beam search.
# ----------------------------------------------------------------------------------------
def _gather_beams(x: Array, index: Array) -> Array:
  """x (B, K', ...), index (B, K) -> x[b, index[b, k], ...]."""
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _gather_cache(cache: dict, parent: Array) -> dict:
  """Reorders the self-attention cache rows (B·K, ...) by parent beam (B, K)."""
  batch, beams = parent.shape
  rows = (jnp.arange(batch)[:, None] * beams + parent).reshape(-1)
  layers = tuple(dict(c, k=c["k"][rows], v=c["v"][rows]) for c in cache["layers"])
  return {"index": cache["index"], "layers": layers}


@functools.partial(jax.jit, static_argnames=("model", "beam_size", "max_len"))
def _beam_search(model: Transformer, variables, src: Array, alpha, beam_size: int,
                 max_len: int) -> BeamSearchOutput:
  cfg = model.config
  batch, beams, vocab = src.shape[0], beam_size, cfg.vocab_size
  src_mask, cache = _start(model, variables, src, max_len)
  tile = lambda x: jnp.repeat(x, beams, axis=0) if x.ndim else x
  cache = jax.tree_util.tree_map(tile, cache)
  src_mask = tile(src_mask)

  seqs = jnp.full((batch, beams, max_len + 1), cfg.pad_id, jnp.int32).at[:, :, 0].set(
      cfg.bos_id)
  # Only the first beam is live at the start, so the K copies of BOS do not compete.
  alive_logp = jnp.broadcast_to(jnp.where(jnp.arange(beams) == 0, 0.0, NEG_INF),
                                (batch, beams))
  state = dict(
      i=jnp.zeros((), jnp.int32), seqs=seqs, alive_logp=alive_logp, cache=cache,
      fin_seqs=seqs, fin_scores=jnp.full((batch, beams), NEG_INF),
      fin_logp=jnp.full((batch, beams), NEG_INF),
      num_fin=jnp.zeros((batch,), jnp.int32), done=jnp.zeros((batch,), bool))

  def cond(s):
    return (s["i"] < max_len) & ~jnp.all(s["done"])

  def body(s):
    i, n = s["i"], s["i"] + 1  # n: length of the hypotheses built at this step
    logp, cache = _next_log_probs(model, variables, s["seqs"][:, :, i].reshape(-1),
                                  s["cache"], src_mask)
    cand = (s["alive_logp"][:, :, None] + logp.reshape(batch, beams, vocab)).reshape(
        batch, beams * vocab)
    top_logp, top_idx = lax.top_k(cand, 2 * beams)  # ranked; at most K of them end in EOS
    parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
    top_seqs = _write(_gather_beams(s["seqs"], parent), n, token)
    live = top_logp > NEG_INF
    is_eos = token == cfg.eos_id

    # Finish: EOS candidates ranked in the top K; at the last step, the top K.
    rank_ok = jnp.arange(2 * beams) < beams
    finish = live & rank_ok & (is_eos | (n == max_len))
    new_scores = jnp.where(finish, top_logp / length_penalty(n, alpha), NEG_INF)
    all_scores = jnp.concatenate([s["fin_scores"], new_scores], axis=1)
    fin_scores, keep = lax.top_k(all_scores, beams)
    fin_seqs = _gather_beams(jnp.concatenate([s["fin_seqs"], top_seqs], axis=1), keep)
    fin_logp = _gather_beams(jnp.concatenate([s["fin_logp"],
                                              jnp.where(finish, top_logp, NEG_INF)], 1), keep)
    num_fin = s["num_fin"] + jnp.sum(finish, axis=1)

    # Stay alive: the K best candidates that do not end in EOS.
    alive_logp, pick = lax.top_k(jnp.where(is_eos, NEG_INF, top_logp), beams)
    seqs = _gather_beams(top_seqs, pick)
    cache = _gather_cache(cache, jnp.take_along_axis(parent, pick, axis=1))

    done = s["done"] | (num_fin >= beams) | ~jnp.any(alive_logp > NEG_INF, axis=1) | \
        (n >= max_len)
    frozen = lambda new, old: jnp.where(
        s["done"].reshape((batch,) + (1,) * (new.ndim - 1)), old, new)
    return dict(i=n, seqs=seqs, alive_logp=alive_logp, cache=cache,
                fin_seqs=frozen(fin_seqs, s["fin_seqs"]),
                fin_scores=frozen(fin_scores, s["fin_scores"]),
                fin_logp=frozen(fin_logp, s["fin_logp"]),
                num_fin=frozen(num_fin, s["num_fin"]), done=done)

  s = lax.while_loop(cond, body, state)
  return BeamSearchOutput(s["fin_seqs"][:, :, 1:], s["fin_scores"], s["fin_logp"])


def beam_search(model: Transformer, variables, src: Array, *, beam_size: int = 4,
                alpha: float = 0.6, max_decode_len: int | None = None) -> BeamSearchOutput:
  """Beam search with the GNMT length penalty (see the module docstring).

  Args:
    model: a :class:`Transformer` (static under jit; equal configs share a compilation).
    variables: ``{"params": ...[, "batch_stats": ...]}``; decoding runs in eval mode.
    src: (B, S) source ids, padded with ``pad_id``.
    beam_size: K (default 4, as in Vaswani et al. 2017).
    alpha: length-penalty exponent α (default 0.6); 0 ranks by raw log-probability.
    max_decode_len: output length cap (default ``min(S + 50, max_len)``).
  """
  if beam_size < 1:
    raise ValueError(f"beam_size must be >= 1, got {beam_size}")
  max_len = _resolve_len(model, src, max_decode_len)
  return _beam_search(model, variables, src, jnp.asarray(alpha, jnp.float32), beam_size,
                      max_len)


# ----------------------------------------------------------------------------------------
# Scoring given outputs (teacher forcing).
# ----------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("model",))
def score_sequences(model: Transformer, variables, src: Array, tokens: Array,
                    alpha=0.6) -> tuple[Array, Array]:
  """The model's own (log P(y|x), s(y)) for outputs ``tokens`` (B, L) padded after EOS.

  Uses the whole-sequence forward pass, so it also checks the incremental decoder; the
  length n counts the non-pad tokens (EOS included).
  """
  cfg = model.config
  logits = model.apply(variables, src, shift_right(tokens, cfg.bos_id))
  logp = jax.nn.log_softmax(logits, axis=-1)
  token_logp = jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]
  real = tokens != cfg.pad_id
  total = jnp.sum(jnp.where(real, token_logp, 0.0), axis=-1)
  return total, total / length_penalty(jnp.sum(real, axis=-1), alpha)
