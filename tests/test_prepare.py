"""The prepared token cache (tasks/translation/cache.py) and packed batches (packing.py):
made once and reused, the same batches as the list-based pipeline, bad input, SentencePiece
on a sample, packing invariants, and a packed batch giving the unpacked loss and gradients."""

import json
import os
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax import config as config_lib, parallelism, training
from resnorm_jax import validation
from resnorm_jax.errors import ConfigError
from resnorm_jax.models.transformer import (Transformer, shift_right, shift_right_segments,
                                            transformer_preset)
from resnorm_jax.tasks.translation import cache, corpora, packing
from helpers import fast_compile_options
from test_translation import tiny_config, write_iwslt


def prepared(tmp_path, data=None, **overrides):
  data = data or write_iwslt(tmp_path / "iwslt")
  config = tiny_config(data, **overrides)
  directory = str(tmp_path / "run")
  logs = []
  manifest = cache.prepare(directory, config, progress=False, log=logs.append)
  return config, directory, manifest, logs


def test_cache_holds_the_encoded_corpus_and_is_reused(tmp_path):
  config, directory, manifest, logs = prepared(tmp_path)
  assert logs[-1].endswith("(absent)")
  corpus = corpora.load_corpus(config)
  sp = cache.load_sentencepiece(directory, config.model.vocab_size)
  for split, pairs in (("train", corpus.train), ("test", corpus.test)):
    data = cache.open_split(directory, split, manifest)
    assert len(data) == len(pairs[0]) == manifest["splits"][split]["pairs"]
    for side, text in zip(cache.SIDES, pairs):
      want = corpora.encode(sp, text)
      for i in (0, 1, len(want) - 1):
        np.testing.assert_array_equal(data.sentence(side, i), want[i])
      assert int(data.lengths(side).sum()) == sum(map(len, want))
  stamp = os.path.getmtime(os.path.join(directory, "tokens", "manifest.json"))
  assert cache.prepare(directory, config, progress=False, log=print) == manifest
  assert os.path.getmtime(os.path.join(directory, "tokens", "manifest.json")) == stamp
  # Touching the corpus files (same content, new times) keeps the cache.
  for name in ("train.en", "train.vi"):
    os.utime(os.path.join(config.data.data_dir, name), (1, 1))
  logs = []
  cache.prepare(directory, config, progress=False, log=logs.append)
  assert logs == []


def test_cached_batches_equal_the_list_pipeline(tmp_path):
  config, directory, manifest, _ = prepared(tmp_path, **{"translation.max_length": 12})
  corpus = corpora.load_corpus(config)
  sp = cache.load_sentencepiece(directory, config.model.vocab_size)
  old = corpora.make_token_batches(corpora.encode(sp, corpus.train[0]),
                                   corpora.encode(sp, corpus.train[1]), max_length=12,
                                   max_tokens=128, replicas=4, seed=3)
  new = packing.make_cached_batches(cache.open_split(directory, "train", manifest),
                                    max_length=12, max_tokens=128, replicas=4, seed=3)
  assert len(new.kept) == len(old.sources) < len(corpus.train[0])   # some pairs dropped
  assert new.batches_per_epoch == old.batches_per_epoch
  for step in (0, 1, 7, old.batches_per_epoch, 2 * old.batches_per_epoch + 5):
    for a, b in zip(new.batch(step), old.batch(step)):
      np.testing.assert_array_equal(a, b)


