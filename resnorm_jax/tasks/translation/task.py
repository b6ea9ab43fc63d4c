"""The translation task: label-smoothed cross entropy per real target token, BLEU.

Loss (Vaswani et al. 2017): decoder input shift_right(y) = [BOS, y_1 .. y_{T−1}],
label-smoothed cross entropy summed over the real (non-pad) target tokens of the global
batch and divided by their number N:

    L = Σ_{b,t: y_bt ≠ pad} ℓ_ε(logits_bt, y_bt) / N.

The task supplies the sum (:meth:`Translation.loss`) and N (:meth:`Translation.weight`);
the engine's one train step (:func:`resnorm_jax.training.make_train_step`) counts N over
all replicas before differentiating, so the three execution styles agree.  BatchNorm
variants (``xskip_bn``, ``rskip_bn``, ``model.norm=batch``) see the token mask through the
model (statistics over real tokens; an all-padding row still contributes its BOS position).

Evaluation: batched beam search (``translation.beam_size``, length penalty α =
``translation.length_penalty``) over the test sources, detokenized with the SentencePiece
model, scored with sacreBLEU against the raw references; hypotheses are gathered from every
process, and process 0 writes ``<workdir>/translations/step_<n>.txt`` (test-set order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnorm_jax import models, parallelism, storage
from resnorm_jax.models.transformer import (label_smoothed_cross_entropy, padding_mask,
                                            shift_right, target_mask)
from resnorm_jax.tasks import TASKS
from resnorm_jax.tasks.base import LossOutput, Task
from resnorm_jax.tasks.translation import corpora, decoding


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


@TASKS.register("translation", "source to target sentences: label-smoothed cross entropy "
                "per real target token, beam-search BLEU",
                data_sets=lambda: corpora.TRANSLATION_DATASETS,
                headline=("bleu", "test BLEU", True))
class Translation(Task):
  """The translation task of :func:`resnorm_jax.training.train_and_evaluate`."""

  data = models.DataInfo()

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    super().__init__(config, mesh)
    self.corpus = corpora.load_corpus(config)       # a data error writes nothing

  @classmethod
  def validate(cls, config, replicas: int) -> None:
    from resnorm_jax import config as config_lib
    config_lib.validate_translation(config, replicas)

  @classmethod
  def static_data(cls, config) -> models.DataInfo:
    del config
    return models.DataInfo()

  def setup(self, workdir: str) -> None:
    """SentencePiece model (trained once, in ``workdir``), encoded batches, steps."""
    config, corpus, tr = self.config, self.corpus, self.config.translation
    self.workdir = workdir
    barrier = None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      barrier = lambda: multihost_utils.sync_global_devices("resnorm_jax:spm")
    self.sp = corpora.load_or_train_sentencepiece(
        corpus, config.model.vocab_size, workdir, jax.process_index() == 0, barrier)
    replicas = self.mesh.devices.size
    self.batches = corpora.make_token_batches(
        corpora.encode(self.sp, corpus.train[0]),
        corpora.encode(self.sp, corpus.train[1]), max_length=tr.max_length,
        max_tokens=tr.max_tokens, replicas=replicas, seed=config.train.seed)
    sources, self.references = corpus.test
    if tr.eval_max_sentences:
      sources = sources[:tr.eval_max_sentences]
      self.references = self.references[:tr.eval_max_sentences]
    self.eval_batches = corpora.eval_batches(
        corpora.encode(self.sp, sources), config.eval.batch_size, replicas,
        config.model.max_len)
    self.sharded = parallelism.batch_sharded(self.mesh)

  # -- train ---------------------------------------------------------------------------------
  def inputs(self, step: int):
    src, tgt = self.batches.batch(step)
    return (parallelism.host_to_global(src, self.sharded),
            parallelism.host_to_global(tgt, self.sharded))

  def weight(self, batch):
    """N: the real target tokens (the loss is a mean over them)."""
    return jnp.sum(batch[1] != corpora.PAD_ID).astype(jnp.float32)

  def loss(self, model, variables, batch, key, apply_kwargs) -> LossOutput:
    src, tgt = batch
    logits, new_vars = model.apply(variables, src, shift_right(tgt, corpora.BOS_ID),
                                   train=True, rngs={"dropout": key}, **apply_kwargs)
    loss_sum, _ = label_smoothed_cross_entropy(logits, tgt, corpora.PAD_ID,
                                               float(self.config.train.label_smoothing))
    return LossOutput(loss_sum, {}, new_vars)

  def step_metrics(self, sums, weight):
    return {"tokens": weight}

  def layer_stats_weights(self, batch):
    """Activation moments over the real tokens of each side."""
    src, tgt = batch
    masks = {"encoder": padding_mask(src, corpora.PAD_ID),
             "decoder": target_mask(shift_right(tgt, corpora.BOS_ID), corpora.PAD_ID)}
    return lambda path: masks.get(path[0])

  def layer_stats_inputs(self) -> tuple:
    tokens = jnp.ones((1, 8), jnp.int32)
    return tokens, tokens

  @staticmethod
  def throughput(summary: dict, steps_per_sec: float) -> dict:
    return {"tokens_per_sec": steps_per_sec * summary["tokens"]}

  def translate(self, state) -> list[str]:
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

  def evaluate(self, state, step: int) -> dict:
    hypotheses = self.translate(state)
    bleu = corpus_bleu(hypotheses, self.references)
    if jax.process_index() == 0:
      directory = storage.join(self.workdir, "translations")
      storage.makedirs(directory)
      storage.write_atomic(storage.join(directory, f"step_{step}.txt"),
                           "".join(h + "\n" for h in hypotheses))
    return {"bleu": bleu, "sentences": float(len(hypotheses))}

  @staticmethod
  def describe(ev: dict) -> str:
    return f"test BLEU {ev['bleu']:.2f} ({int(ev['sentences'])} sentences)"
