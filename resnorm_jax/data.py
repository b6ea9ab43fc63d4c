"""Image data sets, deterministic batch order and in-step augmentation.

Design (exact resume without iterator state): the order of examples is a pure function of
``(seed, epoch)`` and augmentation a pure function of ``(seed, step)``, so a checkpoint needs
only the train state and the step, and a resumed run sees exactly the batches an
uninterrupted run would.  The uint8 images live on the devices; each step gathers its batch
by index, pads, crops, flips and normalizes inside the jitted step.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile

import jax
import jax.numpy as jnp
import numpy as np

from resnorm_jax.layers.registry import ConfigError, Registry

DATASETS = Registry("data set")
AUGMENTATIONS = ("crop_flip", "crop", "none")


@dataclasses.dataclass(frozen=True)
class ImageDataset:
  """uint8 NHWC images with int32 labels, and per-channel normalization constants."""
  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.train_images.shape[1:])


def _check(images: np.ndarray, labels: np.ndarray, num_classes: int, where: str):
  if images.ndim != 4 or images.dtype != np.uint8:
    raise ConfigError(f"{where}: images must be uint8 (N, H, W, C), got {images.dtype} "
                      f"{images.shape}")
  if labels.shape != (images.shape[0],):
    raise ConfigError(f"{where}: {labels.shape[0] if labels.ndim else 0} labels for "
                      f"{images.shape[0]} images")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ConfigError(f"{where}: labels must be in [0, {num_classes}), found "
                      f"[{labels.min()}, {labels.max()}]")


def make_dataset(name, train, test, num_classes) -> ImageDataset:
  """Validates arrays and computes per-channel mean/std over the training images."""
  for split, (images, labels) in (("train", train), ("test", test)):
    _check(images, labels, num_classes, f"data set {name!r} ({split})")
  pixels = train[0].reshape(-1, train[0].shape[-1]).astype(np.float64) / 255.0
  std = np.maximum(pixels.std(0), 1e-3)
  return ImageDataset(name, train[0], train[1].astype(np.int32), test[0],
                      test[1].astype(np.int32), num_classes, tuple(pixels.mean(0)), tuple(std))


# ----------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------
@DATASETS.register("digits", "scikit-learn's 1,797 handwritten digits (8x8x1, 10 classes), "
                   "shipped inside the package: 1,437 train / 360 test")
def _digits(arg, config) -> ImageDataset:
  from sklearn.datasets import load_digits
  digits = load_digits()
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  order = np.random.default_rng(0).permutation(len(labels))  # fixed split
  test, train = order[:360], order[360:]
  return make_dataset("digits", (images[train], labels[train]),
                      (images[test], labels[test]), 10)


@DATASETS.register("synthetic", "random uint8 images of CIFAR's shape (32x32x3, 10 classes) "
                   "for smoke runs and benchmarks")
def _synthetic(arg, config) -> ImageDataset:
  rng = np.random.default_rng(config.train.seed)
  n_train, n_test = config.data.synthetic_train_size, config.data.synthetic_test_size
  draw = lambda n: (rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                    rng.integers(0, 10, (n,), dtype=np.int32))
  return make_dataset("synthetic", draw(n_train), draw(n_test), 10)


_CIFAR_BINARY = {
    "cifar10": ("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"], 1, 10),
    "cifar100": ("cifar-100-binary.tar.gz", "cifar-100-binary", ["train.bin"], ["test.bin"],
                 2, 100),
}


def parse_cifar_binary(blob: bytes, label_bytes: int, num_classes: int, where: str):
  """Parses the official CIFAR binary format: per record, label byte(s) then 3072 CHW bytes.

  CIFAR-100 records carry (coarse, fine) labels; the fine label (the last byte) is used.
  """
  record = label_bytes + 3072
  if len(blob) % record:
    raise ConfigError(f"{where}: {len(blob)} bytes is not a whole number of {record}-byte "
                      "CIFAR records; the file is truncated or not a CIFAR binary batch")
  data = np.frombuffer(blob, np.uint8).reshape(-1, record)
  labels = data[:, label_bytes - 1].astype(np.int32)
  images = data[:, label_bytes:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  _check(images, labels, num_classes, where)
  return np.ascontiguousarray(images), labels


def load_cifar_tarball(name: str, data_dir: str) -> ImageDataset:
  tar_name, folder, train_files, test_files, label_bytes, classes = _CIFAR_BINARY[name]
  path = os.path.join(os.path.expanduser(data_dir or "."), tar_name)
  if not os.path.exists(path):
    raise ConfigError(
        f"data.name={name}: no {tar_name} in data.data_dir={data_dir or '.'!r}. Download the "
        f"official binary tarball from https://www.cs.toronto.edu/~kriz/ into that directory "
        f"(or set --config.data.data_dir=DIR), then rerun")
  try:
    with tarfile.open(path) as tar:
      read = lambda f: tar.extractfile(f"{folder}/{f}").read()
      splits = [[parse_cifar_binary(read(f), label_bytes, classes, f"{path}:{f}")
                 for f in files] for files in (train_files, test_files)]
  except (tarfile.TarError, KeyError, EOFError, OSError) as e:
    raise ConfigError(f"{path} is not a complete CIFAR binary tarball ({e}); download it "
                      "again") from None
  train, test = [(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
                 for parts in splits]
  return make_dataset(name, train, test, classes)


@DATASETS.register("cifar10", "CIFAR-10 (32x32x3, 10 classes, 50k/10k) from the official "
                   "binary tarball in data.data_dir")
def _cifar10(arg, config) -> ImageDataset:
  return load_cifar_tarball("cifar10", config.data.data_dir)


@DATASETS.register("cifar100", "CIFAR-100 (fine labels, 100 classes) from the official "
                   "binary tarball in data.data_dir")
def _cifar100(arg, config) -> ImageDataset:
  return load_cifar_tarball("cifar100", config.data.data_dir)


def load_dataset(config) -> ImageDataset:
  return DATASETS.build(config.data.name, config=config)


def validate_data_config(config) -> None:
  if config.data.augment not in AUGMENTATIONS:
    raise ConfigError(f"data.augment={config.data.augment!r} is not valid; valid choices: "
                      f"{', '.join(AUGMENTATIONS)}")
  if config.data.pad < 0:
    raise ConfigError(f"data.pad={config.data.pad} must be >= 0")


# ----------------------------------------------------------------------------------------
# Order and augmentation.
# ----------------------------------------------------------------------------------------
def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  if num_examples < batch_size:
    raise ConfigError(f"train.batch_size={batch_size} is larger than the {num_examples} "
                      "training examples")
  return num_examples // batch_size


def batch_indices(seed: int, step: int, num_examples: int, batch_size: int) -> np.ndarray:
  """Indices of the global batch at ``step``: epoch permutations from (seed, epoch)."""
  per_epoch = steps_per_epoch(num_examples, batch_size)
  epoch, position = divmod(step, per_epoch)
  permutation = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return permutation[position * batch_size:(position + 1) * batch_size].astype(np.int32)


def normalize(images: jax.Array, mean, std) -> jax.Array:
  """uint8 -> float32 (x/255 − mean) / std per channel."""
  x = images.astype(jnp.float32) / 255.0
  return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def augment(images: jax.Array, key: jax.Array, *, pad: int, mode: str) -> jax.Array:
  """Zero-pad by ``pad`` pixels, take a random crop of the original size, random h-flip.

  One independent draw per example from ``key`` (a function of seed and step).
  """
  if mode == "none" or images.shape[0] == 0:
    return images
  n, h, w, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    crop = lambda img, off: jax.lax.dynamic_slice(img, (off[0], off[1], 0),
                                                  (h, w, img.shape[-1]))
    images = jax.vmap(crop)(padded, offsets)
  if mode == "crop_flip":
    flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1, :], images)
  return images
