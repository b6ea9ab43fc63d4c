"""Signal-propagation moments through randomly initialized conv stacks (Labatie 2019).

A batch x⁰ and a perturbation dx⁰ go through a stack of constant-width
:class:`~resnorm_jax.layers.ConvUnit` s, the *same* unit code that training uses (any
ordering x norm x skip combinator x shortcut of the registries).  Each unit is applied
once per draw with parameters initialised from ``fold_in(key, unit)`` (so no draw ever holds
all the weights of a 500-unit net), and the perturbation is carried by ``jax.jvp`` of that
unit's function:

    (x^{l+1}, dx^{l+1}) = (f_l(x^l), ∂f_l(x^l)·dx^l)

so dx^l is the exact tangent of the network function.  At every ``tap_every`` units the
statistics of :mod:`resnorm_jax.analysis.stats` are recorded: χ^l = sqrt(μ2(dx^l)/μ2(x̂^l))
(normalized so χ⁰ = 1), r_eff of signal and noise, and the channel kurtosis of x^l (the
unit output: the residual stream, i.e. the next unit's pre-activation, for residual
orderings; post-ReLU for ``plain``).

BatchNorm and the tangent (``bn_tangent``): BN runs in train mode (batch statistics).
``exact`` differentiates the statistics too:
d BN(x)·dx = (dx − mean(dx) − x̂·mean(x̂·dx)) / σ, per channel over (B, H, W); ``frozen`` is
Labatie's definition "BN divides by x's std", d BN(x)·dx = dx / σ, computed with the same
module: a train-mode pass records the batch statistics (momentum 0), then the jvp runs
in eval mode with those statistics held fixed.  The two differ by the projection of dx
on the per-channel constant and on x̂, a fraction ~2/(B·H·W) of the noise per BN layer.

Scales (exact, never changing χ or r_eff): the noise is divided by its RMS after every
unit and the log of the factor is carried along (the tangent is linear in dx; Labatie's code
does the same).  With ``rescale`` the signal is too, together with its noise, but only for
units that are positively homogeneous of degree 1, f(c·x) = c·f(x) (no norm, no gate:
checked numerically on the unit), where it is exact and keeps a residual net without norm
(whose variance doubles every unit) within float32 range beyond ~120 units.  Units with a
norm in the branch and an identity shortcut are *not* homogeneous (x + F(x) with F
scale-invariant): rescaling their signal would shrink the stream back and change the
network, so it is never done there (their stream grows only linearly).

Boundaries (``boundary``): ``periodic`` (default; Labatie's) wraps every stride-1 conv's
input around by (k−1)/2 and crops the output — exactly a circular convolution, done by
intercepting the model's own :class:`~resnorm_jax.layers.Conv` — so every position is
statistically alike; ``zero`` keeps the training models' zero padding, whose border
positions stay distinguishable and hold r_eff of a collapsing net above 1 (at 8x8 about
3, instead of → 1), and whose per-channel means leak past BN (a slower χ growth).

Setting (Labatie's, moments-dnns): 3x3 convs, width 512, batch 64, 1000 draws, depth 200
feed-forward layers (``ff_units`` = 100 two-conv units) and 500 residual units.  Inputs
(``inputs``, see :func:`make_inputs`): a batch of images through Labatie's input layer
(per-channel standardization over the batch, then one random 3x3 conv of stride
image size / ``spatial``), with dx the same conv of i.i.d. Gaussian image noise; the images
are CIFAR-10/100 (``cifar10``: the authors' inputs, 32x32 -> 16x16; read from
``data_dir`` like training data), crops of two photographs that ship with scikit-learn
(``photos``, the default: natural images without a download), or scikit-learn's 8x8
``digits``; or i.i.d. Gaussian ``spatial`` x ``spatial`` x ``width`` signal and noise
(``gaussian``).  All are drawn anew per draw.  Which one matters for the nets without
normalization: their r_eff collapses toward 1 through the variation of the feature norms
between positions and images (a degree-1 homogeneous net keeps them while the directions
align), which natural images have and i.i.d. Gaussian ones lack.  Depth is reported in
conv layers (2 per basic unit): exponential rates are per conv layer, like the published
×1.17 per layer; power exponents do not depend on the unit of depth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax import lax

from resnorm_jax import cpu_workarounds, data as data_lib
from resnorm_jax.analysis import common, stats
from resnorm_jax.layers import (COMBINATORS, NORMS, SHORTCUTS, UNIT_ORDERINGS, Conv,
                                ConvUnit, DepthInfo, NormContext, conv_unit)
from resnorm_jax.errors import ConfigError

BN_TANGENTS = ("exact", "frozen")
BOUNDARIES = ("periodic", "zero")
INPUTS = ("photos", "cifar10", "cifar100", "digits", "gaussian")
PHOTO_CROPS = 8192   # size of the fixed set of photo crops a draw samples its batch from
STATS = ("log_chi", "reff_signal", "reff_noise", "kurtosis")
CONVS_PER_UNIT = 2   # basic units: two 3x3 convolutions


@dataclasses.dataclass(frozen=True)
class StackVariant:
  """A constant-width stack of ConvUnits: ordering x norm x skip combinator x shortcut."""
  ordering: str
  norm: str
  skip: str = "skip"
  shortcut: str = "identity"

  @property
  def residual(self) -> bool:
    return UNIT_ORDERINGS.build(self.ordering).residual

  def spec(self) -> str:
    return "/".join([self.ordering, self.norm, self.skip] +
                    ([self.shortcut] if self.shortcut != "identity" else []))


# Labatie's four classes (SPEC.md section 5).
ARCHETYPES = {
    "vanilla_ff": StackVariant("plain", "none"),         # no norm, no skip
    "bn_ff": StackVariant("plain", "batch"),              # norm, no skip
    "vanilla_res": StackVariant("full_preact", "none"),  # skip, no norm
    "bn_res": StackVariant("full_preact", "batch"),      # norm + skip
}
GROUPS = {
    "archetypes": list(ARCHETYPES),
    "orderings": [f"{o}/batch" for o in ("original", "bn_after_add", "relu_before_add",
                                          "relu_preact", "full_preact")],
    "skips": ["full_preact/batch/xskip:0.5", "full_preact/batch/xskip:2",
              "full_preact/batch/xskip_ln:2", "full_preact/batch/rskip_ln:2"],
    "norms": ["full_preact/layer", "full_preact/group:8", "plain/layer", "plain/group:8"],
}
CUSTOM_FORMAT = "'ordering/norm[/skip[/shortcut]]' (e.g. 'full_preact/group:8/xskip_ln:2')"


def parse_variant(name: str) -> StackVariant:
  """An archetype name or ``ordering/norm[/skip[/shortcut]]``, checked by the registries."""
  if name in ARCHETYPES:
    return ARCHETYPES[name]
  parts = name.split("/")
  if "/" not in name or not 2 <= len(parts) <= 4:
    raise common.unknown_variant(name, "moments", list(ARCHETYPES) + list(GROUPS),
                                 CUSTOM_FORMAT)
  variant = StackVariant(*parts)
  for registry, spec in ((UNIT_ORDERINGS, variant.ordering), (NORMS, variant.norm),
                         (COMBINATORS, variant.skip), (SHORTCUTS, variant.shortcut)):
    try:
      registry.validate(spec)
    except ConfigError as e:
      raise ConfigError(f"moments variant {name!r}: {e}") from None
  return variant


def expand_variants(text: str) -> list[str]:
  """Comma-separated names; a group name (``archetypes``, ``orderings``, ...) expands."""
  names = []
  for item in common.split_list(text, "variants"):
    for name in GROUPS.get(item, [item]):
      if name not in names:
        names.append(name)
  return names


def default_config() -> ml_collections.ConfigDict:
  """Every key of a moments analysis with its CPU-sized default."""
  c = ml_collections.ConfigDict()
  c.analysis = "moments"
  c.seed = 0
  c.variants = "archetypes"  # names, groups or custom specs, comma-separated
  c.width = 64               # channels of every unit
  c.spatial = 8              # input is (batch, spatial, spatial, width)
  c.batch = 32
  c.ff_units = 50            # units of feed-forward (ordering 'plain') variants: 100 layers
  c.res_units = 100          # units of residual variants: 200 layers
  c.tap_every = 1            # statistics every k units (must divide the unit counts)
  c.draws = 10
  c.draw_batch = 0           # draws vmapped together; 0 = auto (1 on CPU, 8 on GPU)
  c.inputs = "photos"        # photos | cifar10 | cifar100 | digits (images through a
  #                            random conv) | gaussian
  c.data_dir = ""            # cifar10/cifar100 inputs: as data.data_dir of training
  c.data_source = "auto"     # cifar10/cifar100 inputs: auto | tfds | tarball
  c.boundary = "periodic"    # periodic (Labatie) | zero (the training models' padding)
  c.bn_tangent = "exact"     # exact | frozen (Labatie: BN divides by x's std)
  c.rescale = True           # rescale the signal of degree-1 homogeneous units
  c.eig_iters = 0            # λ_max: 0 = exact eigvalsh; > 0 = power iterations (GPU)
  c.fit_start = 4            # fits use layers >= fit_start
  return c


def num_units(variant: StackVariant, config) -> int:
  return config.res_units if variant.residual else config.ff_units


def build_unit(variant: StackVariant, width: int, units: int) -> ConvUnit:
  """The training code's unit; BN momentum 0 so a train-mode pass stores the batch
  statistics themselves (used by ``bn_tangent='frozen'``)."""
  return conv_unit(width, ordering=variant.ordering, norm=variant.norm,
                  skip=variant.skip, shortcut=variant.shortcut,
                  ctx=NormContext(momentum=0.0), depth=DepthInfo("encoder_only", units))


def validate(config) -> list[tuple[str, StackVariant]]:
  """Raises ConfigError for the first invalid setting; returns the parsed variants."""
  for key in ("width", "spatial", "batch", "ff_units", "res_units", "tap_every", "draws"):
    common.require_int(config, key)
  common.require_int(config, "draw_batch", minimum=0)
  common.require_int(config, "eig_iters", minimum=0)
  common.require_int(config, "fit_start", minimum=1)
  common.require_int(config, "seed", minimum=0)
  common.require_choice(config.bn_tangent, BN_TANGENTS, "bn_tangent")
  common.require_choice(config.boundary, BOUNDARIES, "boundary")
  common.require_choice(config.inputs, INPUTS, "inputs")
  common.require_choice(config.data_source, data_lib.DATA_SOURCES, "data_source")
  validate_inputs(config)
  if config.batch * config.spatial ** 2 < 2:
    raise ConfigError("batch * spatial² must be >= 2 (statistics need two positions)")
  variants = [(name, parse_variant(name)) for name in expand_variants(config.variants)]
  for name, variant in variants:
    units = num_units(variant, config)
    if units % config.tap_every:
      raise ConfigError(
          f"tap_every={config.tap_every} must divide the {units} units of variant {name!r} "
          f"({'res_units' if variant.residual else 'ff_units'}); valid: "
          f"{[k for k in range(1, units + 1) if units % k == 0]}")
    unit = build_unit(variant, config.width, units)
    probe = jnp.zeros((1, 1, 1, config.width), jnp.float32)
    try:
      jax.eval_shape(lambda: unit.init(_rngs(jax.random.key(0)), probe, train=True))
    except ConfigError as e:
      raise ConfigError(f"moments variant {name!r} at width {config.width}: {e}") from None
  return variants


def _rngs(key):
  return {"params": key, "dropout": jax.random.fold_in(key, 1)}


def _periodic_padding(next_fun, args, kwargs, context):
  """Flax method interceptor: every stride-1 :class:`Conv` sees its input wrap-padded by
  p = (k−1)/2 and its output cropped by p, which is exactly a convolution with periodic
  boundaries (the conv's own zero padding only reaches the cropped ring)."""
  module = context.module
  if context.method_name == "__call__" and isinstance(module, Conv) and module.strides == 1:
    p = (module.kernel_size - 1) // 2
    if p:
      x = jnp.pad(args[0], ((0, 0), (p, p), (p, p), (0, 0)), mode="wrap")
      return next_fun(x, *args[1:], **kwargs)[:, p:-p, p:-p, :]
  return next_fun(*args, **kwargs)


def boundary_context(boundary: str):
  """Context in which the stack's convolutions use ``boundary`` conditions."""
  if boundary == "periodic":
    return nn.intercept_methods(_periodic_padding)
  return contextlib.nullcontext()


@functools.lru_cache(maxsize=1)
def _digits() -> np.ndarray:
  """scikit-learn's 1797 handwritten digits (they ship with the package), (N, 8, 8, 1)."""
  from sklearn.datasets import load_digits
  return load_digits().images.astype(np.float32)[..., None]


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[np.ndarray, ...]:
  """scikit-learn's two sample photographs (china.jpg, flower.jpg: 427x640x3 uint8; they
  ship with the package), decoded once."""
  from sklearn.datasets import load_sample_images
  return tuple(load_sample_images().images)


@functools.lru_cache(maxsize=2)
def _photo_crops(size: int, count: int = PHOTO_CROPS, seed: int = 0) -> np.ndarray:
  """``count`` size x size crops at uniformly random places of the photographs (a fixed
  set, like a data set): (count, size, size, 3) uint8."""
  photos = _photos()
  rng = np.random.default_rng(seed)
  crops = np.empty((count, size, size, 3), np.uint8)
  for i, which in enumerate(rng.integers(len(photos), size=count)):
    photo = photos[which]
    top = rng.integers(photo.shape[0] - size + 1)
    left = rng.integers(photo.shape[1] - size + 1)
    crops[i] = photo[top:top + size, left:left + size]
  return crops


@functools.lru_cache(maxsize=2)
def _cifar_train_images(name: str, data_dir: str, source: str) -> np.ndarray:
  """The training images of CIFAR-10/100, read as training reads them (data.load_cifar)."""
  config = ml_collections.ConfigDict({"data": {"source": source, "data_dir": data_dir}})
  return data_lib.load_cifar(name, config).train_images


def input_images(config) -> np.ndarray | None:
  """The set of images a draw samples its batch from, (N, S, S, C); None for ``gaussian``.

  ``photos`` are crops of 2·spatial pixels, so their stem has stride 2 like Labatie's."""
  if config.inputs == "gaussian":
    return None
  if config.inputs == "photos":
    return _photo_crops(2 * config.spatial)
  if config.inputs == "digits":
    return _digits()
  return _cifar_train_images(config.inputs, config.data_dir, config.data_source)


def validate_inputs(config) -> None:
  """ConfigError unless ``inputs`` can give ``batch`` images of ``spatial`` positions (reads
  CIFAR: a missing data set is reported here, with how to get it)."""
  if config.inputs == "photos":
    largest = min(p.shape[0] for p in _photos()) // 2
    if config.spatial > largest:
      raise ConfigError(f"inputs='photos' crops 2·spatial pixels of photographs of height "
                        f"{2 * largest + 1}: needs spatial <= {largest} (got "
                        f"{config.spatial}); use inputs=gaussian for larger sizes")
  images = input_images(config)
  if images is None:
    return
  size, count = images.shape[1], images.shape[0]
  if size % config.spatial:
    valid = [s for s in range(1, size + 1) if size % s == 0]
    raise ConfigError(f"inputs={config.inputs!r} are {size}x{size} images and the input "
                      f"conv's stride is {size}/spatial: spatial must divide {size} (got "
                      f"{config.spatial}; valid: {valid})")
  if config.batch > count:
    raise ConfigError(f"inputs={config.inputs!r} has {count} images: needs batch <= {count} "
                      f"(got batch={config.batch})")


def standardize_channels(images: jax.Array) -> jax.Array:
  """Per channel over the batch and positions: zero mean, unit variance (Labatie's input
  normalization).  Constant channels stay zero."""
  x = stats.centre(images.astype(jnp.float32))
  std = jnp.sqrt(jnp.mean(jnp.square(x), axis=(0, 1, 2), keepdims=True))
  return x / jnp.where(std > 0, std, 1.0)


def random_stem(key, images, noise, width: int, stride: int, boundary: str):
  """Labatie's input layer for the signal and the noise alike: one random 3x3 convolution
  to ``width`` channels with stride ``stride``, no bias, kernel ~ N(0, 1/fan_in) (LeCun:
  no ReLU follows), over padding of one pixel that wraps around (``periodic``) or is zero."""
  channels = images.shape[-1]
  kernel = jax.random.normal(key, (3, 3, channels, width), jnp.float32) / math.sqrt(
      9 * channels)
  mode = "wrap" if boundary == "periodic" else "constant"

  def conv(z):
    z = jnp.pad(z, ((0, 0), (1, 1), (1, 1), (0, 0)), mode=mode)
    return lax.conv_general_dilated(z, kernel, (stride, stride), "VALID",
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))

  return conv(images), conv(noise)


