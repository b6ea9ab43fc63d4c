"""Translation: corpora and their errors, token-count batching, the Transformer train step in
three execution styles, and an IWSLT-format corpus trained and scored end to end."""

import os

import chex
import jax
import numpy as np
import pytest

from resnorm_jax import config as config_lib, parallelism, training
from resnorm_jax import validation
from resnorm_jax.tasks.translation import corpora
from resnorm_jax.errors import ConfigError
from helpers import assert_states_close, assert_trees_close_to_rounding, reordering_tolerance


def write_iwslt(directory, train=400, test=16, skew=0):
  """A toy corpus in IWSLT'15's file layout (train.{en,vi}, tst2013.{en,vi})."""
  os.makedirs(directory, exist_ok=True)
  for split, n, seed in (("train", train, 0), ("tst2013", test, 1)):
    rng = np.random.default_rng(seed)
    pairs = [corpora.toy_pair(rng, 12, 6) for _ in range(n)]
    for side, lang in ((0, "en"), (1, "vi")):
      lines = [p[side] for p in pairs][:n - (skew if lang == "vi" else 0)]
      with open(os.path.join(directory, f"{split}.{lang}"), "w", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
  return str(directory)


def tiny_config(data_dir="", **overrides):
  c = config_lib.base_config()
  c.model.name = "transformer"
  c.model.preset = "tiny"
  c.model.vocab_size = 48
  c.model.max_len = 32
  c.model.dropout_rate = 0.0
  c.model.norm = "layer"
  c.model.skip = "post_ln"
  c.data.name = "iwslt15_envi" if data_dir else "toy_translation"
  c.data.data_dir = data_dir
  c.translation.max_length = 16
  c.translation.max_tokens = 256
  c.translation.beam_size = 2
  c.translation.toy_train_size = 300
  c.translation.toy_test_size = 16
  c.translation.toy_vocab = 12
  c.translation.toy_max_words = 6
  c.train.optimizer = "adam"
  c.train.b2, c.train.eps = 0.98, 1e-9
  c.train.schedule = "rsqrt"
  c.train.warmup_steps = 4
  c.train.learning_rate = 3e-3
  c.train.weight_decay = 0.0
  c.train.label_smoothing = 0.1
  c.train.steps = 6
  c.train.log_every_steps = 1
  c.eval.every_steps = 0
  c.eval.batch_size = 16
  c.checkpoint.every_steps = 3
  c.parallel.num_devices = 1
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


def test_iwslt_corpus_trains_decodes_and_resumes_exactly(tmp_path):
  data = write_iwslt(tmp_path / "iwslt")
  run = str(tmp_path / "run")
  summary = training.train_and_evaluate(tiny_config(data, **{"train.steps": 3}), run)
  spm_model = os.path.join(run, "spm.model")
  stamp = os.path.getmtime(spm_model)
  resumed = training.train_and_evaluate(tiny_config(data), run)
  assert resumed["start_step"] == 3 and resumed["step"] == 6
  assert os.path.getmtime(spm_model) == stamp          # the vocabulary is reused on resume
  reference = training.train_and_evaluate(tiny_config(data), str(tmp_path / "ref"))
  chex.assert_trees_all_close(jax.device_get(resumed["state"]).params,
                              jax.device_get(reference["state"]).params, atol=1e-6)
  for result in (summary, resumed):
    assert 0.0 <= result["eval"]["bleu"] <= 100.0 and result["eval"]["sentences"] == 16
  lines = open(os.path.join(run, "translations", "step_6.txt"), encoding="utf-8").readlines()
  assert len(lines) == 16
  from resnorm_jax.metrics import read_metrics
  evals = [m for m in read_metrics(run) if m["split"] == "eval"]
  assert [m["step"] for m in evals] == [3, 6] and "bleu" in evals[-1]


def test_missing_and_mismatched_files_are_clear_errors(tmp_path):
  with pytest.raises(ConfigError, match="train.en, train.vi, tst2013.en, tst2013.vi missing"
                     ".*nlp.stanford.edu"):
    corpora.load_corpus(tiny_config(str(tmp_path / "nothing")))
  data = write_iwslt(tmp_path / "skewed", skew=2)
  with pytest.raises(ConfigError, match="400 source lines but 398 target lines"):
    corpora.load_corpus(tiny_config(data))
  config = tiny_config(**{"data.name": "wmt14_ende", "data.data_dir": str(tmp_path)})
  with pytest.raises(ConfigError, match="no prepared TFDS data set wmt14_translate/de-en.*"
                     "download_and_prepare"):
    corpora.load_corpus(config)
  run = tmp_path / "run"
  with pytest.raises(ConfigError, match="missing"):
    training.train_and_evaluate(tiny_config(str(tmp_path / "nothing")), str(run))
  assert not run.exists()                                # a data error writes nothing


def test_model_and_data_set_must_match():
  with pytest.raises(ConfigError, match="trains on translation data.*toy_translation"):
    validation.validate(tiny_config(**{"data.name": "digits"}), 1)
  c = config_lib.base_config()
  c.data.name = "toy_translation"
  with pytest.raises(ConfigError, match="trains on image_classification data"):
    validation.validate(c, 1)
  with pytest.raises(ConfigError, match="translation.max_tokens=100 must be >= 8 replicas"):
    validation.validate(tiny_config(**{"translation.max_tokens": 100,
                                       "parallel.num_devices": 8}), 8)


def random_token_batches(seed=0, replicas=4, max_tokens=256, n=500):
  rng = np.random.default_rng(seed)
  make = lambda: [np.arange(1, rng.integers(2, 40)) for _ in range(n)]
  return corpora.make_token_batches(make(), make(), max_length=32, max_tokens=max_tokens,
                                        replicas=replicas, seed=seed)


def test_token_batches_respect_the_budget_and_cover_every_pair_once_per_epoch():
  batches = random_token_batches()
  kept = len(batches.sources)
  assert 0 < kept < 500                                    # pairs longer than 32 dropped
  assert all(len(s) <= 32 and len(t) <= 32 for s, t in zip(batches.sources, batches.targets))
  n = batches.batches_per_epoch
  for epoch in range(2):
    seen = []
    for step in range(epoch * n, (epoch + 1) * n):
      src, tgt = batches.batch(step)
      bucket, idx = batches.indices(step)
      assert src.shape == tgt.shape and src.shape[0] % 4 == 0
      assert src.size <= 256 and src.shape[1] == batches.lengths[bucket]
      real = idx[idx >= 0]
      for row, i in enumerate(idx):
        if i >= 0:
          np.testing.assert_array_equal(src[row, :len(batches.sources[i])], batches.sources[i])
          assert not src[row, len(batches.sources[i]):].any()
        else:
          assert not src[row].any() and not tgt[row].any()
      seen.extend(real.tolist())
    assert sorted(seen) == list(range(kept))
  # Epochs differ in order; a new object (a resumed run) gives the same batches at any step.
  assert [batches.indices(s)[1].tolist() for s in range(3)] != \
      [batches.indices(n + s)[1].tolist() for s in range(3)]
  fresh = random_token_batches()
  for step in (0, 5, n - 1, n, 2 * n + 3):
    np.testing.assert_array_equal(fresh.batch(step)[0], batches.batch(step)[0])
    np.testing.assert_array_equal(fresh.batch(step)[1], batches.batch(step)[1])


def test_bucket_lengths_and_eval_batches():
  assert corpora.bucket_lengths(64) == [8, 16, 24, 32, 40, 56, 64]
  assert corpora.rows_for(24, 256, 4) == 8
  sources = [np.arange(1, k) for k in (3, 30, 5, 12, 70)]
  batches = corpora.eval_batches(sources, 3, 2, max_len=32)
  positions = np.concatenate([p for p, _ in batches])
  assert sorted(positions[positions >= 0].tolist()) == [0, 1, 2, 3, 4]
  for p, src in batches:
    assert src.shape[0] == 4 and src.shape[1] in corpora.bucket_lengths(32)
    for row, i in enumerate(p):
      if i >= 0:
        assert (src[row] != 0).sum() == min(len(sources[i]), 32)


# The attention key biases' gradients are zero in theory (helpers.py, ``cancelling``).
KEY_BIAS = ("['key']['bias']",)


def run_translation_steps(tmp_path, mode, skip, steps=2, packing=False):
  # SGD with momentum: Adam's g/sqrt(v) would amplify float noise in gradients that are
  # exactly zero in theory (attention key biases); the momentum trace is the gradients' sum.
  config = tiny_config(**{"parallel.mode": mode, "parallel.num_devices": 8,
                          "model.skip": skip, "train.optimizer": "sgd", "train.momentum": 0.9,
                          "train.schedule": "constant", "train.learning_rate": 0.5,
                          "translation.packing": packing})
  validation.validate(config, jax.device_count())
  task = training.build_task(config, parallelism.make_mesh(8))
  task.setup(str(tmp_path))
  state, train_step = training.init_state(task), training.make_train_step(task)
  for step in range(steps):
    state, metrics = train_step(state, task.inputs(step))
  return jax.device_get(state), float(jax.device_get(metrics["loss"]))


@pytest.mark.slow   # the default suite: test_failure_paths.py, the ResNet's dropout
def test_dropout_in_jit_gives_the_same_gradients_on_1_and_8_devices(tmp_path):
  """README: in the jit style dropout is drawn on the global batch, so one step with
  dropout on gives the same gradients on 1 and 8 devices.  SGD with momentum: after one
  step the momentum trace is the gradient."""
  def gradient(n):
    config = tiny_config(**{"parallel.num_devices": n, "model.dropout_rate": 0.3,
                            "train.optimizer": "sgd", "train.momentum": 0.9,
                            "train.schedule": "constant", "train.learning_rate": 0.5})
    validation.validate(config, jax.device_count())
    task = training.build_task(config, parallelism.make_mesh(n))
    task.setup(str(tmp_path / str(n)))
    state, _ = training.make_train_step(task)(training.init_state(task), task.inputs(0))
    return jax.device_get(state.opt_state)
  # Longest differing reduction: a weight gradient summed over the batch's 256 token slots
  # (translation.max_tokens).  Key biases: zero gradient in theory.
  assert_trees_close_to_rounding(gradient(8), gradient(1), 256, "dropout, 8 vs 1 devices:",
                                 cancelling=KEY_BIAS)


@pytest.mark.parametrize("skip,packing", [
    pytest.param("post_ln", False, marks=pytest.mark.slow), ("xskip_bn:1", False),
    pytest.param("post_ln", True, marks=pytest.mark.slow)])
def test_three_execution_styles_agree_on_a_translation_step(tmp_path, skip, packing):
  (reference, loss), *others = [run_translation_steps(tmp_path, mode, skip, packing=packing)
                                for mode in ("jit", "shard_map", "pmap")]
  assert np.isfinite(loss)
  for state, other_loss in others:
    np.testing.assert_allclose(other_loss, loss, rtol=reordering_tolerance(2 * 256))
    assert_states_close(state, reference, 2 * 256, "2 steps:", cancelling=KEY_BIAS)


@pytest.mark.slow
def test_chunked_loss_steps_equal_the_unchunked_ones_in_every_style(tmp_path, monkeypatch):
  """With the loss chunk budget lowered so that every toy batch is chunked
  (models/transformer/losses.py:chunked_cross_entropy), the jit and shard_map steps on 8 devices
  give the unchunked jit step's state."""
  from resnorm_jax.models.transformer import losses
  (reference, loss), = [run_translation_steps(tmp_path / "whole", "jit", "post_ln")]
  monkeypatch.setattr(losses, "LOSS_CHUNK_BYTES", 4096)
  for mode in ("jit", "shard_map"):
    state, chunked_loss = run_translation_steps(tmp_path / mode, mode, "post_ln")
    np.testing.assert_allclose(chunked_loss, loss, rtol=reordering_tolerance(2 * 256))
    assert_states_close(state, reference, 2 * 256, f"chunked, {mode}, 2 steps:",
                        cancelling=KEY_BIAS)


@pytest.mark.parametrize("variant,skip,lam", [
    ("", "post_ln", None), ("pre_ln", "pre_ln", None), ("xskip_ln0.5", "xskip_ln", 0.5),
    ("rskip_ln2", "rskip_ln", 2.0)])
def test_translation_configs_and_variants(variant, skip, lam):
  import importlib.util
  from helpers import REPO
  for name, vocab in (("wmt14_ende_transformer", 37_000), ("iwslt15_envi_transformer", 16_000)):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs",
                                                                     name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config(variant)
    assert (c.model.skip, c.model.skip_lambda, c.model.vocab_size) == (skip, lam, vocab)
    assert (c.train.b2, c.train.eps, c.train.warmup_steps, c.translation.beam_size,
            c.translation.length_penalty, c.train.label_smoothing) == (0.98, 1e-9, 4000, 4,
                                                                       0.6, 0.1)
    # The published recipe: the average of the last 5 checkpoints, the literature's BLEU.
    assert (c.checkpoint.average_last, c.published.measure) == (5, "bleu_tokenized")
    assert c.translation.tokenized_bleu == ("t2t_compound" if name.startswith("wmt")
                                            else "tokens")
    validation.validate(c, 8)
    with pytest.raises(ConfigError, match="unknown variant 'rskip_lnx'"):
      module.get_config("rskip_lnx")


def test_iwslt_tfds_builder_prepares_offline_and_is_read_as_a_data_source(tmp_path):
  from resnorm_jax.tasks.translation import iwslt15
  manual = write_iwslt(tmp_path / "manual", train=30, test=6)
  for lang in ("en", "vi"):  # the builder also wants the validation set, tst2012
    os.link(os.path.join(manual, f"tst2013.{lang}"), os.path.join(manual, f"tst2012.{lang}"))
  data_dir = str(tmp_path / "tfds")
  iwslt15.prepare(manual, data_dir)
  corpus = corpora.load_corpus(tiny_config(data_dir))
  plain = corpora.read_iwslt15(manual)
  for got, want in ((corpus.train, plain.train), (corpus.test, plain.test)):
    assert sorted(zip(*got)) == sorted(zip(*want))


def test_wmt_reader_on_a_locally_prepared_array_record_stand_in(tmp_path):
  """The WMT path on a stand-in prepared here: same name, config and features as TFDS's
  wmt14_translate/de-en (the real data is not available offline)."""
  import tensorflow_datasets as tfds

  class Wmt14Translate(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="de-en")]

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.Translation(languages=("de", "en")))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(5), "test": self._generate_examples(3)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"de": f"Satz {i} für {n}", "en": f"sentence {i} of {n}"}

  Wmt14Translate(config="de-en", data_dir=str(tmp_path),
                 file_format="array_record").download_and_prepare()
  corpus = corpora.load_corpus(tiny_config(**{"data.name": "wmt14_ende",
                                                  "data.data_dir": str(tmp_path)}))
  assert (corpus.source_lang, corpus.target_lang) == ("en", "de")
  assert sorted(zip(*corpus.test)) == [(f"sentence {i} of 3", f"Satz {i} für 3")
                                       for i in range(3)]
  assert len(corpus.train[0]) == 5