def test_global_batch_reads_only_the_rows_of_addressable_shards(tmp_path):
  config, directory, manifest, _ = prepared(tmp_path)
  batches = packing.make_cached_batches(cache.open_split(directory, "train", manifest),
                                        max_length=16, max_tokens=256, replicas=8, seed=0)
  calls = []
  split = batches.split
  original = split.padded
  split.padded = lambda side, rows, length: calls.append(len(rows)) or original(side, rows,
                                                                                 length)
  sharding = parallelism.batch_sharded(parallelism.make_mesh(8))
  out = batches.global_batch(4, sharding)
  reads = list(calls)
  src, tgt = batches.batch(4)
  np.testing.assert_array_equal(np.asarray(out["src"]), src)
  np.testing.assert_array_equal(np.asarray(out["tgt"]), tgt)
  rows = src.shape[0]
  assert len(reads) == 16 and all(n == rows // 8 for n in reads)  # a device's rows a read


def test_changed_corpus_vocabulary_and_damaged_cache(tmp_path):
  config, directory, manifest, _ = prepared(tmp_path)
  tokens = os.path.join(directory, "tokens")
  ids = os.path.join(tokens, "train.src.ids")
  want = open(ids, "rb").read()
  # Truncated: rebuilt, the same content.
  with open(ids, "r+b") as f:
    f.truncate(len(want) - 8)
  logs = []
  cache.prepare(directory, config, progress=False, log=logs.append)
  assert "truncated" in logs[-1] and open(ids, "rb").read() == want
  # Corrupted in place (same size): rebuilt.
  with open(ids, "r+b") as f:
    f.seek(100)
    f.write(b"\xff\xff\xff\x7f")
  logs = []
  cache.prepare(directory, config, progress=False, log=logs.append)
  assert "corrupted" in logs[-1] and open(ids, "rb").read() == want
  # A manifest cut short: rebuilt.
  with open(os.path.join(tokens, "manifest.json"), "w") as f:
    f.write('{"format": 1, "spl')
  logs = []
  cache.prepare(directory, config, progress=False, log=logs.append)
  assert "unreadable manifest" in logs[-1]
  # Another spm.model (the vocabulary changed): the tokens are rebuilt for it.
  manifest_path = os.path.join(tokens, "manifest.json")
  record = json.load(open(manifest_path))
  record["spm_sha256"] = "0" * 64
  json.dump(record, open(manifest_path, "w"))
  logs = []
  cache.prepare(directory, config, progress=False, log=logs.append)
  assert "another spm.model" in logs[-1]
  # Other sample settings for the same vocabulary file: one line too.
  with pytest.raises(ConfigError, match="spm.model was trained with"):
    other = tiny_config(str(tmp_path / "iwslt"), **{"translation.spm_sample_seed": 5})
    cache.ensure_sentencepiece(directory, cache.corpus_sources(other), other)
  # The corpus changed under a trained vocabulary: one line naming spm.model, nothing lost.
  with open(os.path.join(config.data.data_dir, "train.en"), "a", encoding="utf-8") as f:
    f.write("a1 a2\n")
  with open(os.path.join(config.data.data_dir, "train.vi"), "a", encoding="utf-8") as f:
    f.write("b1 b2\n")
  before = sorted(os.listdir(tokens))
  with pytest.raises(ConfigError, match=r"spm.model was trained on another corpus.*new "
                     r"--workdir"):
    cache.prepare(directory, config, progress=False, log=print)
  assert sorted(os.listdir(tokens)) == before
  assert os.path.exists(os.path.join(directory, "spm.model"))


def test_bad_corpora_are_one_line_errors(tmp_path):
  skewed = write_iwslt(tmp_path / "skewed", skew=2)
  with pytest.raises(ConfigError, match=r"skewed/train.\{en,vi\}: 400 source lines but 398"):
    prepared(tmp_path / "a", skewed)
  empty = write_iwslt(tmp_path / "empty", test=16)
  for lang in ("en", "vi"):
    open(os.path.join(empty, f"tst2013.{lang}"), "w").close()
  with pytest.raises(ConfigError, match=r"empty/tst2013.\{en,vi\}: no sentence pairs"):
    prepared(tmp_path / "b", empty)
  # Through the training entry point: a ConfigError (exit code 2), the workdir kept.
  run = tmp_path / "run"
  run.mkdir()
  (run / "keep.txt").write_text("x")
  with pytest.raises(ConfigError, match="no sentence pairs"):
    training.train_and_evaluate(tiny_config(empty), str(run))
  assert (run / "keep.txt").read_text() == "x"


def test_sentencepiece_sample_is_bounded_and_seeded(tmp_path):
  data = write_iwslt(tmp_path / "iwslt", train=300)
  config = tiny_config(data)
  train = cache.corpus_sources(config)["train"]
  everything = cache.sample_sentences(train, 10_000, 0)
  corpus = corpora.load_corpus(config)
  assert everything == corpus.train[0] + corpus.train[1]      # small corpus: all, in order
  a, b, c = (cache.sample_sentences(train, 100, seed) for seed in (0, 0, 1))
  assert len(a) == 100 and a == b and a != c
  pairs = set(zip(*corpus.train))
  assert all(pair in pairs for pair in zip(a[:50], a[50:]))    # both sides of 50 pairs


def test_pack_pairs_places_every_pair_once_within_the_row_lengths():
  rng = np.random.default_rng(0)
  src, tgt = rng.integers(2, 17, 500), rng.integers(2, 21, 500)
  offsets, members = packing.pack_pairs(src, tgt, (64, 80), open_rows=16)
  assert sorted(members.tolist()) == list(range(500))
  for r in range(len(offsets) - 1):
    row = members[offsets[r]:offsets[r + 1]]
    assert src[row].sum() <= 64 and tgt[row].sum() <= 80 and len(row) >= 1
  fill = lambda offsets: (src.sum() + tgt.sum()) / ((len(offsets) - 1) * 144)
  assert fill(offsets) > 0.9 > fill(packing.pack_pairs(src, tgt, (64, 80), open_rows=1)[0])


def test_packed_batches_segments_positions_and_epochs(tmp_path):
  config, directory, manifest, _ = prepared(tmp_path)
  split = cache.open_split(directory, "train", manifest)
  batches = packing.make_packed_batches(split, max_length=16, max_tokens=256, replicas=4,
                                        seed=0)
  n = batches.batches_per_epoch
  kept = set(packing.kept_pairs(split, 16).tolist())
  for epoch in range(2):
    seen = []
    for step in range(epoch * n, (epoch + 1) * n):
      b = batches.batch(step)
      rows = batches.indices(step)
      assert len(rows) % 4 == 0
      for side in cache.SIDES:
        assert b[side].shape == (len(rows), batches.lengths[side])
      for r, row in enumerate(rows):
        pairs = batches.row_members[batches.row_offsets[row]:batches.row_offsets[row + 1]] \
            if row >= 0 else []
        for side in cache.SIDES:
          tokens, seg, pos = (b[side][r], b[f"{side}_segments"][r], b[f"{side}_positions"][r])
          for k, pair in enumerate(pairs, 1):
            np.testing.assert_array_equal(tokens[seg == k], split.sentence(side, pair))
            np.testing.assert_array_equal(pos[seg == k], np.arange((seg == k).sum()))
          assert not tokens[seg == 0].any() and seg.max(initial=0) == len(pairs)
        seen.extend(int(p) for p in pairs)
    assert sorted(seen) == sorted(kept)


def _pairs(rng, n, vocab=48, longest=9):
  return [(rng.integers(4, vocab, rng.integers(1, longest)).tolist() + [corpora.EOS_ID],
           rng.integers(4, vocab, rng.integers(1, longest)).tolist() + [corpora.EOS_ID])
          for _ in range(n)]


@pytest.mark.parametrize("skip", ["post_ln", pytest.param("pre_ln", marks=pytest.mark.slow)])
def test_packed_batch_gives_the_unpacked_per_token_loss_and_gradients(skip):
  rng = np.random.default_rng(0)
  pairs = _pairs(rng, 6)
  length = 10
  # Unpacked: a pair per row.
  src = np.zeros((6, length), np.int32)
  tgt = np.zeros((6, length), np.int32)
  for i, (s, t) in enumerate(pairs):
    src[i, :len(s)], tgt[i, :len(t)] = s, t
  # Packed: three pairs per row of 3·length tokens, plus trailing padding.
  packed = {k: np.zeros((2, 3 * length + 4), np.int32) for k in (
      "src", "tgt", "src_segments", "tgt_segments", "src_positions", "tgt_positions")}
  where = {}   # (row, position) in the packed target of pair i's tokens
  for i, (s, t) in enumerate(pairs):
    row, k = divmod(i, 3)
    for side, ids in (("src", s), ("tgt", t)):
      start = int((packed[f"{side}_segments"][row] > 0).sum())
      packed[side][row, start:start + len(ids)] = ids
      packed[f"{side}_segments"][row, start:start + len(ids)] = k + 1
      packed[f"{side}_positions"][row, start:start + len(ids)] = np.arange(len(ids))
      if side == "tgt":
        where[i] = (row, start)
  model = Transformer(transformer_preset("tiny", 48, skip=skip, dropout_rate=0.0,
                                         max_len=64))
  with fast_compile_options():
    params = jax.jit(model.init)(jax.random.key(0), jnp.asarray(src),
                                 jnp.asarray(tgt))["params"]
  denominator = float((tgt != 0).sum())

  def per_token(params, batch, packed_rows):
    if packed_rows:
      tgt_in = shift_right_segments(batch["tgt"], batch["tgt_segments"], corpora.BOS_ID)
      kwargs = {k: batch[k] for k in batch if k not in ("src", "tgt")}
    else:
      tgt_in, kwargs = shift_right(batch["tgt"], corpora.BOS_ID), {}
    logits = model.apply({"params": params}, batch["src"], tgt_in, **kwargs)
    logp = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(logp, batch["tgt"][..., None], -1)[..., 0]

  def loss(params, batch, packed_rows):
    logits_loss = per_token(params, batch, packed_rows)
    return jnp.sum(logits_loss * (batch["tgt"] != 0)) / denominator

  with fast_compile_options():
    _compare_packed_and_unpacked(model, params, jax.jit(per_token, static_argnums=2),
                                 jax.jit(jax.grad(loss), static_argnums=2), src, tgt, packed,
                                 pairs, where)


def _compare_packed_and_unpacked(model, params, per_token, grad, src, tgt, packed, pairs,
                                 where):
  unpacked_batch = {"src": jnp.asarray(src), "tgt": jnp.asarray(tgt)}
  packed_batch = {k: jnp.asarray(v) for k, v in packed.items()}
  a = per_token(params, unpacked_batch, False)
  b = per_token(params, packed_batch, True)
  for i, (_, t) in enumerate(pairs):
    row, start = where[i]
    np.testing.assert_allclose(b[row, start:start + len(t)], a[i, :len(t)], rtol=1e-5,
                               atol=1e-5)
  grads = [grad(params, batch, p)
           for batch, p in ((unpacked_batch, False), (packed_batch, True))]
  chex.assert_trees_all_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)


