"""Every norm of the NORMS registry against its formula, written independently in numpy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax.layers import (NORMS, ConfigError, Conv, NormContext, make_norm,
                                standardize_weight)

EPS = 1e-5
TOL = dict(rtol=1e-5, atol=1e-5)

SHAPES = {
    "image": (4, 3, 3, 8),  # NHWC
    "sequence": (3, 5, 8),  # (B, T, D)
    "flat": (6, 8),  # (B, D)
}


# ----------------------------------------------------------------------------------------
# Independent numpy formulas (float64).
# ----------------------------------------------------------------------------------------
def np_moments(x, axes, mask=None):
  """Mean and biased variance over ``axes`` (keepdims); ``mask`` (B, T) weights samples."""
  x = np.asarray(x, np.float64)
  if mask is None:
    return x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
  m = np.asarray(mask, np.float64).reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
  m = np.broadcast_to(m, x.shape)
  count = m.sum(axis=axes, keepdims=True)
  mean = (x * m).sum(axis=axes, keepdims=True) / count
  var = (((x - mean) ** 2) * m).sum(axis=axes, keepdims=True) / count
  return mean, var


def np_affine(y, scale=None, bias=None):
  if scale is not None:
    y = y * np.asarray(scale, np.float64)
  if bias is not None:
    y = y + np.asarray(bias, np.float64)
  return y


def np_standardize(x, mean, var):
  return (np.asarray(x, np.float64) - mean) / np.sqrt(var + EPS)


def stat_axes(kind, ndim):
  """The axes each norm reduces over, stated independently of the library."""
  if kind == "batch":
    return tuple(range(ndim - 1))  # N,H,W per channel / B,T per feature / B per feature
  if kind == "layer":
    return (1, 2, 3) if ndim == 4 else (ndim - 1,)  # H,W,C per image / D per token
  if kind in ("layer:c", "rms:c"):
    return (ndim - 1,)
  if kind == "rms":
    return (1, 2, 3) if ndim == 4 else (ndim - 1,)
  if kind == "instance":
    return tuple(range(1, ndim - 1))  # H,W per image-channel / T per sequence-feature
  raise ValueError(kind)


def np_group(x, groups, scale, bias):
  x = np.asarray(x, np.float64)
  c = x.shape[-1]
  xg = x.reshape(x.shape[:-1] + (groups, c // groups))
  axes = ((1, 2) if x.ndim == 4 else ()) + (xg.ndim - 1,)
  mean, var = np_moments(xg, axes)
  y = np_standardize(xg, mean, var).reshape(x.shape)
  return np_affine(y, scale, bias)


def np_reference(spec, x, params, mask=None):
  """Train-mode output of norm ``spec`` from its formula."""
  scale, bias = params.get("scale"), params.get("bias")
  if spec == "none":
    return np.asarray(x, np.float64)
  if spec.startswith("group:"):
    return np_group(x, int(spec.split(":")[1]), scale, bias)
  if spec.startswith("rms"):
    x64 = np.asarray(x, np.float64)
    ms = (x64 ** 2).mean(axis=stat_axes(spec, x.ndim), keepdims=True)
    return np_affine(x64 / np.sqrt(ms + EPS), scale, None)
  if spec == "switchable":
    return np_switchable(x, params, mask)
  mean, var = np_moments(x, stat_axes(spec, x.ndim),
                         mask if spec in ("batch", "instance") else None)
  return np_affine(np_standardize(x, mean, var), scale, bias)


def softmax(w):
  e = np.exp(np.asarray(w, np.float64) - np.max(w))
  return e / e.sum()


def np_switchable(x, params, mask=None):
  nd = x.ndim
  m_in, v_in = np_moments(x, tuple(range(1, nd - 1)), mask)
  m_ln, v_ln = np_moments(x, (1, 2, 3) if nd == 4 else (nd - 1,))
  m_bn, v_bn = np_moments(x, tuple(range(nd - 1)), mask)
  wm, wv = softmax(params["mean_weight"]), softmax(params["var_weight"])
  mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * m_bn
  var = wv[0] * v_in + wv[1] * v_ln + wv[2] * v_bn
  return np_affine(np_standardize(x, mean, var), params["scale"], params["bias"])


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------
ALL_SPECS = ["batch", "layer", "layer:c", "instance", "group:2", "group:4", "switchable",
             "rms", "rms:c", "none"]
EXPECTED_PARAMS = {
    "batch": {"scale", "bias"}, "layer": {"scale", "bias"}, "layer:c": {"scale", "bias"},
    "instance": {"scale", "bias"}, "group:2": {"scale", "bias"}, "group:4": {"scale", "bias"},
    "switchable": {"scale", "bias", "mean_weight", "var_weight"}, "rms": {"scale"},
    "rms:c": {"scale"}, "none": set(),
}


def random_input(shape, seed=0, offset=0.0, dtype=jnp.float32):
  x = np.random.default_rng(seed).normal(size=shape) * 1.5 + offset
  return jnp.asarray(x, dtype)


def randomize_params(params, seed=1):
  """Replaces every parameter by random values (scales around 1, the rest around 0)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    centre = 1.0 if "scale" in name else 0.0
    return jnp.asarray(centre + 0.5 * rng.normal(size=leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, params)


def init_and_randomize(spec, x, ctx=NormContext(), mask=None):
  norm = make_norm(spec, ctx)
  variables = dict(norm.init(jax.random.key(0), x, train=True, mask=mask))
  if "params" in variables:
    variables["params"] = randomize_params(variables["params"])
  return norm, variables


def apply_train(norm, variables, x, mask=None):
  if "batch_stats" in variables:
    y, _ = norm.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
    return y
  return norm.apply(variables, x, train=True, mask=mask)


def test_every_registered_norm_is_covered():
  assert {s.split(":")[0] for s in ALL_SPECS} == set(NORMS.names())


# ----------------------------------------------------------------------------------------
# Formula checks: statistics axes and affine parameters.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", sorted(SHAPES))
@pytest.mark.parametrize("spec", ALL_SPECS)
def test_norm_matches_formula(spec, layout):
  x = random_input(SHAPES[layout], offset=0.7)
  if layout == "flat" and spec in ("instance", "switchable"):
    with pytest.raises(ConfigError, match="spatial or time axes"):
      make_norm(spec).init(jax.random.key(0), x, train=True)
    return
  norm, variables = init_and_randomize(spec, x)
  params = variables.get("params", {})
  assert set(params) == EXPECTED_PARAMS[spec]
  for name in ("scale", "bias"):
    if name in params:
      assert params[name].shape == (x.shape[-1],) and params[name].dtype == jnp.float32
  y = apply_train(norm, variables, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  np.testing.assert_allclose(y, np_reference(spec, x, params), **TOL)


@pytest.mark.parametrize("spec", ["batch", "layer", "instance", "group:4", "rms"])
def test_default_affine_init_is_identity_transform(spec):
  """At init γ = 1 and β = 0: the output is the plain standardized input."""
  x = random_input(SHAPES["image"], offset=-0.3)
  norm = make_norm(spec)
  variables = norm.init(jax.random.key(0), x, train=True)
  params = variables["params"]
  np.testing.assert_array_equal(params["scale"], np.ones(x.shape[-1]))
  if "bias" in params:
    np.testing.assert_array_equal(params["bias"], np.zeros(x.shape[-1]))
  y = apply_train(norm, variables, x)
  np.testing.assert_allclose(y, np_reference(spec, x, {}), **TOL)


def test_group_default_is_32_groups():
  x = random_input((2, 2, 2, 64))
  norm = make_norm("group")
  variables = norm.init(jax.random.key(0), x)
  np.testing.assert_allclose(norm.apply(variables, x), np_group(x, 32, None, None), **TOL)


def test_layer_statistics_differ_from_per_channel_variant():
  """`layer` (H,W,C) and `layer:c` (C per pixel) are really different on images."""
  x = random_input(SHAPES["image"])
  a = make_norm("layer").apply(make_norm("layer").init(jax.random.key(0), x), x)
  b = make_norm("layer:c").apply(make_norm("layer:c").init(jax.random.key(0), x), x)
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-2


# ----------------------------------------------------------------------------------------
# BatchNorm running statistics and eval mode.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("momentum", [0.9, 0.7])
@pytest.mark.parametrize("layout", ["image", "sequence"])
def test_batchnorm_running_stat_update(layout, momentum):
  x = random_input(SHAPES[layout], offset=2.0)
  c = x.shape[-1]
  ctx = NormContext(momentum=momentum)
  norm, variables = init_and_randomize("batch", x, ctx)
  rng = np.random.default_rng(5)
  old_mean, old_var = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
  variables["batch_stats"] = {"mean": jnp.asarray(old_mean, jnp.float32),
                              "var": jnp.asarray(old_var, jnp.float32)}
  _, updates = norm.apply(variables, x, train=True, mutable=["batch_stats"])
  axes = tuple(range(x.ndim - 1))
  x64 = np.asarray(x, np.float64)
  batch_mean, batch_var = x64.mean(axes), x64.var(axes)  # biased variance
  new = updates["batch_stats"]
  assert new["mean"].dtype == jnp.float32 and new["var"].dtype == jnp.float32
  np.testing.assert_allclose(new["mean"], momentum * old_mean + (1 - momentum) * batch_mean,
                             **TOL)
  np.testing.assert_allclose(new["var"], momentum * old_var + (1 - momentum) * batch_var,
                             **TOL)


@pytest.mark.parametrize("spec", ["batch", "switchable"])
def test_no_running_stat_update_during_init(spec):
  x = random_input(SHAPES["image"], offset=3.0)
  variables = make_norm(spec).init(jax.random.key(0), x, train=True)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros(x.shape[-1]))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones(x.shape[-1]))


