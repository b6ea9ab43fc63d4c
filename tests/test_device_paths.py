"""Paths that differ per backend: the non-finite guard's two forms, the CPU-only workarounds'
gating (checked by lowering for CUDA and TPU from this host), and the device-check command
(its CPU smoke run is a slow test)."""

import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import export

from resnorm_jax import cpu_workarounds
from resnorm_jax.training import TrainState, apply_gradients, resolve_guard

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------
# Non-finite guard: lax.cond and where give the same state.
# ----------------------------------------------------------------------------------------
def guard_state(tx):
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  return TrainState(step=jnp.asarray(4, jnp.int32), params=params,
                    batch_stats={"mean": jnp.zeros(3)}, opt_state=tx.init(params),
                    nonfinite_step=jnp.asarray(-1, jnp.int32),
                    skipped_steps=jnp.asarray(0, jnp.int32))


@pytest.mark.parametrize("bad", [False, True], ids=["finite", "nan"])
@pytest.mark.parametrize("stop", [False, True], ids=["skip", "stop"])
def test_cond_and_where_guards_give_the_same_state(bad, stop):
  tx = optax.adam(0.1)
  state = guard_state(tx)
  grads = {"w": jnp.full((2, 3), 0.5), "b": jnp.asarray([1.0, np.nan if bad else 2.0, 3.0])}
  loss, stats = jnp.asarray(1.5), {"mean": jnp.full(3, 7.0)}
  run = jax.jit(apply_gradients, static_argnums=(0, 5, 6))
  out = {g: run(tx, state, grads, loss, stats, stop, g) for g in ("where", "cond")}
  chex.assert_trees_all_equal(out["where"], out["cond"])
  new, grad_norm = out["cond"]
  assert int(new.step) == 5 and int(new.skipped_steps) == int(bad)
  assert int(new.nonfinite_step) == (4 if bad and stop else -1)
  if bad:   # nothing of the update is kept
    chex.assert_trees_all_equal((new.params, new.batch_stats, new.opt_state),
                                (state.params, state.batch_stats, state.opt_state))
    assert not np.isfinite(grad_norm)
  else:     # the plain optax update
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    chex.assert_trees_all_close(new.params, optax.apply_updates(state.params, updates))
    chex.assert_trees_all_close(new.opt_state, opt_state)
    chex.assert_trees_all_equal(new.batch_stats, stats)
    np.testing.assert_allclose(grad_norm, np.sqrt(6 * 0.25 + 1 + 4 + 9), rtol=1e-6)


def test_unknown_guard_is_a_one_line_error():
  tx = optax.sgd(0.1)
  state = guard_state(tx)
  with pytest.raises(ValueError, match="unknown non-finite guard 'if'; valid choices: where, "
                     "cond"):
    apply_gradients(tx, state, state.params, jnp.asarray(1.0), state.batch_stats, False, "if")


def test_auto_guard_per_platform():
  assert resolve_guard("auto", "cpu") == "cond"
  assert resolve_guard("auto", "gpu") == resolve_guard("auto", "tpu") == "where"
  assert resolve_guard("where", "cpu") == "where" and resolve_guard("cond", "gpu") == "cond"


def test_config_rejects_an_unknown_guard():
  from resnorm_jax import config as config_lib
  from resnorm_jax import validation
  from resnorm_jax.errors import ConfigError
  c = config_lib.base_config()
  c.train.nonfinite_guard = "select"
  with pytest.raises(ConfigError, match="train.nonfinite_guard"):
    validation.validate(c, jax.device_count())


# ----------------------------------------------------------------------------------------
# CPU-only workarounds stay off on GPU and TPU.
# ----------------------------------------------------------------------------------------
def test_materialize_grad_conditional_is_lowered_for_cpu_only():
  """The gradient's opaque conditional (its predicate compares the primal with itself) is
  in the CPU lowering; the CUDA and TPU lowerings pass the gradient straight through."""
  from resnorm_jax.cpu_workarounds import materialize_grad
  grad = jax.jit(jax.grad(lambda x: jnp.sum(materialize_grad(x * 3.0) ** 2)))
  x = jnp.ones((4,))
  text = {p: export.export(grad, platforms=(p,))(x).mlir_module() for p in ("cpu", "cuda",
                                                                           "tpu")}
  assert "stablehlo.compare" in text["cpu"]
  assert "stablehlo.compare" not in text["cuda"]
  assert "stablehlo.compare" not in text["tpu"]
  # Every platform computes the same gradient: 2 * 9 * x.
  np.testing.assert_allclose(grad(x), 18.0 * np.ones(4))


def test_conv_layout_rewrite_applies_on_cpu_only():
  def conv(x, w):  # a kernel-gradient convolution: batch and feature axes swapped
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("CHWN", "HWIO", "CHWN"))
  for platform in ("gpu", "tpu", "cuda", "rocm"):
    assert cpu_workarounds.for_platform(conv, platform) is conv
  rewritten = cpu_workarounds.for_platform(conv, "cpu")
  x, w = jnp.ones((3, 5, 5, 2)), jnp.ones((3, 3, 3, 4))
  eqns = jax.make_jaxpr(rewritten)(x, w).jaxpr.eqns
  convs = [e for e in eqns if e.primitive is jax.lax.conv_general_dilated_p]
  assert convs and all(cpu_workarounds.is_canonical(e.params) for e in convs)
  np.testing.assert_allclose(rewritten(x, w), conv(x, w), rtol=1e-6)
# ----------------------------------------------------------------------------------------
# The device check (make device-check): its CPU smoke run.
# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_device_check_cpu_smoke_run(tmp_path):
  """``benchmarks/device_check.py`` end to end at its CPU scale in a fresh process: every
  section passes, and the report names the device, versions and command."""
  env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)   # the command sets its own host device count
  proc = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "device_check.py"),
                         "--out", str(tmp_path)], env=env, capture_output=True, text=True,
                        timeout=1800)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  report = json.loads((tmp_path / "device_check.json").read_text())
  assert report["scale"] == "cpu" and report["environment"]["platform"] == "cpu"
  assert report["environment"]["num_devices"] >= 2 and "device_check.py" in report["command"]
  sections = {s["name"]: s for s in report["sections"]}
  assert set(sections) >= {"numerics: norms x sync x styles", "numerics: skip x ordering",
                           "numerics: attention", "numerics: cached decoding",
                           "numerics: bf16 vs f32", "gating: CPU workarounds",
                           "speed: resnet step", "speed: transformer step",
                           "speed: moments draw", "speed: compile time"}
  for s in report["sections"]:
    assert s["status"] == "passed", s
  checks = [c for s in report["sections"] for c in s.get("checks", [])]
  assert len(checks) > 50 and all(c["ok"] for c in checks)
  markdown = (tmp_path / "device_check.md").read_text()
  assert "# Device check" in markdown and report["environment"]["jax"] in markdown
