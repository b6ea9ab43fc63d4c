"""Per-layer training statistics: the math against numpy and optax, the execution styles,
and the loop's files (layer_stats.jsonl, TensorBoard) with unchanged training numerics."""

import glob
import os
import struct

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from resnorm_jax import (config as config_lib, data as data_lib, layer_stats, models, optim,
                         parallelism, training, validation)
from resnorm_jax.tasks.translation import corpora
from resnorm_jax.analysis import plots, stats as stats_lib
from resnorm_jax.errors import ConfigError
from resnorm_jax.metrics import read_metrics
from resnorm_jax.models import transformer

from helpers import read_state, run_steps_with_stats, tiny_config


def numpy_moments(x, weights=None):
  """Moments of the real elements of x (..., C), straight from the definitions (float64)."""
  x = np.asarray(x, np.float64)
  w = np.ones(x.shape[:-1]) if weights is None else np.asarray(weights, np.float64)
  rows, w = x.reshape(-1, x.shape[-1]), w.reshape(-1, 1)
  n = w.sum()
  mean = (w * rows).sum() / (n * rows.shape[1])
  mu = (w * rows).sum(0) / n
  mu2 = (w * (rows - mu) ** 2).sum(0) / n
  mu4 = (w * (rows - mu) ** 4).sum(0) / n
  return {"mean": mean,
          "std": np.sqrt((w * (rows - mean) ** 2).sum() / (n * rows.shape[1])),
          "rms": np.sqrt((w * rows ** 2).sum() / (n * rows.shape[1])),
          "kurtosis": np.mean(mu4 / mu2 ** 2)}


def skewed_features(shape, seed=0):
  """Non-Gaussian features with per-channel offsets and scales (kurtosis far from 3)."""
  rng = np.random.default_rng(seed)
  c = shape[-1]
  return (rng.exponential(size=shape) ** 2 * rng.uniform(0.5, 2, c)
          + rng.normal(size=c)).astype(np.float32)


def test_unit_moments_match_numpy_with_masks_and_stacked_units():
  x = skewed_features((2, 4, 5, 3))                   # (units, batch, tokens, channels)
  mask = np.random.default_rng(1).random((4, 5)) < 0.6
  got = layer_stats.unit_moments(jnp.asarray(x[0]), jnp.asarray(mask))
  want = numpy_moments(x[0][mask])
  for k in layer_stats.MOMENTS:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, err_msg=k)
  stacked = layer_stats.unit_moments(jnp.asarray(x), stacked=True)
  for k in layer_stats.MOMENTS:
    np.testing.assert_allclose(stacked[k], [numpy_moments(u)[k] for u in x], rtol=2e-5)
  # The moments diagnostic's kurtosis (Labatie 2019) is the same statistic.
  np.testing.assert_allclose(stacked["kurtosis"][1], stats_lib.kurtosis(jnp.asarray(x[1])),
                             rtol=1e-6)


def test_unit_moments_of_a_per_device_program_are_the_global_batch_moments():
  mesh = parallelism.make_mesh(8)
  x = skewed_features((16, 6, 4), seed=2)
  mask = np.random.default_rng(3).random((16, 6)) < 0.5
  mask[:2] = False                                    # a device with no real token at all
  per_device = jax.shard_map(
      lambda a, m: layer_stats.unit_moments(a, m, axis_name=parallelism.DATA_AXIS),
      mesh=mesh, in_specs=(P(parallelism.DATA_AXIS),) * 2, out_specs=P(), check_vma=False)
  got = jax.jit(per_device)(x, mask)
  want = numpy_moments(x[mask])
  for k in layer_stats.MOMENTS:
    np.testing.assert_allclose(got[k], want[k], rtol=2e-5, err_msg=k)


def test_layers_are_units_in_depth_order_with_norms_of_their_subtrees():
  config = tiny_config(**{"model.depth": 14, "model.scan_stages": True})
  model = models.build_model(config, models.norm_context(config),
                             models.DataInfo(10, (32, 32, 3)))
  image = jnp.zeros((1, 32, 32, 3))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), image)["params"])
  leaves, treedef = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(0)
  draw = lambda: jax.tree_util.tree_unflatten(
      treedef, [rng.normal(size=s.shape).astype(np.float32) for s in leaves])
  grads, params, new_params = draw(), draw(), draw()
  stats = jax.device_get(layer_stats.step_stats(grads, params, new_params, {}))
  summary = layer_stats.summarize(
      stats, layer_stats.module_call_order(model, image, train=False))

  layers = summary["layers"]
  assert layers["names"] == ["stem_conv", "stage1_unit1", "stage1_unit2", "stage2_unit1",
                             "stage2_unit2", "stage3_unit1", "stage3_unit2", "head_norm_0",
                             "classifier"]
  unit = lambda tree, name: (jax.tree_util.tree_map(lambda a: a[0], tree[name[:-1] + "s"])
                             if name.endswith("unit2") else tree[name])
  updates = jax.tree_util.tree_map(np.subtract, new_params, params)
  for i, name in enumerate(layers["names"]):
    for key, tree in (("grad_norm", grads), ("param_norm", params), ("update_norm", updates)):
      np.testing.assert_allclose(layers[key][i], optax.global_norm(unit(tree, name)),
                                 rtol=1e-5, err_msg=f"{key} {name}")
  names = summary["params"]["names"]
  assert names[0] == "stem_conv/kernel" and names[-1] == "classifier/kernel"
  assert "stage2_unit2/unit/conv_1/kernel" in names
  np.testing.assert_allclose(np.linalg.norm(summary["params"]["grad_norm"]),
                             optax.global_norm(grads), rtol=1e-5)
  assert summary["activations"]["names"] == []
  tags = layer_stats.tensorboard_scalars(summary)
  assert tags["layer_grad_norm"]["stage2_unit2"] == layers["grad_norm"][4]


