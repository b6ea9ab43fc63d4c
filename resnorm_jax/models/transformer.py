"""Encoder-decoder Transformer (Vaswani et al. 2017) with pluggable residual blocks.

Every residual sublayer (encoder self-attention, decoder self-attention, cross-attention,
FFN) is wrapped by a skip combinator of ``resnorm_jax.layers.COMBINATORS``:

    y = combinator(x, F),   F(h) = Dropout(Sublayer(h))

so ``post_ln`` (the paper: y = LN(x + F(x))), ``pre_ln`` (y = x + F(LN(x))), ``xskip_ln``
(y = LN(λx + F(x))), ``rskip_ln`` (G_k = LN(x + G_{k−1})), ``deepnorm`` (y = LN(αx + F(x))
with the branch init scaled by β), ``rezero``, and the BatchNorm variants ``xskip_bn`` /
``rskip_bn`` (statistics over the real tokens only: the (B, T) token mask is passed to
every combinator) all plug in by name (Liu et al. 2020, SPEC.md section 3).

Pieces (Vaswani et al. 2017, Sec. 3):

* embeddings E shared by source, target and the pre-softmax projection (``share_embeddings``,
  ``tie_output``), looked up as E[x]·sqrt(d_model), plus sinusoidal positions
  PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d));
* attention(Q, K, V) = softmax(QKᵀ / sqrt(d_k) + mask) V over ``num_heads`` heads, with
  padding keys masked everywhere and future positions masked in decoder self-attention;
* FFN(h) = max(0, h W_1 + b_1) W_2 + b_2;
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

Attention runs through ``jax.nn.dot_product_attention`` (``TransformerConfig.attention``):
``auto`` picks cuDNN's fused kernel on a GPU for bfloat16/float16 compute and XLA's
implementation elsewhere (``attention_implementation``); weights dropout
(``attention_dropout_rate`` > 0 in training), which the fused function has no place for,
and ``einsum`` use the explicit softmax(QKᵀ/sqrt(d_k) + mask)V written out here.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from resnorm_jax.layers import (COMBINATORS, NORMS, DepthInfo, NormContext, SkipCombinator,
                                make_combinator, make_norm)
from resnorm_jax import config as config_lib
from resnorm_jax.errors import ConfigError
from resnorm_jax.models.family import (ModelFamily, compute_dtype, norm_context,
                                       register_model)

Array = jax.Array


# ----------------------------------------------------------------------------------------
# Configuration and presets.
# ----------------------------------------------------------------------------------------
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
    skip, skip_lambda: combinator spec and λ (``make_combinator``).
    norm: norm spec used wherever a combinator would use LayerNorm (its pre-norm / post-norms
      for ``pre_ln``, ``post_ln``, ``xskip_ln``, ``rskip_ln``, ``deepnorm``; the ``*_bn``
      combinators keep their BatchNorm) and by the final norms.
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
  skip: str = "post_ln"
  skip_lambda: float | None = None
  norm: str = "layer"
  share_embeddings: bool = True
  tie_output: bool = True
  dtype: Any = jnp.float32
  norm_ctx: NormContext = NormContext()
  final_norm: bool | None = None
  pad_id: int = 0
  bos_id: int = 1
  eos_id: int = 2
  attention: str = "auto"

  def __post_init__(self):
    validate_config(self)


ATTENTION_CHOICES = ("auto", "xla", "cudnn", "einsum")


def validate_config(cfg: TransformerConfig) -> None:
  """Raises ConfigError for values that cannot build a model (no compilation needed)."""
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
  COMBINATORS.entry(cfg.skip)  # unknown names list the valid choices
  NORMS.entry(cfg.norm)
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
  fields = {f.name for f in dataclasses.fields(TransformerConfig)} - {"vocab_size"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"unknown TransformerConfig field(s) {unknown}; valid fields: "
                      f"{', '.join(sorted(fields))}")
  return TransformerConfig(vocab_size=vocab_size, **{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------------------
# Skip combinators resolved per stack.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SkipSpec:
  """The :class:`SkipCombinator` fields of one stack, resolved from ``cfg.skip``.

  Resolution happens once (in :meth:`Transformer.setup`), so the layers can read β
  (``init_scale``) and build one combinator per sublayer with ``build(name)``.
  """
  fields: tuple[tuple[str, Any], ...]

  def get(self, key):
    return dict(self.fields)[key]

  @property
  def init_scale(self) -> float:
    return float(self.get("init_scale"))

  def build(self, name: str) -> SkipCombinator:
    return SkipCombinator(**{**dict(self.fields), "tap_output": True}, name=name)


def stack_depth(cfg: TransformerConfig, stack: str) -> DepthInfo:
  """DepthInfo of the ``encoder`` or ``decoder`` stack (DeepNorm's α, β need N and M)."""
  return DepthInfo(stack=stack, num_encoder=cfg.num_encoder_layers,
                   num_decoder=cfg.num_decoder_layers)


def resolve_skip(cfg: TransformerConfig, stack: str) -> SkipSpec:
  """Builds ``cfg.skip`` with ``make_combinator``, ``cfg.norm`` in place of LayerNorm.

  Call it at top level or inside a ``setup()``: an unnamed module built there is an
  unattached template (it registers no submodule and owns no variables).
  """
  template = make_combinator(cfg.skip, lam=cfg.skip_lambda, ctx=cfg.norm_ctx,
                             depth=stack_depth(cfg, stack), layer_norm=cfg.norm)
  fields = {f.name: getattr(template, f.name) for f in dataclasses.fields(template)
            if f.init and f.name not in ("parent", "name")}
  return SkipSpec(tuple(sorted(fields.items())))


def uses_final_norm(cfg: TransformerConfig, spec: SkipSpec) -> bool:
  """``cfg.final_norm``, or automatically: a pre-norm combinator's residual stream is never
  normalized, so the stack output gets one (Pre-LN Transformer, Xiong et al. 2020)."""
  if cfg.final_norm is not None:
    return bool(cfg.final_norm)
  return spec.get("pre_norm") is not None


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------
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


# ----------------------------------------------------------------------------------------
# Sublayers.
# ----------------------------------------------------------------------------------------
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
  skip: SkipSpec

  @nn.compact
  def __call__(self, x, mask, *, train: bool = False, attn_mask=None):
    cfg, beta = self.config, self.skip.init_scale
    drop = nn.Dropout(cfg.dropout_rate)
    attn = _attention(cfg, beta, "self_attn")
    attn_mask = key_mask(mask) if attn_mask is None else attn_mask
    x = self.skip.build("self_attn_skip")(
        x, lambda h: drop(attn(h, h, attn_mask, train=train), deterministic=not train),
        train=train, mask=mask)
    ffn = _ffn(cfg, beta)
    return self.skip.build("ffn_skip")(
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

    x = self.skip.build("self_attn_skip")(x, self_branch, train=train, mask=token_mask)

    cross_attn = _attention(cfg, beta, "cross_attn")

    def cross_branch(h):
      if cache is not None and cache.get("cross_k") is not None:
        k, v = cache["cross_k"], cache["cross_v"]
      else:
        k, v = cross_attn.project_kv(encoded)
      if cache is not None:
        new_cache.update(cross_k=k, cross_v=v)
      return drop(cross_attn.attend(h, k, v, cross_mask, train=train), deterministic=not train)

    x = self.skip.build("cross_attn_skip")(x, cross_branch, train=train, mask=token_mask)

    ffn = _ffn(cfg, beta)
    x = self.skip.build("ffn_skip")(
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
      x = make_norm(cfg.norm, cfg.norm_ctx, name="final_norm")(x, train=train, mask=mask)
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
      x = make_norm(cfg.norm, cfg.norm_ctx, name="final_norm")(x, train=train, mask=tgt_mask)
    new_cache = None if cache is None else {"index": cache["index"], "layers": tuple(layers)}
    return x, new_cache


# ----------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------
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
    enc_skip, dec_skip = resolve_skip(cfg, "encoder"), resolve_skip(cfg, "decoder")
    self.encoder = Encoder(cfg, enc_skip, uses_final_norm(cfg, enc_skip))
    self.decoder = Decoder(cfg, dec_skip, uses_final_norm(cfg, dec_skip))
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


# ----------------------------------------------------------------------------------------
# Registration.
# ----------------------------------------------------------------------------------------
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
