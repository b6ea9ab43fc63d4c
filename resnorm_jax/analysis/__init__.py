"""Diagnostics of why normalization and skip connections must be combined (SPEC.md 5).

Three analyses, each a module with ``default_config()``, ``validate(config)``,
``run(config, log) -> results`` and ``table(results)``, run by ``resnorm-analyze``
(:mod:`resnorm_jax.analysis.cli`) from a config file in ``configs/``:

* ``moments`` (:mod:`~resnorm_jax.analysis.moments`): Labatie (2019) — normalized
  sensitivity χ, effective rank of signal and noise, kurtosis, through random conv stacks
  built from the training code's ConvUnit, with ``jax.jvp`` carrying the perturbation;
* ``shattering`` (:mod:`~resnorm_jax.analysis.shattering`): Balduzzi et al. (2017) —
  correlation of neighbouring input gradients of deep MLPs vs depth;
* ``grad_scale`` (:mod:`~resnorm_jax.analysis.grad_scale`): He et al. (2016) eq. 5-8 and
  Liu et al. (2020) — per-unit gradient norms through xskip / xskip_ln; Xiong et al. (2020)
  — Post-LN vs Pre-LN Transformer per-layer gradient norms at initialization.

Statistics and fits are in :mod:`~resnorm_jax.analysis.stats`, figures in
:mod:`~resnorm_jax.analysis.plots`.
"""

from __future__ import annotations

from resnorm_jax.analysis.registry import ANALYSES, load


def run():
  """Entry point of the ``resnorm-analyze`` console script."""
  from resnorm_jax.analysis.cli import run as cli_run
  cli_run()


__all__ = ["ANALYSES", "load", "run"]