# XLA:CPU compiles a tiny ResNet's init with the (default) partitionable threefry in ~8 s,
# with the classic one in ~2 s; these tests hold for any random start, so they use that.
fast_random = jax.threefry_partitionable(False)


def hand_computed(config, state, step):
  """Layer statistics of ``step`` from ``state`` from scratch: jax.grad of the loss on the
  same (unaugmented) batch on one device, numpy moments of the unit outputs."""
  dataset = data_lib.load_dataset(config)
  model = models.build_model(config, models.norm_context(config),
                             models.DataInfo(dataset.num_classes, dataset.image_shape))
  idx = data_lib.batch_indices(config.train.seed, step, len(dataset.train_labels),
                               config.train.batch_size)
  x = data_lib.normalize(dataset.train_images[idx], dataset.mean, dataset.std)

  def loss(params):
    logits, new_vars = model.apply({"params": params, "batch_stats": state.batch_stats}, x,
                                   train=True, **layer_stats.apply_kwargs(True))
    return optim.cross_entropy(logits, dataset.train_labels[idx]).mean(), new_vars

  grads, new_vars = jax.jit(jax.grad(loss, has_aux=True))(state.params)
  outputs = {name: new_vars["taps"][name]["output"][0]
             for name in state.params if "_unit" in name}
  return grads, {name: numpy_moments(y) for name, y in outputs.items()}


def test_execution_styles_give_the_hand_computed_stats_and_unchanged_training():
  config = lambda mode: tiny_config(**{"data.augment": "none", "parallel.num_devices": 8,
                                       "parallel.mode": mode})
  task = training.build_task(config("jit"), parallelism.make_mesh(8))
  with fast_random:
    initial = jax.device_get(training.init_state(task))
  summaries, states = {}, {}
  order = layer_stats.module_call_order(task.model, jnp.zeros((1, 32, 32, 3)))
  for mode in ("jit", "shard_map"):
    states[mode], stats = run_steps_with_stats(config(mode), steps=1, stats_at={0},
                                               initial=initial)
    summaries[mode] = layer_stats.summarize(stats[0], order)
  for section in ("params", "layers", "activations"):
    for key, values in summaries["jit"][section].items():
      if key == "names":
        assert summaries["shard_map"][section][key] == values
      else:
        np.testing.assert_allclose(summaries["shard_map"][section][key], values, rtol=2e-5,
                                   atol=1e-7, err_msg=f"{section} {key}")

  # The statistics step makes exactly the update of the ordinary one.
  plain, _ = run_steps_with_stats(config("jit"), steps=1, initial=initial)
  chex.assert_trees_all_equal(states["jit"], plain)

  grads, moments = hand_computed(config("jit"), initial, step=0)
  updates = jax.tree_util.tree_map(np.subtract, plain.params, initial.params)
  layers, acts = summaries["jit"]["layers"], summaries["jit"]["activations"]
  for i, name in enumerate(layers["names"]):
    for key, tree in (("grad_norm", grads), ("param_norm", initial.params),
                      ("update_norm", updates)):
      np.testing.assert_allclose(layers[key][i], optax.global_norm(tree[name]), rtol=1e-4,
                                 err_msg=f"{key} {name}")
  assert acts["names"] == ["stage1_unit1", "stage2_unit1", "stage3_unit1"]
  for i, name in enumerate(acts["names"]):
    for key in layer_stats.MOMENTS:
      np.testing.assert_allclose(acts[key][i], moments[name][key], rtol=1e-4, atol=1e-6,
                                 err_msg=f"{key} {name}")


def tensorboard_tags(workdir):
  """Scalar tags in a run's TensorBoard event files (TFRecord framing, no TensorFlow)."""
  from tensorboardX.proto import event_pb2
  tags = set()
  for path in glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*")):
    data, pos = open(path, "rb").read(), 0
    while pos < len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      tags.update(v.tag for v in event.summary.value)
      pos += 16 + length
  return tags


