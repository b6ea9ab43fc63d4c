"""The translation task of the training loop: Transformer train step, beam-search BLEU.

Train step (Vaswani et al. 2017): decoder input shift_right(y) = [BOS, y_1 .. y_{T−1}],
loss = label-smoothed cross entropy summed over the real (non-pad) target tokens of the
global batch and divided by their number N:

    L = Σ_{b,t: y_bt ≠ pad} ℓ_ε(logits_bt, y_bt) / N.

N does not depend on the parameters: it is counted (and ``psum``-ed over replicas) first,
each replica differentiates the sum over its slice divided by N, and ``psum`` of (∇, loss)
then gives exactly the global-batch gradient, with no division pass over the gradients; so
the three execution styles (``jit``, ``shard_map``, ``pmap``;
:func:`resnorm_jax.parallelism.data_parallel`) agree.  BatchNorm
variants (``xskip_bn``, ``rskip_bn``, ``model.norm=batch``) see the token mask through the
model (statistics over real tokens; an all-padding row still contributes its BOS position).

Evaluation: batched beam search (``translation.beam_size``, length penalty α =
``translation.length_penalty``) over the test sources, detokenized with the SentencePiece
model, scored with sacreBLEU against the raw references; hypotheses are gathered from every
process, and process 0 writes ``<workdir>/translations/step_<n>.txt`` (test-set order).
"""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from resnorm_jax import layer_stats as layer_stats_lib, models, parallelism
from resnorm_jax.errors import ConfigError
from resnorm_jax.tasks.translation import cache, corpora, decoding, packing
from resnorm_jax.models.transformer import (label_smoothed_cross_entropy, padding_mask,
                                            shift_right, shift_right_segments, target_mask)
from resnorm_jax.training import TrainState, apply_gradients, make_optimizer, resolve_guard


