"""Device meshes and the three data-parallel execution styles.

The per-example math is written once, as ``make_fn(axis_name)``: a function of replicated
arguments (train state) and batch-sharded arguments (the global batch, or this replica's
slice of it) that reduces across replicas by ``axis_name`` when one is given.  Then:

* ``jit``:       ``make_fn(None)`` on global arrays; XLA inserts the all-reduces.
* ``shard_map``: ``jax.shard_map(make_fn("data"))``: one per-device program, explicit
                 ``pmean``/``psum`` by axis name.
* ``pmap``:      ``jax.pmap(make_fn("data"))`` with the batch reshaped to (devices, ...).

All three take and return unreplicated global state, so checkpoints never see a device axis.
"""

from __future__ import annotations

from typing import Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int = 0) -> Mesh:
  """A 1-D data-parallel mesh over the first ``num_devices`` devices (0 = all).

  Auto axis types: shardings propagate as in classic SPMD, so reshapes of the batch (ghost
  BatchNorm groups) need no explicit output shardings.
  """
  devices = jax.devices()
  n = num_devices or len(devices)
  return jax.make_mesh((n,), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:n])


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def data_parallel(make_fn: Callable[[str | None], Callable], mode: str, mesh: Mesh,
                  num_replicated: int, num_sharded: int) -> Callable:
  """Wraps ``make_fn`` in an execution style; see the module docstring.

  The returned function takes ``num_replicated`` replicated arguments followed by
  ``num_sharded`` global batch arguments (leading batch axis) and returns replicated
  outputs (pytrees whose values are identical on every replica).
  """
  n = mesh.devices.size
  if mode == "jit":
    return make_fn(None)
  if mode == "shard_map":
    # check_vma=False: the per-device program reduces explicitly (as under pmap).  With
    # varying-axis checking on, the transpose of using a replicated parameter on sharded
    # data would already psum its gradient, and an explicit pmean would then be wrong.
    return jax.shard_map(make_fn(DATA_AXIS), mesh=mesh,
                         in_specs=(P(),) * num_replicated + (P(DATA_AXIS),) * num_sharded,
                         out_specs=P(), check_vma=False)
  if mode == "pmap":
    mapped = jax.pmap(make_fn(DATA_AXIS), axis_name=DATA_AXIS, devices=list(mesh.devices.flat),
                      in_axes=(None,) * num_replicated + (0,) * num_sharded, out_axes=None)

    def call(*args):
      fixed, batch = args[:num_replicated], args[num_replicated:]
      batch = jax.tree_util.tree_map(lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:]),
                                     batch)
      return mapped(*fixed, *batch)
    return call
  raise ValueError(f"unknown parallel mode {mode!r}")


def host_to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a host array (the same on every process) as a global array."""
  return jax.device_put(array, sharding)
