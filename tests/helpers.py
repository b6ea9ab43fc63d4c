"""Shared test helpers: tiny image configs, running steps, reading a finished run's state,
tiny CLI settings."""

import contextlib
import importlib.util
import io
import json
import math
import os
import tarfile

import jax
import numpy as np

from resnorm_jax import config as config_lib, parallelism, storage, training
from resnorm_jax import validation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# tiny_config's longest reductions (weight gradients and BatchNorm statistics of its 32x32
# stage): batch 16 x 32 x 32 positions per step.
TINY_TERMS = 16 * 32 * 32


def tiny_config(**overrides):
  """A depth-8, width-4 ResNet on 64 synthetic images; ``overrides``: {"section.key": v}."""
  c = config_lib.base_config()
  c.model.depth = 8
  c.model.width = 4
  c.data.synthetic_train_size = 64
  c.data.synthetic_test_size = 32
  c.train.batch_size = 16
  c.train.steps = 6
  c.train.schedule = "constant"
  c.train.learning_rate = 0.05
  c.train.log_every_steps = 1
  c.eval.every_steps = 0
  c.eval.batch_size = 16
  c.checkpoint.every_steps = 3
  for key, value in overrides.items():
    section, name = key.split(".")
    c[section][name] = value
  return c


# ----------------------------------------------------------------------------------------
# Tolerances from float32 rounding.
# ----------------------------------------------------------------------------------------
F32_ROUNDOFF = 2.0 ** -24   # u: the largest relative error of one float32 rounding


def reordering_tolerance(terms: int, sigmas: float = 3.0) -> float:
  """Relative tolerance for two float32 computations of one quantity that differ only in
  how their sums are ordered and split (device counts, execution styles, process counts,
  a resumed run's step, a fused or rewritten program).

  Derivation: each float32 addition rounds with a relative error of at most u = 2⁻²⁴.
  Adding n terms in two different orders gives results whose difference is a sum of n
  rounding errors of either sign; modelled as independent (Higham & Mary, "A new approach to
  probabilistic rounding error analysis", SIAM J. Sci. Comput. 2019) it stays below
  λ·√n·u times the magnitude of the terms with probability ≥ 1 − 2·exp(−λ²/2) (λ = 3:
  0.989 per compared sum; the largest magnitude of the compared leaf stands for the terms').
  ``terms`` is n for the longest reduction that differs between the two computations, e.g.
  batch × positions for a convolution's weight gradient or a BatchNorm statistic.
  """
  return sigmas * math.sqrt(terms) * F32_ROUNDOFF


def assert_states_close(a, b, terms: int, what: str = "",
                        names=("opt_state", "batch_stats", "params"), cancelling=()) -> None:
  """Two training states agree to float32 rounding (:func:`assert_trees_close_to_rounding`),
  the optimizer state (its traces are the gradients) first.  For k steps, ``terms`` is k
  times a step's: the rounding errors of every step's sums add up, and the small learning
  rates of these tests do not amplify them noticeably within a few steps.  Beyond one step
  this assumes no ReLU input lies within rounding of zero: one that does takes the other
  side in one of the computations and moves a gradient by far more than rounding (see
  test_failure_paths.QUICKSTART_ONE_STEP); the multi-step comparisons here are checked to
  have none."""
  for name in names:
    assert_trees_close_to_rounding(getattr(a, name), getattr(b, name), terms, f"{what} {name}",
                                   cancelling)


def assert_trees_close_to_rounding(actual, expected, terms: int, what: str = "",
                                   cancelling: tuple[str, ...] = ()) -> None:
  """Every leaf of ``actual`` equals ``expected``'s within
  ``reordering_tolerance(terms) · scale`` (see there for the derivation), where the scale is
  the leaf's largest magnitude.  A leaf that is zero in theory holds only the residue of
  terms as large as the rest of the tree's: e.g. attention key biases (softmax does not
  change when every logit of a row gets the same q·b) or a bias right before a BatchNorm
  (which removes it).  Its scale is the largest magnitude in the whole tree; such leaves
  are named in ``cancelling`` (substrings of their paths) or recognized by a magnitude
  below the tolerance times the tree's largest.  The message names the leaf, its relative
  difference and the tolerance."""
  tol = reordering_tolerance(terms)
  leaves_a = jax.tree_util.tree_leaves_with_path(actual)
  leaves_e = [np.asarray(e) for e in jax.tree_util.tree_leaves(expected)]
  assert len(leaves_a) == len(leaves_e), f"{what}: different trees"
  floating = lambda x: np.issubdtype(x.dtype, np.floating)
  tree_scale = max((float(np.max(np.abs(e))) for e in leaves_e if e.size and floating(e)),
                   default=0.0)
  for (path, a), e in zip(leaves_a, leaves_e):
    name = jax.tree_util.keystr(path)
    a = np.asarray(a)
    assert a.shape == e.shape, f"{what}{name}: shapes {a.shape} {e.shape}"
    if not floating(e):   # step counters: equal
      np.testing.assert_array_equal(a, e, err_msg=f"{what}{name}")
      continue
    if not e.size:
      continue
    a, e = a.astype(np.float64), e.astype(np.float64)
    scale = float(np.max(np.abs(e)))
    if any(c in name for c in cancelling) or scale < tol * tree_scale:
      scale = tree_scale
    diff = float(np.max(np.abs(a - e)))
    assert diff <= tol * scale or diff == 0.0, (
        f"{what}{name}: max |difference| {diff:.3g} is {diff / max(scale, 1e-300):.3g} of "
        f"the scale {scale:.3g}; float32 rounding over {terms} terms allows {tol:.3g}")


