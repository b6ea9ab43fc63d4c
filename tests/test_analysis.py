"""Diagnostics: exact statistics, the tangent propagation, the archetypes' ordering,
shattered gradients, gradient scale through scaled skips, and the resnorm-analyze CLI."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax.analysis import common, grad_scale, moments, shattering, stats
from resnorm_jax.errors import ConfigError
from helpers import cifar_records, write_tarball

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))


def moments_config(**overrides):
  c = moments.default_config()
  c.update(dict(width=8, spatial=4, batch=8, ff_units=3, res_units=3, draws=2, fit_start=1,
                inputs="gaussian"))
  c.update(overrides)
  return c


# ----------------------------------------------------------------------------------------
# Statistics on hand-checkable inputs.
# ----------------------------------------------------------------------------------------
def test_chi_of_a_scaled_copy_and_centring():
  x = jax.random.normal(jax.random.key(0), (4, 3, 3, 5)) + 7.0   # a per-channel offset
  xc = stats.centre(x)
  np.testing.assert_allclose(np.mean(np.asarray(xc), axis=(0, 1, 2)), 0.0, atol=1e-5)
  # dx = x̂: χ = 1 (the signal's offset does not count); dx = 3 x̂: χ = 3.
  np.testing.assert_allclose(stats.log_chi(x, xc), 0.0, atol=1e-6)
  np.testing.assert_allclose(stats.log_chi(x, 3.0 * xc), np.log(3.0), atol=1e-5)


@pytest.mark.parametrize("iters", [0, 50])
def test_effective_rank_rank_one_and_isotropic(iters):
  u = jax.random.normal(jax.random.key(1), (512, 1))
  v = jax.random.normal(jax.random.key(2), (1, 16))
  rank_one = u * v + 3.0                                   # rank 1 after centring
  np.testing.assert_allclose(stats.effective_rank(rank_one, iters), 1.0, rtol=1e-4)
  # [I; −I]: centred, covariance I/C exactly -> r_eff = C.
  eye = jnp.eye(16)
  np.testing.assert_allclose(stats.effective_rank(jnp.concatenate([eye, -eye]), 0), 16.0,
                             rtol=1e-5)
  # Gaussian features, n >> C: r_eff close to C (Marchenko-Pastur edge (1+sqrt(C/n))²).
  iso = jax.random.normal(jax.random.key(3), (20000, 16))
  reff = float(stats.effective_rank(iso, iters))
  assert 0.85 * 16 < reff <= 16.0 * 1.02
  # The power iteration is a lower bound of λ_max: never below the exact r_eff by much.
  assert reff >= 0.99 * float(stats.effective_rank(iso, 0))


def test_kurtosis_gaussian_and_two_point():
  g = jax.random.normal(jax.random.key(4), (200000, 3))
  np.testing.assert_allclose(stats.kurtosis(g), 3.0, rtol=0.03)
  signs = jnp.where(jax.random.bernoulli(jax.random.key(5), 0.5, (100000, 2)), 1.0, -1.0)
  np.testing.assert_allclose(stats.kurtosis(signs), 1.0, rtol=1e-3)
  dead = jnp.concatenate([signs, jnp.zeros((100000, 1))], axis=1)   # a constant channel
  np.testing.assert_allclose(stats.kurtosis(dead), 1.0, rtol=1e-3)


def test_fits_recover_exponential_and_power_laws():
  depth = np.arange(1, 101, dtype=float)
  exp_fit = stats.fit_growth(depth, 0.15 * depth + 0.3)
  assert exp_fit["better"] == "exponential"
  np.testing.assert_allclose(exp_fit["exponential"]["rate"], 0.15, rtol=1e-9)
  np.testing.assert_allclose(exp_fit["exponential"]["factor"], np.exp(0.15), rtol=1e-9)
  pow_fit = stats.fit_growth(depth, 0.5 * np.log(depth) - 1.0)
  assert pow_fit["better"] == "power"
  np.testing.assert_allclose(pow_fit["power"]["exponent"], 0.5, rtol=1e-9)


def test_aggregate_percentiles():
  agg = stats.aggregate(np.arange(11.0)[:, None] * np.ones((1, 3)))
  assert agg["mean"] == [5.0] * 3 and agg["p10"] == [1.0] * 3 and agg["p90"] == [9.0] * 3


def test_run_draws_batches_and_pads():
  keys = common.draw_keys(0, 5)
  out = common.run_draws(lambda k: {"a": jax.random.normal(k, (3,))}, keys, 2)["a"]
  assert out.shape == (5, 3) and len(np.unique(out[:, 0])) == 5


@pytest.mark.parametrize("name,module", [("moments", moments), ("shattering", shattering),
                                         ("grad_scale", grad_scale)])
def test_every_scale_of_every_config_file_validates(name, module):
  config_file = __import__(name)   # configs/<name>.py
  for scale in config_file.SCALES:
    config = config_file.get_config(scale)
    assert config.analysis == name
    module.validate(config)


# ----------------------------------------------------------------------------------------
# Moments through the training code's units.
# ----------------------------------------------------------------------------------------
def test_identity_network_keeps_chi_one_and_the_rank():
  # ReZero units (y = x + α F(x), α = 0 at init) are the identity: χ = 1 at every layer.
  config = moments_config(variants="full_preact/batch/rezero", draws=1)
  per_draw = common.run_draws(moments.draw_function(moments.parse_variant(config.variants),
                                                    config), common.draw_keys(0, 1), 1)
  np.testing.assert_allclose(per_draw["log_chi"], 0.0, atol=1e-5)
  reff = per_draw["reff_signal"]
  np.testing.assert_allclose(reff, np.broadcast_to(reff[:, :1], reff.shape), rtol=1e-4)


@pytest.mark.parametrize("name", ["bn_res", "bn_ff", "full_preact/group:4/xskip_ln:2"])
def test_tangent_equals_central_finite_difference(name):
  variant = moments.parse_variant(name)
  unit = moments.build_unit(variant, 8, 3)
  key = jax.random.key(0)
  x = jax.random.normal(key, (8, 4, 4, 8))
  dx = jax.random.normal(jax.random.fold_in(key, 1), x.shape)
  params = [unit.init(moments._rngs(jax.random.fold_in(key, 10 + i)), x, train=True)
            for i in range(3)]

  def net(h):
    for v in params:
      h = unit.apply(v, h, train=True, mutable=["batch_stats"])[0]
    return h

  def tangent(h, dh):
    for v in params:
      h, dh = moments.unit_tangent(unit, v, h, dh, bn_tangent="exact", key=key)
    return dh

  # ReLU kinks make the difference quotient's error first order in eps (measured: 17% at
  # 1e-2, 0.4% at 1e-4 for bn_ff); float32 rounding stays ~1e-3 at 1e-4.
  eps = 1e-4
  fd = (net(x + eps * dx) - net(x - eps * dx)) / (2 * eps)
  jvp = tangent(x, dx)
  err = float(jnp.linalg.norm(fd - jvp) / jnp.linalg.norm(jvp))
  assert err < 2e-2, err


def _circular_conv_stride(images, kernel, stride):
  """Reference: a 3x3 convolution with wrap-around padding of 1, by explicit sums."""
  _, h, w, _ = images.shape
  out = np.zeros((images.shape[0], h // stride, w // stride, kernel.shape[-1]))
  for i in range(0, h, stride):
    for j in range(0, w, stride):
      patch = images[:, [(i + a - 1) % h for a in range(3)]][:, :, [(j + b - 1) % w
                                                                      for b in range(3)]]
      out[:, i // stride, j // stride] = np.einsum("nabc,abcd->nd", patch, kernel)
  return out


def test_periodic_boundary_is_a_circular_convolution():
  from resnorm_jax.layers import Conv
  conv = Conv(4, 3)
  x = jax.random.normal(jax.random.key(0), (2, 5, 5, 3))
  variables = conv.init(jax.random.key(1), x)
  with moments.boundary_context("periodic"):
    y = np.asarray(conv.apply(variables, x))
  ref = _circular_conv_stride(np.asarray(x), np.asarray(variables["params"]["kernel"]), 1)
  np.testing.assert_allclose(y, ref, atol=1e-5)
  with moments.boundary_context("zero"):   # the training models' padding: unchanged
    np.testing.assert_array_equal(conv.apply(variables, x), conv.apply(variables, x))
    assert not np.allclose(conv.apply(variables, x), ref, atol=1e-3)


def test_frozen_statistics_tangent_is_close_to_the_exact_one():
  # Labatie's "BN divides by x's std" vs the exact jvp: they differ by the projection of
  # dx on the per-channel mean and on x̂, a fraction ~2/(B·H·W) per BN layer.
  variant = moments.parse_variant("bn_ff")
  unit = moments.build_unit(variant, 8, 1)
  x = jax.random.normal(jax.random.key(0), (32, 8, 8, 8))
  dx = jax.random.normal(jax.random.key(1), x.shape)
  v = unit.init(moments._rngs(jax.random.key(2)), x, train=True)
  y1, exact = moments.unit_tangent(unit, v, x, dx, bn_tangent="exact", key=None)
  y2, frozen = moments.unit_tangent(unit, v, x, dx, bn_tangent="frozen", key=None)
  np.testing.assert_allclose(y1, y2, atol=1e-5)
  rel = float(jnp.linalg.norm(exact - frozen) / jnp.linalg.norm(frozen))
  assert 0 < rel < 0.1, rel


def test_signal_rescaling_only_for_homogeneous_units_and_exact_there():
  assert moments.is_homogeneous(moments.ARCHETYPES["vanilla_res"], 8)
  assert moments.is_homogeneous(moments.ARCHETYPES["vanilla_ff"], 8)
  assert not moments.is_homogeneous(moments.ARCHETYPES["bn_res"], 8)
  variant = moments.ARCHETYPES["vanilla_res"]
  keys = common.draw_keys(0, 1)
  out = [common.run_draws(moments.draw_function(variant, moments_config(rescale=r)), keys, 1)
         for r in (True, False)]
  for stat in ("log_chi", "reff_signal", "reff_noise"):
    np.testing.assert_allclose(out[0][stat], out[1][stat], rtol=2e-3, atol=2e-4)


@pytest.fixture(scope="module")
def archetypes():
  # Robust: the margins below held for seeds 0-5 at this size (smallest ratios 1.98 for
  # log χ, 1.44 for r_eff).
  config = moments_config(width=16, spatial=4, batch=16, ff_units=12, res_units=12, draws=2,
                          fit_start=2)
  return moments.run(config, log=lambda s: None)["variants"]


def test_archetypes_qualitative_ordering(archetypes):
  final = {n: r["final"] for n, r in archetypes.items()}
  assert all(r["final"]["layer"] == 24 for r in archetypes.values())
  # Norm without skip: χ grows exponentially (~0.15 per layer, ×1.17), far above the rest.
  assert archetypes["bn_ff"]["fits"]["log_chi"]["exponential"]["rate"] > 0.1
  for name in ("vanilla_ff", "vanilla_res", "bn_res"):
    assert final["bn_ff"]["log_chi"] > 1.5 * final[name]["log_chi"], (name, final)
  # Norm + skip: χ grows much more slowly, and the signal keeps its rank; without norm it
  # collapses towards rank 1.
  assert final["bn_res"]["log_chi"] < 0.5 * final["bn_ff"]["log_chi"]
  for name in ("vanilla_ff", "vanilla_res"):
    assert final["bn_res"]["reff_signal"] > 1.2 * final[name]["reff_signal"], (name, final)


def test_unnormalized_collapse_comes_from_the_inputs_norm_variation():
  # A net without norm is degree-1 homogeneous: feature vectors align while their norms
  # keep the inputs' variation, which then holds all the variance.  Natural images vary in
  # contrast, i.i.d. Gaussian images do not: the signal collapses far more with photos.
  # Robust: gaussian/photos r_eff ratio 1.70-2.81 over seeds 0-5 at this size.
  reff = {}
  for inputs in ("photos", "gaussian"):
    config = moments_config(width=16, spatial=4, batch=16, ff_units=12, draws=2,
                            fit_start=2, inputs=inputs, variants="vanilla_ff")
    reff[inputs] = moments.run(config, log=lambda s: None)["variants"]["vanilla_ff"][
        "final"]["reff_signal"]
  assert reff["gaussian"] > 1.3 * reff["photos"], reff


def test_moments_results_layout(archetypes):
  r = archetypes["bn_res"]
  assert r["unit"] == list(range(13)) and r["layer"] == list(range(0, 25, 2))
  for stat in moments.STATS:
    assert set(r[stat]) == {"mean", "p10", "p90"} and len(r[stat]["mean"]) == 13
  assert r["log_chi"]["mean"][0] == 0.0
  assert r["fits"]["log_chi"]["better"] in ("exponential", "power")
  assert "bn_res" in moments.table({"variants": archetypes})


def test_moments_config_errors():
  with pytest.raises(ConfigError, match="valid names: vanilla_ff, bn_ff"):
    moments.validate(moments_config(variants="bn_fff"))
  with pytest.raises(ConfigError, match="unknown unit 'preact'"):
    moments.validate(moments_config(variants="preact/batch"))
  with pytest.raises(ConfigError, match="valid G for 8 channels"):
    moments.validate(moments_config(variants="full_preact/group:3"))
  with pytest.raises(ConfigError, match="tap_every=2 must divide the 3 units"):
    moments.validate(moments_config(tap_every=2))
  with pytest.raises(ConfigError, match="bn_tangent='exactly'.*valid choices: exact, frozen"):
    moments.validate(moments_config(bn_tangent="exactly"))
  with pytest.raises(ConfigError, match=r"'digits' are 8x8 images.*must divide 8.*\[1, 2, 4, 8\]"):
    moments.validate(moments_config(inputs="digits", spatial=3))
  with pytest.raises(ConfigError, match="'digits' has 1797 images: needs batch <= 1797"):
    moments.validate(moments_config(inputs="digits", spatial=8, batch=1800))
  with pytest.raises(ConfigError, match="needs spatial <= 213"):
    moments.validate(moments_config(inputs="photos", spatial=300))
  with pytest.raises(ConfigError, match="data_source='hub'.*auto, tfds, tarball"):
    moments.validate(moments_config(data_source="hub"))
  import moments as moments_file   # configs/moments.py
  with pytest.raises(ConfigError, match="unknown variant 'huge'.*valid: tiny, cpu"):
    moments_file.get_config("huge")
  assert moments_file.get_config("paper,bn_res").variants == "bn_res"
  assert moments.expand_variants("archetypes,bn_ff") == list(moments.ARCHETYPES)


@pytest.mark.parametrize("stride", [1, 2])
def test_random_stem_is_a_periodic_convolution_of_signal_and_noise(stride):
  images = np.asarray(jax.random.normal(jax.random.key(0), (2, 8, 8, 3)))
  noise = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 3)))
  key = jax.random.key(2)
  x, dx = moments.random_stem(key, images, noise, 5, stride, "periodic")
  kernel = np.asarray(jax.random.normal(key, (3, 3, 3, 5))) / np.sqrt(27)
  np.testing.assert_allclose(x, _circular_conv_stride(images, kernel, stride), atol=1e-4)
  np.testing.assert_allclose(dx, _circular_conv_stride(noise, kernel, stride), atol=1e-4)
  zero_x, _ = moments.random_stem(key, images, noise, 5, stride, "zero")
  np.testing.assert_allclose(zero_x[:, 1:-1, 1:-1], x[:, 1:-1, 1:-1], atol=1e-5)
  assert not np.allclose(zero_x[:, 0], x[:, 0])


@pytest.mark.parametrize("inputs,spatial", [("photos", 4), ("digits", 4), ("gaussian", 4)])
def test_inputs_are_normalized_batches_of_distinct_images(inputs, spatial):
  config = moments_config(inputs=inputs, spatial=spatial, width=6, batch=16)
  moments.validate(config)
  images = moments.input_images(config)
  x, dx = jax.jit(lambda k, *d: moments.make_inputs(k, config, *d))(
      jax.random.key(3), *([] if images is None else [jnp.asarray(images)]))
  assert x.shape == dx.shape == (16, spatial, spatial, 6)
  np.testing.assert_allclose(stats.second_moment(stats.centre(x)), 1.0, rtol=1e-5)
  np.testing.assert_allclose(stats.second_moment(dx), 1.0, rtol=1e-5)
  flat = np.asarray(x).reshape(16, -1)
  assert len({tuple(np.round(r, 4)) for r in flat}) == 16    # no image drawn twice
  if inputs == "photos":   # crops of 2·spatial pixels of the two photographs, stride 2
    assert images.shape == (moments.PHOTO_CROPS, 8, 8, 3) and images.dtype == np.uint8
    assert images.std(axis=(1, 2, 3)).std() > 5   # natural images: contrast varies
  wrong = np.zeros((4, 8, 8, 1), np.float32) if images is None else None
  with pytest.raises(ValueError, match="needs images=input_images"):
    moments.make_inputs(jax.random.key(0), config, wrong)


def test_cifar_inputs_read_the_training_images(tmp_path):
  members = {}
  for i in range(1, 6):
    members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = cifar_records(8, 1, 10, seed=i)[0]
  members["cifar-10-batches-bin/test_batch.bin"] = cifar_records(2, 1, 10, seed=9)[0]
  write_tarball(tmp_path / "cifar-10-binary.tar.gz", members)
  config = moments_config(inputs="cifar10", data_dir=str(tmp_path), spatial=16, batch=32,
                          width=4, variants="vanilla_ff,bn_res")
  moments.validate(config)
  assert moments.input_images(config).shape == (40, 32, 32, 3)
  result = moments.run(config, log=lambda *_: None)
  assert set(result["variants"]) == {"vanilla_ff", "bn_res"}
  with pytest.raises(ConfigError, match="has 40 images: needs batch <= 40"):
    moments.validate(moments_config(inputs="cifar10", data_dir=str(tmp_path), spatial=16,
                                    batch=41))
  with pytest.raises(ConfigError, match="no cifar-10-binary.tar.gz in data.data_dir"):
    moments.validate(moments_config(inputs="cifar10", data_dir=str(tmp_path / "none"),
                                    spatial=16))


# ----------------------------------------------------------------------------------------
# Shattered gradients.
# ----------------------------------------------------------------------------------------
def test_lag1_correlation_exact_cases():
  np.testing.assert_allclose(shattering.lag1_correlation(jnp.ones(8)), 0.0)
  alternating = jnp.array([1.0, -1.0] * 8)
  np.testing.assert_allclose(shattering.lag1_correlation(alternating), -15 / 16, rtol=1e-6)
  assert shattering.lag1_correlation(jnp.linspace(0.0, 1.0, 256)) > 0.98


def test_input_gradients_hold_batch_statistics_fixed():
  # With BN statistics frozen, g_i depends on x_i only: equal to a per-point derivative of
  # the eval-mode network with those statistics.
  model = shattering.ShatterMLP(16, 3, shattering.VARIANTS["resnet_bn"], 0.1)
  x = jnp.linspace(-2, 2, 32)[:, None]
  variables = model.init(jax.random.key(0), x, train=True)
  g = shattering.input_gradients(model, variables, x)
  _, bs = model.apply(variables, x, train=True, mutable=["batch_stats"])
  frozen = {**variables, **bs}
  f = lambda z: model.apply(frozen, z.reshape(1, 1), train=False)[0]
  np.testing.assert_allclose(g, jax.vmap(jax.grad(f))(x[:, 0]), rtol=1e-4, atol=1e-6)


def test_shattering_plain_decays_faster_than_residual():
  c = shattering.default_config()
  c.update(dict(variants="plain_bn,resnet_bn", width=32, depths="2,12", grid=64, draws=6,
                draw_batch=6))
  out = shattering.run(c, log=lambda s: None)["variants"]
  plain, res = out["plain_bn"]["corr"]["mean"], out["resnet_bn"]["corr"]["mean"]
  assert plain[1] < res[1] - 0.2, (plain, res)
  assert plain[0] - plain[1] > res[0] - res[1], (plain, res)
  assert "plain_bn" in shattering.table({"variants": out})
  with pytest.raises(ConfigError, match="unknown shattering variant 'resnet_nb'"):
    shattering.validate(_with(shattering.default_config(), variants="resnet_nb"))
  with pytest.raises(ConfigError, match="depths: 'x' is not an integer"):
    shattering.validate(_with(shattering.default_config(), depths="1,x"))


def _with(config, **overrides):
  config.update(overrides)
  return config


# ----------------------------------------------------------------------------------------
# Gradient scale.
# ----------------------------------------------------------------------------------------
def test_grad_scale_xskip_explodes_and_xskip_ln_stays_bounded(tmp_path):
  c = grad_scale.default_config()
  c.draws = 2
  c.conv.update(dict(variants="xskip:2,xskip_ln:2", units=6, width=8, spatial=4, batch=4))
  c.transformer.variants = ""
  results = grad_scale.run(c, log=lambda s: None)
  out = results["conv"]
  grow = out["xskip:2"]
  # ~2^depth: the shortcut's λ = 2 per unit (plus the variance-preserving branch:
  # sqrt(λ² + 1) = 2.24).
  assert 1.8 < grow["growth_per_unit"] < 2.6, grow["growth_per_unit"]
  assert grow["input_over_output"] > 1.8 ** 6
  assert grow["he_prediction"] == 2.0
  flat = out["xskip_ln:2"]
  assert flat["he_prediction"] == 1.0 and flat["max_over_min"] < 2.0, flat["max_over_min"]
  assert 0.8 < flat["growth_per_unit"] < 1.25
  assert "xskip_ln:2" in grad_scale.table(results)
  from resnorm_jax.analysis import plots
  [png] = plots.grad_scale_figures(results, str(tmp_path))
  assert png.endswith("grad_scale_conv.png") and os.path.getsize(png) > 10_000


@pytest.mark.slow   # the default suite: the convolutional case above
def test_grad_scale_post_ln_vs_pre_ln_transformer(tmp_path):
  c = grad_scale.default_config()
  c.draws = 2
  c.conv.variants = ""
  c.transformer.update(dict(layers=2, d_model=16, num_heads=2, d_ff=32, vocab=32, batch=4,
                            length=8))
  results = grad_scale.run(c, log=lambda s: None)
  out = results["transformer"]
  # Xiong et al. 2020: Post-LN's gradients grow toward the output; Pre-LN's do not.
  post, pre = out["post_ln"]["decoder"], out["pre_ln"]["decoder"]
  assert post["growth_per_layer"] > 1.05 and pre["growth_per_layer"] < 1.0, (post, pre)
  assert post["last_over_first"] > 1.2 * pre["last_over_first"]
  assert "post_ln" in grad_scale.table(results)
  from resnorm_jax.analysis import plots
  [png] = plots.grad_scale_figures(results, str(tmp_path))
  assert png.endswith("grad_scale_transformer.png") and os.path.getsize(png) > 10_000


def test_grad_scale_config_errors():
  c = grad_scale.default_config()
  c.conv.variants, c.transformer.variants = "", ""
  with pytest.raises(ConfigError, match="both empty"):
    grad_scale.validate(c)
  c = grad_scale.default_config()
  c.conv.variants = "xskip_lm:2"
  with pytest.raises(ConfigError, match="unknown skip 'xskip_lm:2'; valid choices: skip, xskip"):
    grad_scale.validate(c)
  c = grad_scale.default_config()
  c.conv.ordering = "plain"
  with pytest.raises(ConfigError, match="has no shortcut"):
    grad_scale.validate(c)


# ----------------------------------------------------------------------------------------
# The resnorm-analyze command.
# ----------------------------------------------------------------------------------------
def analyze(*flags, workdir=None):
  args = [sys.executable, "-m", "resnorm_jax.analysis", *flags]
  if workdir is not None:
    args.append(f"--workdir={workdir}")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_cli_moments_writes_results_plots_and_table(tmp_path):
  proc = analyze("--config=configs/moments.py:tiny", "--config.variants=bn_res",
                 "--config.draws=1", workdir=tmp_path)
  assert proc.returncode == 0, proc.stderr
  results = json.load(open(tmp_path / "results.json"))
  assert results["analysis"] == "moments" and results["settings"]["width"] == 8
  bn_res = results["variants"]["bn_res"]
  assert len(bn_res["layer"]) == len(bn_res["log_chi"]["mean"]) == 4
  assert {"exponential", "power", "better"} <= set(bn_res["fits"]["log_chi"])
  for png in ("moments_chi.png", "moments_reff.png", "moments_kurtosis.png"):
    assert (tmp_path / png).stat().st_size > 10_000
  assert "dlogchi/layer" in proc.stdout and "bn_res" in proc.stdout


@pytest.mark.parametrize("flags,files", [
    (["--config=configs/shattering.py:tiny,plain_bn", "--config.depths=1,2"],
     ["shattering_corr.png", "shattering_gradients.png"]),
])
def test_cli_shattering(tmp_path, flags, files):
  proc = analyze(*flags, "--config.draws=2", workdir=tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert json.load(open(tmp_path / "results.json"))["seconds"] > 0
  for png in files:
    assert (tmp_path / png).stat().st_size > 10_000


@pytest.mark.parametrize("flags,message", [
    (["--config=configs/moments.py:bn_rse"], "unknown variant 'bn_rse' of configs/moments.py "
     "(did you mean 'bn_res'?)"),
    (["--config=configs/moments.py:tiny", "--config.variants=full_preact/batch/xskip:-1"],
     "lambda must be >= 0"),
    (["--config=configs/shattering.py", "--config.widht=3"], "widht"),
    (["--config=configs/quickstart.py"], "not an analysis config"),
])
def test_cli_invalid_config_is_one_line_exit_2(tmp_path, flags, message):
  proc = analyze(*flags, workdir=tmp_path / "out")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("resnorm-analyze: error:"), proc.stderr
  assert message in lines[0], lines[0]
  assert not (tmp_path / "out").exists()


def test_cli_url_workdir_is_one_line_exit_2():
  proc = analyze("--config=configs/moments.py:tiny", workdir="s3://bucket/moments")
  assert proc.returncode == 2, proc.stderr
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and ("--workdir=s3://bucket/moments: the scheme s3:// is not "
                              "supported") in lines[0], lines
  assert not os.path.exists(os.path.join(REPO, "s3:"))
