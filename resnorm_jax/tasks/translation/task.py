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
model, scored with sacreBLEU (and its signature) against the raw references and, per
``translation.tokenized_bleu``, with the tokenized BLEU papers report (:mod:`bleu`); hypotheses are gathered from every
process, and process 0 writes ``<workdir>/translations/step_<n>.txt`` (test-set order).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnorm_jax import config as config_lib, models, parallelism, storage
from resnorm_jax.errors import ConfigError
from resnorm_jax.models.transformer import (padding_mask, shift_right, shift_right_segments,
                                            target_mask)
from resnorm_jax.tasks.base import LossOutput, Metric, Task, TaskInfo, register_task
from resnorm_jax.tasks.translation import bleu as bleu_lib, cache, corpora, decoding, packing


# The arrays of a packed batch besides ``src`` and ``tgt`` (tasks/translation/packing.py),
# passed to the model as keyword arguments.
PACKED_KEYS = ("src_segments", "tgt_segments", "src_positions", "tgt_positions")


def _gather(array) -> np.ndarray:
  """A global array's full value on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(array))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(array, tiled=True))


_C = config_lib
# The translation section (model.* keys: the Transformer family's; data.name: corpora.py).
# The shared SentencePiece vocabulary has model.vocab_size pieces.
SCHEMA = {"translation": {
    "max_length": _C.Key(256, _C.TRAJECTORY, _C.POSITIVE_INT,
                         "longest training sentence in pieces (EOS included)"),
    "max_tokens": _C.Key(4096, _C.TRAJECTORY, _C.POSITIVE_INT,
                         "token budget of a global batch: rows x bucket length"),
    "beam_size": _C.Key(4, _C.NEUTRAL, _C.POSITIVE_INT),
    "length_penalty": _C.Key(0.6, _C.NEUTRAL, _C.number(allow_zero=True), "GNMT alpha"),
    "eval_max_sentences": _C.Key(0, _C.NEUTRAL, _C.NON_NEGATIVE_INT,
                                 "0 = the whole test set"),
    "toy_train_size": _C.Key(20_000, _C.TRAJECTORY, _C.POSITIVE_INT),
    "toy_test_size": _C.Key(200, _C.TRAJECTORY, _C.POSITIVE_INT),
    "toy_vocab": _C.Key(40, _C.TRAJECTORY, _C.POSITIVE_INT),
    "toy_max_words": _C.Key(10, _C.TRAJECTORY, _C.POSITIVE_INT),
    # The prepared token cache (cache.py) and packing (packing.py).
    "cache_dir": _C.Key("", _C.NEUTRAL, _C.path, "'' = the workdir; else shared by runs of "
                        "the same data"),
    "spm_sample_sentences": _C.Key(1_000_000, _C.TRAJECTORY, _C.int_at_least(2),
                                   "SentencePiece trains on at most this many sentences"),
    "spm_sample_seed": _C.Key(0, _C.TRAJECTORY, _C.seed),
    "packing": _C.Key(False, _C.TRAJECTORY, _C.boolean,
                      "several pairs per row (segment ids, per-segment positions)"),
    "tokenized_bleu": _C.Key("none", _C.NEUTRAL, _C.one_of(*bleu_lib.TOKENIZED),
                             "bleu_tokenized beside sacreBLEU: none | tokens (multi-bleu on "
                             "the text as is) | t2t_compound (tensor2tensor's "
                             "get_ende_bleu.sh); tasks/translation/bleu.py"),
}}
BLEU = Metric("bleu", "test BLEU", True)
# published.measure: the measures of the headline number (sacreBLEU's, or tokenized).
MEASURES = {"bleu": BLEU, "bleu_tokenized": Metric("bleu_tokenized", "test BLEU (tokenized)",
                                                   True)}
TOKENIZED_LABELS = {"t2t_compound": "test BLEU (tokenized, compound-split)"}


def _measure(info: TaskInfo, config) -> Metric:
  del info
  metric = MEASURES[config.published.measure or "bleu"]
  if metric.key == "bleu_tokenized":
    label = TOKENIZED_LABELS.get(config.translation.tokenized_bleu, metric.label)
    metric = Metric(metric.key, label, metric.higher_is_better)
  return metric


def _summary_lines(info: TaskInfo, ev: dict, workdir: str) -> list[str]:
  del info
  lines = [f"  test BLEU      {ev['bleu']:.2f}   ({int(ev['sentences'])} sentences, "
           f"sacreBLEU {ev.get('bleu_signature', '')}; translations in "
           f"{storage.join(workdir, TRANSLATIONS_DIR)})"]
  if "bleu_tokenized" in ev:
    lines.append(f"  tokenized BLEU {ev['bleu_tokenized']:.2f}   (multi-bleu.perl, "
                 f"translation.tokenized_bleu)")
  return lines


TRANSLATIONS_DIR = "translations"


@register_task("translation", "source to target sentences: label-smoothed cross entropy "
               "per real target token, beam-search BLEU",
               TaskInfo(headline=BLEU, data_sets=corpora.TRANSLATION_DATASETS, schema=SCHEMA,
                        workdir_files=(cache.SPM_FILE,),
                        workdir_directories=(TRANSLATIONS_DIR,), measure=_measure,
                        summary_lines=_summary_lines))
class Translation(Task):
  """The translation task of :func:`resnorm_jax.training.train_and_evaluate`."""

  data = models.DataInfo()

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    super().__init__(config, mesh)
    cache.check_corpus_present(config)              # a missing data set writes nothing

  @classmethod
  def validate(cls, config, replicas: int) -> None:
    validate_config(config, replicas)

  @classmethod
  def static_data(cls, config) -> models.DataInfo:
    del config
    return models.DataInfo()

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
    # Rows per batch: a multiple of replicas x train.accumulate_steps, so each device's share
    # splits into the step's microbatches (k = 1: the batches of a run without accumulation).
    self.batches = make(cache.open_split(directory, "train", manifest),
                        max_length=tr.max_length, max_tokens=tr.max_tokens,
                        replicas=replicas * config.train.accumulate_steps,
                        seed=config.train.seed)
    test = cache.open_split(directory, "test", manifest)
    count = min(len(test), tr.eval_max_sentences or len(test))
    self.references = cache.references(config, manifest, count)
    self.eval_batches = corpora.eval_batches(
        [test.sentence("src", i) for i in range(count)], config.eval.batch_size, replicas,
        config.model.max_len)
    self.sharded = parallelism.batch_sharded(self.mesh)

  # -- train ---------------------------------------------------------------------------------
  def inputs(self, step: int) -> dict:
    """The global batch of ``step``: a dict of (R, L) int32 batch-sharded arrays, ``src``,
    ``tgt`` and, for packed rows, :data:`PACKED_KEYS`; this process reads only the rows its
    devices hold."""
    return self.batches.global_batch(step, self.sharded)

  @staticmethod
  def decoder_input(batch: dict):
    """shift_right(y) = [BOS, y_1 .. y_{T−1}], per segment for packed rows."""
    if "tgt_segments" in batch:
      return shift_right_segments(batch["tgt"], batch["tgt_segments"], corpora.BOS_ID,
                                  corpora.PAD_ID)
    return shift_right(batch["tgt"], corpora.BOS_ID)

  def weight(self, batch):
    """N: the real target tokens (the loss is a mean over them)."""
    return jnp.sum(batch["tgt"] != corpora.PAD_ID).astype(jnp.float32)

  def loss(self, model, variables, batch, key, apply_kwargs) -> LossOutput:
    src, tgt = batch["src"], batch["tgt"]
    packed = {k: batch[k] for k in PACKED_KEYS if k in batch}
    loss_sum, new_vars = model.apply(
        variables, src, self.decoder_input(batch), tgt,
        float(self.config.train.label_smoothing), True, rngs={"dropout": key},
        method=model.loss_sum, **packed, **apply_kwargs)
    real = lambda x: jnp.sum(x != corpora.PAD_ID).astype(jnp.float32)
    return LossOutput(loss_sum, {"src_real": real(src), "tgt_real": real(tgt),
                                 "size": jnp.float32(src.size)}, new_vars)

  def step_metrics(self, sums, weight):
    """``tokens`` (N) and the non-padding fraction of each side of the global batch (what
    packing raises)."""
    return {"tokens": weight, "src_nonpad_fraction": sums["src_real"] / sums["size"],
            "tgt_nonpad_fraction": sums["tgt_real"] / sums["size"]}

  def layer_stats_weights(self, batch):
    """Activation moments over the real tokens of each side."""
    src = batch["src"]
    decoder = (batch["tgt_segments"] > 0 if "tgt_segments" in batch
               else target_mask(self.decoder_input(batch), corpora.PAD_ID))
    masks = {"encoder": padding_mask(src, corpora.PAD_ID), "decoder": decoder}
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

  def evaluate(self, state, step: int, name: str = "") -> dict:
    hypotheses = self.translate(state)
    tokenized = self.config.translation.tokenized_bleu
    lang = corpora.TRANSLATION_DATASETS.info(self.config.data.name).target_lang
    scores = bleu_lib.scores(hypotheses, self.references, tokenized, lang)
    if jax.process_index() == 0:
      directory = storage.join(self.workdir, TRANSLATIONS_DIR)
      storage.makedirs(directory)
      storage.write_atomic(storage.join(directory, f"{name or f'step_{step}'}.txt"),
                           "".join(h + "\n" for h in hypotheses))
    return {**scores, "sentences": float(len(hypotheses))}

  @staticmethod
  def describe(ev: dict) -> str:
    tokenized = (f", tokenized BLEU {ev['bleu_tokenized']:.2f}" if "bleu_tokenized" in ev
                 else "")
    return f"test BLEU {ev['bleu']:.2f}{tokenized} ({int(ev['sentences'])} sentences)"


def validate_config(config: ml_collections.ConfigDict, replicas: int) -> None:
  """Checks across keys of the translation task (each key's own check is in SCHEMA)."""
  tr, m = config.translation, config.model
  measure = config.published.measure
  if measure not in ("", *MEASURES):
    raise ConfigError(f"published.measure={measure!r} is not valid; valid choices: bleu "
                      "(sacreBLEU), bleu_tokenized")
  if measure == "bleu_tokenized" and tr.tokenized_bleu == "none":
    raise ConfigError("published.measure='bleu_tokenized' needs translation.tokenized_bleu "
                      "(tokens or t2t_compound), or the table has no number to compare")
  if tr.max_length > m.max_len:
    raise ConfigError(f"translation.max_length={tr.max_length} exceeds model.max_len="
                      f"{m.max_len}")
  if tr.max_tokens < replicas * tr.max_length:
    raise ConfigError(f"translation.max_tokens={tr.max_tokens} must be >= {replicas} "
                      f"replicas x translation.max_length={tr.max_length} = "
                      f"{replicas * tr.max_length}")
  # A global batch's rows are rounded down to a multiple of replicas x k
  # (corpora.rows_for), so every bucket splits into k microbatches per device as long as the
  # longest bucket has replicas x k rows.
  k = config.train.accumulate_steps
  if tr.max_tokens < replicas * k * tr.max_length:
    raise ConfigError(
        f"train.accumulate_steps={k} must divide each device's share of the batch, but "
        f"translation.max_tokens={tr.max_tokens} gives rows of translation.max_length="
        f"{tr.max_length} tokens fewer than {replicas} replicas x {k} rows; use max_tokens >= "
        f"{replicas * k * tr.max_length} or a smaller k")
