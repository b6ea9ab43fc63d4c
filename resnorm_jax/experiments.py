"""Helpers shared by the experiment configs (``configs/he2016_*.py``, ...) and resnorm-sweep.

An experiment config is a ``get_config(arg)`` file whose ``arg`` names one variant; it
exposes the names as ``VARIANTS`` (so ``--variants=all`` works), names the variant the others
are compared with as ``BASELINE`` (one name, or a dict variant -> its baseline), and sets
``config.published`` to the result the paper reports for that variant.
"""

from __future__ import annotations

import importlib.util
import os
import types

from resnorm_jax.errors import ConfigError


def load_config_module(path: str) -> types.ModuleType:
  """Imports a config file by path (``configs/`` is not a package), as config_flags does."""
  path = os.path.abspath(path)
  if not os.path.isfile(path):
    raise ConfigError(f"no config file {path}")
  name = "resnorm_config_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def sibling(config_file: str, name: str) -> types.ModuleType:
  """The config module ``name`` next to ``config_file`` (pass ``__file__``)."""
  return load_config_module(os.path.join(os.path.dirname(os.path.abspath(config_file)),
                                         f"{name}.py"))


def check_variant(arg: str | None, variants, config_name: str, default: str) -> str:
  """``arg`` (or ``default`` when empty) if it names a variant, else a one-line error."""
  variant = (arg or default).strip()
  if variant not in variants:
    raise ConfigError(f"unknown variant {variant!r} of {config_name}; valid: "
                      f"{', '.join(variants)}")
  return variant


def set_published(config, error: float | None, source: str, note: str = ""):
  """Records the published test error (%) of this variant; None = none published."""
  config.published.error = None if error is None else float(error)
  config.published.source = source
  config.published.note = note
  return config


def set_published_bleu(config, bleu: float | None, source: str, note: str = ""):
  """Records the published test BLEU of this (translation) variant; None = none published."""
  config.published.bleu = None if bleu is None else float(bleu)
  config.published.source = source
  config.published.note = note
  return config
