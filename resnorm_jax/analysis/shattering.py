"""Shattered gradients (Balduzzi et al. 2017, "The Shattered Gradients Problem").

A fully-connected ReLU net maps a 1-D input to a scalar; its gradient g(x) = df/dx is
taken at every point of a grid x_1 < ... < x_n over [-r, r].  Feed-forward nets give
gradients that decorrelate between neighbouring points exponentially fast with depth
("white noise"); residual nets, especially with BatchNorm, keep them correlated, with a
decay that is only sub-exponential ("brown noise").  The measure is the lag-1
autocorrelation of the gradient sequence,

    ρ = Σ_i (g_i − ḡ)(g_{i+1} − ḡ) / Σ_i (g_i − ḡ)²,

averaged over random draws, against depth, with an exponential (log ρ linear in L) and a
power-law (log ρ linear in log L) fit.

Networks (:class:`ShatterMLP`, built from ``nn.Dense`` and the norm and skip-combinator
registries): z_1 = W_in x + b_in; feed-forward: h_l = ReLU(N(z_l)), z_{l+1} = W_l h_l + b_l,
f = w_out·h_L + b_out (L ReLU layers); residual: h_0 = z_1, h_l = combinator(h_{l−1}, F),
F(h) = W_l ReLU(N(h)) + b_l (pre-activation, as in Balduzzi's resnets), f = w_out·h_L +
b_out (L blocks).  He-normal (fan-in) weights; biases are
N(0, ``bias_std``²), non-zero so that the breakpoints of the piecewise-linear f are spread
over the grid (with zero biases a bias-free ReLU net of a 1-D input is linear on each
half-line).  BatchNorm statistics are taken over the grid (the batch), in train mode, and
held fixed while differentiating (each g_i = ∂f(x_i)/∂x_i, not the derivative of the
batch statistics): a train-mode pass stores them (momentum 0), then the gradient is taken
in eval mode with them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnorm_jax.analysis import common, stats
from resnorm_jax.layers import (COMBINATORS, NORMS, DepthInfo, NormContext, make_combinator,
                                make_norm)
from resnorm_jax.errors import ConfigError

KINDS = ("plain", "residual")
_CTX = NormContext(momentum=0.0)   # running statistics := the grid's batch statistics
_he = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


@dataclasses.dataclass(frozen=True)
class MLPVariant:
  kind: str            # plain | residual
  norm: str = "none"
  skip: str = "skip"   # residual only

  def spec(self) -> str:
    return f"{self.kind}/{self.norm}" + (f"/{self.skip}" if self.kind == "residual" else "")


VARIANTS = {
    "plain": MLPVariant("plain", "none"),
    "plain_bn": MLPVariant("plain", "batch"),
    "resnet": MLPVariant("residual", "none"),
    "resnet_bn": MLPVariant("residual", "batch"),
}
CUSTOM_FORMAT = "'plain/norm' or 'residual/norm[/skip]' (e.g. 'residual/layer/xskip:0.5')"


class _Layer(nn.Module):
  """One hidden layer: plain h ← ReLU(N(W h + b)); residual h ← C(h, W ReLU(N(h)) + b)."""
  width: int
  variant: MLPVariant
  depth: int
  bias_std: float
  train: bool

  @nn.compact
  def __call__(self, h, _=None):
    v = self.variant
    linear = nn.Dense(self.width, kernel_init=_he,
                      bias_init=nn.initializers.normal(self.bias_std), name="dense")
    norm = make_norm(v.norm, _CTX, name="norm")
    if v.kind == "plain":
      return nn.relu(norm(linear(h), train=self.train)), None
    skip = make_combinator(v.skip, ctx=_CTX, depth=DepthInfo("encoder_only", self.depth),
                           name="skip")
    return skip(h, lambda z: linear(nn.relu(norm(z, train=self.train))),
                train=self.train), None


class ShatterMLP(nn.Module):
  """Width-``width`` ReLU MLP of ``depth`` ReLU layers (plain) or blocks (residual).

  The identical hidden layers are an ``nn.scan`` (one compiled body whatever the depth;
  each layer has its own parameters).
  """
  width: int
  depth: int
  variant: MLPVariant
  bias_std: float = 0.1

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    v = self.variant
    h = nn.Dense(self.width, kernel_init=_he, bias_init=nn.initializers.normal(self.bias_std),
                 name="input")(x)
    layers = self.depth
    if v.kind == "plain":   # the input layer's ReLU, then depth − 1 hidden layers
      h = nn.relu(make_norm(v.norm, _CTX, name="input_norm")(h, train=train))
      layers -= 1
    if layers:
      stack = nn.scan(_Layer, variable_axes={"params": 0, "batch_stats": 0},
                      split_rngs={"params": True}, length=layers)
      h, _ = stack(self.width, v, self.depth, self.bias_std, train, name="layers")(h, None)
    return nn.Dense(1, kernel_init=nn.initializers.lecun_normal(), name="output")(h)[..., 0]


def parse_variant(name: str) -> MLPVariant:
  if name in VARIANTS:
    return VARIANTS[name]
  parts = name.split("/")
  if parts[0] not in KINDS or not 2 <= len(parts) <= (2 if parts[0] == "plain" else 3):
    raise common.unknown_variant(name, "shattering", VARIANTS, CUSTOM_FORMAT)
  variant = MLPVariant(*parts)
  try:
    NORMS.validate(variant.norm)
    COMBINATORS.validate(variant.skip)
  except ConfigError as e:
    raise ConfigError(f"shattering variant {name!r}: {e}") from None
  return variant


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.analysis = "shattering"
  c.seed = 0
  c.variants = "plain,resnet,resnet_bn"   # names or custom specs, comma-separated
  c.width = 200
  c.depths = "1,2,4,8,16,32"              # comma-separated
  c.grid = 256                            # points of the 1-D input grid
  c.input_range = 2.0                     # grid over [-input_range, input_range]
  c.bias_std = 0.1
  c.draws = 20
  c.draw_batch = 20                       # draws vmapped together (dense layers vmap well)
  c.fit_floor = 0.05                      # fits use depths whose mean ρ exceeds this
  return c


def validate(config) -> tuple[list[tuple[str, MLPVariant]], list[int]]:
  for key in ("width", "grid", "draws"):
    common.require_int(config, key, minimum=3 if key == "grid" else 1)
  common.require_int(config, "draw_batch", minimum=0)
  common.require_int(config, "seed", minimum=0)
  common.require_float(config, "input_range")
  common.require_float(config, "bias_std", strict=False)
  common.require_float(config, "fit_floor", strict=False)
  depths = sorted(set(common.int_list(config.depths, "depths")))
  variants = [(n, parse_variant(n)) for n in dict.fromkeys(common.split_list(
      config.variants, "variants"))]
  for name, variant in variants:
    model = ShatterMLP(config.width, 1, variant, config.bias_std)
    try:
      jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((config.grid, 1)),
                                        train=True))
    except ConfigError as e:
      raise ConfigError(f"shattering variant {name!r}: {e}") from None
  return variants, depths


def grid_points(config) -> jax.Array:
  return jnp.linspace(-config.input_range, config.input_range, config.grid)[:, None]


def input_gradients(model: ShatterMLP, variables, x: jax.Array) -> jax.Array:
  """g_i = ∂f(x_i)/∂x_i with batch statistics over the grid held fixed (see module doc)."""
  _, batch_stats = model.apply(variables, x, train=True, mutable=["batch_stats"])
  frozen = {**variables, **batch_stats}
  return jax.grad(lambda z: jnp.sum(model.apply(frozen, z, train=False)))(x)[:, 0]


def lag1_correlation(g: jax.Array) -> jax.Array:
  """ρ = Σ (g_i − ḡ)(g_{i+1} − ḡ) / Σ (g_i − ḡ)² (0 for a constant sequence)."""
  d = g - jnp.mean(g)
  den = jnp.sum(d * d)
  return jnp.where(den > 0, jnp.sum(d[:-1] * d[1:]) / jnp.where(den > 0, den, 1.0), 0.0)


def draw_function(variant: MLPVariant, depth: int, config):
  model = ShatterMLP(config.width, depth, variant, config.bias_std)
  x = grid_points(config)

  def draw(key):
    variables = model.init(key, x, train=True)
    g = input_gradients(model, variables, x)
    return {"corr": lag1_correlation(g), "gradient": g}

  return draw


def run(config, log=print) -> dict:
  variants, depths = validate(config)
  keys = common.draw_keys(config.seed, config.draws)
  results = {}
  for name, variant in variants:
    start = time.time()
    corr, examples = [], {}
    for depth in depths:
      out = common.run_draws(draw_function(variant, depth, config), keys, config.draw_batch,
                             label=f"{name} depth {depth}", log=log)
      corr.append(out["corr"])
      examples[str(depth)] = out["gradient"][0].tolist()
    corr = np.stack(corr, axis=1)                  # (draws, depths)
    agg = stats.aggregate(corr)
    mean = np.asarray(agg["mean"])
    keep = mean > config.fit_floor
    fit = stats.fit_growth(np.asarray(depths)[keep], np.log(mean[keep]))
    results[name] = {"spec": dataclasses.asdict(variant) | {"string": variant.spec()},
                     "depth": depths, "corr": agg, "fits": {"corr": fit},
                     "example_gradients": examples, "seconds": time.time() - start}
    log(f"  {name}: corr {', '.join(f'{c:.3f}' for c in mean)} at depths {depths}, "
        f"{time.time() - start:.1f} s")
  return {"variants": results, "grid": np.asarray(grid_points(config))[:, 0].tolist()}


def table(results: dict) -> str:
  first = next(iter(results["variants"].values()))
  depths = first["depth"]
  head = (f"{'variant':<22} " + " ".join(f"{'L=' + str(d):>7}" for d in depths) +
          f" {'exp rate':>9} {'pow exp':>8} {'better':>11}")
  lines = ["lag-1 gradient correlation vs depth", head, "-" * len(head)]
  for name, r in results["variants"].items():
    fit = r["fits"]["corr"]
    lines.append(f"{name:<22} " + " ".join(f"{c:>7.3f}" for c in r["corr"]["mean"]) +
                 f" {fit['exponential']['rate']:>9.4f} {fit['power']['exponent']:>8.3f} "
                 f"{str(fit['better']):>11}")
  return "\n".join(lines)