def test_loop_writes_jsonl_tensorboard_and_a_plot_and_keeps_the_checkpoint(tmp_path):
  config = tiny_config(**{"parallel.num_devices": 1, "train.steps": 3,
                          "train.layer_stats_every_steps": 2,
                          "checkpoint.every_steps": 1000})
  with fast_random:
    summary = training.train_and_evaluate(config, str(tmp_path))

  records = read_metrics(str(tmp_path), layer_stats.FILENAME)
  (record,) = records
  assert record["step"] == 2
  assert record["layers"]["names"][:2] == ["stem_conv", "stage1_unit1"]
  assert record["activations"]["names"] == ["stage1_unit1", "stage2_unit1", "stage3_unit1"]
  for section in record.values():
    if isinstance(section, dict):
      assert {len(v) for v in section.values()} == {len(section["names"])}
  train = [m for m in read_metrics(str(tmp_path)) if m["split"] == "train"]
  assert "layer_stats" not in train[1]
  tags = tensorboard_tags(str(tmp_path))
  assert {"layer_grad_norm/stage1_unit1", "layer_update_norm/classifier",
          "act_std/stage3_unit1", "act_kurtosis/stage2_unit1", "train/loss"} <= tags

  (png,) = plots.layer_stats_figures(records, str(tmp_path))
  assert os.path.getsize(png) > 0

  # The checkpoint is the usual TrainState (its template does not depend on the option).
  step, restored = read_state(str(tmp_path))
  assert step == 3
  chex.assert_trees_all_equal(restored, jax.device_get(summary["state"]))


@pytest.mark.parametrize("value", [-1, True])
def test_config_rejects_bad_layer_stats_every_steps(value):
  config = tiny_config()
  config.train.layer_stats_every_steps = value
  with pytest.raises(ConfigError, match=r"^train\.layer_stats_every_steps=.* must be a "
                     "non-negative integer: 0 \\(off\\)"):
    validation.validate(config, 8)


def test_transformer_unit_moments_count_real_tokens_only():
  config = config_lib.base_config()
  config.model.update(name="transformer", preset="tiny", vocab_size=16, max_len=16,
                      dropout_rate=0.0, norm="layer", skip="pre_ln")
  config.data.name = "toy_translation"
  config.parallel.num_devices = 1
  config.train.update(optimizer="sgd", schedule="constant", learning_rate=0.1)
  config.translation.toy_train_size = config.translation.toy_test_size = 8
  task = training.build_task(config, parallelism.make_mesh(1))   # the task's loss and masks
  step = training.make_train_step(task, layer_stats=True)
  model_for, tx = task.model_for, task.tx
  rng = np.random.default_rng(0)
  lengths = np.array([[8, 3], [5, 8], [1, 6]])          # (source, target) real tokens per row
  src, tgt = (np.where(np.arange(8) < lengths[:, i, None], rng.integers(3, 16, (3, 8)),
                       corpora.PAD_ID).astype(np.int32) for i in range(2))
  model = model_for(None)
  with fast_random:
    params = jax.device_get(model.init(jax.random.key(0), src, tgt)["params"])  # not donated
  state = training.TrainState(jnp.zeros((), jnp.int32), params, {}, tx.init(params),
                              jnp.full((), -1, jnp.int32), jnp.zeros((), jnp.int32))
  _, metrics = step(state, {"src": src, "tgt": tgt})
  summary = layer_stats.summarize(jax.device_get(metrics["layer_stats"]),
                                  layer_stats.module_call_order(model, src, tgt))

  tgt_in = transformer.shift_right(tgt, corpora.BOS_ID)
  _, captured = jax.jit(lambda p: model.apply({"params": p}, src, tgt_in, train=True,
                                              **layer_stats.apply_kwargs(True)))(params)
  masks = {"encoder": src != corpora.PAD_ID,
           "decoder": transformer.target_mask(tgt_in, corpora.PAD_ID)}
  acts = summary["activations"]
  assert acts["names"][:3] == ["encoder/layer_0/self_attn_skip", "encoder/layer_0/ffn_skip",
                               "encoder/layer_1/self_attn_skip"]
  assert "decoder/layer_1/cross_attn_skip" in acts["names"]
  for i, name in enumerate(acts["names"]):
    path = tuple(name.split("/"))
    y = np.asarray(captured["taps"][path[0]][path[1]][path[2]]["output"][0])
    want = numpy_moments(y[np.asarray(masks[path[0]])])
    for key in layer_stats.MOMENTS:
      np.testing.assert_allclose(acts[key][i], want[key], rtol=1e-4, err_msg=f"{key} {name}")
  assert summary["layers"]["names"][:3] == ["embed", "encoder/layer_0", "encoder/layer_1"]
  np.testing.assert_allclose(np.linalg.norm(summary["layers"]["grad_norm"]),
                             metrics["grad_norm"], rtol=1e-5)