@pytest.mark.parametrize("layout", ["image", "sequence", "flat"])
def test_batchnorm_eval_uses_running_stats(layout):
  x = random_input(SHAPES[layout], offset=1.0)
  c = x.shape[-1]
  norm, variables = init_and_randomize("batch", x)
  rng = np.random.default_rng(7)
  run_mean, run_var = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
  variables["batch_stats"] = {"mean": jnp.asarray(run_mean, jnp.float32),
                              "var": jnp.asarray(run_var, jnp.float32)}
  y = norm.apply(variables, x, train=False)
  params = variables["params"]
  expected = np_affine(np_standardize(x, run_mean, run_var), params["scale"], params["bias"])
  np.testing.assert_allclose(y, expected, **TOL)
  # Eval mode does not touch the running statistics.
  y2, updates = norm.apply(variables, x, train=False, mutable=["batch_stats"])
  chex.assert_trees_all_close(updates["batch_stats"], variables["batch_stats"], rtol=0, atol=0)
  np.testing.assert_array_equal(y2, y)


def test_switchable_eval_uses_running_stats_for_bn_part():
  x = random_input(SHAPES["image"], offset=1.0)
  c = x.shape[-1]
  norm, variables = init_and_randomize("switchable", x)
  rng = np.random.default_rng(8)
  run_mean, run_var = rng.normal(size=c), rng.uniform(0.5, 2.0, size=c)
  variables["batch_stats"] = {"mean": jnp.asarray(run_mean, jnp.float32),
                              "var": jnp.asarray(run_var, jnp.float32)}
  p = variables["params"]
  m_in, v_in = np_moments(x, (1, 2))
  m_ln, v_ln = np_moments(x, (1, 2, 3))
  wm, wv = softmax(p["mean_weight"]), softmax(p["var_weight"])
  mean = wm[0] * m_in + wm[1] * m_ln + wm[2] * run_mean
  var = wv[0] * v_in + wv[1] * v_ln + wv[2] * run_var
  expected = np_affine(np_standardize(x, mean, var), p["scale"], p["bias"])
  np.testing.assert_allclose(norm.apply(variables, x, train=False), expected, **TOL)


