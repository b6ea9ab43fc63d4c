"""Data sets, deterministic order and in-step augmentation."""

import io
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from resnorm_jax import config as config_lib, data as data_lib
from resnorm_jax.errors import ConfigError
from helpers import cifar_records, write_tarball


def test_batch_order_is_a_pure_function_of_seed_and_step():
  n, bs = 50, 8
  per_epoch = data_lib.steps_per_epoch(n, bs)
  epoch0 = np.concatenate([data_lib.batch_indices(1, s, n, bs) for s in range(per_epoch)])
  assert len(set(epoch0.tolist())) == per_epoch * bs          # no repeats within an epoch
  again = data_lib.batch_indices(1, 3, n, bs)
  np.testing.assert_array_equal(again, epoch0[3 * bs:4 * bs])  # any step, any time
  epoch1 = data_lib.batch_indices(1, per_epoch, n, bs)
  assert not np.array_equal(epoch1, epoch0[:bs])              # a fresh permutation per epoch
  assert not np.array_equal(data_lib.batch_indices(2, 0, n, bs), epoch0[:bs])


def test_batch_larger_than_data_is_a_clear_error():
  with pytest.raises(ConfigError, match="larger than the 10 training examples"):
    data_lib.steps_per_epoch(10, 16)


def test_augment_crops_a_window_of_the_padded_image_and_flips():
  images = jnp.asarray(np.random.default_rng(0).integers(0, 255, (16, 6, 6, 2)), jnp.uint8)
  out = np.asarray(data_lib.augment(images, jax.random.key(0), pad=2, mode="crop_flip"))
  padded = np.pad(np.asarray(images), ((0, 0), (2, 2), (2, 2), (0, 0)))
  flipped_some = False
  for i in range(16):
    windows = [padded[i, a:a + 6, b:b + 6] for a in range(5) for b in range(5)]
    plain = any(np.array_equal(out[i], w) for w in windows)
    flipped = any(np.array_equal(out[i], w[:, ::-1]) for w in windows)
    assert plain or flipped
    flipped_some |= flipped and not plain
  assert flipped_some
  crop_only = np.asarray(data_lib.augment(images, jax.random.key(0), pad=2, mode="crop"))
  assert out.shape == crop_only.shape == images.shape
  np.testing.assert_array_equal(data_lib.augment(images, jax.random.key(0), pad=2,
                                                 mode="none"), images)


def test_normalize_per_channel():
  images = jnp.full((1, 2, 2, 3), 255, jnp.uint8)
  out = data_lib.normalize(images, (0.5, 0.0, 1.0), (0.5, 1.0, 2.0))
  np.testing.assert_allclose(out[0, 0, 0], [1.0, 1.0, 0.0])


def test_digits_ship_with_the_package():
  config = config_lib.base_config()
  config.data.name = "digits"
  ds = data_lib.load_dataset(config)
  assert ds.train_images.shape == (1437, 8, 8, 1) and ds.test_images.shape == (360, 8, 8, 1)
  assert ds.train_images.dtype == np.uint8 and ds.num_classes == 10
  assert set(np.unique(ds.test_labels)) == set(range(10))


def _config(name, data_dir):
  config = config_lib.base_config()
  config.data.name, config.data.data_dir = name, str(data_dir)
  return config


def test_cifar10_binary_tarball(tmp_path):
  members, train_images, train_labels = {}, [], []
  for i in range(1, 6):
    blob, images, labels = cifar_records(4, 1, 10, seed=i)
    members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = blob
    train_images.append(images)
    train_labels.append(labels)
  test_blob, test_images, test_labels = cifar_records(3, 1, 10, seed=9)
  members["cifar-10-batches-bin/test_batch.bin"] = test_blob
  write_tarball(tmp_path / "cifar-10-binary.tar.gz", members)
  ds = data_lib.load_dataset(_config("cifar10", tmp_path))
  np.testing.assert_array_equal(ds.train_images, np.concatenate(train_images))
  np.testing.assert_array_equal(ds.train_labels, np.concatenate(train_labels))
  np.testing.assert_array_equal(ds.test_images, test_images)
  np.testing.assert_array_equal(ds.test_labels, test_labels)
  assert ds.image_shape == (32, 32, 3) and ds.num_classes == 10


