"""CIFAR ResNet family: shapes, published parameter counts, every variant trains, options."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax import config as config_lib, summary
from resnorm_jax import validation
from resnorm_jax.layers import NORMS, UNIT_ORDERINGS, NormContext
from resnorm_jax.errors import ConfigError
from resnorm_jax.models.resnet import CifarResNet, cifar_resnet, resolve_block
from helpers import assert_trees_close_to_rounding

IMAGES = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 8, 3)), jnp.float32)


def param_count(model, shape=(1, 32, 32, 3)):
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(shape),
                                                train=False))
  return sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(variables["params"]))


@pytest.mark.parametrize("depth,published", [(110, 1.7e6), (164, 1.7e6),
                                             pytest.param(1001, 10.2e6, marks=pytest.mark.slow)])
def test_parameter_counts_match_he_2016(depth, published):
  assert abs(param_count(CifarResNet(depth=depth)) - published) / published < 0.03


@pytest.mark.parametrize("depth,block,n", [(20, "basic", 3), (56, "basic", 9),
                                           (110, "basic", 18), (1202, "basic", 200),
                                           (164, "bottleneck", 18), (1001, "bottleneck", 111)])
def test_depths_resolve_to_the_papers_units(depth, block, n):
  assert resolve_block(depth) == (block, n)


def test_invalid_depth_lists_valid_depths():
  with pytest.raises(ConfigError, match=r"model.depth=111 .* 6n\+2 .* 110"):
    resolve_block(111)


@pytest.mark.parametrize("depth,classes", [(20, 10), (164, 100)])
def test_output_shapes(depth, classes):
  model = CifarResNet(depth=depth, num_classes=classes, width=4)
  logits = jax.eval_shape(lambda: model.init_with_output(
      jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False)[0])
  assert logits.shape == (2, classes)


def test_determinism_from_the_seed():
  model = CifarResNet(depth=8, width=4)
  a = model.init(jax.random.key(3), IMAGES, train=False)
  b = model.init(jax.random.key(3), IMAGES, train=False)
  c = model.init(jax.random.key(4), IMAGES, train=False)
  chex.assert_trees_all_equal(a, b)
  assert not np.allclose(a["params"]["stem_conv"]["kernel"], c["params"]["stem_conv"]["kernel"])


NORM_SPECS = ["batch", "layer", "instance", "group:2", "switchable", "rms", "none"]


@pytest.mark.parametrize("unit", UNIT_ORDERINGS.names())
def test_one_step_gradient_is_finite_for_every_unit_and_norm(unit):
  assert {s.split(":")[0] for s in NORM_SPECS} == set(NORMS.names())
  labels = jnp.arange(4) % 10
  for norm in NORM_SPECS:
    model = cifar_resnet(8, width=4, unit=unit, norm=norm)
    variables = model.init(jax.random.key(0), IMAGES, train=False)

    def loss(params):
      logits, _ = model.apply({**variables, "params": params}, IMAGES, train=True,
                              mutable=["batch_stats"])
      return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), labels])

    value, grads = jax.value_and_grad(loss)(variables["params"])
    assert np.isfinite(value), (unit, norm)
    norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
    assert all(np.isfinite(norms)) and max(norms) > 0, (unit, norm)


@pytest.mark.parametrize("variant", [
    dict(skip="xskip", skip_lambda=0.5), dict(skip="xskip_ln", skip_lambda=2.0),
    dict(skip="rskip_ln", skip_lambda=2.0), dict(skip="rskip_bn:3"), dict(skip="pre_ln"),
    dict(skip="deepnorm"), dict(skip="rezero"), dict(shortcut="exclusive_gate"),
    dict(shortcut="conv1x1"), dict(weight_standardization=True, norm="group:2"),
    dict(unit="original", shortcut="constant:0.5,1")])
def test_combinators_and_shortcuts_plug_into_the_resnet(variant):
  model = cifar_resnet(8, width=4, **variant)
  variables = model.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, IMAGES,
                         train=False)
  logits, _ = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
  assert logits.shape == (4, 10) and bool(jnp.all(jnp.isfinite(logits)))


def _stack_units(params, n):
  """Unrolled parameters -> the scanned layout (units 2..n of a stage stacked on axis 0)."""
  out = {k: v for k, v in params.items() if "_unit" not in k or k.endswith("_unit1")}
  for stage in (1, 2, 3):
    units = [params[f"stage{stage}_unit{i}"] for i in range(2, n + 1)]
    out[f"stage{stage}_units"] = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *units)
  return out


def test_scanned_stages_compute_the_same_function():
  unrolled = cifar_resnet(20, width=4, norm="layer")
  scanned = cifar_resnet(20, width=4, norm="layer", scan_stages=True, remat=True)
  variables = unrolled.init(jax.random.key(0), IMAGES, train=False)
  stacked = {"params": _stack_units(variables["params"], 3)}
  chex.assert_trees_all_equal_shapes(
      stacked, scanned.init(jax.random.key(0), IMAGES, train=False))
  # The longest reductions: LayerNorm statistics and weight gradients over 4 images of
  # 8 x 8 positions (x 4 channels for the norm), the same in both programs up to order.
  terms = IMAGES.shape[0] * 8 * 8 * 4
  assert_trees_close_to_rounding(jax.jit(scanned.apply)(stacked, IMAGES),
                                 jax.jit(unrolled.apply)(variables, IMAGES), terms, "logits")
  grad = lambda m, v: jax.jit(jax.grad(
      lambda p: jnp.sum(m.apply({"params": p}, IMAGES) ** 2)))(v["params"])
  assert_trees_close_to_rounding(grad(scanned, stacked),
                                 _stack_units(grad(unrolled, variables), 3), terms,
                                 "gradients ")


def test_bfloat16_compute_keeps_float32_parameters_and_statistics():
  model = CifarResNet(depth=8, width=4, dtype=jnp.bfloat16)
  variables = model.init(jax.random.key(0), IMAGES, train=False)
  logits, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(updates))
  reference = CifarResNet(depth=8, width=4).apply(variables, IMAGES, train=True,
                                                  mutable=["batch_stats"])[0]
  np.testing.assert_allclose(logits, reference, atol=0.1, rtol=0.05)


def test_summary_flops_and_params_are_analytic():
  config = config_lib.base_config()
  config.model.depth = 20
  model, inputs, kwargs, extra = summary.summary_inputs(config)
  assert extra == 0
  rows, params, flops = summary.model_summary(model, inputs, init_kwargs=kwargs,
                                              apply_kwargs=kwargs)
  # ResNet-20 multiply-adds by hand: stem, 9 basic units, 2 projections, classifier.
  conv = lambda cin, cout, k, hw: cin * cout * k * k * hw * hw
  macs = (conv(3, 16, 3, 32) + 6 * conv(16, 16, 3, 32)
          + conv(16, 32, 3, 16) + 5 * conv(32, 32, 3, 16) + conv(16, 32, 1, 16)
          + conv(32, 64, 3, 8) + 5 * conv(64, 64, 3, 8) + conv(32, 64, 1, 8) + 64 * 10)
  assert flops == 2 * macs
  assert params == param_count(model) == sum(r.params for r in rows)
  assert [r.name for r in rows][:2] == ["stem_conv", "stage1_unit1"]
  assert "0.0816" in summary.format_table(rows, params, flops)


def test_group_norm_that_does_not_divide_a_stage_is_rejected_before_compiling():
  config = config_lib.base_config()
  config.model.norm = "group:32"
  with pytest.raises(ConfigError, match=r"G=32 does not divide the \[16\] channels"):
    validation.validate(config, 1)


def transformer_config(**model):
  config = config_lib.base_config()
  config.model.name, config.model.norm, config.model.skip = "transformer", "layer", "post_ln"
  for key, value in model.items():
    config.model[key] = value
  return config


def test_transformer_is_one_config_value_away_and_summarized():
  config = transformer_config(preset="tiny", vocab_size=100, summary_length=8)
  validation.validate_model(config)
  text = summary.summarize_config(config)
  assert "transformer preset=tiny" in text and "encoder" in text and "decoder" in text
  model, inputs, kwargs, extra = summary.summary_inputs(config)
  _, params, flops = summary.model_summary(model, inputs, init_kwargs=kwargs,
                                           apply_kwargs=kwargs, extra_flops=extra)
  # Dense layers: every weight matrix is used once per token, except the tied embedding
  # (counted in `extra` as the logits) and the cross-attention K/V (once per source token).
  assert flops > 2 * 8 * (params - 100 * model.config.d_model) and extra > 0


@pytest.mark.parametrize("model,message", [
    (dict(norm="instance"), "makes no sense in a Transformer"),
    (dict(preset="huge"), "model.preset='huge' is not valid"),
    (dict(skip="rskip_ln", skip_lambda=1.5), "integer"),
])
def test_transformer_config_errors(model, message):
  with pytest.raises(ConfigError, match=message):
    validation.validate_model(transformer_config(**model))


def test_training_a_transformer_without_translation_data_is_a_clear_error():
  with pytest.raises(ConfigError, match="trains on translation data"):
    validation.validate(transformer_config(), 1)
