"""Encoder-decoder Transformer (Vaswani et al. 2017) with pluggable residual blocks.

Every residual sublayer (encoder self-attention, decoder self-attention, cross-attention,
FFN) is wrapped by a skip combinator of ``resnorm_jax.layers.COMBINATORS``:

    y = combinator(x, F),   F(h) = Dropout(Sublayer(h))

so ``post_ln`` (the paper: y = LN(x + F(x))), ``pre_ln`` (y = x + F(LN(x))), ``xskip_ln``
(y = LN(λx + F(x))), ``rskip_ln`` (G_k = LN(x + G_{k−1})), ``deepnorm`` (y = LN(αx + F(x))
with the branch init scaled by β), ``rezero``, and the BatchNorm variants ``xskip_bn`` /
``rskip_bn`` (statistics over the real tokens only: the (B, T) token mask is passed to
every combinator) all plug in by name (Liu et al. 2020, SPEC.md section 3).

The package, one concern per module:

* ``config``: :class:`TransformerConfig`, its checks and presets; the norm and each stack's
  combinator are resolved there, once;
* ``tokens``: positions, token masks, the teacher-forcing decoder input;
* ``attention``: attention masks, multi-head attention, the fused/cuDNN and explicit
  implementations;
* ``losses``: label-smoothed cross entropy, whole or over chunks of positions;
* ``layers``: the FFN, encoder and decoder layers and stacks;
* ``model``: the :class:`Transformer` (embeddings, logits, loss, incremental decoding);
* ``family``: the ``transformer`` model family's registration.
"""

from resnorm_jax.models.transformer.attention import (MultiHeadAttention,
                                                      attention_implementation, causal_mask,
                                                      einsum_attention, fused_attention,
                                                      key_mask, scaled_init, segment_mask)
from resnorm_jax.models.transformer.config import (ATTENTION_CHOICES, PRESETS,
                                                   TransformerConfig, resolve_skip,
                                                   stack_depth, transformer_preset,
                                                   uses_final_norm, validate_config)
from resnorm_jax.models.transformer.layers import (Decoder, DecoderLayer, Encoder,
                                                   EncoderLayer, FeedForward)
from resnorm_jax.models.transformer.losses import (LOSS_CHUNK_BYTES, chunked_cross_entropy,
                                                   label_smoothed_cross_entropy, loss_chunks)
from resnorm_jax.models.transformer.model import Transformer
from resnorm_jax.models.transformer.tokens import (padding_mask, shift_right,
                                                   shift_right_segments,
                                                   sinusoidal_positions, target_mask)
from resnorm_jax.models.transformer import family  # noqa: F401  registers the family

__all__ = [
    "ATTENTION_CHOICES", "LOSS_CHUNK_BYTES", "PRESETS", "Decoder", "DecoderLayer", "Encoder",
    "EncoderLayer", "FeedForward", "MultiHeadAttention", "Transformer", "TransformerConfig",
    "attention_implementation", "causal_mask", "chunked_cross_entropy", "einsum_attention",
    "fused_attention", "key_mask", "label_smoothed_cross_entropy", "loss_chunks",
    "padding_mask", "resolve_skip", "scaled_init", "segment_mask", "shift_right",
    "shift_right_segments", "sinusoidal_positions", "stack_depth", "target_mask",
    "transformer_preset", "uses_final_norm", "validate_config",
]
