"""Tests for resnorm_jax.checkpointing: save/restore, retention, layouts, corruption, signals."""

import glob
import json
import logging
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax import checkpointing, preemption, resume
from resnorm_jax.checkpointing import Checkpointer
from resnorm_jax.preemption import PreemptionGuard
from resnorm_jax.errors import ConfigError

LOGGER = "resnorm_jax.checkpointing"
# tests/conftest.py asks XLA for 8 host devices; the layout tests need them.
needs_8_devices = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
# When one array of a step fails to read, orbax abandons the reads of its other arrays, and
# Python reports those coroutines (and tensorstore callbacks into orbax's closed event loop) as
# "unraisable" exceptions whenever they are garbage collected -- often during a later test.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _tree(seed=0, *, sharding=None, width=64):
  """A params-like state: nested float32/int32 arrays, an int step and a numpy scalar."""
  rng = np.random.default_rng(seed)
  put = (lambda x: jax.device_put(x, sharding)) if sharding is not None else jnp.asarray
  return {
      "params": {
          "conv": {"kernel": put(rng.standard_normal((width, width)).astype(np.float32))},
          "norm": {"scale": put(rng.standard_normal(width).astype(np.float32)),
                   "count": put(rng.integers(-5, 5, size=(3,)).astype(np.int32))},
      },
      "step": 100 + seed,
      "loss_scale": np.float32(0.5 + seed),
  }


def _abstract(tree, sharding=None):
  """The tree as ShapeDtypeStructs (arrays) with ``sharding`` (default: the array's own)."""
  def leaf(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding)
    return x
  return jax.tree.map(leaf, tree)


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert type(x) is type(y) or (isinstance(x, jax.Array) and isinstance(y, jax.Array))
    assert np.asarray(x).dtype == np.asarray(y).dtype
    assert np.asarray(x).tobytes() == np.asarray(y).tobytes()


@pytest.fixture
def ckpt_dir(tmp_path):
  return str(tmp_path / "ckpt")


def _save_steps(directory, steps, *, keep=10):
  with Checkpointer(directory, keep=keep, every_steps=1) as ckpt:
    for s in steps:
      assert ckpt.save(s, _tree(s))
    ckpt.wait()


def test_roundtrip_is_bitwise(ckpt_dir):
  tree = _tree(3)
  with Checkpointer(ckpt_dir, keep=2, every_steps=10) as ckpt:
    assert ckpt.restore(_abstract(tree)) is None
    assert ckpt.save(10, tree)
    ckpt.wait()
  with Checkpointer(ckpt_dir, keep=2, every_steps=10) as ckpt:
    assert ckpt.all_steps() == [10] and ckpt.latest_step() == 10
    step, restored = ckpt.restore(_abstract(tree))
  assert step == 10
  _assert_bitwise_equal(restored, tree)
  assert isinstance(restored["step"], int) and isinstance(restored["loss_scale"], np.float32)


def test_keep_retains_newest_n(ckpt_dir):
  with Checkpointer(ckpt_dir, keep=2, every_steps=1) as ckpt:
    for s in range(1, 6):
      assert ckpt.save(s, _tree(s))
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert sorted(int(d) for d in os.listdir(ckpt_dir) if d.isdigit()) == [4, 5]


def test_should_save_cadence_and_force(ckpt_dir):
  with Checkpointer(ckpt_dir, keep=5, every_steps=5) as ckpt:
    assert [s for s in range(1, 16) if ckpt.should_save(s)] == [5, 10, 15]
    assert not ckpt.save(3, _tree())
    assert ckpt.save(5, _tree())
    assert ckpt.save(7, _tree(), force=True)
    ckpt.wait()
    assert ckpt.all_steps() == [5, 7]
  with Checkpointer(ckpt_dir, keep=5, every_steps=0) as never:
    assert not any(never.should_save(s) for s in range(0, 20))
    assert not never.save(10, _tree())
    assert never.save(11, _tree(), force=True)