# ----------------------------------------------------------------------------------------
# Switchable norm.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["image", "sequence"])
def test_switchable_is_softmax_mix_of_in_ln_bn_moments(layout):
  x = random_input(SHAPES[layout], offset=0.5)
  norm, variables = init_and_randomize("switchable", x)
  p = variables["params"]
  # Unequal mixing weights so that a swapped or missing term is visible.
  p["mean_weight"] = jnp.asarray([1.5, -0.5, 0.3], jnp.float32)
  p["var_weight"] = jnp.asarray([-1.0, 0.8, 0.2], jnp.float32)
  y, updates = norm.apply(variables, x, train=True, mutable=["batch_stats"])
  np.testing.assert_allclose(y, np_switchable(x, p), **TOL)
  # Its BN part keeps running statistics like BatchNorm.
  axes = tuple(range(x.ndim - 1))
  x64 = np.asarray(x, np.float64)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * x64.mean(axes), **TOL)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * x64.var(axes), **TOL)


def test_switchable_default_weights_are_uniform():
  x = random_input(SHAPES["image"])
  variables = make_norm("switchable").init(jax.random.key(0), x)
  p = variables["params"]
  np.testing.assert_allclose(softmax(p["mean_weight"]), np.full(3, 1 / 3), rtol=1e-6)
  np.testing.assert_allclose(softmax(p["var_weight"]), np.full(3, 1 / 3), rtol=1e-6)


