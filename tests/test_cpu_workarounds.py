"""cpu_workarounds.canonicalize_convs: same values, canonical convolutions inside loops."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import jaxlib
import numpy as np
import pytest
from jax import lax

from helpers import assert_trees_close_to_rounding
from resnorm_jax import cpu_workarounds

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, k, stride=1):
  pad = (k.shape[0] - 1) // 2
  return lax.conv_general_dilated(x, k, (stride, stride), ((pad, pad), (pad, pad)),
                                  dimension_numbers=NHWC)


def _loss(params, x):
  """A scanned stack of 3x3 convs (one rematerialized), then a strided 1x1 conv."""
  k3, k1 = params

  def body(h, k):
    return jax.checkpoint(lambda a: jnp.tanh(_conv(a, k)))(h), None

  h, _ = lax.scan(body, x, k3)
  return jnp.sum(_conv(h, k1, 2) ** 2)


def _inputs():
  keys = jax.random.split(jax.random.key(0), 3)
  params = (0.2 * jax.random.normal(keys[0], (3, 3, 3, 4, 4)),
            0.5 * jax.random.normal(keys[1], (1, 1, 4, 6)))
  return params, jax.random.normal(keys[2], (2, 8, 8, 4))


def _conv_lines(hlo: str) -> list[str]:
  return re.findall(r"dim_labels=([^,\s]+)", hlo)


def test_gradients_match_and_loop_convolutions_are_canonical():
  params, x = _inputs()
  grad = jax.grad(_loss)
  plain = jax.jit(grad)
  fixed = jax.jit(cpu_workarounds.canonicalize_convs(grad))
  for a, b in zip(jax.tree_util.tree_leaves(plain(params, x)),
                  jax.tree_util.tree_leaves(fixed(params, x))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)
  before = _conv_lines(plain.lower(params, x).as_text(dialect="hlo"))
  after = _conv_lines(fixed.lower(params, x).as_text(dialect="hlo"))
  assert any(d != "b01f_01io->b01f" for d in before)   # autodiff's swapped layouts
  assert after and all(d == "b01f_01io->b01f" for d in after)


def test_pytrees_and_non_conv_functions_pass_through():
  fn = lambda d, s: {"y": jnp.cumsum(d["x"]) * s, "n": d["n"] + 1}
  wrapped = jax.jit(cpu_workarounds.canonicalize_convs(fn))
  out = wrapped({"x": jnp.arange(4.0), "n": jnp.int32(2)}, 3.0)
  np.testing.assert_allclose(out["y"], np.cumsum(np.arange(4.0)) * 3)
  assert int(out["n"]) == 3


def test_other_dimension_numbers_are_rewritten_exactly():
  x = jax.random.normal(jax.random.key(1), (2, 3, 9, 7))       # N C H W
  k = jax.random.normal(jax.random.key(2), (5, 3, 3, 3))       # O I H W
  f = lambda x, k: lax.conv_general_dilated(x, k, (2, 1), ((1, 1), (0, 2)), rhs_dilation=(1, 2),
                                            dimension_numbers=("NCHW", "OIHW", "NHCW"))
  want = f(x, k)
  got = jax.jit(cpu_workarounds.canonicalize_convs(f))(x, k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  jaxpr = jax.make_jaxpr(cpu_workarounds.canonicalize_convs(f))(x, k)
  convs = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "conv_general_dilated"]
  assert len(convs) == 1 and cpu_workarounds.is_canonical(convs[0].params)


def test_rewritten_jaxpr_type_checks():
  params, x = _inputs()
  closed = jax.make_jaxpr(jax.grad(_loss))(params, x)
  rewritten = cpu_workarounds._rewrite(closed)
  assert rewritten is not closed
  jax.extend.core.check_jaxpr(rewritten.jaxpr)
  assert cpu_workarounds._rewrite(rewritten) is rewritten     # nothing left to rewrite


@pytest.mark.slow
def test_scanned_resnet_train_step_same_with_and_without_the_workarounds():
  """The step builder applies the workarounds to scanned CPU steps (jit and shard_map
  styles); ``train.cpu_workarounds=False`` switches them off and changes no number."""
  from resnorm_jax import models
  from helpers import TINY_TERMS, assert_states_close, run_steps, tiny_config
  settings = {"model.depth": 20, "model.scan_stages": True, "parallel.num_devices": 1}
  fixed = run_steps(tiny_config(**settings), steps=2)
  sharded = run_steps(tiny_config(**dict(settings, **{"parallel.num_devices": 4,
                                                      "parallel.mode": "shard_map"})), steps=2)
  off = tiny_config(**dict(settings, **{"train.cpu_workarounds": False}))
  model = models.build_model(off, models.norm_context(off), models.DataInfo(10, (32, 32, 3)))
  step = lambda state: state
  assert not model.materialize_stream_grad
  assert cpu_workarounds.apply(step, off, "cpu", model) is step
  assert cpu_workarounds.apply(step, tiny_config(**settings), "gpu", model) is step
  plain = run_steps(off, steps=2)
  assert_states_close(fixed, plain, 2 * TINY_TERMS, "workarounds on, 2 steps:")
  assert_states_close(sharded, plain, 2 * TINY_TERMS, "on, shard_map, 2 steps:")


# ----------------------------------------------------------------------------------------
# Convolutions on XLA's own kernels instead of YNNPACK's (compiler_options).
# ----------------------------------------------------------------------------------------
_needs_verified_jaxlib = pytest.mark.skipif(
    not cpu_workarounds.library_fusions_known(),
    reason=f"jaxlib {jaxlib.__version__}: the compiler option is verified on 0.10.x only")


def test_compiler_options_are_gated_on_platform_version_and_config():
  from helpers import tiny_config
  assert cpu_workarounds.compiler_options("gpu") == {}
  assert cpu_workarounds.compiler_options("tpu") == {}
  assert cpu_workarounds.compiler_options("cpu", version="0.11.1") == {}
  assert cpu_workarounds.compiler_options("cpu", version="0.10.1") == {}
  assert cpu_workarounds.xla_flag(version="0.11.0") == ""
  assert cpu_workarounds.compiler_options(
      "cpu", tiny_config(**{"train.cpu_workarounds": False}), version="0.10.2") == {}
  on = cpu_workarounds.compiler_options("cpu", tiny_config(), version="0.10.2")
  assert on == {cpu_workarounds.YNN_FUSION_OPTION:
                "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
  assert cpu_workarounds.xla_flag(version="0.10.2") == (
      f"--{cpu_workarounds.YNN_FUSION_OPTION}=individual_dot,reduce")


@_needs_verified_jaxlib
def test_resnet_gradients_on_xla_convolutions_equal_the_library_path():
  """The same ResNet gradient compiled both ways: YNNPACK convolutions (jaxlib's default)
  and XLA's own (``compiler_options``), equal within float32 rounding.

  The two kernels sum the same products in another order: equal to float32 rounding
  (helpers.assert_trees_close_to_rounding), with n the longest sum, a weight gradient's
  N*H*W = 8*16*16 products.  A real difference (a wrong padding, stride or layout) is O(1).
  """
  from resnorm_jax import models
  from helpers import tiny_config
  config = tiny_config(**{"model.width": 16})
  model = models.build_model(config, models.norm_context(config),
                             models.DataInfo(10, (16, 16, 3)))
  x = jax.random.normal(jax.random.key(0), (8, 16, 16, 3))
  y = jnp.arange(8) % 10
  variables = model.init(jax.random.key(1), x, train=False)

  def loss(params):
    logits, _ = model.apply({**variables, "params": params}, x, train=True,
                            mutable=["batch_stats"])
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), y])

  grad = jax.grad(loss)
  # The in-process default is the suite's XLA_FLAGS setting (tests/conftest.py): jaxlib's
  # own default is asked for explicitly.
  library = jax.jit(grad, compiler_options=cpu_workarounds.JAXLIB_DEFAULT_OPTIONS)
  ours = jax.jit(grad, compiler_options=cpu_workarounds.compiler_options("cpu", config))
  hlo = {name: f.lower(variables["params"]).compile().as_text()
         for name, f in (("library", library), ("ours", ours))}
  assert cpu_workarounds.library_convolutions(hlo["library"]) > 0    # the paths differ
  assert cpu_workarounds.library_convolutions(hlo["ours"]) == 0
  assert_trees_close_to_rounding(ours(variables["params"]), library(variables["params"]),
                                 8 * 16 * 16, "gradients ")


@_needs_verified_jaxlib
def test_train_and_eval_steps_run_no_convolution_through_the_library():
  """The engine's compiled train and eval steps on CPU carry the option.  (With
  ``train.cpu_workarounds=False`` they carry none and follow the process's XLA_FLAGS, which
  in this suite hold the same setting: that case is the gating test above.)"""
  from resnorm_jax import parallelism, training
  from helpers import tiny_config
  config = tiny_config(**{"parallel.num_devices": 1})
  task = training.build_task(config, parallelism.make_mesh(1))
  task.setup(workdir="")
  state = training.init_state(task)
  step = training.make_train_step(task)
  assert cpu_workarounds.library_convolutions(
      step.lower(state, task.inputs(0)).compile().as_text()) == 0
  images, labels = task.arrays[2:]
  idx, weights = jnp.arange(16, dtype=jnp.int32), jnp.ones(16, jnp.float32)
  eval_hlo = task.eval_step.lower(state, images, labels, idx, weights).compile().as_text()
  assert cpu_workarounds.library_convolutions(eval_hlo) == 0