def test_shift_right_segments():
  tgt = jnp.asarray([[5, 6, 2, 7, 2, 0, 0]])
  seg = jnp.asarray([[1, 1, 1, 2, 2, 0, 0]])
  np.testing.assert_array_equal(shift_right_segments(tgt, seg, 1),
                                [[1, 5, 6, 1, 7, 0, 0]])


def test_packing_in_the_train_step_fills_rows(tmp_path):
  fractions = {}
  for packed in (False, True):
    config = tiny_config(**{"translation.packing": packed, "parallel.num_devices": 2,
                            "translation.max_tokens": 512})
    validation.validate(config, jax.device_count())
    task = training.build_task(config, parallelism.make_mesh(2))
    task.setup(str(tmp_path / str(packed)))
    with fast_compile_options():
      state = training.init_state(task)
      state, metrics = training.make_train_step(task)(state, task.inputs(0))
    metrics = jax.device_get(metrics)
    assert np.isfinite(metrics["loss"])
    fractions[packed] = float(metrics["tgt_nonpad_fraction"])
    batch = task.batches.batch(0)
    tgt = batch["tgt"] if packed else batch[1]
    np.testing.assert_allclose(fractions[packed], (tgt != 0).mean(), rtol=1e-6)
  assert fractions[True] > fractions[False] + 0.05