# ----------------------------------------------------------------------------------------
# Float32 statistics for bfloat16 inputs.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["batch", "layer", "instance", "group:4", "switchable", "rms"])
def test_bfloat16_input_uses_float32_statistics(spec):
  # A large offset makes bfloat16 statistics (E[x²] − E[x]² in 8 mantissa bits) useless.
  x = random_input((8, 4, 4, 8), offset=10.0, dtype=jnp.bfloat16)
  norm, variables = init_and_randomize(spec, x)
  y = apply_train(norm, variables, x)
  assert y.dtype == jnp.bfloat16
  x32 = np.asarray(x.astype(jnp.float32))  # the exact values the layer sees
  expected = np_reference(spec, x32, variables["params"])
  np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, rtol=2e-2, atol=3e-2)
  if spec == "batch":
    _, updates = norm.apply(variables, x, train=True, mutable=["batch_stats"])
    mean = updates["batch_stats"]["mean"]
    assert mean.dtype == jnp.float32
    np.testing.assert_allclose(mean, 0.1 * x32.astype(np.float64).mean((0, 1, 2)), rtol=1e-5)
    np.testing.assert_allclose(updates["batch_stats"]["var"],
                               0.9 + 0.1 * x32.astype(np.float64).var((0, 1, 2)), rtol=1e-4)


# ----------------------------------------------------------------------------------------
# Sequence padding masks.
# ----------------------------------------------------------------------------------------
def _padded_sequence(seed=3):
  b, t, d = 3, 6, 8
  x = np.asarray(random_input((b, t, d), seed=seed, offset=0.4))
  lengths = np.array([6, 4, 2])
  mask = np.arange(t)[None, :] < lengths[:, None]
  huge = x.copy()
  huge[~mask] = 1e6  # padding may hold anything
  return jnp.asarray(x), jnp.asarray(huge), jnp.asarray(mask)


@pytest.mark.parametrize("spec", ["batch", "instance", "switchable"])
def test_padding_is_excluded_from_statistics(spec):
  x, huge, mask = _padded_sequence()
  norm, variables = init_and_randomize(spec, x, mask=mask)
  if spec == "switchable":
    variables["params"]["mean_weight"] = jnp.asarray([0.4, -0.3, 0.9], jnp.float32)
    variables["params"]["var_weight"] = jnp.asarray([0.2, 0.5, -0.6], jnp.float32)
  y = np.asarray(apply_train(norm, variables, x, mask))
  y_huge = np.asarray(apply_train(norm, variables, huge, mask))
  m = np.asarray(mask)
  expected = np_reference(spec, x, variables["params"], mask)
  np.testing.assert_allclose(y[m], expected[m], **TOL)
  np.testing.assert_allclose(y_huge[m], expected[m], **TOL)
  # Without the mask the padding does change the statistics (the check can fail).
  y_unmasked = np.asarray(apply_train(norm, variables, x))
  assert np.max(np.abs(y_unmasked[m] - expected[m])) > 1e-3