def make_inputs(key, config, images=None):
  """x⁰ (batch, spatial, spatial, width) with μ2(x̂⁰) = 1, and dx⁰ with μ2(dx⁰) = 1.

  ``images`` (from :func:`input_images`; None for ``gaussian``): ``batch`` distinct images,
  standardized per channel over the batch, and i.i.d. N(0, 1) image noise, both through
  :func:`random_stem` (Labatie's pipeline: CIFAR-10 32x32 -> 16x16 with stride 2).
  ``gaussian``: x⁰ and dx⁰ i.i.d. N(0, 1).
  """
  if (images is None) != (config.inputs == "gaussian"):
    raise ValueError(f"inputs={config.inputs!r} needs images=input_images(config)")
  kx, kdx, kstem = jax.random.split(key, 3)
  if images is None:
    shape = (config.batch, config.spatial, config.spatial, config.width)
    x = jax.random.normal(kx, shape, jnp.float32)
    dx = jax.random.normal(kdx, shape, jnp.float32)
  else:
    pick = jax.random.choice(kx, images.shape[0], (config.batch,), replace=False)
    x = standardize_channels(jnp.asarray(images)[pick])
    noise = jax.random.normal(kdx, x.shape, jnp.float32)
    x, dx = random_stem(kstem, x, noise, config.width, images.shape[1] // config.spatial,
                        config.boundary)
  return (x / jnp.sqrt(stats.second_moment(stats.centre(x))),
          dx / jnp.sqrt(stats.second_moment(dx)))