def test_new_config_keys_are_validated():
  for key, value, message in (("translation.spm_sample_sentences", 0, "integer >= 2"),
                              ("translation.spm_sample_seed", -1, r"\[0, 4294967295\]")):
    with pytest.raises(ConfigError, match=message):
      validation.validate(tiny_config(**{key: value}), 1)


def test_resnorm_prepare_command_prepares_the_toy_corpus_and_refuses_bad_input(tmp_path):
  """The installed command: exit 0 with the counts, then (another vocabulary in the same
  directory) a one-line exit 2 that leaves the cache as it was."""
  import shutil
  import subprocess
  from helpers import REPO
  command = [shutil.which("resnorm-prepare", path=os.path.dirname(sys.executable)),
             "--config=configs/toy_translation.py", f"--workdir={tmp_path}",
             "--config.translation.toy_train_size=300", "--config.translation.toy_test_size=20"]
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "train 300 pairs" in done.stdout and "test 20 pairs" in done.stdout
  manifest = (tmp_path / "tokens" / "manifest.json").read_bytes()
  bad = subprocess.run(command + ["--config.model.vocab_size=64"], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2, bad.stderr[-2000:]
  lines = [l for l in bad.stderr.splitlines() if l.startswith("resnorm-prepare: error:")]
  assert len(lines) == 1 and "spm.model" in lines[0], bad.stderr[-2000:]
  assert (tmp_path / "tokens" / "manifest.json").read_bytes() == manifest


@pytest.mark.slow
def test_generated_corpus_prepares_once_then_starts_from_the_cache(tmp_path):
  """Scale probe on benchmarks/make_corpus.py's corpus (RESNORM_SCALE_PAIRS pairs, default
  200k; benchmarks/RESULTS.md has the 2M and 4.5M runs): the prepare command makes the
  cache in one pass, a second call only checks it, and the first call's peak RSS stays
  bounded (SentencePiece on a sample, encoding in chunks)."""
  import resource
  import subprocess
  import sys
  import time
  from helpers import REPO, load_benchmark
  pairs = int(os.environ.get("RESNORM_SCALE_PAIRS", "200000"))
  data, work = str(tmp_path / "corpus"), str(tmp_path / "work")
  load_benchmark("make_corpus").main(["--pairs", str(pairs), "--test", "500", "--out", data])
  command = [sys.executable, "-m", "resnorm_jax.tasks.translation.prepare",
             "--config=configs/iwslt15_envi_transformer.py",
             f"--config.data.data_dir={data}", f"--workdir={work}"]
  seconds = []
  for _ in range(2):
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    seconds.append(time.perf_counter() - start)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"train {pairs:,} pairs" in done.stdout and "test 500 pairs" in done.stdout
    if len(seconds) == 1:
      stamp = os.path.getmtime(os.path.join(work, "tokens", "manifest.json"))
      peak_gib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2 ** 20
  assert os.path.getmtime(os.path.join(work, "tokens", "manifest.json")) == stamp
  assert seconds[1] < seconds[0] / 3, seconds
  assert peak_gib < 6, peak_gib
  manifest = cache.load_manifest(work)
  split = cache.open_split(work, "train", manifest)
  assert len(split) == pairs and 20 < split.lengths("src").mean() < 60


def test_tfds_data_sets_go_through_the_same_cache(tmp_path):
  """The prepared TFDS copy of IWSLT'15 (the project's builder; WMT'14 is read the same way,
  by tfds.builder_from_directory) is tokenized into the same cache, checked on reuse."""
  from resnorm_jax.tasks.translation import iwslt15
  manual = write_iwslt(tmp_path / "manual", train=60, test=6)
  for lang in ("en", "vi"):
    os.link(os.path.join(manual, f"tst2013.{lang}"), os.path.join(manual, f"tst2012.{lang}"))
  data_dir = str(tmp_path / "tfds")
  iwslt15.prepare(manual, data_dir)
  config, directory, manifest, logs = prepared(tmp_path, data_dir)
  assert manifest["corpus_splits"]["train"]["kind"] == "tfds" and "(absent)" in logs[-1]
  sp = cache.load_sentencepiece(directory, config.model.vocab_size)
  plain = corpora.read_iwslt15(manual)
  for split, pairs in (("train", plain.train), ("test", plain.test)):
    data = cache.open_split(directory, split, manifest)
    decoded = [tuple(corpora.decode(sp, data.sentence(side, i)) for side in cache.SIDES)
               for i in range(len(data))]
    assert sorted(decoded) == sorted(zip(*pairs))
  logs = []
  assert cache.prepare(directory, config, progress=False, log=logs.append) == manifest
  assert logs == []