def make_translation_train_step(config, mesh, model_for, tx, schedule, layer_stats=False):
  """``train_step(state, batch) -> (state, metrics)``; ``batch`` a dict of (R, L) int32
  global arrays (batch-sharded): ``src``, ``tgt`` and, for packed rows, ``src_segments``,
  ``tgt_segments``, ``src_positions``, ``tgt_positions``.  Dropout keys are a function of
  (seed, step[, replica]).  With ``layer_stats`` the same update also returns
  ``metrics["layer_stats"]``, activation moments over the real tokens of each side
  (:mod:`resnorm_jax.layer_stats`)."""
  seed_key = jax.random.key(config.train.seed)
  smoothing = float(config.train.label_smoothing)
  stop_on_nonfinite = config.train.on_nonfinite == "stop"
  guard = resolve_guard(config.train.nonfinite_guard, mesh.devices.flat[0].platform)

  def make_fn(axis_name):
    model = model_for(axis_name)

    def step_fn(state: TrainState, key, batch):
      if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
      src, tgt = batch["src"], batch["tgt"]
      packed = {k: batch[k] for k in ("src_segments", "tgt_segments", "src_positions",
                                      "tgt_positions") if k in batch}
      if packed:
        tgt_in = shift_right_segments(tgt, packed["tgt_segments"], corpora.BOS_ID,
                                      corpora.PAD_ID)
      else:
        tgt_in = shift_right(tgt, corpora.BOS_ID)
      # N = the global batch's real target tokens; it does not depend on the parameters, so
      # the loss is divided before differentiating and the gradients come out of the
      # backward pass already normalized (no extra pass over a parameter-sized tree).
      count = jnp.sum(tgt != corpora.PAD_ID).astype(jnp.float32)
      # Non-padding fraction of each side (packing's effect), over the global batch.
      real = jnp.stack([jnp.sum(src != corpora.PAD_ID), jnp.sum(tgt != corpora.PAD_ID)])
      size = jnp.float32(src.size)
      if axis_name is not None:
        count, real, size = lax.psum((count, real, size), axis_name)
      denominator = jnp.maximum(count, 1.0)

      def loss_fn(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, src, tgt_in, train=True,
            rngs={"dropout": key}, **packed, **layer_stats_lib.apply_kwargs(layer_stats))
        loss_sum, _ = label_smoothed_cross_entropy(logits, tgt, corpora.PAD_ID,
                                                   smoothing)
        return loss_sum / denominator, new_vars

      (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      if axis_name is not None:
        grads, loss = lax.psum((grads, loss), axis_name)
      new_state, grad_norm = apply_gradients(tx, state, grads, loss,
                                             new_vars.get("batch_stats", {}),
                                             stop_on_nonfinite, guard)
      metrics = dict(loss=loss, tokens=count, grad_norm=grad_norm,
                     learning_rate=schedule(state.step),
                     src_nonpad_fraction=real[0] / size, tgt_nonpad_fraction=real[1] / size)
      if layer_stats:
        masks = {"encoder": padding_mask(src, corpora.PAD_ID),
                 "decoder": (packed["tgt_segments"] > 0 if packed
                             else target_mask(tgt_in, corpora.PAD_ID))}
        metrics["layer_stats"] = layer_stats_lib.step_stats(
            grads, state.params, new_state.params, new_vars.get("intermediates", {}),
            axis_name=axis_name, weights_for=lambda path: masks.get(path[0]))
      return new_state, metrics
    return step_fn

  mode = config.parallel.mode
  parallel_step = parallelism.data_parallel(make_fn, mode, mesh, 2, 1)
  step_key = lambda step: jax.random.fold_in(seed_key, step)
  if mode == "pmap":  # pmap cannot live inside jit
    key_jit = jax.jit(step_key)
    return lambda state, batch: parallel_step(state, key_jit(state.step), batch)
  return jax.jit(lambda state, batch: parallel_step(state, step_key(state.step), batch),
                 donate_argnums=0)


def _gather(array) -> np.ndarray:
  """A global array's full value on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


def corpus_bleu(hypotheses: list[str], references: list[str]) -> float:
  """sacreBLEU (13a tokenization, exp-smoothing defaults) on detokenized text."""
  import sacrebleu
  return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


class TranslationJob:
  """The translation task of :func:`resnorm_jax.training.train_and_evaluate`."""

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    self.config, self.mesh = config, mesh
    cache.check_corpus_present(config)              # a missing data set writes nothing
    n = mesh.devices.size
    self.model_for = lambda axis_name: models.build_model(
        config, models.norm_context(config, n, axis_name), 0)
    self.tx, self.schedule = make_optimizer(config.train, config.train.steps)

  @property
  def model(self):
    return self.model_for(None)

  def setup(self, workdir: str) -> None:
    """The prepared token cache (:mod:`cache`: SentencePiece model and token ids, made once
    by process 0 in the workdir or ``translation.cache_dir``), batches, steps."""
    config, tr = self.config, self.config.translation
    self.workdir = workdir
    directory = cache.cache_directory(config, workdir)
    error = None
    if jax.process_index() == 0:
      try:
        cache.prepare(directory, config,
                      log=lambda m: print(f"resnorm-train: {m}", file=sys.stderr, flush=True))
      except ConfigError as e:
        error = e
    if parallelism.any_process(error is not None):   # also the barrier after preparing
      raise error or ConfigError(f"process 0 could not prepare the token cache in "
                                 f"{directory} (see its message)")
    manifest = cache.load_manifest(directory)
    self.sp = cache.load_sentencepiece(directory, config.model.vocab_size)
    replicas = self.mesh.devices.size
    make = packing.make_packed_batches if tr.packing else packing.make_cached_batches
    self.batches = make(cache.open_split(directory, "train", manifest),
                        max_length=tr.max_length, max_tokens=tr.max_tokens,
                        replicas=replicas, seed=config.train.seed)
    test = cache.open_split(directory, "test", manifest)
    count = min(len(test), tr.eval_max_sentences or len(test))
    self.references = cache.references(config, manifest, count)
    self.eval_batches = corpora.eval_batches(
        [test.sentence("src", i) for i in range(count)], config.eval.batch_size, replicas,
        config.model.max_len)
    self.sharded = parallelism.batch_sharded(self.mesh)
    self.train_step, self.stats_step = (
        make_translation_train_step(config, self.mesh, self.model_for, self.tx, self.schedule,
                                    layer_stats=layer_stats) for layer_stats in (False, True))

  @staticmethod
  def _example_tokens():
    return jnp.ones((1, 8), jnp.int32)

  def _init(self, key):
    tokens = self._example_tokens()
    variables = self.model.init({"params": key, "dropout": key}, tokens, tokens, train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=self.tx.init(params),
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      skipped_steps=jnp.zeros((), jnp.int32))

  def init_state(self) -> TrainState:
    key = jax.random.key(self.config.train.seed)
    return jax.jit(self._init, out_shardings=parallelism.replicated(self.mesh))(key)

  def abstract_state(self) -> TrainState:
    sharding = parallelism.replicated(self.mesh)
    shapes = jax.eval_shape(self._init, jax.random.key(0))
    return jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)

  def global_batch(self, step: int) -> dict:
    """The global batch of ``step`` as a dict of batch-sharded arrays (see
    :func:`make_translation_train_step`); this process reads only its devices' rows."""
    return self.batches.global_batch(step, self.sharded)

  def step(self, state: TrainState, step: int, layer_stats: bool = False):
    train_step = self.stats_step if layer_stats else self.train_step
    return train_step(state, self.global_batch(step))

  def layer_call_order(self):
    tokens = self._example_tokens()
    return layer_stats_lib.module_call_order(self.model, tokens, tokens, train=False)

  @staticmethod
  def throughput(summary: dict, steps_per_sec: float) -> dict:
    return {"tokens_per_sec": steps_per_sec * summary["tokens"]}

  def translate(self, state: TrainState) -> list[str]:
    """Beam-search translations of the test sources (test-set order), on every process."""
    tr = self.config.translation
    variables = {"params": state.params}
    if state.batch_stats:
      variables["batch_stats"] = state.batch_stats
    hypotheses = [""] * len(self.references)
    for positions, src in self.eval_batches:
      out = decoding.beam_search(self.model, variables,
                                 parallelism.host_to_global(src, self.sharded),
                                 beam_size=tr.beam_size, alpha=tr.length_penalty)
      best = _gather(out.tokens[:, 0])
      for position, ids in zip(positions, best):
        if position >= 0:
          hypotheses[position] = corpora.decode(self.sp, ids)
    return hypotheses

  def evaluate(self, state: TrainState, step: int) -> dict:
    hypotheses = self.translate(state)
    bleu = corpus_bleu(hypotheses, self.references)
    if jax.process_index() == 0:
      directory = os.path.join(self.workdir, "translations")
      os.makedirs(directory, exist_ok=True)
      with open(os.path.join(directory, f"step_{step}.txt"), "w", encoding="utf-8") as f:
        f.write("".join(h + "\n" for h in hypotheses))
    return {"bleu": bleu, "sentences": float(len(hypotheses))}

  @staticmethod
  def describe(ev: dict) -> str:
    return f"test BLEU {ev['bleu']:.2f} ({int(ev['sentences'])} sentences)"