def unit_tangent(unit: ConvUnit, variables, x, dx, *, bn_tangent: str, key):
  """(f(x), ∂f(x)·dx) for one unit in train mode (batch statistics); see module doc."""
  rngs = {} if key is None else {"dropout": key}
  if bn_tangent == "exact":
    fn = lambda h: unit.apply(variables, h, train=True, mutable=["batch_stats"], rngs=rngs)[0]
    return jax.jvp(fn, (x,), (dx,))
  _, stats_now = unit.apply(variables, x, train=True, mutable=["batch_stats"], rngs=rngs)
  frozen = {**variables, **stats_now}
  return jax.jvp(lambda h: unit.apply(frozen, h, train=False), (x,), (dx,))


@functools.lru_cache(maxsize=64)
def is_homogeneous(variant: StackVariant, width: int) -> bool:
  """Whether the unit is positively homogeneous of degree 1, f(2x) = 2 f(x) (checked on a
  random 2x4x4 input with random parameters, train mode)."""
  unit = build_unit(variant, width, 1)

  @functools.partial(jax.jit,
                     compiler_options=cpu_workarounds.compiler_options(jax.default_backend()))
  def defect():
    key = jax.random.key(7, impl=common.PRNG_IMPL)
    x = jax.random.normal(key, (2, 4, 4, width), jnp.float32)
    variables = unit.init(_rngs(jax.random.fold_in(key, 1)), x, train=True)
    f = lambda h: unit.apply(variables, h, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.fold_in(key, 2)})[0]
    y = f(x)
    return jnp.max(jnp.abs(f(2.0 * x) - 2.0 * y)), jnp.max(jnp.abs(y))

  gap, scale = defect()
  return bool(gap <= 1e-4 * scale)


