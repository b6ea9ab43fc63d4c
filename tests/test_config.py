"""The config schema: every key has a default, a resume class and a check of its own, and
model families and tasks add their keys when they register."""

import pytest

from resnorm_jax import config as config_lib, models
from resnorm_jax.errors import ConfigError


def test_every_key_has_a_check_that_rejects_a_value_of_no_meaning():
  count = 0
  for section, keys in config_lib.SCHEMA.items():
    for name, key in keys.items():
      with pytest.raises(ConfigError, match=rf"^{section}\.{name}="):
        key.check({"not": "a value"}, f"{section}.{name}")
      key.check(key.default, f"{section}.{name}")     # the default passes its own check
      count += 1
  assert count >= 75


def test_families_and_tasks_own_their_keys():
  assert config_lib.SCHEMA.owner("model", "depth") == "model cifar_resnet"
  assert config_lib.SCHEMA.owner("model", "preset") == "model transformer"
  assert config_lib.SCHEMA.owner("translation", "max_tokens") == "task translation"
  assert config_lib.SCHEMA.owner("data", "augment") == "task image_classification"
  assert config_lib.SCHEMA.owner("published", "error") == "task image_classification"
  assert config_lib.SCHEMA.owner("published", "bleu") == "task translation"
  assert config_lib.SCHEMA.owner("train", "steps") == "engine"
  assert models.family(config_lib.base_config()).config_keys[:3] == ("depth", "block",
                                                                      "width")


def test_a_family_adds_its_keys_and_cannot_take_another_owners():
  key = config_lib.Key(3, config_lib.TREE, config_lib.POSITIVE_INT)
  family = models.ModelFamily(task="image_classification",
                              example_inputs=lambda config, data: (),
                              schema={"test_units": key})

  @models.register_model("test_family_keys", "a family with one key of its own", family)
  def build(arg, config, norm_ctx, data):
    raise AssertionError("never built")
  try:
    assert config_lib.base_config().model.test_units == 3
    assert config_lib.resume_class("model.test_units") == config_lib.TREE
    with pytest.raises(ValueError, match="model.depth of model test_other is already "
                       "defined by model cifar_resnet"):
      config_lib.SCHEMA.add("model", {"depth": key}, owner="model test_other")
  finally:
    models.MODELS.unregister("test_family_keys")
  assert "test_units" not in config_lib.base_config().model
  del build
