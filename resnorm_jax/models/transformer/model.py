"""The encoder-decoder Transformer (Vaswani et al. 2017) with pluggable residual blocks.

Pieces (Vaswani et al. 2017, Sec. 3):

* embeddings E shared by source, target and the pre-softmax projection (``share_embeddings``,
  ``tie_output``), looked up as E[x]·sqrt(d_model), plus sinusoidal positions
  PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d));
* the encoder and decoder stacks (``layers.py``), attention (``attention.py``);
* dropout on the embeddings, on every sublayer's output (inside F, before the addition) and,
  at ``attention_dropout_rate``, on the attention weights.

Incremental decoding keeps an explicit cache pytree (:meth:`Transformer.init_cache`,
:meth:`Transformer.decode_step`): per decoder layer the self-attention keys/values of the
positions decoded so far (written in place with ``lax.dynamic_update_slice``) and the
cross-attention keys/values of the encoder output (computed once).  Shapes never change
between steps, so a step runs inside ``jax.jit`` / ``lax.while_loop`` (see
``resnorm_jax.tasks.translation.decoding``).

Parameters are always float32; ``dtype`` is the compute dtype.  Attention logits, softmax,
norm statistics and output logits are computed in float32.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnorm_jax.models.transformer.attention import scaled_init
from resnorm_jax.models.transformer.config import TransformerConfig, uses_final_norm
from resnorm_jax.models.transformer.layers import Decoder, Encoder
from resnorm_jax.models.transformer.losses import (chunked_cross_entropy,
                                                   label_smoothed_cross_entropy, loss_chunks)
from resnorm_jax.models.transformer.tokens import (padding_mask, sinusoidal_positions,
                                                   target_mask)

Array = jax.Array


class Transformer(nn.Module):
  """Encoder-decoder Transformer; see the module docstring.

  Usage::

    model = Transformer(transformer_preset("base", vocab_size=37000))
    variables = model.init(key, src, tgt_in)                   # {"params"[, "batch_stats"]}
    logits = model.apply(variables, src, tgt_in, train=True, rngs={"dropout": key},
                         mutable=["batch_stats"])               # mutable only for BN variants
    cache = model.apply(variables, encoded, src_mask, L, method=model.init_cache)
    logits, cache = model.apply(variables, token, cache, src_mask, method=model.decode_step)
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    embed = lambda: nn.Embed(cfg.vocab_size, cfg.d_model, dtype=dtype, param_dtype=jnp.float32,
                             embedding_init=nn.initializers.normal(cfg.d_model ** -0.5))
    if cfg.share_embeddings:
      self.embed = embed()
    else:
      self.src_embed = embed()
      self.tgt_embed = embed()
    if not cfg.tie_output:
      self.output = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dtype,
                             param_dtype=jnp.float32, kernel_init=scaled_init(1.0))
    self.encoder = Encoder(cfg, cfg.encoder_skip, uses_final_norm(cfg, cfg.encoder_skip))
    self.decoder = Decoder(cfg, cfg.decoder_skip, uses_final_norm(cfg, cfg.decoder_skip))
    self.dropout = nn.Dropout(cfg.dropout_rate)

  def _embedding(self, side: str) -> nn.Embed:
    if self.config.share_embeddings:
      return self.embed
    return self.src_embed if side == "src" else self.tgt_embed

  def _embed(self, side: str, tokens: Array, positions: Array, *, train: bool) -> Array:
    """E[x]·sqrt(d_model) + PE[positions], then dropout."""
    cfg = self.config
    table = sinusoidal_positions(cfg.max_len, cfg.d_model)
    x = self._embedding(side)(tokens) * jnp.asarray(cfg.d_model ** 0.5, jnp.dtype(cfg.dtype))
    x = x + jnp.asarray(table, x.dtype)[positions]
    return self.dropout(x, deterministic=not train)

  def _check_length(self, length: int, what: str):
    if length > self.config.max_len:
      raise ValueError(f"{what} length {length} exceeds max_len={self.config.max_len}")

  def logits(self, h: Array) -> Array:
    """Pre-softmax projection, float32: h Eᵀ when tied, h W_out otherwise."""
    if self.config.tie_output:
      out = self._embedding("tgt").attend(h)
    else:
      out = self.output(h)
    return out.astype(jnp.float32)

  def encode(self, src: Array, train: bool = False, *, segments: Array | None = None,
             positions: Array | None = None) -> Array:
    """(B, S) source ids -> (B, S, d_model) encoder output.  Packed rows: ``segments``
    (B, S) segment ids (0 = padding) and ``positions`` (B, S) positions within a segment."""
    if positions is None:   # packed rows: positions restart in each segment (< max_len)
      self._check_length(src.shape[1], "source")
      positions = jnp.arange(src.shape[1])
    x = self._embed("src", src, positions, train=train)
    return self.encoder(x, padding_mask(src, self.config.pad_id), train=train,
                        segments=segments)

  def decode(self, encoded: Array, src_mask: Array, tgt_in: Array,
             train: bool = False, *, src_segments: Array | None = None,
             tgt_segments: Array | None = None,
             tgt_positions: Array | None = None, hidden: bool = False) -> Array:
    """Teacher-forced decoder: (B, T) decoder input ids -> (B, T, vocab) float32 logits
    (``hidden``: the (B, T, d_model) output before the projection).  Packed rows: segment
    ids of both sides, target positions within a segment; the real target positions are
    then those with a segment (``tgt_segments > 0``)."""
    positions = tgt_positions
    if positions is None:
      self._check_length(tgt_in.shape[1], "target")
      positions = jnp.arange(tgt_in.shape[1])
    x = self._embed("tgt", tgt_in, positions, train=train)
    if tgt_segments is None:
      tgt_mask, segments = target_mask(tgt_in, self.config.pad_id), None
    else:
      tgt_mask, segments = tgt_segments > 0, (src_segments, tgt_segments)
    h, _ = self.decoder(x, encoded, src_mask, tgt_mask, train=train, segments=segments)
    return h if hidden else self.logits(h)

  def loss_sum(self, src: Array, tgt_in: Array, targets: Array, smoothing: float,
               train: bool = False, *, src_segments: Array | None = None,
               tgt_segments: Array | None = None, src_positions: Array | None = None,
               tgt_positions: Array | None = None) -> Array:
    """The training loss's numerator, Σ over non-pad ``targets`` of the label-smoothed cross
    entropy of :meth:`__call__`'s logits, without holding a large batch's logits at once
    (:func:`chunked_cross_entropy`, tied output projection; a small batch, or an untied one,
    goes through the logits as they are)."""
    cfg = self.config
    packed = dict(src_segments=src_segments, tgt_segments=tgt_segments,
                  src_positions=src_positions, tgt_positions=tgt_positions)
    chunks = loss_chunks(targets.shape, cfg.vocab_size)
    if chunks == 1 or not cfg.tie_output:
      logits = self(src, tgt_in, train, **packed)
      return label_smoothed_cross_entropy(logits, targets, cfg.pad_id, smoothing)[0]
    if (src_segments is None) != (tgt_segments is None):
      raise ValueError("packed rows need the segment ids of both sides")
    encoded = self.encode(src, train=train, segments=src_segments, positions=src_positions)
    h = self.decode(encoded, padding_mask(src, cfg.pad_id), tgt_in, train=train,
                    src_segments=src_segments, tgt_segments=tgt_segments,
                    tgt_positions=tgt_positions, hidden=True)
    embedding = self._embedding("tgt")
    h, table = embedding.promote_dtype(h, embedding.embedding, dtype=embedding.dtype)
    return chunked_cross_entropy(h, table.T, targets, cfg.pad_id, smoothing, chunks)

  def __call__(self, src: Array, tgt_in: Array, train: bool = False, *,
               src_segments: Array | None = None, tgt_segments: Array | None = None,
               src_positions: Array | None = None,
               tgt_positions: Array | None = None) -> Array:
    """Logits (B, T, vocab) of the next token at each decoder input position.  The keyword
    arguments describe packed rows (all four or none; decoder input from
    :func:`shift_right_segments`): attention never crosses segments and positions restart
    in each segment."""
    if (src_segments is None) != (tgt_segments is None):
      raise ValueError("packed rows need the segment ids of both sides")
    encoded = self.encode(src, train=train, segments=src_segments, positions=src_positions)
    return self.decode(encoded, padding_mask(src, self.config.pad_id), tgt_in, train=train,
                       src_segments=src_segments, tgt_segments=tgt_segments,
                       tgt_positions=tgt_positions)

  def init_cache(self, encoded: Array, src_mask: Array, max_decode_len: int) -> dict:
    """Empty self-attention cache for ``max_decode_len`` steps, cross-attention keys and
    values of ``encoded`` computed once.  Leaves lead with the batch dimension except the
    scalar step ``index``."""
    cfg = self.config
    self._check_length(max_decode_len, "decode")
    batch, d_k = encoded.shape[0], cfg.d_model // cfg.num_heads
    zeros = jnp.zeros((batch, max_decode_len, cfg.num_heads, d_k), jnp.dtype(cfg.dtype))
    empty = {"k": zeros, "v": zeros, "cross_k": None, "cross_v": None}
    priming = {"index": jnp.zeros((), jnp.int32),
               "layers": tuple(dict(empty) for _ in range(cfg.num_decoder_layers))}
    # One throwaway step computes every layer's cross-attention keys/values.
    x = jnp.zeros((batch, 1, cfg.d_model), jnp.dtype(cfg.dtype))
    _, primed = self.decoder(x, encoded, src_mask, jnp.ones((batch, 1), bool), train=False,
                             cache=priming)
    layers = tuple({"k": zeros, "v": zeros, "cross_k": c["cross_k"], "cross_v": c["cross_v"]}
                   for c in primed["layers"])
    return {"index": jnp.zeros((), jnp.int32), "layers": layers}

  def decode_step(self, token: Array, cache: dict, src_mask: Array) -> tuple[Array, dict]:
    """One incremental step: (B,) ids at position ``cache["index"]`` -> (B, vocab) float32
    logits of the next token and the cache advanced by one position (eval mode)."""
    index = cache["index"]
    x = self._embed("tgt", token[:, None], index[None], train=False)
    h, new = self.decoder(x, None, src_mask, jnp.ones(token.shape + (1,), bool), train=False,
                          cache=cache)
    return self.logits(h)[:, 0], {"index": index + 1, "layers": new["layers"]}
