"""The registry of the analyses ``resnorm-analyze`` runs: a name, its documentation and its
module (imported when it is run)."""

from __future__ import annotations

import importlib

from resnorm_jax.registry import Registry

ANALYSES = Registry("analysis")

for _name, _doc in (
    ("moments", "χ, r_eff and kurtosis of signal and noise vs depth (Labatie 2019)"),
    ("shattering", "correlation of neighbouring input gradients vs depth (Balduzzi 2017)"),
    ("grad_scale", "per-layer gradient norms at init: xskip λ, xskip_ln, Post/Pre-LN"),
):
  ANALYSES.register(_name, _doc)(
      lambda arg, _n=_name: importlib.import_module(f"resnorm_jax.analysis.{_n}"))


def load(name: str):
  """The module of analysis ``name`` (ConfigError listing the valid names otherwise)."""
  return ANALYSES.build(name)
