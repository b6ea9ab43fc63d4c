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

from resnorm_jax import storage
from resnorm_jax.registry import ConfigError, Registry

@dataclasses.dataclass(frozen=True)
class ImageDataInfo:
  """What is known of an image data set before loading it: one example's shape and the
  number of classes."""
  image_shape: tuple[int, int, int]
  num_classes: int


DATASETS = Registry("data set", ImageDataInfo)
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
  mean, std = channel_moments(train[0])
  return ImageDataset(name, train[0], train[1].astype(np.int32), test[0],
                      test[1].astype(np.int32), num_classes, mean, std)


def channel_moments(images: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std (floored at 1e-3) of uint8 images scaled to [0, 1].

  Exact, from each channel's 256-bin histogram: no float copy of the images (CIFAR's
  50k training images would need 1.2 GB of float64 and several seconds).
  """
  channels = images.shape[-1]
  pixels = images.reshape(-1, channels)
  values = np.arange(256, dtype=np.float64) / 255.0
  means, stds = [], []
  for c in range(channels):
    counts = np.bincount(pixels[:, c], minlength=256).astype(np.float64)
    p = counts / max(counts.sum(), 1.0)
    mean = float(p @ values)
    means.append(mean)
    stds.append(max(float(np.sqrt(max(p @ (values - mean) ** 2, 0.0))), 1e-3))
  return tuple(means), tuple(stds)


# ----------------------------------------------------------------------------------------
# Sources.
# ----------------------------------------------------------------------------------------
@DATASETS.register("digits", "scikit-learn's 1,797 handwritten digits (8x8x1, 10 classes), "
                   "shipped inside the package: 1,437 train / 360 test",
                   info=ImageDataInfo((8, 8, 1), 10))
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
                   "for smoke runs and benchmarks", info=ImageDataInfo((32, 32, 3), 10))
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
  path = storage.join(os.path.expanduser(data_dir or "."), tar_name)
  if not storage.exists(path):
    raise ConfigError(
        f"data.name={name}: no {tar_name} in data.data_dir={data_dir or '.'!r} (and no "
        f"prepared TFDS {name} there). Download the official binary tarball from "
        f"https://www.cs.toronto.edu/~kriz/ into that directory (or set "
        f"--config.data.data_dir=DIR), or prepare TFDS data with TensorFlow installed "
        f"(pip install -e '.[tf]'): tfds build {name} --data_dir=DIR "
        f"--file_format=array_record; then rerun")
  try:
    with storage.local_copy(path) as local, tarfile.open(local) as tar:
      read = lambda f: tar.extractfile(f"{folder}/{f}").read()
      splits = [[parse_cifar_binary(read(f), label_bytes, classes, f"{path}:{f}")
                 for f in files] for files in (train_files, test_files)]
  except (tarfile.TarError, KeyError, EOFError, OSError) as e:
    raise ConfigError(f"{path} is not a complete CIFAR binary tarball ({e}); download it "
                      "again") from None
  train, test = [(np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts]))
                 for parts in splits]
  return make_dataset(name, train, test, classes)


# CIFAR through TFDS: ``tfds.data_source`` reads the ArrayRecord files of a prepared data set
# without TensorFlow (TensorFlow is needed only to *prepare* it, ``tfds build``).
DATA_SOURCES = ("auto", "tfds", "tarball")
_CIFAR_SHAPE = (32, 32, 3)


def _tfds_prepare_hint(name: str, data_dir: str) -> str:
  flag = f" --data_dir={data_dir}" if data_dir else ""
  return (f"prepare it once with TensorFlow installed (pip install -e '.[tf]'): "
          f"tfds build {name}{flag} --file_format=array_record; or download the official "
          f"binary tarball {_CIFAR_BINARY[name][0]} from https://www.cs.toronto.edu/~kriz/ "
          f"into data.data_dir and use --config.data.source=tarball")


def _tfds_dir(data_dir: str):
  """data.data_dir for TFDS: '' means TFDS's default (~/tensorflow_datasets)."""
  return storage.abspath(data_dir) if data_dir else None   # TFDS reads gs:// itself (epath)