def test_padding_is_excluded_from_running_stats():
  x, huge, mask = _padded_sequence()
  norm, variables = init_and_randomize("batch", x, mask=mask)
  _, updates = norm.apply(variables, huge, train=True, mask=mask, mutable=["batch_stats"])
  real = np.asarray(x, np.float64)[np.asarray(mask)]  # (num_real, D)
  np.testing.assert_allclose(updates["batch_stats"]["mean"], 0.1 * real.mean(0), **TOL)
  np.testing.assert_allclose(updates["batch_stats"]["var"], 0.9 + 0.1 * real.var(0), **TOL)


# ----------------------------------------------------------------------------------------
# Weight standardization.
# ----------------------------------------------------------------------------------------
def np_standardize_weight(w):
  w = np.asarray(w, np.float64)
  mean = w.mean(axis=(0, 1, 2), keepdims=True)
  std = w.std(axis=(0, 1, 2), keepdims=True)
  return (w - mean) / (std + EPS)


def test_standardize_weight_formula():
  w = jnp.asarray(np.random.default_rng(0).normal(0.3, 2.0, size=(3, 3, 4, 6)), jnp.float32)
  ws = standardize_weight(w)
  np.testing.assert_allclose(ws, np_standardize_weight(w), **TOL)
  np.testing.assert_allclose(np.mean(np.asarray(ws), axis=(0, 1, 2)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.std(np.asarray(ws), axis=(0, 1, 2)), 1.0, atol=1e-4)


@pytest.mark.parametrize("kernel_size,strides", [(3, 1), (3, 2), (1, 1)])
def test_conv_weight_standardization(kernel_size, strides):
  x = random_input((2, 6, 6, 4))
  conv = Conv(5, kernel_size, strides, weight_standardization=True)
  variables = conv.init(jax.random.key(0), x)
  kernel = variables["params"]["kernel"]
  assert kernel.shape == (kernel_size, kernel_size, 4, 5)
  pad = (kernel_size - 1) // 2
  expected = jax.lax.conv_general_dilated(
      x, jnp.asarray(np_standardize_weight(kernel), jnp.float32), (strides, strides),
      ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      precision=jax.lax.Precision.HIGHEST)
  y = conv.apply(variables, x)
  np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
  # Without the option the raw kernel is used, which differs.
  y_raw = Conv(5, kernel_size, strides).apply(variables, x)
  raw = jax.lax.conv_general_dilated(
      x, kernel, (strides, strides), ((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(y_raw, raw, rtol=1e-4, atol=1e-4)
  assert np.max(np.abs(np.asarray(y_raw) - np.asarray(y))) > 1e-2


# ----------------------------------------------------------------------------------------
# Registry and configuration errors.
# ----------------------------------------------------------------------------------------
def test_unknown_norm_names_bad_value_and_choices():
  with pytest.raises(ConfigError) as info:
    make_norm("grop:32")
  message = str(info.value)
  assert "grop" in message
  for name in NORMS.names():
    assert name in message
  assert "grop:32" not in NORMS


def test_norm_without_argument_rejects_one():
  with pytest.raises(ConfigError, match="batch"):
    make_norm("batch:2")


@pytest.mark.parametrize("spec", ["layer:x", "rms:hw", "group:abc", "group:0"])
def test_bad_norm_argument(spec):
  with pytest.raises(ConfigError):
    make_norm(spec)


def test_group_must_divide_channels():
  x = random_input((2, 3, 3, 8))
  norm = make_norm("group:3")
  with pytest.raises(ConfigError) as info:
    norm.init(jax.random.key(0), x)
  message = str(info.value)
  assert "3" in message and "8" in message
  assert "G=3" in message and "8 channels" in message


@pytest.mark.parametrize("bn_sync", ["foo", "group:3", "group:0", "group:x", "global:2",
                                     "local:1", "group"])
def test_bad_bn_sync(bn_sync):
  with pytest.raises(ConfigError) as info:
    NormContext(bn_sync=bn_sync, num_replicas=8)
  assert bn_sync.split(":")[0] in str(info.value)


@pytest.mark.parametrize("bn_sync,group_size", [("global", 8), ("local", 1), ("group:2", 2),
                                                ("group:4", 4), ("group:8", 8)])
def test_bn_sync_group_size(bn_sync, group_size):
  ctx = NormContext(bn_sync=bn_sync, num_replicas=8)
  assert ctx.group_size == group_size
  assert ctx.num_stat_groups == 8 // group_size


# ----------------------------------------------------------------------------------------
# The hand-written backward pass of per-channel normalization.
# ----------------------------------------------------------------------------------------
def _autodiff_normalize_affine(x, mean, var, scale, bias, eps):
  y = (x.astype(jnp.float32) - mean) * jax.lax.rsqrt(var + eps)
  return y * (1.0 if scale is None else scale) + (0.0 if bias is None else bias)


@pytest.mark.parametrize("stats", ["batch", "ghost", "instance"])
@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
def test_normalize_affine_gradients_equal_autodiff(stats, affine):
  """Gradients w.r.t. x, γ and β of the custom-VJP normalization equal plain autodiff,
  through statistics computed from x in every per-channel layout (global batch, ghost
  groups broadcast per sample, per-sample instance statistics)."""
  from resnorm_jax.layers.norms import normalize_affine
  k = jax.random.split(jax.random.key(0), 4)
  x = 3 * jax.random.normal(k[0], (8, 4, 4, 6)) + 1
  scale, bias, w = (jax.random.normal(k[1], (6,)), jax.random.normal(k[2], (6,)),
                    jax.random.normal(k[3], x.shape))

  def moments_of(x):
    if stats == "batch":
      return x.mean((0, 1, 2), keepdims=True), x.var((0, 1, 2), keepdims=True)
    if stats == "instance":
      return x.mean((1, 2), keepdims=True), x.var((1, 2), keepdims=True)
    xg = x.reshape((2, 4) + x.shape[1:])
    per_sample = lambda a: jnp.broadcast_to(a, (2, 4, 1, 1, 6)).reshape(8, 1, 1, 6)
    return per_sample(xg.mean((1, 2, 3), keepdims=True)), per_sample(xg.var((1, 2, 3),
                                                                             keepdims=True))

  def loss(fn, x, scale, bias):
    mean, var = moments_of(x)
    y = fn(x, mean, var, scale if affine[0] else None, bias if affine[1] else None, EPS)
    return jnp.sum(jnp.sin(y) * w)

  ours = jax.grad(lambda *a: loss(normalize_affine, *a), (0, 1, 2))(x, scale, bias)
  ref = jax.grad(lambda *a: loss(_autodiff_normalize_affine, *a), (0, 1, 2))(x, scale, bias)
  chex.assert_trees_all_close(ours, ref, rtol=1e-4, atol=1e-5)
  chex.assert_trees_all_close(loss(normalize_affine, x, scale, bias),
                              loss(_autodiff_normalize_affine, x, scale, bias), **TOL)


def test_batchnorm_backward_uses_two_reductions():
  """BatchNorm's backward pass reduces the cotangent twice (Σ∂L/∂y, Σ∂L/∂y·x̂), where
  autodiff of the same formula reduces it four times."""
  from resnorm_jax.layers.norms import normalize_affine
  x = jnp.ones((4, 2, 2, 3))
  mean, var = x.mean((0, 1, 2), keepdims=True), x.var((0, 1, 2), keepdims=True)
  args = (x, mean, var, jnp.ones(3), jnp.zeros(3))

  def full_reductions(fn):
    _, vjp = jax.vjp(lambda *a: fn(*a, EPS), *args)
    jaxpr = jax.make_jaxpr(vjp)(x).jaxpr
    eqns = [e for e in jaxpr.eqns]
    for e in jaxpr.eqns:  # the custom rule's body sits in a nested jaxpr
      for sub in jax.core.jaxprs_in_params(e.params):
        eqns.extend(sub.eqns)
    return sum(e.primitive.name == "reduce_sum" and e.invars[0].aval.shape == x.shape
               for e in eqns)

  assert full_reductions(normalize_affine) == 2
  assert full_reductions(_autodiff_normalize_affine) == 4
