"""Taps: a model marks the output of each of its residual units for the layer statistics.

A unit module calls :func:`tap` on its output; the value goes into the :data:`TAPS`
collection under the module's own path (``stage2_unit3``, ``encoder/layer_0/ffn_skip``),
so the statistics (:mod:`resnorm_jax.layer_stats`) name units by what the model chose,
never by a pattern over module names.  The collection exists only when a step makes it
mutable; otherwise ``sow`` does nothing and the plain step is unchanged.
"""

from __future__ import annotations

import flax.linen as nn
import jax

TAPS = "taps"
TAP_NAME = "output"


def tap(module: nn.Module, output: jax.Array) -> jax.Array:
  """Marks ``output`` as the output of the residual unit ``module``; returns it.  Nothing
  is sown while the model initializes (``init`` makes every collection mutable), so the
  variables of a model never hold taps."""
  if not module.is_initializing():
    module.sow(TAPS, TAP_NAME, output)
  return output
