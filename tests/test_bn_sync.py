"""BatchNorm cross-replica synchronisation (global / local / group:k) on 8 CPU devices.

The same definition must hold in every execution style: ``jax.jit`` over a mesh with the
batch sharded (the model sees the global batch, ``axis_name=None``), ``jax.shard_map`` and
``jax.pmap`` (per-device programs that reduce by axis name).  Everything is compared with a
numpy reference that groups the samples explicitly, and gradients with plain single-device
BatchNorm applied to each statistics group.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from resnorm_jax.layers import BatchNorm, NormContext

N_DEV = 8
EPS = 1e-5
MOMENTUM = 0.9
IMAGE_SHAPE = (16, 2, 2, 4)  # 2 images per device
SEQ_SHAPE = (16, 4, 4)  # (B, T, D), 2 sequences per device
MODES = {"global": 8, "local": 1, "group:2": 2, "group:4": 4}  # bn_sync -> replicas per group
TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-5)


def test_eight_devices_visible():
  """tests/conftest.py sets XLA_FLAGS so that the suite sees 8 CPU devices."""
  assert jax.device_count() == N_DEV


@functools.lru_cache(maxsize=None)
def mesh():
  return jax.make_mesh((N_DEV,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


# ----------------------------------------------------------------------------------------
# Data and references.
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def data():
  rng = np.random.default_rng(0)
  # Per-device offsets make the groupings give clearly different statistics.
  offsets = np.repeat(rng.normal(scale=2.0, size=(N_DEV, 1, 1, IMAGE_SHAPE[-1])),
                      IMAGE_SHAPE[0] // N_DEV, axis=0)
  x = (rng.normal(size=IMAGE_SHAPE) * rng.uniform(0.5, 2.0, size=(IMAGE_SHAPE[0], 1, 1, 1))
       + offsets).astype(np.float32)
  w = rng.normal(size=IMAGE_SHAPE).astype(np.float32)
  c = IMAGE_SHAPE[-1]
  params = {"scale": rng.uniform(0.5, 1.5, size=c).astype(np.float32),
            "bias": rng.normal(size=c).astype(np.float32)}
  stats = {"mean": np.zeros(c, np.float32), "var": np.ones(c, np.float32)}
  return x, w, params, stats


def np_grouped_bn(x, group_size, params, mask=None):
  """Output and updated running statistics with each group of ``group_size`` consecutive
  devices' samples normalised together (the batch is split contiguously over devices)."""
  x = np.asarray(x, np.float64)
  per_group = x.shape[0] // N_DEV * group_size
  axes = tuple(range(x.ndim - 1))
  ys, means, variances = [], [], []
  for start in range(0, x.shape[0], per_group):
    xg = x[start:start + per_group]
    if mask is None:
      mean, var = xg.mean(axes), xg.var(axes)
    else:
      real = xg[np.asarray(mask[start:start + per_group], bool)]  # (num_real, D)
      mean, var = real.mean(0), real.var(0)
    ys.append((xg - mean) / np.sqrt(var + EPS) * params["scale"] + params["bias"])
    means.append(mean)
    variances.append(var)
  running = {"mean": (1 - MOMENTUM) * np.mean(means, 0),
             "var": MOMENTUM + (1 - MOMENTUM) * np.mean(variances, 0)}
  return np.concatenate(ys), running


def loss_and_updates(model, params, stats, x, w, mask=None):
  y, updates = model.apply({"params": params, "batch_stats": stats}, x, train=True, mask=mask,
                           mutable=["batch_stats"])
  return jnp.sum(y * w), (y, updates["batch_stats"])


def step(model, params, stats, x, w, mask=None):
  """(output, new running statistics, d loss / d params, d loss / d x)."""
  grad_fn = jax.value_and_grad(loss_and_updates, argnums=(1, 3), has_aux=True)
  (_, (y, new_stats)), (g_params, g_x) = grad_fn(model, params, stats, x, w, mask)
  return y, new_stats, g_params, g_x


@functools.lru_cache(maxsize=None)
def single_device_grads(group_size):
  """Gradients of sum(y * w) from plain single-device BatchNorm applied to each group."""
  x, w, params, stats = data()
  model = BatchNorm(ctx=NormContext(momentum=MOMENTUM, epsilon=EPS))
  per_group = x.shape[0] // N_DEV * group_size

  def loss(params, x):
    total = 0.0
    for start in range(0, x.shape[0], per_group):
      sl = slice(start, start + per_group)
      total += loss_and_updates(model, params, stats, x[sl], w[sl])[0]
    return total

  g_params, g_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(x))
  return jax.tree.map(np.asarray, g_params), np.asarray(g_x)