def test_cifar100_uses_fine_labels(tmp_path):
  train, _, train_labels = cifar_records(6, 2, 100, seed=1)
  test, _, _ = cifar_records(2, 2, 100, seed=2)
  write_tarball(tmp_path / "cifar-100-binary.tar.gz",
                 {"cifar-100-binary/train.bin": train, "cifar-100-binary/test.bin": test})
  ds = data_lib.load_dataset(_config("cifar100", tmp_path))
  np.testing.assert_array_equal(ds.train_labels, train_labels)
  assert ds.num_classes == 100


def test_missing_cifar_says_how_to_get_it(tmp_path):
  with pytest.raises(ConfigError, match="no cifar-10-binary.tar.gz in data.data_dir"):
    data_lib.load_dataset(_config("cifar10", tmp_path))


def test_truncated_cifar_batch_is_reported(tmp_path):
  blob, _, _ = cifar_records(2, 1, 10)
  members = {f"cifar-10-batches-bin/data_batch_{i}.bin": blob for i in range(1, 6)}
  members["cifar-10-batches-bin/test_batch.bin"] = blob[:-7]
  write_tarball(tmp_path / "cifar-10-binary.tar.gz", members)
  with pytest.raises(ConfigError, match="truncated"):
    data_lib.load_dataset(_config("cifar10", tmp_path))


def test_labels_out_of_range_and_bad_shapes_are_errors():
  images = np.zeros((2, 4, 4, 1), np.uint8)
  with pytest.raises(ConfigError, match=r"labels must be in \[0, 10\)"):
    data_lib.make_dataset("x", (images, np.array([0, 10])), (images, np.array([0, 1])), 10)
  with pytest.raises(ConfigError, match="uint8"):
    data_lib.make_dataset("x", (images.astype(np.float32), np.array([0, 1])),
                          (images, np.array([0, 1])), 10)


# ----------------------------------------------------------------------------------------
# CIFAR through TFDS.  tfds.testing.mock_data serves tfds.data_source only record by record
# (its batched __getitems__ lacks `self` in tfds 4.9, and RAW_BYTES mocking needs TensorFlow
# to encode images), so these tests write a real tiny ArrayRecord TFDS data set on disk with
# the cifar10/cifar100 builders' own features and dataset_info.json, without TensorFlow.
# ----------------------------------------------------------------------------------------
def _png(image):
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  buffer.seek(0)
  return buffer


def _raw_example(image, label):
  """A tf.train.Example built directly (to write labels the builder would refuse)."""
  from tensorflow_datasets.proto import tf_example_pb2
  example = tf_example_pb2.Example()
  example.features.feature["image"].bytes_list.value.append(_png(image).getvalue())
  example.features.feature["label"].int64_list.value.append(int(label))
  return example.SerializeToString()


def _write_tfds(data_dir, name, sizes, *, shape=(32, 32, 3), bad_label=None, seed=0,
                file_format="array_record"):
  """Writes a prepared TFDS ``name`` (splits of ``sizes``); returns {split: (images, labels)}."""
  import tensorflow_datasets as tfds
  from array_record.python import array_record_module

  builder = tfds.builder(name, data_dir=str(data_dir), file_format=file_format)
  features, classes = builder.info.features, builder.info.features["label"].num_classes
  rng = np.random.default_rng(seed)
  os.makedirs(builder.data_dir, exist_ok=True)
  written, splits = {}, []
  for split, n in sizes.items():
    images = rng.integers(0, 256, (n,) + shape, dtype=np.uint8)
    labels = rng.integers(0, classes, n)
    template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name=name,
                                             split=split, filetype_suffix=file_format)
    writer = array_record_module.ArrayRecordWriter(
        os.fspath(template.sharded_filepaths(1)[0]), "group_size:1")
    for i in range(n):
      if bad_label is not None and i == n - 1:
        writer.write(_raw_example(images[i], bad_label))
        continue
      example = {"id": f"{split}_{i}", "image": _png(images[i]), "label": labels[i]}
      if "coarse_label" in features:
        example["coarse_label"] = labels[i] // 5
      writer.write(features.serialize_example(features.encode_example(example)))
    writer.close()
    splits.append(tfds.core.SplitInfo(name=split, shard_lengths=[n], num_bytes=0,
                                      filename_template=template))
    written[split] = (images, labels)
  builder.info.set_splits(tfds.core.SplitDict(splits))
  builder.info.write_to_directory(builder.data_dir)
  return written


