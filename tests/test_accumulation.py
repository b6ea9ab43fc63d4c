"""Gradient accumulation (``train.accumulate_steps``): k microbatches, one update.

Compared quantity: the optimizer state after one step.  With SGD, momentum 0.9 and no weight
decay the momentum trace after the first step *is* the global-batch gradient, so the test
compares gradients directly (parameters would hide a gap by the learning rate's factor).

Tolerance, from float32 rounding (helpers.reordering_tolerance: λ·√n·u).  Without
BatchNorm every example's forward and backward pass is the same arithmetic whatever
microbatch it is in; what changes is how a parameter's gradient sums its per-example,
per-position terms: one reduction over n terms (k = 1), or k reductions over n/k terms and a
sum of the k partial sums (k > 1) -- the same n terms in another order.  The longest such
reduction is n: the first convolution's kernel gradient, B·H·W = 64·32·32 for the tiny
ResNet; a packed translation batch's rows × target length for the Transformer.
(Measured, ResNet with k = 4 in jit: 7.8e-7 of the leaf's scale against 4.6e-5 allowed.)
"""

import jax
import numpy as np
import pytest

from resnorm_jax import config as config_lib, parallelism, training
from resnorm_jax import validation
from resnorm_jax.errors import ConfigError

from helpers import assert_trees_close_to_rounding, reordering_tolerance, tiny_config

IMAGE_TERMS = 64 * 32 * 32          # batch x positions of the first convolution


def one_step(config, inputs_from=None, workdir=""):
  """(host state after one step, host metrics) of ``config`` on 8 CPU devices;
  ``inputs_from``: another config's task supplies the global batch (translation: rows are
  a multiple of replicas x k)."""
  validation.validate(config, jax.device_count())
  mesh = parallelism.make_mesh(config.parallel.num_devices)
  task = training.build_task(config, mesh)
  task.setup(workdir=workdir)
  state = training.init_state(task)
  source = task if inputs_from is None else inputs_from
  state, metrics = training.make_train_step(task)(state, source.inputs(0))
  return jax.device_get(state), jax.device_get(metrics)


def image_config(**overrides):
  return tiny_config(**{"train.batch_size": 64, "train.weight_decay": 0.0,
                        "train.momentum": 0.9, "parallel.num_devices": 8, **overrides})


@pytest.mark.parametrize("mode", ["jit", pytest.param("shard_map", marks=pytest.mark.slow),
                                  pytest.param("pmap", marks=pytest.mark.slow)])
def test_four_microbatches_give_the_one_batch_gradient_without_batchnorm(mode):
  reference, ref_metrics = one_step(image_config(**{"model.norm": "layer",
                                                    "parallel.mode": mode}))
  state, metrics = one_step(image_config(**{"model.norm": "layer", "parallel.mode": mode,
                                            "train.accumulate_steps": 4}))
  assert_trees_close_to_rounding(state.opt_state, reference.opt_state, IMAGE_TERMS,
                                 f"k=4 vs 1, {mode}:")
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"],
                             rtol=reordering_tolerance(64))
  np.testing.assert_allclose(metrics["accuracy"], ref_metrics["accuracy"])


@pytest.mark.parametrize("devices,k,mode", [
    (1, 4, "jit"), pytest.param(2, 2, "shard_map", marks=pytest.mark.slow),
    pytest.param(2, 2, "pmap", marks=pytest.mark.slow)])
def test_batchnorm_microbatches_are_ghost_batches_with_one_running_update(devices, k, mode):
  """The definition: k microbatches on n devices = the same step on n·k devices with one
  BatchNorm statistics group per device (``bn_sync=local``): each microbatch normalizes
  with its own statistics, and the running statistics move once, by the mean of the
  microbatches' statistics (as bn_sync=local averages its groups')."""
  ghost = one_step(image_config(**{"parallel.num_devices": 4, "parallel.bn_sync": "local",
                                   "train.batch_size": 32}))[0]
  state = one_step(image_config(**{"parallel.num_devices": devices, "parallel.mode": mode,
                                   "parallel.bn_sync": "local", "train.batch_size": 32,
                                   "train.accumulate_steps": k}))[0]
  assert_trees_close_to_rounding(state.opt_state, ghost.opt_state, 32 * 32 * 32,
                                 f"{devices} devices, k={k}, {mode}:")
  # Running statistics: m·r + (1 − m)·s, s the mean of 4 groups' statistics, each a sum
  # over 8·32·32 values, averaged in another order: the same 32·32·32 terms.
  assert_trees_close_to_rounding(state.batch_stats, ghost.batch_stats, 32 * 32 * 32,
                                 f"{devices} devices, k={k}, {mode}: running statistics")
  if devices == 1:   # ... and not the statistics of the whole batch
    whole = one_step(image_config(**{"parallel.num_devices": 1, "train.batch_size": 32}))[0]
    gaps = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                  whole.batch_stats, ghost.batch_stats)
    assert max(jax.tree_util.tree_leaves(gaps)) > 1e-3