def check(mode, y, running_per_device, g_params, g_x):
  """Compares one execution style's results with the references for ``mode``."""
  x, _, params, _ = data()
  k = MODES[mode]
  expected_y, expected_running = np_grouped_bn(x, k, params)
  np.testing.assert_allclose(np.asarray(y).reshape(x.shape), expected_y, **TOL)
  for name in ("mean", "var"):
    per_device = np.asarray(running_per_device[name])
    assert per_device.shape == (N_DEV, x.shape[-1])
    np.testing.assert_array_equal(per_device, np.broadcast_to(per_device[0], per_device.shape))
    np.testing.assert_allclose(per_device[0], expected_running[name], **TOL)
  ref_params, ref_x = single_device_grads(k)
  np.testing.assert_allclose(np.asarray(g_x).reshape(x.shape), ref_x, **GRAD_TOL)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, dict(g_params)), ref_params, **GRAD_TOL)


def test_modes_really_differ():
  """The groupings give different outputs on this data (so each check can fail)."""
  x, _, params, _ = data()
  outputs = {mode: np_grouped_bn(x, k, params)[0] for mode, k in MODES.items()}
  modes = list(outputs)
  for i, a in enumerate(modes):
    for b in modes[i + 1:]:
      assert np.max(np.abs(outputs[a] - outputs[b])) > 1e-2, (a, b)
  grads = {mode: single_device_grads(k)[1] for mode, k in MODES.items()}
  assert np.max(np.abs(grads["global"] - grads["local"])) > 1e-3


def per_device_copies(array):
  """(N_DEV, ...) stack of every device's copy of a replicated global array."""
  shards = sorted(array.addressable_shards, key=lambda s: s.device.id)
  assert len(shards) == N_DEV
  return np.stack([np.asarray(s.data) for s in shards])