def _source_config(name, data_dir, source):
  config = _config(name, data_dir)
  config.data.source = source
  return config


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_from_tfds_array_record(tmp_path, name):
  written = _write_tfds(tmp_path, name, {"train": 12, "test": 5})
  for source in ("tfds", "auto"):
    ds = data_lib.load_dataset(_source_config(name, tmp_path, source))
    np.testing.assert_array_equal(ds.train_images, written["train"][0])
    np.testing.assert_array_equal(ds.train_labels, written["train"][1])
    np.testing.assert_array_equal(ds.test_images, written["test"][0])
    np.testing.assert_array_equal(ds.test_labels, written["test"][1])
    assert ds.train_images.dtype == np.uint8 and ds.train_labels.dtype == np.int32
    assert ds.num_classes == (10 if name == "cifar10" else 100)


def test_tfds_reads_in_chunks(tmp_path):
  written = _write_tfds(tmp_path, "cifar10", {"train": 7, "test": 3})
  ds = data_lib.load_cifar_tfds("cifar10", str(tmp_path), chunk=2)
  np.testing.assert_array_equal(ds.train_images, written["train"][0])


def test_auto_prefers_tfds_and_falls_back_to_the_tarball(tmp_path, monkeypatch):
  calls = []
  monkeypatch.setattr(data_lib, "load_cifar_tfds", lambda *a: calls.append("tfds"))
  monkeypatch.setattr(data_lib, "load_cifar_tarball", lambda *a: calls.append("tarball"))
  data_lib.load_dataset(_source_config("cifar10", tmp_path, "auto"))
  _write_tfds(tmp_path, "cifar10", {"train": 2, "test": 1})
  data_lib.load_dataset(_source_config("cifar10", tmp_path, "auto"))
  data_lib.load_dataset(_source_config("cifar10", tmp_path, "tarball"))
  assert calls == ["tarball", "tfds", "tarball"]


def test_missing_tfds_data_says_how_to_prepare_it(tmp_path):
  with pytest.raises(ConfigError, match=r"no prepared TFDS cifar10 .* tfds build cifar10 "
                     r"--data_dir=.* --file_format=array_record.*binary tarball"):
    data_lib.load_dataset(_source_config("cifar10", tmp_path, "tfds"))
  with pytest.raises(ConfigError, match="no cifar-10-binary.tar.gz .* tfds build cifar10"):
    data_lib.load_dataset(_source_config("cifar10", tmp_path, "auto"))


def test_tfds_tfrecord_copy_asks_for_array_record(tmp_path):
  import tensorflow_datasets as tfds
  builder = tfds.builder("cifar10", data_dir=str(tmp_path), file_format="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name="train", shard_lengths=[1], num_bytes=0)]))
  os.makedirs(builder.data_dir)
  builder.info.write_to_directory(builder.data_dir)
  with pytest.raises(ConfigError, match="stored as tfrecord.*--file_format=array_record"):
    data_lib.load_dataset(_source_config("cifar10", tmp_path, "tfds"))


def test_tfds_wrong_image_shape_and_labels_out_of_range(tmp_path):
  _write_tfds(tmp_path / "shape", "cifar10", {"train": 3, "test": 2}, shape=(28, 28, 3))
  with pytest.raises(ConfigError, match=r"shape \(28, 28, 3\); CIFAR images are \(32, 32, 3\)"):
    data_lib.load_dataset(_source_config("cifar10", tmp_path / "shape", "tfds"))
  _write_tfds(tmp_path / "label", "cifar10", {"train": 3, "test": 2}, bad_label=10)
  with pytest.raises(ConfigError, match=r"TFDS cifar10 \(train\).*labels must be in \[0, 10\)"):
    data_lib.load_dataset(_source_config("cifar10", tmp_path / "label", "tfds"))


def test_invalid_data_source_is_a_config_error():
  config = config_lib.base_config()
  config.data.source = "gcs"
  with pytest.raises(ConfigError, match="data.source='gcs' is not valid; valid choices: auto"):
    config_lib.check_keys(config)
