"""The engine's extension points: a model family registered from this file alone trains with
resnorm-train's engine, in every execution style, and resumes under the schema's rules."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax import config as config_lib, models, tasks, training
from resnorm_jax import validation
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import NORMS, make_norm

from helpers import assert_states_close, tiny_config


class TwoLayerPerceptron(nn.Module):
  """Flatten, Dense(width), norm, ReLU, Dense(classes): norms see (batch, 1, width) tokens."""
  num_classes: int
  width: int
  norm: str
  norm_ctx: models.NormContext

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    x = nn.Dense(self.width)(images.reshape(images.shape[0], -1))
    x = make_norm(self.norm, self.norm_ctx, name="norm")(x[:, None, :], train=train)[:, 0]
    return nn.Dense(self.num_classes)(nn.relu(x))


def _validate(config):
  if config.model.width < 2:
    raise ConfigError(f"model.width={config.model.width} must be >= 2 for test_mlp")
  if not NORMS.parse(config.model.norm).info.sequences:
    raise ConfigError(f"model.norm={config.model.norm!r} needs spatial axes")


@pytest.fixture
def mlp_family():
  @models.register_model(
      "test_mlp", "a two-layer perceptron, registered by tests/test_tasks.py",
      models.ModelFamily(
          task="image_classification", validate=_validate,
          example_inputs=lambda config, data: (jnp.zeros((1,) + data.input_shape),),
          reads=("width", "norm", "bn_momentum", "bn_epsilon")))
  def build(arg, config, norm_ctx, data):
    del arg
    return TwoLayerPerceptron(data.num_classes, config.model.width, config.model.norm,
                              norm_ctx)
  yield build
  models.MODELS.unregister("test_mlp")


def mlp_config(**overrides):
  return tiny_config(**{"model.name": "test_mlp", "model.width": 16, "train.steps": 2,
                        "checkpoint.every_steps": 1, **overrides})


def test_a_model_family_registered_in_a_test_file_trains_and_resumes(mlp_family, tmp_path):
  assert tasks.task_class(mlp_config()).__name__ == "ImageClassification"
  with pytest.raises(ConfigError, match="model.width=1 must be >= 2 for test_mlp"):
    validation.validate(mlp_config(**{"model.width": 1}), jax.device_count())
  with pytest.raises(ConfigError, match="trains on image_classification data"):
    validation.validate(mlp_config(**{"data.name": "toy_translation"}), jax.device_count())

  run = str(tmp_path / "run")
  first = training.train_and_evaluate(mlp_config(), run)
  assert first["status"] == "completed" and first["step"] == 2
  assert np.isfinite(first["eval"]["loss"]) and 0 <= first["eval"]["accuracy"] <= 1
  assert set(first["state"].params) == {"Dense_0", "Dense_1", "norm"}
  assert set(first["state"].batch_stats) == {"norm"}          # model.norm=batch

  # model.depth is not one of the family's keys: neutral for it; model.width changes its
  # parameter tree: an error that names it.
  resumed = training.train_and_evaluate(
      mlp_config(**{"train.steps": 4, "model.depth": 14}), run)
  assert resumed["start_step"] == 2 and resumed["step"] == 4
  assert resumed["resume_changes"] == ["train.steps: checkpoint has 2, this run has 4"]
  with pytest.raises(ConfigError, match="model.width: checkpoint has 16, this run has 8"):
    training.train_and_evaluate(mlp_config(**{"train.steps": 6, "model.width": 8}), run)


def test_a_registered_family_gets_every_execution_style(mlp_family):
  """The engine's one step, for a family it has never seen: 8-device shard_map and pmap
  equal 1-device jit, with augmentation on."""
  from helpers import run_steps
  states = {mode: run_steps(mlp_config(**{"parallel.mode": mode, "parallel.num_devices": n}),
                            steps=2)
            for mode, n in (("jit", 1), ("shard_map", 8), ("pmap", 8))}
  # Longest differing reduction: the first layer's weight gradient over the batch of 16,
  # for each of 2 steps.  Dense_0's bias comes right before a BatchNorm, which removes it:
  # its gradient is zero in theory.
  for mode in ("shard_map", "pmap"):
    assert_states_close(states[mode], states["jit"], 2 * 16, f"{mode}, 2 steps:",
                        cancelling=("['Dense_0']['bias']",))


def _imports(path, package_root):
  """The resnorm_jax modules a file imports anywhere in it (module level or inside
  functions)."""
  import ast
  import os
  tree = ast.parse(open(path).read())
  out = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith("resnorm_jax")}
    elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
        "resnorm_jax"):
      for a in node.names:   # `from pkg import module` imports pkg.module
        sub = f"{node.module}.{a.name}"
        is_module = os.path.exists(os.path.join(package_root, *sub.split(".")[1:]) + ".py") \
            or os.path.isdir(os.path.join(package_root, *sub.split(".")[1:]))
        out.add(sub if is_module else node.module)
  return out


def _import_graph():
  import os
  import resnorm_jax
  root = os.path.dirname(resnorm_jax.__file__)
  graph = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      if name.endswith(".py"):
        rel = os.path.relpath(os.path.join(dirpath, name), root)[:-3].split(os.sep)
        if rel[-1] == "__init__":
          rel = rel[:-1]
        graph[".".join(["resnorm_jax"] + rel)] = _imports(os.path.join(dirpath, name), root)
  return graph


def _find_cycle(graph):
  """One import cycle of ``graph`` as a list of modules, or None."""
  state, stack = {}, []

  def visit(module):
    state[module] = "open"
    stack.append(module)
    for dep in sorted(graph.get(module, ())):
      if dep == module or dep not in graph:
        continue
      if state.get(dep) == "open":
        return stack[stack.index(dep):] + [dep]
      if dep not in state:
        found = visit(dep)
        if found:
          return found
    stack.pop()
    state[module] = "done"
    return None
  for module in sorted(graph):
    if module not in state:
      found = visit(module)
      if found:
        return found
  return None


def test_the_package_has_no_import_cycles_counting_imports_inside_functions():
  """Every import counts, also one inside a function (a lazy import hides a cycle from
  Python, not from the design): the config schema is a leaf, the engine imports the tasks
  and models, never the other way round."""
  graph = _import_graph()
  assert graph["resnorm_jax.config"] <= {"resnorm_jax.errors"}, graph["resnorm_jax.config"]
  cycle = _find_cycle(graph)
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle_through_a_function_level_import(tmp_path):
  """The check above can fail: a package whose leaf imports its user inside a function."""
  pkg = tmp_path / "resnorm_jax"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "leaf.py").write_text("def f():\n  from resnorm_jax import user\n")
  (pkg / "user.py").write_text("from resnorm_jax import leaf\n")
  graph = {f"resnorm_jax.{m}": _imports(str(pkg / f"{m}.py"), str(pkg))
           for m in ("leaf", "user")}
  assert _find_cycle(graph) in (["resnorm_jax.leaf", "resnorm_jax.user", "resnorm_jax.leaf"],
                                ["resnorm_jax.user", "resnorm_jax.leaf", "resnorm_jax.user"])


def test_tasks_and_models_never_import_the_engine():
  """The engine imports the tasks and models, never the other way round (not even lazily):
  the redesign's fix of the former training <-> translation_training cycle."""
  import os
  import re
  import resnorm_jax
  root = os.path.dirname(resnorm_jax.__file__)
  for sub in ("tasks", "models", "layers"):
    for dirpath, _, files in os.walk(os.path.join(root, sub)):
      for name in files:
        if name.endswith(".py"):
          text = open(os.path.join(dirpath, name)).read()
          assert not re.search(r"^\s*(from|import)\s.*\btraining\b", text, re.M), name