# ----------------------------------------------------------------------------------------
# Execution styles.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(MODES))
def test_jit_on_sharded_batch(mode):
  x, w, params, stats = data()
  m = mesh()
  model = BatchNorm(ctx=NormContext(bn_sync=mode, num_replicas=N_DEV, axis_name=None,
                                    momentum=MOMENTUM, epsilon=EPS))
  batch, replicated = NamedSharding(m, P("data")), NamedSharding(m, P())
  xs, ws = jax.device_put(x, batch), jax.device_put(w, batch)
  ps, ss = jax.device_put(params, replicated), jax.device_put(stats, replicated)
  assert len(xs.addressable_shards) == N_DEV
  assert xs.addressable_shards[0].data.shape == (x.shape[0] // N_DEV,) + x.shape[1:]
  y, new_stats, g_params, g_x = jax.jit(functools.partial(step, model))(ps, ss, xs, ws)
  running = {name: per_device_copies(v) for name, v in new_stats.items()}
  check(mode, y, running, g_params, g_x)


@pytest.mark.parametrize("check_vma", [True, False])
@pytest.mark.parametrize("mode", list(MODES))
def test_shard_map(mode, check_vma):
  x, w, params, stats = data()
  model = BatchNorm(ctx=NormContext(bn_sync=mode, num_replicas=N_DEV, axis_name="data",
                                    momentum=MOMENTUM, epsilon=EPS))

  def per_device(params, stats, x, w):
    y, new_stats, g_params, g_x = step(model, params, stats, x, w)
    if not check_vma:
      # Without varying-axis tracking, a replicated parameter's gradient is this device's
      # share only (as under pmap): sum it explicitly.
      g_params = jax.lax.psum(g_params, "data")
    return y, jax.tree.map(lambda a: a[None], new_stats), g_params, g_x

  fn = jax.shard_map(per_device, mesh=mesh(), in_specs=(P(), P(), P("data"), P("data")),
                     out_specs=(P("data"), P("data"), P(), P("data")), check_vma=check_vma)
  y, running, g_params, g_x = jax.jit(fn)(params, stats, x, w)
  check(mode, y, running, g_params, g_x)


@pytest.mark.parametrize("mode", list(MODES))
def test_pmap(mode):
  x, w, params, stats = data()
  model = BatchNorm(ctx=NormContext(bn_sync=mode, num_replicas=N_DEV, axis_name="data",
                                    momentum=MOMENTUM, epsilon=EPS))

  def per_device(params, stats, x, w):
    y, new_stats, g_params, g_x = step(model, params, stats, x, w)
    return y, new_stats, jax.lax.psum(g_params, "data"), g_x

  split = lambda a: a.reshape((N_DEV, a.shape[0] // N_DEV) + a.shape[1:])
  fn = jax.pmap(per_device, axis_name="data", in_axes=(None, None, 0, 0))
  y, running, g_params, g_x = fn(params, stats, split(x), split(w))
  assert y.shape == (N_DEV, x.shape[0] // N_DEV) + x.shape[1:]
  # psum'd parameter gradients are replicated: one copy per device, all equal.
  for name in ("scale", "bias"):
    np.testing.assert_array_equal(g_params[name], np.broadcast_to(g_params[name][0],
                                                                  g_params[name].shape))
  check(mode, y, running, jax.tree.map(lambda a: a[0], g_params), g_x)


# ----------------------------------------------------------------------------------------
# Padding masks across replicas.
# ----------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def masked_data():
  rng = np.random.default_rng(1)
  b, t, d = SEQ_SHAPE
  x = (rng.normal(size=SEQ_SHAPE) + rng.normal(size=(1, 1, d))).astype(np.float32)
  lengths = rng.integers(1, t + 1, size=b)
  mask = np.arange(t)[None, :] < lengths[:, None]
  x[~mask] = 1e3  # padding holds garbage
  w = (rng.normal(size=SEQ_SHAPE) * mask[..., None]).astype(np.float32)  # loss ignores pads
  params = {"scale": rng.uniform(0.5, 1.5, size=d).astype(np.float32),
            "bias": rng.normal(size=d).astype(np.float32)}
  stats = {"mean": np.zeros(d, np.float32), "var": np.ones(d, np.float32)}
  return x, mask, w, params, stats


@functools.lru_cache(maxsize=None)
def masked_single_device(group_size):
  """Plain single-device masked BatchNorm applied to each statistics group."""
  x, mask, w, params, stats = masked_data()
  model = BatchNorm(ctx=NormContext(momentum=MOMENTUM, epsilon=EPS))
  per_group = x.shape[0] // N_DEV * group_size

  def loss(params, x):
    total, ys, new_stats = 0.0, [], []
    for start in range(0, x.shape[0], per_group):
      sl = slice(start, start + per_group)
      value, (y, new) = loss_and_updates(model, params, stats, x[sl], w[sl], mask[sl])
      total, ys, new_stats = total + value, ys + [y], new_stats + [new]
    running = jax.tree.map(lambda *a: jnp.mean(jnp.stack(a), 0), *new_stats)
    return total, (jnp.concatenate(ys), running)

  (_, (y, running)), (g_params, g_x) = jax.value_and_grad(
      loss, argnums=(0, 1), has_aux=True)(params, jnp.asarray(x))
  return jax.tree.map(np.asarray, (y, running, g_params, g_x))


def check_masked(mode, y, new_stats, g_params, g_x):
  x, mask, _, params, _ = masked_data()
  ref_y, ref_stats, ref_g_params, ref_g_x = masked_single_device(MODES[mode])
  # The single-device result is itself the masked formula over each group's real tokens.
  expected_y, expected_running = np_grouped_bn(x, MODES[mode], params, mask)
  np.testing.assert_allclose(ref_y[mask], expected_y[mask], **TOL)
  for name in ("mean", "var"):
    np.testing.assert_allclose(ref_stats[name], expected_running[name], **TOL)
    np.testing.assert_allclose(np.asarray(new_stats[name]), ref_stats[name], **TOL)
  np.testing.assert_allclose(np.asarray(y)[mask], ref_y[mask], **TOL)
  np.testing.assert_allclose(np.asarray(g_x), ref_g_x, **GRAD_TOL)
  assert np.all(ref_g_x[~mask] == 0)
  chex.assert_trees_all_close(jax.tree.map(np.asarray, dict(g_params)), ref_g_params,
                              **GRAD_TOL)


MASKED_MODES = ["global", "local", "group:4"]


def test_masked_modes_really_differ():
  x, mask, _, params, _ = masked_data()
  outputs = [np_grouped_bn(x, MODES[mode], params, mask)[0][mask] for mode in MASKED_MODES]
  for i in range(len(outputs)):
    for j in range(i + 1, len(outputs)):
      assert np.max(np.abs(outputs[i] - outputs[j])) > 1e-2
  # ... and the padding would matter if it were not masked.
  unmasked = np_grouped_bn(x, N_DEV, params)[0][mask]
  assert np.max(np.abs(unmasked - outputs[0])) > 1e-2


@pytest.mark.parametrize("mode", MASKED_MODES)
def test_masked_jit(mode):
  x, mask, w, params, stats = masked_data()
  m = mesh()
  model = BatchNorm(ctx=NormContext(bn_sync=mode, num_replicas=N_DEV, momentum=MOMENTUM,
                                    epsilon=EPS))
  batch = NamedSharding(m, P("data"))
  xs, ms, ws = (jax.device_put(a, batch) for a in (x, mask, w))
  y, new_stats, g_params, g_x = jax.jit(functools.partial(step, model))(params, stats, xs, ws,
                                                                        ms)
  check_masked(mode, y, new_stats, g_params, g_x)


@pytest.mark.parametrize("mode", MASKED_MODES)
def test_masked_shard_map(mode):
  x, mask, w, params, stats = masked_data()
  model = BatchNorm(ctx=NormContext(bn_sync=mode, num_replicas=N_DEV, axis_name="data",
                                    momentum=MOMENTUM, epsilon=EPS))

  def per_device(params, stats, x, w, mask):
    return step(model, params, stats, x, w, mask)

  fn = jax.shard_map(per_device, mesh=mesh(), in_specs=(P(), P(), P("data"), P("data"),
                                                         P("data")),
                     out_specs=(P("data"), P(), P(), P("data")))
  y, new_stats, g_params, g_x = jax.jit(fn)(params, stats, x, w, mask)
  check_masked(mode, y, new_stats, g_params, g_x)