def run_steps(config, steps=3):
  """Runs ``steps`` train steps in the config's execution style; returns the host state."""
  return run_steps_with_stats(config, steps)[0]


def run_steps_with_stats(config, steps=3, stats_at=(), initial=None):
  """Like :func:`run_steps`, with the layer-statistics variant of the step at the step
  numbers in ``stats_at``, from the host state ``initial`` if given (initialising is the
  slowest part of a tiny run); returns (host state, {step: host metrics["layer_stats"]})."""
  validation.validate(config, jax.device_count())
  task = training.build_task(config, parallelism.make_mesh(config.parallel.num_devices))
  task.setup(workdir="")
  state = (training.init_state(task) if initial is None
           else jax.device_put(initial, parallelism.replicated(task.mesh)))
  step_fns = {False: training.make_train_step(task),
              True: training.make_train_step(task, layer_stats=True)}
  stats = {}
  for step in range(steps):
    state, metrics = step_fns[step in stats_at](state, task.inputs(step))
    if step in stats_at:
      stats[step] = jax.device_get(metrics["layer_stats"])
  return jax.device_get(state), stats


def read_state(workdir):
  """The final state of a finished run (image or translation), restored from its newest
  checkpoint onto one device."""
  config = config_lib.base_config()
  config.update_from_flattened_dict(
      {k: (tuple(v) if isinstance(v, list) else v) for k, v in _flatten(
          json.loads(storage.read_text(storage.join(workdir, "config.json")))).items()})
  from resnorm_jax import checkpointing
  task = training.build_task(config, parallelism.make_mesh(1))
  ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), keep=3,
                                    every_steps=0)
  step, state = ckpt.restore(training.abstract_state(task))
  ckpt.close()
  return step, jax.device_get(state)


def _flatten(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def train_cli(workdir, *flags, tiny=True, **popen):
  """``python -m resnorm_jax.train --workdir=... [CLI_TINY] flags`` as a Popen with text
  pipes (unbuffered, so a test can watch its output); ``env``: variables added to this
  process's environment."""
  import subprocess
  import sys
  env = {**os.environ, "PYTHONUNBUFFERED": "1", **popen.pop("env", {})}
  return subprocess.Popen([sys.executable, "-m", "resnorm_jax.train", f"--workdir={workdir}",
                           *(CLI_TINY if tiny else []), *flags], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


CLI_TINY = ["--config.model.depth=8", "--config.model.width=4",
            "--config.data.synthetic_train_size=64", "--config.data.synthetic_test_size=32",
            "--config.train.batch_size=16", "--config.train.schedule=cosine",
            "--config.train.learning_rate=0.05", "--config.train.log_every_steps=1",
            "--config.eval.every_steps=0", "--config.eval.batch_size=16",
            "--config.checkpoint.every_steps=1000", "--config.data.name=synthetic",
            "--config.parallel.num_devices=1"]




@contextlib.contextmanager
def fast_compile_options():
  """Within the block, jit trades XLA code quality for compile time (tiny programs run a few
  times).  The optimization level is part of the jit cache key, so no other test reuses
  these executables."""
  previous = (jax.config.jax_optimization_level,
              jax.config.values.get("jax_disable_most_optimizations", False))
  jax.config.update("jax_optimization_level", "O0")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_optimization_level", previous[0])
    jax.config.update("jax_disable_most_optimizations", previous[1])


def load_benchmark(name):
  """Imports ``benchmarks/<name>.py`` (benchmarks/ is not a package)."""
  spec = importlib.util.spec_from_file_location(
      f"benchmark_{name}", os.path.join(REPO, "benchmarks", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def cifar_records(n, label_bytes, num_classes, seed=0):
  """n random CIFAR records in the official binary layout: (bytes, NHWC images, labels)."""
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n).astype(np.uint8)
  chw = rng.integers(0, 256, (n, 3, 32, 32)).astype(np.uint8)
  prefix = [labels[:, None]] if label_bytes == 1 else [(labels // 5)[:, None], labels[:, None]]
  blob = np.concatenate(prefix + [chw.reshape(n, -1)], axis=1).tobytes()
  return blob, chw.transpose(0, 2, 3, 1), labels


def write_tarball(path, members):
  """A .tar.gz at ``path`` holding {member name: bytes}."""
  with tarfile.open(path, "w:gz") as tar:
    for name, blob in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