def test_same_step_never_saved_twice(ckpt_dir):
  with Checkpointer(ckpt_dir, keep=5, every_steps=2) as ckpt:
    assert ckpt.save(2, _tree(0))
    assert not ckpt.save(2, _tree(1))               # still in flight
    ckpt.wait()
    assert not ckpt.save(2, _tree(1), force=True)   # committed
  with Checkpointer(ckpt_dir, keep=5, every_steps=2) as ckpt:
    assert not ckpt.save(2, _tree(1), force=True)   # found on disk by a new instance
    _, restored = ckpt.restore(_abstract(_tree(0)))
  _assert_bitwise_equal(restored, _tree(0))


def test_bad_keep_is_config_error(ckpt_dir):
  with pytest.raises(ConfigError, match="keep"):
    Checkpointer(ckpt_dir, keep=0, every_steps=1)


def test_temporary_dirs_are_ignored(ckpt_dir):
  _save_steps(ckpt_dir, [1])
  partial = os.path.join(ckpt_dir, "2.orbax-checkpoint-tmp-123")
  os.makedirs(os.path.join(partial, "state"))
  with Checkpointer(ckpt_dir, keep=5, every_steps=1) as ckpt:
    assert ckpt.all_steps() == [1]
    step, _ = ckpt.restore(_abstract(_tree(1)))
  assert step == 1


def _mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


@needs_8_devices
def test_restore_8_devices_onto_1(ckpt_dir):
  replicated = jax.sharding.NamedSharding(_mesh(), jax.sharding.PartitionSpec())
  tree = _tree(1, sharding=replicated)
  with Checkpointer(ckpt_dir, keep=1, every_steps=1) as ckpt:
    ckpt.save(1, tree)
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with Checkpointer(ckpt_dir, keep=1, every_steps=1) as ckpt:
    _, restored = ckpt.restore(_abstract(tree, single))
  _assert_bitwise_equal(restored, tree)
  for leaf in jax.tree.leaves(restored["params"]):
    assert leaf.sharding == single


@needs_8_devices
def test_restore_1_device_onto_8(ckpt_dir):
  tree = _tree(2, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  with Checkpointer(ckpt_dir, keep=1, every_steps=1) as ckpt:
    ckpt.save(1, tree)
  mesh = _mesh()
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  abstract = _abstract(tree, replicated)
  row_sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  kernel = abstract["params"]["conv"]["kernel"]
  abstract["params"]["conv"]["kernel"] = kernel.update(sharding=row_sharded)
  with Checkpointer(ckpt_dir, keep=1, every_steps=1) as ckpt:
    _, restored = ckpt.restore(abstract)
  _assert_bitwise_equal(restored, tree)
  assert restored["params"]["norm"]["scale"].sharding == replicated
  assert restored["params"]["conv"]["kernel"].sharding == row_sharded


def _largest_data_file(ckpt_dir, step):
  files = [p for p in glob.glob(os.path.join(ckpt_dir, str(step), "**", "d", "*"),
                                recursive=True) if os.path.isfile(p)]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", [os.remove, _truncate], ids=["deleted", "truncated"])
def test_corrupt_newest_falls_back(ckpt_dir, caplog, damage):
  _save_steps(ckpt_dir, [1, 2])
  damage(_largest_data_file(ckpt_dir, 2))
  with Checkpointer(ckpt_dir, keep=5, every_steps=1) as ckpt:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
      step, restored = ckpt.restore(_abstract(_tree(0)))
  assert step == 1
  _assert_bitwise_equal(restored, _tree(1))
  warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER]
  assert any("step 2" in m and "unreadable" in m for m in warnings), warnings
  assert os.path.isdir(os.path.join(ckpt_dir, "2"))  # never deleted on error


def test_missing_metadata_falls_back(ckpt_dir, caplog):
  _save_steps(ckpt_dir, [1, 2])
  os.remove(os.path.join(ckpt_dir, "2", checkpointing.ITEM, "_METADATA"))
  with Checkpointer(ckpt_dir, keep=5, every_steps=1) as ckpt:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
      step, _ = ckpt.restore(_abstract(_tree(0)))
  assert step == 1
  assert any("step 2" in r.getMessage() for r in caplog.records if r.name == LOGGER)