def _tfds_builder(name: str, data_dir: str):
  import tensorflow_datasets as tfds
  return tfds.builder(name, data_dir=_tfds_dir(data_dir))


def tfds_prepared(name: str, data_dir: str) -> bool:
  """Whether ``data_dir`` holds a prepared TFDS copy of ``name`` (any file format)."""
  try:
    return _tfds_builder(name, data_dir).is_prepared()
  except Exception:  # pylint: disable=broad-except  (unreadable metadata: not prepared)
    return False


def decode_tfds_records(records, *, image_key="image", label_key="label", where=""):
  """Serialized ``tf.train.Example`` records -> (uint8 NHWC images, int64 labels).

  Parses the protos with protobuf (no TensorFlow) and decodes each PNG once into one
  preallocated array; every image must have CIFAR's shape (32, 32, 3).
  """
  from PIL import Image
  from tensorflow_datasets.proto import tf_example_pb2

  images = np.empty((len(records),) + _CIFAR_SHAPE, np.uint8)
  labels = np.empty((len(records),), np.int64)
  for i, record in enumerate(records):
    feature = tf_example_pb2.Example.FromString(record).features.feature
    if image_key not in feature or label_key not in feature:
      raise ConfigError(f"{where}: record {i} has features {sorted(feature)}; expected "
                        f"{image_key!r} and {label_key!r}")
    image = Image.open(io.BytesIO(feature[image_key].bytes_list.value[0]),
                       formats=("PNG", "JPEG"))  # no format sniffing: ~25% faster
    shape = (image.height, image.width, len(image.getbands()))
    if shape != _CIFAR_SHAPE:
      raise ConfigError(f"{where}: record {i} holds an image of shape {shape}; CIFAR "
                        f"images are {_CIFAR_SHAPE}. The data set is not CIFAR; prepare it "
                        "again")
    images[i] = np.frombuffer(image.tobytes(), np.uint8).reshape(_CIFAR_SHAPE)
    labels[i] = feature[label_key].int64_list.value[0]
  return images, labels


