"""Encoder-decoder Transformer, its loss and decoding (SPEC.md section 4)."""

import functools
import itertools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax.tasks.translation.decoding import (beam_search, greedy_decode, length_penalty,
                                  score_sequences)
from resnorm_jax.layers import ConfigError, DepthInfo, NormContext, deepnorm_constants
from resnorm_jax.models.transformer import (PRESETS, Transformer, TransformerConfig,
                                            label_smoothed_cross_entropy, shift_right,
                                            transformer_preset)

PAD, BOS, EOS = 0, 1, 2
SRC = np.array([[3, 4, 5, 6, 2, 0, 0],
                [7, 8, 9, 3, 4, 5, 2],
                [5, 2, 0, 0, 0, 0, 0]], np.int32)
TGT = np.array([[3, 4, 5, 2, 0],   # decoder targets; inputs are shift_right(TGT)
                [6, 7, 8, 9, 2],
                [9, 2, 0, 0, 0]], np.int32)


# The tests run tiny programs once: trade XLA CPU code quality for compile time.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def tiny(vocab=11, **overrides) -> TransformerConfig:
  return transformer_preset("tiny", vocab, **overrides)


@functools.lru_cache(maxsize=None)
def _jit_init(model):
  return fast_jit(model.init)


def init(model, src=SRC, tgt=TGT, seed=0):
  """Variables of ``model`` (one compilation per model and input shapes)."""
  return _jit_init(model)(jax.random.PRNGKey(seed), jnp.asarray(src),
                          shift_right(jnp.asarray(tgt), BOS))


def loss_fn(model, params, extra, src, tgt, rng, smoothing=0.1):
  """Mean label-smoothed loss in train mode; returns (loss, (logits, new batch_stats))."""
  variables = {"params": params, **extra}
  logits, updates = model.apply(variables, src, shift_right(tgt, BOS), train=True,
                                rngs={"dropout": rng}, mutable=["batch_stats"])
  total, count = label_smoothed_cross_entropy(logits, tgt, PAD, smoothing)
  return total / count, (logits, updates)


# ----------------------------------------------------------------------------------------
# Configs and presets.
# ----------------------------------------------------------------------------------------
def test_presets_and_config_errors():
  base = transformer_preset("base", 37000)
  assert (base.num_encoder_layers, base.num_decoder_layers, base.d_model, base.num_heads,
          base.d_ff, base.dropout_rate) == (6, 6, 512, 8, 2048, 0.1)
  big = transformer_preset("big", 37000)
  assert (big.d_model, big.num_heads, big.d_ff, big.dropout_rate) == (1024, 16, 4096, 0.3)
  iwslt = transformer_preset("iwslt", 8000)
  assert (iwslt.d_model, iwslt.num_heads, iwslt.d_ff, iwslt.dropout_rate) == (512, 4, 1024, 0.3)
  assert base.skip.text == "post_ln" and base.share_embeddings and base.tie_output
  assert transformer_preset("tiny", 11, skip="pre_ln").skip.text == "pre_ln"
  assert list(PRESETS) == ["base", "big", "iwslt", "tiny"]
  with pytest.raises(ConfigError, match="valid choices: base, big, iwslt, tiny"):
    transformer_preset("huge", 100)
  with pytest.raises(ConfigError, match="d_modle"):
    transformer_preset("tiny", 100, d_modle=3)
  with pytest.raises(ConfigError, match="num_heads=3 must divide d_model=32"):
    tiny(num_heads=3)
  with pytest.raises(ConfigError, match="valid choices"):
    tiny(skip="post_lnn")
  with pytest.raises(ConfigError, match="valid choices"):
    tiny(norm="layr")
  with pytest.raises(ConfigError, match="eos_id"):
    tiny(eos_id=PAD)
  with pytest.raises(ConfigError, match="attention must be one of auto, xla, cudnn, einsum"):
    tiny(attention="flash")


