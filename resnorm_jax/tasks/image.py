"""Image classification (CIFAR, digits, synthetic): cross entropy, top-1 accuracy.

Every process keeps the (small) uint8 data set on its devices; a step's inputs are the
global batch's example indices (batch-sharded, from ``data.batch_indices(seed, step)``), and
gathering, augmentation (``data.augment``, key ``fold_in(step key, 0)``) and normalization
run on the global batch inside the jitted step, so every execution style sees identical
inputs.  Loss: Σ_i ℓ_ε(logits_i, y_i) / B over the global batch (label smoothing ε =
``train.label_smoothing``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnorm_jax import config as config_lib, cpu_workarounds, data as data_lib, models, optim
from resnorm_jax import parallelism
from resnorm_jax.errors import ConfigError
from resnorm_jax.tasks.base import LossOutput, Metric, Task, TaskInfo, register_task

_C = config_lib
# The data.* keys of image data sets (the engine's are data.name and data.data_dir).
SCHEMA = {"data": {
    "source": _C.Key("auto", _C.NEUTRAL, _C.one_of(*data_lib.DATA_SOURCES),
                     "CIFAR: auto (TFDS if prepared, else tarball) | tfds | tarball"),
    "augment": _C.Key("crop_flip", _C.TRAJECTORY, _C.one_of(*data_lib.AUGMENTATIONS),
                      "crop_flip (pad + random crop + flip) | crop | none"),
    "pad": _C.Key(4, _C.TRAJECTORY, _C.NON_NEGATIVE_INT, "pixels of padding before a crop"),
    "synthetic_train_size": _C.Key(1024, _C.TRAJECTORY, _C.POSITIVE_INT,
                                   "data.name=synthetic: training images"),
    "synthetic_test_size": _C.Key(256, _C.TRAJECTORY, _C.POSITIVE_INT,
                                  "data.name=synthetic: test images"),
}}


def _summary_lines(info: TaskInfo, ev: dict, workdir: str) -> list[str]:
  del info, workdir
  return [f"  test accuracy  {ev['accuracy']:.4f}   (error {100 * ev['error']:.2f}%, "
          f"loss {ev['loss']:.4f})"]


@register_task("image_classification", "images to classes: cross entropy, top-1 error",
               TaskInfo(headline=Metric("error", "test error %", False, scale=100.0),
                        data_sets=data_lib.DATASETS, schema=SCHEMA,
                        summary_lines=_summary_lines))
class ImageClassification(Task):

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    super().__init__(config, mesh)
    self.dataset = data_lib.load_dataset(config)         # a data error writes nothing
    data_lib.steps_per_epoch(len(self.dataset.train_labels), config.train.batch_size)
    self.data = models.DataInfo(self.dataset.num_classes, self.dataset.image_shape)

  @classmethod
  def validate(cls, config, replicas: int) -> None:
    validate_accumulation(
        config, config.train.batch_size // replicas,
        f"train.batch_size={config.train.batch_size} / {replicas} devices")

  @classmethod
  def static_data(cls, config) -> models.DataInfo:
    info = data_lib.DATASETS.info(config.data.name)
    return models.DataInfo(info.num_classes, info.image_shape)

  def setup(self, workdir: str) -> None:
    del workdir
    replicated = parallelism.replicated(self.mesh)
    self.arrays = [parallelism.host_to_global(a, replicated) for a in (
        self.dataset.train_images, self.dataset.train_labels, self.dataset.test_images,
        self.dataset.test_labels)]
    self.sharded = parallelism.batch_sharded(self.mesh)
    self.eval_step = make_eval_step(self)

  # -- train ---------------------------------------------------------------------------------
  def inputs(self, step: int):
    t = self.config.train
    idx = data_lib.batch_indices(t.seed, step, len(self.dataset.train_labels), t.batch_size)
    return (*self.arrays[:2], parallelism.host_to_global(idx, self.sharded))

  def prepare(self, key, inputs):
    images, labels, indices = inputs
    d = self.config.data
    x = data_lib.augment(images[indices], jax.random.fold_in(key, 0), pad=d.pad,
                         mode=d.augment)
    x = data_lib.normalize(x, self.dataset.mean, self.dataset.std)
    return jax.random.fold_in(key, 1), (x, labels[indices])

  def weight(self, batch):
    return jnp.float32(batch[1].shape[0])

  def loss(self, model, variables, batch, key, apply_kwargs) -> LossOutput:
    x, labels = batch
    logits, new_vars = model.apply(variables, x, train=True, rngs={"dropout": key},
                                   **apply_kwargs)
    losses = optim.cross_entropy(logits, labels, float(self.config.train.label_smoothing))
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return LossOutput(jnp.sum(losses), {"correct": jnp.sum(correct)}, new_vars)

  def step_metrics(self, sums, weight):
    return {"accuracy": sums["correct"] / weight}

  def throughput(self, summary, steps_per_sec):
    return {"examples_per_sec": steps_per_sec * self.config.train.batch_size}

  # -- evaluate ------------------------------------------------------------------------------
  def evaluate(self, state, step: int, name: str = "") -> dict[str, float]:
    del step, name
    images, labels = self.arrays[2:]
    n, replicas = labels.shape[0], self.mesh.devices.size
    bs = -(-min(self.config.eval.batch_size, n) // replicas) * replicas  # padding is masked
    totals = np.zeros(3)
    for start in range(0, n, bs):
      idx = np.arange(start, start + bs)
      weights = (idx < n).astype(np.float32)
      idx = np.where(idx < n, idx, 0).astype(np.int32)
      out = self.eval_step(state, images, labels,
                           parallelism.host_to_global(idx, self.sharded),
                           parallelism.host_to_global(weights, self.sharded))
      totals += np.array(parallelism.to_host(out), dtype=np.float64)
    loss_sum, correct, count = totals
    return {"loss": loss_sum / count, "accuracy": correct / count,
            "error": 1 - correct / count}

  @staticmethod
  def describe(ev: dict) -> str:
    return (f"test error {100 * ev['error']:.2f}% (accuracy {ev['accuracy']:.4f}, "
            f"loss {ev['loss']:.4f})")


def validate_accumulation(config: ml_collections.ConfigDict, share: int, what: str) -> None:
  """``train.accumulate_steps`` must divide ``share``, each device's rows of a batch."""
  k = config.train.accumulate_steps
  if share % k:
    fits = max(d for d in range(1, k + 1) if share % d == 0)
    raise ConfigError(
        f"train.accumulate_steps={k} must divide each device's share of the batch, {what} = "
        f"{share}; e.g. use {fits}")


def make_eval_step(task: ImageClassification):
  """``eval_step(state, images, labels, indices, weights) -> (loss_sum, correct, count)``."""
  model, dataset = task.model, task.dataset
  options = cpu_workarounds.compiler_options(task.mesh.devices.flat[0].platform, task.config)

  @functools.partial(jax.jit, compiler_options=options)
  def eval_step(state, images, labels, indices, weights):
    x = data_lib.normalize(images[indices], dataset.mean, dataset.std)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                         train=False)
    y = labels[indices]
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (jnp.sum(optim.cross_entropy(logits, y) * weights), jnp.sum(correct * weights),
            jnp.sum(weights))
  return eval_step