def draw_function(variant: StackVariant, config):
  """draw(key, images=None) -> {stat: (taps + 1,)} for one random network, input and
  perturbation; ``images`` = :func:`input_images` (None for ``gaussian`` inputs)."""
  units = num_units(variant, config)
  unit = build_unit(variant, config.width, units)
  width, k = config.width, config.tap_every
  probe = jnp.zeros((1, 1, 1, width), jnp.float32)
  iters, mode, boundary = config.eig_iters, config.bn_tangent, config.boundary
  rescale_signal = bool(config.rescale) and is_homogeneous(variant, width)

  def one_unit(carry, index):
    x, dx, log_scale, kp = carry
    key = jax.random.fold_in(kp, index)
    # Parameter shapes do not depend on batch or spatial size: init on a 1x1 probe.
    variables = unit.init(_rngs(key), probe, train=True)
    with boundary_context(boundary):
      y, dy = unit_tangent(unit, variables, x, dx, bn_tangent=mode,
                           key=jax.random.fold_in(key, 2))
    if rescale_signal:   # exact for degree-1 homogeneous units: f(cx) = c f(x)
      s = jnp.sqrt(stats.second_moment(y)) + 1e-30
      y, dy = y / s, dy / s
    n = jnp.sqrt(stats.second_moment(dy)) + 1e-30   # the tangent is linear in dx
    return (y, dy / n, log_scale + jnp.log(n), kp), None

  def tap_stats(x, dx, log_scale):
    out = stats.signal_noise_stats(x, dx, iters)
    out["log_chi"] = out["log_chi"] + log_scale
    return out

  def one_tap(carry, tap):
    carry, _ = lax.scan(one_unit, carry, tap * k + jnp.arange(k))
    return carry, tap_stats(*carry[:3])

  def draw(key, images=None):
    kin, kp = jax.random.split(key)
    x, dx = make_inputs(kin, config, images)
    zero = jnp.zeros((), jnp.float32)
    first = tap_stats(x, dx, zero)
    _, rest = lax.scan(one_tap, (x, dx, zero, kp), jnp.arange(units // k))
    out = jax.tree_util.tree_map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)
    out["log_chi"] = out["log_chi"] - out["log_chi"][0]      # χ⁰ = 1
    return out

  return draw


def summarize_variant(variant: StackVariant, config, per_draw: dict, seconds: float) -> dict:
  units = num_units(variant, config)
  unit_index = list(range(0, units + 1, config.tap_every))
  layer = [u * CONVS_PER_UNIT for u in unit_index]
  out = {"spec": dataclasses.asdict(variant) | {"string": variant.spec()},
         "residual": variant.residual, "units": units, "unit": unit_index, "layer": layer}
  for name in STATS:
    out[name] = stats.aggregate(per_draw[name])
  log_chi = np.asarray(out["log_chi"]["mean"])
  fit_layers = np.asarray(layer) >= config.fit_start
  out["fits"] = {"log_chi": stats.fit_growth(np.asarray(layer)[fit_layers],
                                             log_chi[fit_layers])}
  out["final"] = {name: out[name]["mean"][-1] for name in STATS}
  out["final"]["chi"] = float(math.exp(out["final"]["log_chi"]))
  out["final"]["layer"] = layer[-1]
  out["seconds"] = seconds
  return out


def run(config, log=print) -> dict:
  """Runs every variant; returns the JSON-ready results (see README "Diagnostics")."""
  variants = validate(config)
  keys = common.draw_keys(config.seed, config.draws)
  images = input_images(config)
  data = () if images is None else (jnp.asarray(images),)
  results = {}
  for name, variant in variants:
    start = time.time()
    per_draw = common.run_draws(draw_function(variant, config), keys, config.draw_batch,
                                data=data, label=name, log=log)
    results[name] = summarize_variant(variant, config, per_draw, time.time() - start)
    f = results[name]["final"]
    log(f"  {name}: {results[name]['units']} units, {time.time() - start:.1f} s; last layer "
        f"log chi {f['log_chi']:.3f}, r_eff signal {f['reff_signal']:.2f}")
  return {"variants": results}


def table(results: dict) -> str:
  """Summary: per variant, the fitted growth of χ and the last layer's statistics."""
  head = (f"{'variant':<28} {'layers':>6} {'dlogchi/layer':>13} {'power exp':>9} "
          f"{'better':>11} {'chi_L':>10} {'reff_sig':>8} {'reff_noise':>10} {'kurt':>6}")
  lines = [head, "-" * len(head)]
  for name, r in results["variants"].items():
    fit, f = r["fits"]["log_chi"], r["final"]
    lines.append(
        f"{name:<28} {f['layer']:>6} {fit['exponential']['rate']:>13.4f} "
        f"{fit['power']['exponent']:>9.3f} {str(fit['better']):>11} {f['chi']:>10.3g} "
        f"{f['reff_signal']:>8.2f} {f['reff_noise']:>10.2f} {f['kurtosis']:>6.2f}")
  return "\n".join(lines)