def test_accumulate_steps_must_divide_each_devices_share():
  with pytest.raises(ConfigError, match=r"train.accumulate_steps=3 must divide each "
                     r"device's share of the batch, train.batch_size=64 / 8 devices = 8; "
                     r"e.g. use 2"):
    validation.validate(image_config(**{"train.accumulate_steps": 3}), 8)
  with pytest.raises(ConfigError, match="must be a positive integer"):
    validation.validate(image_config(**{"train.accumulate_steps": 0}), 8)
  assert config_lib.resume_class("train.accumulate_steps") == config_lib.TRAJECTORY
  from test_translation import tiny_config as translation_config
  with pytest.raises(ConfigError, match=r"train.accumulate_steps=4 must divide each device's "
                     r"share of the batch, but translation.max_tokens=256 gives rows of "
                     r"translation.max_length=16 tokens fewer than 8 replicas x 4 rows; use "
                     r"max_tokens >= 512 or a smaller k"):
    validation.validate(translation_config(**{"parallel.num_devices": 8,
                                              "train.accumulate_steps": 4}), 8)


def _translation_config(tmp_path, mode, k):
  from test_translation import tiny_config as translation_config
  c = translation_config(**{"parallel.mode": mode, "parallel.num_devices": 8,
                            "train.optimizer": "sgd", "train.schedule": "constant",
                            "train.learning_rate": 0.5, "train.momentum": 0.9,
                            "translation.packing": True, "translation.max_tokens": 1024,
                            "train.accumulate_steps": k})
  return c


@pytest.mark.parametrize("mode", ["jit", pytest.param("shard_map", marks=pytest.mark.slow),
                                  pytest.param("pmap", marks=pytest.mark.slow)])
def test_packed_translation_microbatches_divide_by_the_global_token_count(tmp_path, mode):
  """With packing, microbatches hold different numbers of real tokens; the loss of each is
  divided by the global batch's N, so the sum is the one-batch loss and gradient."""
  config = _translation_config(tmp_path, mode, 4)
  validation.validate(config, 8)
  task = training.build_task(config, parallelism.make_mesh(8))
  task.setup(str(tmp_path))
  rows = task.inputs(0)["tgt"].shape[0]
  assert rows % 32 == 0   # a multiple of replicas x k
  reference, ref_metrics = one_step(_translation_config(tmp_path, mode, 1), task,
                                     str(tmp_path))
  state, metrics = one_step(config, task, str(tmp_path))
  from test_translation import KEY_BIAS
  terms = int(np.prod(task.inputs(0)["tgt"].shape))
  assert_trees_close_to_rounding(state.opt_state, reference.opt_state, terms,
                                 f"translation k=4 vs 1, {mode}:", cancelling=KEY_BIAS)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"],
                             rtol=reordering_tolerance(terms))
  assert metrics["tokens"] == ref_metrics["tokens"]


@pytest.mark.slow   # a benchmark's smoke run (benchmarks are measured, not tested)
def test_memory_benchmark_shows_the_activations_falling(capsys):
  """benchmarks/accumulation_memory.py end to end on a tiny ResNet: XLA's temporaries at
  k = 2 are well under those at k = 1 (the full-size figures: benchmarks/RESULTS.md)."""
  from helpers import load_benchmark
  result = load_benchmark("accumulation_memory").main(
      ["--depth", "8", "--width", "4", "--batch", "32", "--ks", "1,2"])
  one, two = result["rows"]
  assert two["microbatch"] == 16 and two["temp / k=1"] < 0.75
  assert "compiled.memory_analysis()" in capsys.readouterr().out


@pytest.mark.slow
def test_translation_average_is_scored_with_beam_search_bleu(tmp_path):
  """A toy translation run with checkpoint averaging: the average's record holds sacreBLEU
  with its signature and the tokenized BLEU, and its translations are written."""
  import json
  from resnorm_jax import storage
  from test_translation import tiny_config as translation_config
  c = translation_config(**{"train.steps": 4, "checkpoint.every_steps": 0,
                            "checkpoint.keep": 1, "translation.tokenized_bleu": "tokens"})
  c.checkpoint.average_last, c.checkpoint.average_every_steps = 2, 2
  workdir = str(tmp_path / "run")
  summary = training.train_and_evaluate(c, workdir)
  average = summary["average"]
  assert average["averaged_steps"] == [2, 4]
  assert average["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
  assert 0 <= average["bleu_tokenized"] <= 100 and 0 <= average["bleu"] <= 100
  [record] = [r for r in map(json.loads, storage.read_text(
      storage.join(workdir, "metrics.jsonl")).splitlines()) if r["split"] == "average"]
  assert record["averaged_steps"] == [2, 4] and record["bleu"] == pytest.approx(average["bleu"])
  assert storage.exists(storage.join(workdir, "translations", "average_2-4.txt"))


def test_layer_statistics_with_accumulation_come_from_the_last_microbatch():
  from helpers import run_steps_with_stats
  state, stats = run_steps_with_stats(tiny_config(**{"parallel.num_devices": 1,
                                                     "train.accumulate_steps": 2}),
                                      steps=1, stats_at=(0,))
  assert int(state.step) == 1
  acts = stats[0]["activations"]
  assert acts and all(np.isfinite(np.asarray(v)).all()
                      for v in jax.tree_util.tree_leaves(acts))