def test_all_corrupt_is_config_error(ckpt_dir):
  _save_steps(ckpt_dir, [1, 2])
  for step in (1, 2):
    _truncate(_largest_data_file(ckpt_dir, step))
  with Checkpointer(ckpt_dir, keep=5, every_steps=1) as ckpt:
    with pytest.raises(ConfigError, match=r"no checkpoint .* could be restored") as e:
      ckpt.restore(_abstract(_tree(0)))
  assert "[2, 1]" in str(e.value) and "--workdir" in str(e.value)
  assert sorted(os.listdir(ckpt_dir)).count("1") == 1  # nothing deleted


def test_structure_mismatch_is_config_error(ckpt_dir):
  _save_steps(ckpt_dir, [1])
  other = _tree(0, width=32)                       # different shapes
  del other["params"]["norm"]["count"]              # a key only the checkpoint has
  other["params"]["head"] = jnp.zeros((4,))         # a key only this run has
  with Checkpointer(ckpt_dir, keep=5, every_steps=1) as ckpt:
    with pytest.raises(ConfigError) as e:
      ckpt.restore(_abstract(other))
  msg = str(e.value)
  assert ckpt_dir in msg and "different model/config" in msg and "--workdir" in msg
  assert "params.norm.count" in msg and "params.head" in msg
  assert "params.conv.kernel checkpoint (64, 64) vs this run (32, 32)" in msg
  assert os.path.isdir(os.path.join(ckpt_dir, "1"))


def test_preemption_guard_sets_flag_and_restores_handler():
  calls = []
  def previous(signum, frame):
    calls.append(signum)
  old = signal.signal(signal.SIGTERM, previous)
  try:
    with PreemptionGuard() as guard:
      assert not guard.requested
      os.kill(os.getpid(), signal.SIGTERM)
      assert guard.requested and guard.signal == "SIGTERM"
    assert calls == []
    assert signal.getsignal(signal.SIGTERM) is previous
    os.kill(os.getpid(), signal.SIGTERM)
    assert calls == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, old)


def test_preemption_guard_sigint_optional():
  old_int = signal.getsignal(signal.SIGINT)
  with PreemptionGuard() as guard:
    assert signal.getsignal(signal.SIGINT) is old_int
  with PreemptionGuard(sigint=True) as guard:
    os.kill(os.getpid(), signal.SIGINT)
    assert guard.requested and guard.signal == "SIGINT"
  assert signal.getsignal(signal.SIGINT) is old_int


def _config(norm="batch", data="cifar10", lr=0.1):
  return {"model": {"name": "cifar_resnet", "norm": norm, "depth": 20, "widths": (16, 32)},
          "data": {"name": data, "pad": 4}, "train": {"learning_rate": lr}}


def test_config_json_roundtrip_and_compatible(tmp_path):
  workdir = str(tmp_path / "run")
  resume.check_config_compatible(workdir, _config())  # nothing saved yet: fine
  path = resume.save_config_json(workdir, _config())
  assert path == os.path.join(workdir, "config.json")
  with open(path) as f:
    assert json.load(f)["model"]["norm"] == "batch"
  assert [n for n in os.listdir(workdir) if n != "config.json"] == []  # no temp leftovers
  resume.check_config_compatible(workdir, _config(lr=0.5))  # train.* may change
  resume.save_config_json(workdir, _config(lr=0.5))        # overwrite is atomic


def test_config_incompatible_lists_each_key(tmp_path):
  workdir = str(tmp_path / "run")
  resume.save_config_json(workdir, _config())
  current = _config(norm="layer", data="imagenet")
  current["model"]["depth"] = 56
  with pytest.raises(ConfigError) as e:
    resume.check_config_compatible(workdir, current)
  msg = str(e.value)
  assert "model.norm: checkpoint has 'batch', this run has 'layer'" in msg
  assert "model.depth: checkpoint has 20, this run has 56" in msg
  assert "data.name: checkpoint has 'cifar10', this run has 'imagenet'" in msg
  assert workdir in msg and "--workdir" in msg
  assert "learning_rate" not in msg
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["norm"] == "batch"  # untouched on error


def test_config_unreadable_is_config_error(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text("{not json")
  with pytest.raises(ConfigError, match="config.json is unreadable"):
    resume.check_config_compatible(str(workdir), _config())
