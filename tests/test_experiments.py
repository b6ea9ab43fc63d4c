"""Experiment configs: every variant validates and builds the model it names, published numbers
as in SPEC.md (resnorm-sweep itself: tests/test_sweep.py)."""

import os

import jax
import pytest

from resnorm_jax import config as config_lib, experiments, models
from resnorm_jax import validation
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import SHORTCUTS, norm_factory
from resnorm_jax.layers.residual import resolve_combinator
from resnorm_jax.models.resnet import resolve_block
from helpers import REPO

CONFIGS = ("he2016_shortcuts", "he2016_units", "he2016_preact", "liu2020_resnet")


def _module(name):
  return experiments.load_config_module(os.path.join(REPO, "configs", f"{name}.py"))


def _all_variants():
  return [(name, v) for name in CONFIGS for v in _module(name).VARIANTS]


def _expected_model(name, variant):
  """(depth, unit, shortcut, skip, skip_lambda, data) each variant must set."""
  if name == "he2016_shortcuts":
    shortcut = {"identity": "identity", "constant_0.5_1": "constant:0.5,1",
                "constant_0.5_0.5": "constant:0.5,0.5", "exclusive_gate": "exclusive_gate:-6",
                "shortcut_gate": "shortcut_gate:-6", "conv1x1": "conv1x1",
                "dropout": "dropout:0.5"}[variant]
    return 110, "original", shortcut, "skip", None, "cifar10"
  if name == "he2016_units":
    unit, depth = variant.rsplit("_", 1)
    return int(depth), unit, "identity", "skip", None, "cifar10"
  if name == "he2016_preact":
    preset, data = variant.split("_")
    return int(preset[len("resnet"):]), "full_preact", "identity", "skip", None, data
  if variant == "skip":
    return 110, "full_preact", "identity", "skip", None, "cifar10"
  skip, lam = variant.rsplit("_", 1)
  return 110, "full_preact", "identity", skip, float(lam), "cifar10"


def test_variant_lists():
  assert _module("he2016_shortcuts").VARIANTS == (
      "identity", "constant_0.5_1", "constant_0.5_0.5", "exclusive_gate", "shortcut_gate",
      "conv1x1", "dropout")
  assert len(_module("he2016_units").VARIANTS) == 12       # 6 orderings x depths 110, 164
  assert set(_module("he2016_preact").VARIANTS) == {
      "resnet164_cifar10", "resnet1001_cifar10", "resnet164_cifar100", "resnet1001_cifar100"}
  assert len(_module("liu2020_resnet").VARIANTS) == 16     # skip + 5 combinators x λ 1..3


@pytest.mark.parametrize("name,variant", _all_variants())
def test_every_variant_validates_and_builds_its_model(name, variant):
  config = _module(name).get_config(variant)
  validation.validate(config, jax.device_count())
  depth, unit, shortcut, skip, lam, data = _expected_model(name, variant)
  model = models.build_model(config, models.norm_context(config), models.DataInfo(
      100 if data == "cifar100" else 10, (32, 32, 3)))
  m = config.model
  assert (m.depth, m.unit, m.shortcut, m.skip, m.skip_lambda) == (depth, unit, shortcut, skip,
                                                                  lam)
  # The model holds the variants resolved once by its builder (names are not kept).
  ctx = models.norm_context(config)
  assert model.depth == depth and model.unit.ordering.name == unit
  assert model.unit.shortcut == SHORTCUTS.build(shortcut)
  assert model.unit.skip == resolve_combinator(skip, lam=lam, ctx=ctx)
  assert model.unit.norm == norm_factory("batch", ctx)
  assert resolve_block(model.depth, model.block)[0] == (
      "bottleneck" if depth in (164, 1001) else "basic")
  assert model.num_classes == (100 if data == "cifar100" else 10)
  # The recipe of configs/cifar_resnet.py, reused, not copied.
  assert config.data.name == data and config.model.norm == "batch"
  t = config.train
  assert (t.steps, t.batch_size, t.optimizer, t.momentum, t.learning_rate, t.weight_decay,
          tuple(t.boundaries), t.warmup_steps, t.warmup_learning_rate) == (
              64_000, 128, "sgd", 0.9, 0.1, 1e-4, (32_000, 48_000), 400, 0.01)
  assert config.published.error is None or config.published.source


def _param_count(config, classes=10):
  import jax.numpy as jnp
  model = models.build_model(config, models.norm_context(config),
                             models.DataInfo(classes, (32, 32, 3)))
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  return sum(x.size for x in jax.tree.leaves(shapes["params"]))


def test_shortcut_variants_initialise_with_their_extra_parameters():
  module = _module("he2016_shortcuts")
  counts = {v: _param_count(module.get_config(v)) for v in module.VARIANTS}
  assert 1.70e6 < counts["identity"] < 1.76e6                 # ResNet-110: 1.7M (SPEC)
  for same in ("constant_0.5_1", "constant_0.5_0.5", "dropout"):
    assert counts[same] == counts["identity"]                 # no parameters of their own
  for gated in ("exclusive_gate", "shortcut_gate", "conv1x1"):
    assert counts[gated] > counts["identity"]                 # 1x1 gate / projection convs


@pytest.mark.parametrize("name,variant,error,note", [
    # SPEC.md section 2: He 2016 Table 1, Table 2 and the pre-activation results.
    ("he2016_shortcuts", "identity", 6.61, ""),
    ("he2016_shortcuts", "constant_0.5_1", None, "fail"),
    ("he2016_shortcuts", "constant_0.5_0.5", 12.35, ""),
    ("he2016_shortcuts", "exclusive_gate", 8.70, ""),
    ("he2016_shortcuts", "shortcut_gate", 6.91, ""),
    ("he2016_shortcuts", "conv1x1", 12.22, ""),
    ("he2016_shortcuts", "dropout", None, "fail"),
    ("he2016_units", "bn_after_add_110", 8.17, ""),
    ("he2016_units", "relu_before_add_164", 6.14, ""),
    ("he2016_units", "full_preact_164", 5.46, ""),
    ("he2016_units", "plain_110", None, "baseline"),
    ("he2016_preact", "resnet1001_cifar10", 4.92, ""),
    ("he2016_preact", "resnet164_cifar100", 24.33, ""),
    ("he2016_preact", "resnet1001_cifar100", 22.71, ""),
    ("liu2020_resnet", "rskip_ln_2", None, "not transcribed"),
])
def test_published_numbers_match_spec(name, variant, error, note):
  published = _module(name).get_config(variant).published
  assert published.error == error
  assert note in published.note


def test_unknown_variant_of_a_config_is_a_one_line_error():
  with pytest.raises(ConfigError, match=r"unknown variant 'rskip_ln_9' of "
                     r"configs/liu2020_resnet.py; valid: skip, xskip_1"):
    _module("liu2020_resnet").get_config("rskip_ln_9")


def test_base_config_has_no_published_number():
  published = config_lib.base_config().published
  assert published.error is None and published.bleu is None
  assert published.source == "" and published.note == ""
