"""cpu_workarounds.canonicalize_convs: same values, canonical convolutions inside loops."""

import re

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
from jax import lax

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


def test_scanned_resnet_train_step_same_with_and_without_the_workarounds():
  """The step builder applies the workarounds to scanned CPU steps (jit and shard_map
  styles); ``train.cpu_workarounds=False`` switches them off and changes no number."""
  from resnorm_jax import models
  from test_training import assert_states_close, run_steps, tiny_config
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
  assert_states_close(fixed, plain)
  assert_states_close(sharded, plain)
