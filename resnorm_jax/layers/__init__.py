"""The norm / shortcut / unit / combinator library: every variant of SPEC.md 1-3."""

from resnorm_jax.layers.conv import Conv, he_normal, standardize_weight
from resnorm_jax.layers.norms import (BN_SYNC_MODES, NORMS, BatchNorm, NormContext,
                                      NormFactory, NormInfo, SampleKind, SampleNorm,
                                      SwitchableNorm, batch_moments, bn_sync_group_size,
                                      make_norm, norm_factory)
from resnorm_jax.registry import ConfigError, Registry, split_spec
from resnorm_jax.layers.residual import (COMBINATORS, LAMBDA_COMBINATORS, SHORTCUTS,
                                         UNIT_ORDERINGS, ConvUnit, DepthInfo, Shortcut,
                                         ShortcutSpec, SkipCombinator, SkipSpec, UnitOrdering,
                                         UnitVariant, conv_unit, deepnorm_constants,
                                         make_combinator, make_shortcut, resolve_combinator,
                                         resolve_unit)

REGISTRIES = (NORMS, UNIT_ORDERINGS, SHORTCUTS, COMBINATORS)


def registry_markdown() -> str:
  """The README table of every registry name (generated; tests keep README in sync)."""
  lines = ["| kind | name | meaning |", "|---|---|---|"]
  for registry in REGISTRIES:
    lines.extend(registry.markdown_rows())
  return "\n".join(lines)