@pytest.mark.parametrize("preset", ["base", "big", "iwslt"])
def test_full_size_preset_shapes(preset):
  """Real dimensions, shapes only (jax.eval_shape: nothing is allocated or computed)."""
  cfg = transformer_preset(preset, 1000)
  model = Transformer(cfg)
  src, tgt_in = jnp.asarray(SRC), shift_right(jnp.asarray(TGT), BOS)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), src, tgt_in)
  logits = jax.eval_shape(model.apply, variables, src, tgt_in)
  chex.assert_shape(logits, (3, 5, 1000))
  assert logits.dtype == jnp.float32
  p = variables["params"]
  assert set(p) == {"embed", "encoder", "decoder"}
  assert len(p["encoder"]) == cfg.num_encoder_layers  # post_ln: no final norm
  assert len(p["decoder"]) == cfg.num_decoder_layers
  chex.assert_shape(p["embed"]["embedding"], (1000, cfg.d_model))
  chex.assert_shape(p["encoder"]["layer_0"]["ffn"]["wi"]["kernel"], (cfg.d_model, cfg.d_ff))
  assert set(p["decoder"]["layer_5"]) == {"self_attn", "self_attn_skip", "cross_attn",
                                          "cross_attn_skip", "ffn", "ffn_skip"}


def test_base_parameter_count():
  """Vaswani et al. 2017, Table 3: base = 65M parameters with a 37k shared vocabulary."""
  model = Transformer(transformer_preset("base", 37000))
  src = jnp.ones((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), src, src)
  n = num_params(shapes["params"])
  assert abs(n - 65e6) / 65e6 < 0.05, n


def test_structure_options():
  """Final norm (automatic for pre_ln), norm substitution, untied embeddings."""
  src = jnp.ones((2, 4), jnp.int32)

  def params(**kw):
    model = Transformer(tiny(**kw))
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), src, src)["params"]

  assert "final_norm" in params(skip="pre_ln")["encoder"]
  assert "final_norm" in params(skip="pre_ln")["decoder"]
  assert "final_norm" not in params(skip="post_ln")["encoder"]
  assert "final_norm" not in params(skip="pre_ln", final_norm=False)["decoder"]
  assert "final_norm" in params(skip="post_ln", final_norm=True)["decoder"]
  # norm replaces the combinators' LayerNorm: RMSNorm has a scale and no bias.
  rms = params(skip="post_ln", norm="rms")["encoder"]["layer_0"]["ffn_skip"]["post_norm_0"]
  assert set(rms) == {"scale"}
  pre = params(skip="pre_ln", norm="rms")
  assert set(pre["decoder"]["layer_1"]["ffn_skip"]["pre_norm"]) == {"scale"}
  assert set(pre["decoder"]["final_norm"]) == {"scale"}
  # BN combinators keep BatchNorm whatever `norm` says.
  bn = params(skip="xskip_bn", norm="rms")["encoder"]["layer_0"]["ffn_skip"]["post_norm_0"]
  assert set(bn) == {"scale", "bias"}
  untied = params(share_embeddings=False, tie_output=False)
  assert {"src_embed", "tgt_embed", "output"} <= set(untied)


# ----------------------------------------------------------------------------------------
# Forward pass.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
  model = Transformer(tiny())
  return model, init(model)


def test_tiny_forward_shapes(tiny_model):
  model, variables = tiny_model
  src, tgt_in = jnp.asarray(SRC), shift_right(jnp.asarray(TGT), BOS)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  logits, encoded = fast_jit(lambda v: (model.apply(v, src, tgt_in),
                                        model.apply(v, src, method=model.encode)))(variables)
  chex.assert_shape(logits, (3, 5, 11))
  chex.assert_tree_all_finite(logits)
  chex.assert_shape(encoded, (3, 7, 32))


def test_bfloat16_compute():
  model = Transformer(tiny(dtype=jnp.bfloat16))
  src, tgt_in = jnp.asarray(SRC), shift_right(jnp.asarray(TGT), BOS)

  @fast_jit
  def run(key):
    variables = model.init(key, src, tgt_in)
    return variables, model.apply(variables, src, tgt_in)

  variables, logits = run(jax.random.PRNGKey(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  assert logits.dtype == jnp.float32
  chex.assert_tree_all_finite(logits)


def test_determinism_from_seed(tiny_model):
  model, variables = tiny_model
  chex.assert_trees_all_equal(variables, init(model, seed=0))
  other = init(model, seed=1)
  assert not np.allclose(variables["params"]["embed"]["embedding"],
                         other["params"]["embed"]["embedding"])
  src, tgt = jnp.asarray(SRC), jnp.asarray(TGT)
  run = fast_jit(lambda rng: loss_fn(model, variables["params"], {}, src, tgt, rng)[1][0])
  a, b, c = run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(3)), run(jax.random.PRNGKey(4))
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a, c)  # dropout is on in train mode


