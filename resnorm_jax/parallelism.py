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

import os
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
  outputs (pytrees whose values are identical on every replica), as global arrays over
  ``mesh`` in every style and with any number of processes.
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
      out = mapped(*fixed, *batch)
      if jax.process_count() == 1:
        return out
      # With several processes, pmap takes global arrays but returns *host-local* ones
      # (each process's copy, on its own devices only), which the next jit over the mesh
      # (the next step's batch preparation, evaluation, beam search) refuses to mix with
      # global arrays.  The outputs are replicated (identical on every replica), so each
      # process's copy is its part of the global replicated array: declare them as such.
      from jax.experimental import multihost_utils
      return multihost_utils.host_local_array_to_global_array(out, mesh, P())
    return call
  raise ValueError(f"unknown parallel mode {mode!r}")


def host_to_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global array from a host array that every process computes identically.

  Each process materializes only the shards its own devices hold (its slice of a
  batch-sharded array, or a full copy of a replicated one), so this is the same call on one
  host and on a pod.
  """
  array = np.asarray(array)
  return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def to_host(tree):
  """Fetches replicated (or process-local) arrays to numpy on every process.

  ``jax.device_get`` refuses arrays that span other processes' devices; a replicated array
  has a full copy on each of this process's devices, so the first local copy is read.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if not x.is_fully_replicated:
        raise ValueError(f"cannot fetch a sharded array of shape {x.shape} to the host")
      return np.asarray(x.addressable_data(0))
    return np.asarray(jax.device_get(x))
  return jax.tree_util.tree_map(fetch, tree)


def any_process(flag: bool) -> bool:
  """True on every process if ``flag`` is true on any process (a collective)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.any(multihost_utils.process_allgather(np.int32(bool(flag)))))


# Environment variables that mark a multi-process launch jax can auto-detect.
_CLUSTER_ENV = {
    "SLURM_NTASKS": "SLURM",
    "OMPI_COMM_WORLD_SIZE": "Open MPI",
    "TPU_WORKER_HOSTNAMES": "TPU VM pod",
}


def detect_cluster() -> str | None:
  """Names the multi-process launcher found in the environment, or None."""
  for var, name in _CLUSTER_ENV.items():
    value = os.environ.get(var, "")
    if var == "TPU_WORKER_HOSTNAMES":
      if "," in value:
        return name
    elif value.isdigit() and int(value) > 1:
      return name
  return None


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None,
                           heartbeat_timeout_seconds: int = 100) -> bool:
  """Starts JAX's multi-controller runtime before any device is touched.

  ``mode``: ``off`` (single process); ``on`` (always; jax detects TPU VM, SLURM, Open MPI
  and GKE settings); ``auto`` (on when a coordinator address is given or a multi-process
  launcher is detected in the environment).  An explicit ``coordinator_address`` with
  ``num_processes`` and ``process_id`` works anywhere, e.g. several processes on 127.0.0.1.
  A process that dies is noticed by the others within ``heartbeat_timeout_seconds``.
  Returns whether the runtime was initialized.
  """
  if mode not in ("auto", "on", "off"):
    raise ValueError(f"unknown distributed mode {mode!r}; valid choices: auto, on, off")
  explicit = coordinator_address is not None
  if mode == "off" or (mode == "auto" and not explicit and detect_cluster() is None):
    return False
  if explicit and (num_processes is None or process_id is None):
    raise ValueError("--coordinator_address needs --num_processes and --process_id too")
  kwargs = dict(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
  if explicit:
    kwargs.update(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)
  return True