def _chunks(n: int, size: int) -> list[list[int]]:
  """Record keys 0..n-1 in consecutive batches of at most ``size``."""
  return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def load_cifar_tfds(name: str, data_dir: str, chunk: int = 10_000) -> ImageDataset:
  """CIFAR-10/100 from a prepared TFDS ArrayRecord copy, all records as uint8 arrays.

  Records are fetched in batches of ``chunk`` (ArrayRecord's parallel batch read) as raw
  bytes; CIFAR-100 uses its fine ``label``.
  """
  import tensorflow_datasets as tfds

  classes = _CIFAR_BINARY[name][-1]
  where_dir = data_dir or "TFDS's default data directory"
  builder = _tfds_builder(name, data_dir)
  if not builder.is_prepared():
    raise ConfigError(f"data.name={name}, data.source=tfds: no prepared TFDS {name} "
                      f"(version {builder.version}) in data.data_dir={where_dir!r}; "
                      + _tfds_prepare_hint(name, data_dir))
  file_format = builder.info.file_format
  if file_format is None or file_format.value != "array_record":
    raise ConfigError(f"TFDS {name} in {builder.data_dir} is stored as "
                      f"{getattr(file_format, 'value', file_format)}, but training reads "
                      "ArrayRecord without TensorFlow; "
                      + _tfds_prepare_hint(name, data_dir))
  image_shape = tuple(builder.info.features["image"].shape)
  if image_shape != _CIFAR_SHAPE:
    raise ConfigError(f"TFDS {name} in {builder.data_dir} has images of shape {image_shape}; "
                      f"expected {_CIFAR_SHAPE}")
  splits = []
  for split in ("train", "test"):
    where = f"TFDS {name} ({split}) in {builder.data_dir}"
    source = tfds.data_source(name, split=split, data_dir=_tfds_dir(data_dir),
                              deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    parts = [decode_tfds_records(source.__getitems__(keys), where=where)
             for keys in _chunks(len(source), chunk)]
    if not parts:
      raise ConfigError(f"{where}: the split is empty; prepare the data set again")
    images, labels = (np.concatenate([p[k] for p in parts]) for k in (0, 1))
    _check(images, labels, classes, where)
    splits.append((images, labels.astype(np.int32)))
  return make_dataset(name, *splits, classes)


def load_cifar(name: str, config) -> ImageDataset:
  """CIFAR from ``data.source``: auto (TFDS if prepared in data.data_dir, else the
  tarball), tfds or tarball."""
  source, data_dir = config.data.source, config.data.data_dir
  if source == "auto":
    source = "tfds" if tfds_prepared(name, data_dir) else "tarball"
  if source == "tfds":
    return load_cifar_tfds(name, data_dir)
  return load_cifar_tarball(name, data_dir)


@DATASETS.register("cifar10", "CIFAR-10 (32x32x3, 10 classes, 50k/10k): prepared TFDS "
                   "ArrayRecord data or the official binary tarball in data.data_dir "
                   "(data.source)", info=ImageDataInfo((32, 32, 3), 10))
def _cifar10(arg, config) -> ImageDataset:
  return load_cifar("cifar10", config)


@DATASETS.register("cifar100", "CIFAR-100 (fine labels, 100 classes): prepared TFDS "
                   "ArrayRecord data or the official binary tarball in data.data_dir "
                   "(data.source)", info=ImageDataInfo((32, 32, 3), 100))
def _cifar100(arg, config) -> ImageDataset:
  return load_cifar("cifar100", config)


def load_dataset(config) -> ImageDataset:
  return DATASETS.build(config.data.name, config=config)


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

  One independent draw per example from ``key`` (a function of seed and step); the draws
  of the global batch do not depend on how it is sharded (threefry is partitionable), and
  neither does the crop: it is written as two one-hot contractions,
  ``crop[n, i, j] = Σ_{r,c} [r = i + dy_n] [c = j + dx_n] padded[n, r, c]``, which are exact
  for uint8 pixels in float32 and partition along the batch like any einsum.  (A per-example
  ``dynamic_slice`` is a batched gather, which XLA's SPMD partitioner computed differently
  on 1 and 8 devices inside the train step.)
  """
  if mode == "none" or images.shape[0] == 0:
    return images
  n, h, w, _ = images.shape
  k_crop, k_flip = jax.random.split(key)
  if pad:
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0))).astype(jnp.float32)
    offsets = jax.random.randint(k_crop, (n, 2), 0, 2 * pad + 1)
    rows = _one_hot_window(offsets[:, 0], h, h + 2 * pad)   # (n, h, h + 2 pad)
    cols = _one_hot_window(offsets[:, 1], w, w + 2 * pad)   # (n, w, w + 2 pad)
    x = jnp.einsum("nir,nrcd->nicd", rows, padded, precision=jax.lax.Precision.HIGHEST)
    x = jnp.einsum("njc,nicd->nijd", cols, x, precision=jax.lax.Precision.HIGHEST)
    images = jnp.round(x).astype(images.dtype)
  if mode == "crop_flip":
    flip = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
    images = jnp.where(flip, images[:, :, ::-1, :], images)
  return images


def _one_hot_window(start: jax.Array, size: int, total: int) -> jax.Array:
  """``[n, i, r] = 1`` where ``r == start[n] + i``: selects ``size`` consecutive rows of
  ``total`` from each example's offset."""
  wanted = start[:, None, None] + jnp.arange(size)[None, :, None]
  return (wanted == jnp.arange(total)[None, None, :]).astype(jnp.float32)