COMBINATORS = [("post_ln", None), ("pre_ln", None), ("xskip_ln", 2.0), ("rskip_ln", 2),
               ("deepnorm", None), ("rezero", None), ("xskip_bn", 2.0), ("rskip_bn", 2)]


@pytest.mark.parametrize("skip,lam", COMBINATORS, ids=[c[0] for c in COMBINATORS])
def test_combinators_finite_logits_and_gradients(skip, lam):
  # One encoder and one decoder layer (every sublayer kind) and no dropout: compile time.
  model = Transformer(tiny(skip=skip, skip_lambda=lam, num_encoder_layers=1,
                           num_decoder_layers=1, dropout_rate=0.0))
  src, tgt = jnp.asarray(SRC), jnp.asarray(TGT)

  @fast_jit
  def run(key):
    variables = model.init(key, src, shift_right(tgt, BOS))
    params, extra = variables["params"], {k: v for k, v in variables.items() if k != "params"}
    grad_fn = jax.value_and_grad(lambda p: loss_fn(model, p, extra, src, tgt, key),
                                 has_aux=True)
    return variables, grad_fn(params)

  variables, ((loss, (logits, updates)), grads) = run(jax.random.PRNGKey(1))
  params = variables["params"]
  chex.assert_shape(logits, (3, 5, 11))
  chex.assert_tree_all_finite((loss, logits, grads))
  assert float(loss) > 0
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree_util.tree_leaves(grads))
  if skip.endswith("_bn"):
    assert "batch_stats" in variables
    assert not np.allclose(updates["batch_stats"]["encoder"]["layer_0"]["ffn_skip"]
                           ["post_norm_0"]["mean"], 0.0)
  if skip == "deepnorm":  # β scales W_V, W_O and the FFN init; W_Q, W_K keep gain 1
    _, beta = deepnorm_constants(DepthInfo("decoder", 1, 1))
    attn = params["decoder"]["layer_0"]["self_attn"]
    ratio = float(jnp.std(attn["value"]["kernel"]) / jnp.std(attn["query"]["kernel"]))
    assert ratio == pytest.approx(beta, rel=0.2)
  if skip == "rezero":  # y = x + α F(x) with α = 0: the branch's own weights get no gradient
    assert float(jnp.abs(grads["encoder"]["layer_0"]["ffn"]["wi"]["kernel"]).max()) == 0.0


@pytest.mark.parametrize("skip", ["xskip_bn", "rskip_bn"])
def test_batchnorm_statistics_ignore_padding(skip):
  """More pad columns, or a different pad embedding, leave real positions unchanged."""
  model = Transformer(tiny(skip=skip, skip_lambda=2, dropout_rate=0.0, num_encoder_layers=1,
                           num_decoder_layers=1))
  src, tgt_in = jnp.asarray(SRC), shift_right(jnp.asarray(TGT), BOS)

  @fast_jit
  def run(src, tgt_in, pad_embedding_shift):
    variables = model.init(jax.random.PRNGKey(0), src, tgt_in)
    emb = variables["params"]["embed"]["embedding"]
    variables["params"]["embed"]["embedding"] = emb.at[PAD].add(pad_embedding_shift)
    return model.apply(variables, src, tgt_in, train=True, mutable=["batch_stats"])

  logits, stats = run(src, tgt_in, 0.0)
  real = np.asarray(tgt_in != PAD)
  drop_pad = lambda a: np.delete(a[real], PAD, axis=-1)  # pad's own tied logit aside
  ref = drop_pad(np.asarray(logits))
  check = lambda a: np.testing.assert_allclose(drop_pad(a), ref, rtol=1e-4,
                                               atol=1e-4 * np.abs(ref).max())
  # (1) three more pad columns on both sides.
  more = lambda x: jnp.pad(x, ((0, 0), (0, 3)), constant_values=PAD)
  logits2, stats2 = run(more(src), more(tgt_in), 0.0)
  check(np.asarray(logits2)[:, :5])
  chex.assert_trees_all_close(stats2, stats, rtol=1e-4, atol=1e-5)
  # (2) a different embedding for the pad token (its own tied output logit aside).
  logits3, stats3 = run(src, tgt_in, 5.0)
  check(np.asarray(logits3))
  chex.assert_trees_all_close(stats3, stats, rtol=1e-4, atol=1e-5)
  # Control: the same perturbation does change the pad positions themselves.
  assert not np.allclose(np.asarray(logits3)[~real], np.asarray(logits)[~real])


# ----------------------------------------------------------------------------------------
# Attention: jax.nn.dot_product_attention against the written-out formula.
# ----------------------------------------------------------------------------------------
def np_attention(q, k, v, mask):
  """softmax(q kᵀ / sqrt(d) + mask) v in float64; a fully masked row averages all values."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
  mask = np.broadcast_to(np.asarray(mask), logits.shape)
  logits = np.where(mask, logits, -np.inf)
  logits = np.where(mask.any(-1, keepdims=True), logits, 0.0)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v)


def attention_inputs(dtype=jnp.float32, t=5, s=7):
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(3, n, 2, 8)), dtype) for n in (t, s, s))
  keys = np.ones((3, s), bool)
  keys[0, 4:] = False   # padding
  keys[2, :] = False    # a fully masked row: uniform weights, never NaN
  causal = np.tril(np.ones((t, s), bool), k=s - t)
  return q, k, v, {"padding": keys[:, None, None, :],
                   "causal and padding": keys[:, None, None, :] & causal[None, None]}


@pytest.mark.parametrize("kind", ["padding", "causal and padding"])
def test_fused_attention_equals_the_formula(kind):
  from resnorm_jax.models.transformer import einsum_attention, fused_attention
  q, k, v, masks = attention_inputs()
  mask = jnp.asarray(masks[kind])
  fused = jax.jit(fused_attention, static_argnums=4)(q, k, v, mask, "auto")
  chex.assert_trees_all_close(fused, np_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(fused, einsum_attention(q, k, v, mask), rtol=1e-5, atol=1e-6)
  # Gradients with respect to q, k and v agree too.
  w = jnp.asarray(np.random.default_rng(1).normal(size=fused.shape), jnp.float32)
  grads = [jax.grad(lambda *a: jnp.sum(f(*a, mask) * w), argnums=(0, 1, 2))(q, k, v)
           for f in (fused_attention, einsum_attention)]
  chex.assert_trees_all_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)
  # bfloat16 inputs: float32 logits and softmax, within bfloat16 rounding of the formula.
  qb, kb, vb = (a.astype(jnp.bfloat16) for a in (q, k, v))
  low = fused_attention(qb, kb, vb, mask)
  assert low.dtype == jnp.bfloat16
  chex.assert_trees_all_close(low.astype(jnp.float32), np_attention(qb, kb, vb, mask),
                              rtol=2e-2, atol=2e-2)


def test_attention_implementation_per_backend():
  """auto: cuDNN's fused kernel only on GPU for 16-bit compute; XLA's on CPU/TPU and f32."""
  from resnorm_jax.models.transformer import attention_implementation
  gpu = jax.default_backend() == "gpu"
  assert attention_implementation("auto", jnp.float32) == "xla"
  assert attention_implementation("auto", jnp.bfloat16) == ("cudnn" if gpu else "xla")
  assert attention_implementation("auto", jnp.float16) == ("cudnn" if gpu else "xla")
  assert attention_implementation("einsum", jnp.bfloat16) == "einsum"


@pytest.mark.parametrize("skip", ["post_ln", "pre_ln"])
def test_model_attention_paths_agree(skip):
  """The model through jax.nn.dot_product_attention equals the written-out einsum path:
  logits, loss gradients (train mode, dropout on) and cached decoding."""
  cfgs = [tiny(skip=skip, num_encoder_layers=1, num_decoder_layers=1, attention=a)
          for a in ("auto", "einsum")]
  models_ = [Transformer(c) for c in cfgs]
  variables = init(models_[0])
  src, tgt = jnp.asarray(SRC), jnp.asarray(TGT)

  @fast_jit
  def run(variables):
    out = []
    for model in models_:
      logits = model.apply(variables, src, shift_right(tgt, BOS))
      grads = jax.grad(lambda p: loss_fn(model, p, {}, src, tgt, jax.random.PRNGKey(3))[0])(
          variables["params"])
      encoded = model.apply(variables, src, method=model.encode)
      cache = model.apply(variables, encoded, src != PAD, 4, method=model.init_cache)
      step_logits, _ = model.apply(variables, tgt[:, 0], cache, src != PAD,
                                   method=model.decode_step)
      out.append((logits, grads, step_logits))
    return out

  fused, einsum = run(variables)
  chex.assert_trees_all_close(fused, einsum, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Incremental decoding.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("skip", ["post_ln", "pre_ln", "rskip_bn"])
def test_incremental_decoding_matches_full_pass(skip):
  bn = skip.endswith("_bn")
  # BN decodes with running statistics; momentum 0 makes them the last batch's.
  model = Transformer(tiny(skip=skip, skip_lambda=2, norm_ctx=NormContext(momentum=0.0),
                           num_encoder_layers=1, num_decoder_layers=1) if bn else tiny(skip=skip))
  variables = init(model)
  src = jnp.asarray(SRC)
  tgt_in = jnp.asarray([[BOS, 3, 4, 5, 6], [BOS, 7, 8, 9, 2], [BOS, 9, 9, 3, 10]])
  src_mask = src != PAD

  @fast_jit
  def incremental_and_full(variables):
    if bn:
      _, stats = model.apply(variables, src, tgt_in, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.PRNGKey(0)})
      variables = {**variables, **stats}
    encoded = model.apply(variables, src, method=model.encode)
    cache = model.apply(variables, encoded, src_mask, 8, method=model.init_cache)

    def step(cache, token):
      logits, cache = model.apply(variables, token, cache, src_mask,
                                  method=model.decode_step)
      return cache, logits

    cache, logits = jax.lax.scan(step, cache, tgt_in.T)
    full = model.apply(variables, src, tgt_in)
    return jnp.swapaxes(logits, 0, 1), cache["index"], full

  logits, index, full = incremental_and_full(variables)
  assert int(index) == 5
  chex.assert_trees_all_close(logits, full, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------
# Decoding.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def five_token_model():
  """Vocabulary {pad, bos, eos, 3, 4}: generated tokens come from {eos, 3, 4}."""
  model = Transformer(tiny(vocab=5, dropout_rate=0.0))
  src = np.array([[3, 4, 3, 2, 0], [4, 4, 2, 0, 0], [3, 3, 4, 4, 2]], np.int32)
  return model, init(model, src=src, tgt=src, seed=7), jnp.asarray(src)


def all_outputs(vocab, max_len):
  """Every output of length <= max_len: ends in EOS, or has max_len tokens and no EOS."""
  words = [t for t in range(vocab) if t not in (PAD, BOS, EOS)]
  seqs = []
  for n in range(1, max_len + 1):
    for prefix in itertools.product(words, repeat=n - 1):
      seqs.append(list(prefix) + [EOS])
    if n == max_len:
      seqs.extend(list(s) for s in itertools.product(words, repeat=n))
  return np.array([s + [PAD] * (max_len - len(s)) for s in seqs], np.int32)


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_matches_exhaustive_search(five_token_model, alpha):
  model, variables, src = five_token_model
  outputs = all_outputs(5, 3)  # 15 sequences
  assert len(outputs) == 1 + 2 + 4 + 8
  batch, n = src.shape[0], len(outputs)
  _, scores = score_sequences(model, variables, jnp.repeat(src, n, axis=0),
                              jnp.tile(outputs, (batch, 1)), alpha)
  scores = np.asarray(scores).reshape(batch, n)
  # 12 beams hold every candidate (4 alive hypotheses x 3 tokens): the search is exact.
  exact = beam_search(model, variables, src, beam_size=12, alpha=alpha, max_decode_len=3)
  for b in range(batch):
    best = int(np.argmax(scores[b]))
    np.testing.assert_array_equal(exact.tokens[b, 0], outputs[best])
    np.testing.assert_allclose(exact.scores[b, 0], scores[b, best], rtol=1e-5, atol=1e-5)
    # All 15 outputs are finished hypotheses; the 12 kept are the 12 best, in order.
    np.testing.assert_allclose(exact.scores[b], np.sort(scores[b])[::-1][:12], rtol=1e-5,
                               atol=1e-5)


def test_greedy_equals_beam_size_one(five_token_model):
  model, variables, src = five_token_model
  for seed in (7, 8):
    variables = init(model, src=src, tgt=src, seed=seed)
    greedy, greedy_logp = greedy_decode(model, variables, src, max_decode_len=6,
                                        return_log_probs=True)
    beam = beam_search(model, variables, src, beam_size=1, alpha=0.6, max_decode_len=6)
    chex.assert_shape(greedy, (3, 6))
    np.testing.assert_array_equal(greedy, beam.tokens[:, 0])
    chex.assert_trees_all_close(greedy_logp, beam.log_probs[:, 0], rtol=1e-5, atol=1e-5)


def test_eos_handling_and_independent_batch_elements(five_token_model):
  model, variables, src = five_token_model
  out = beam_search(model, variables, src, beam_size=4, alpha=0.6, max_decode_len=6)
  chex.assert_shape(out.tokens, (3, 4, 6))
  tokens = np.asarray(out.tokens)
  for hyp in tokens.reshape(-1, 6):
    eos = np.flatnonzero(hyp == EOS)
    end = eos[0] + 1 if len(eos) else 6
    assert np.all(hyp[end:] == PAD)                     # finished hypotheses stop growing
    assert np.all((hyp[:end] != PAD) & (hyp[:end] != BOS))
  assert np.all(np.diff(np.asarray(out.scores), axis=1) <= 0)  # best first
  lengths = np.sum(tokens != PAD, axis=-1)
  np.testing.assert_allclose(out.scores, out.log_probs / length_penalty(lengths, 0.6),
                             rtol=1e-5)
  # The reported scores are the model's own (whole-sequence pass) scores of the outputs.
  logp, scores = score_sequences(model, variables, jnp.repeat(src, 4, axis=0),
                                 out.tokens.reshape(12, 6), 0.6)
  np.testing.assert_allclose(np.asarray(scores).reshape(3, 4), out.scores, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(logp).reshape(3, 4), out.log_probs, rtol=1e-5)
  # Each row's result does not depend on the other rows (same shapes, other sources).
  other = src.at[1:].set(jnp.asarray([[4, 3, 2, 0, 0], [3, 2, 0, 0, 0]]))
  out2 = beam_search(model, variables, other, beam_size=4, alpha=0.6, max_decode_len=6)
  np.testing.assert_array_equal(out2.tokens[0], out.tokens[0])
  np.testing.assert_allclose(out2.scores[0], out.scores[0], rtol=1e-6)
  greedy = np.asarray(greedy_decode(model, variables, src, max_decode_len=6))
  greedy2 = np.asarray(greedy_decode(model, variables, other, max_decode_len=6))
  np.testing.assert_array_equal(greedy2[0], greedy[0])
  for hyp in greedy:
    eos = np.flatnonzero(hyp == EOS)
    if len(eos):
      assert np.all(hyp[eos[0] + 1:] == PAD)


# ----------------------------------------------------------------------------------------
# Loss.
# ----------------------------------------------------------------------------------------
def test_label_smoothed_cross_entropy_matches_numpy():
  rng = np.random.RandomState(0)
  logits = rng.randn(2, 4, 6).astype(np.float32) * 3
  targets = np.array([[3, 1, 5, 0], [2, 0, 0, 0]], np.int32)
  eps, vocab = 0.1, 6
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  expected = 0.0
  for b, t in zip(*np.nonzero(targets != PAD)):
    q = np.full(vocab, eps / (vocab - 1))
    q[targets[b, t]] = 1 - eps
    expected -= np.sum(q * logp[b, t])
  total, count = label_smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                              PAD, eps)
  assert float(count) == 4
  np.testing.assert_allclose(float(total), expected, rtol=1e-5)
  # No smoothing: the negative log-likelihood.
  nll, _ = label_smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(targets), PAD, 0.0)
  mask = targets != PAD
  np.testing.assert_allclose(
      float(nll), -np.take_along_axis(logp, targets[..., None], -1)[..., 0][mask].sum(),
      rtol=1e-5)
  # Logits at padded positions do not matter.
  noisy = logits + 100.0 * (~mask)[..., None] * rng.randn(*logits.shape)
  total2, _ = label_smoothed_cross_entropy(jnp.asarray(noisy), jnp.asarray(targets), PAD, eps)
  np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)


def test_smoothed_targets_gradient_is_softmax_minus_the_smoothed_targets():
  """The one-pass gradient of the chunked loss's slices equals autodiff of the loss, pad
  positions included (zero there)."""
  from resnorm_jax.models.transformer.losses import smoothed_targets_gradient
  rng = np.random.default_rng(2)
  logits = jnp.asarray(3.0 * rng.standard_normal((3, 5, 17)), jnp.float32)
  targets = jnp.asarray(rng.integers(1, 17, (3, 5)), jnp.int32).at[2, 3:].set(0)
  loss, grad = smoothed_targets_gradient(logits, targets, 0, 0.1)
  value, reference = jax.value_and_grad(
      lambda z: label_smoothed_cross_entropy(z, targets, 0, 0.1)[0])(logits)
  # The same log_softmax and the same formula (losses._smoothed_loss), op by op: equal.
  assert float(loss) == float(value)
  # Both take p from the same log_softmax; here ∂z = p − q in one rounding, autodiff forms
  # g − p·Σg with g = −q and Σg = −1 up to the rounding of a sum of V = 17 terms whose
  # partial sums stay below 1 (≤ 2⁻²⁵ per addition, about √16·2⁻²⁵ = 2⁻²³ in all), then a
  # product and a subtraction (≤ 2⁻²⁵ each): a few units of 2⁻²⁴ apart; 8·2⁻²⁴ bounds it
  # (4-6·2⁻²⁴ measured over four seeds).
  np.testing.assert_allclose(grad, reference, rtol=0, atol=4 * 2.0 ** -23)
  assert not np.any(np.asarray(grad)[2, 3:])


@pytest.mark.parametrize("chunks", [2, 3, 7])
def test_chunked_cross_entropy_equals_the_whole_logits_in_value_and_gradient(chunks):
  """The chunked loss (output projection and cross entropy a slice of positions at a
  time, each slice's gradients computed with its logits) is the loss of the whole logits."""
  from resnorm_jax.models.transformer import (chunked_cross_entropy,
                                              label_smoothed_cross_entropy)
  rng = np.random.default_rng(0)
  h = jnp.asarray(rng.standard_normal((3, 10, 8)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((8, 13)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 13, (3, 10)), jnp.int32).at[1, 6:].set(0)

  def whole(h, w):
    return label_smoothed_cross_entropy(jnp.dot(h, w), targets, 0, 0.1)[0]

  def chunked(h, w):
    return chunked_cross_entropy(h, w, targets, 0, 0.1, chunks)
  np.testing.assert_allclose(chunked(h, w), whole(h, w), rtol=1e-6)
  for a, b in zip(jax.grad(chunked, (0, 1))(h, w), jax.grad(whole, (0, 1))(h, w)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow   # the default suite: the chunked loss itself, test_chunked_cross_entropy_...
def test_transformer_loss_sum_chunks_large_batches_and_matches_the_logits(monkeypatch):
  """Transformer.loss_sum: the same loss and parameter gradients as the cross entropy of
  __call__'s logits, here with the chunk budget lowered so that the tiny batch is chunked."""
  from resnorm_jax.models import transformer as transformer_lib
  from resnorm_jax.models.transformer import losses
  monkeypatch.setattr(losses, "LOSS_CHUNK_BYTES", 4 * 11 * 3 * 2)
  model = Transformer(tiny(dropout_rate=0.0))
  rng = np.random.default_rng(1)
  src = jnp.asarray(rng.integers(3, 11, (3, 6)), jnp.int32)
  tgt = jnp.asarray(rng.integers(3, 11, (3, 7)), jnp.int32).at[0, 5:].set(0)
  assert transformer_lib.loss_chunks(tgt.shape, 11) > 1
  params = model.init(jax.random.key(0), src, tgt)["params"]
  tgt_in = shift_right(tgt, 1)

  def via_logits(p):
    logits = model.apply({"params": p}, src, tgt_in)
    return transformer_lib.label_smoothed_cross_entropy(logits, tgt, 0, 0.1)[0]

  def via_loss_sum(p):
    return model.apply({"params": p}, src, tgt_in, tgt, 0.1, method=model.loss_sum)
  np.testing.assert_allclose(via_loss_sum(params), via_logits(params), rtol=1e-6)
  chex.assert_trees_all_close(jax.grad(via_loss_sum)(params), jax.grad(via_logits)(params),
                              rtol=1e-5, atol=1e-6)
