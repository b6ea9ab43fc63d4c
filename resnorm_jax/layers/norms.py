"""Normalization layers, their registry, and the :class:`NormFactory` into which a model
resolves its norm once (SPEC.md section 1).

All norms are Flax Linen modules with one call signature, ``norm(x, train=..., mask=None)``,
and accept NHWC images ``(B, H, W, C)``, token sequences ``(B, T, D)`` with an optional
padding mask ``(B, T)`` (1 = real token), and flat features ``(B, D)``.

Why Linen (not NNX): parameters and BatchNorm statistics are plain pytrees, so the same model
function runs unchanged under ``jax.jit`` over a mesh, inside ``jax.shard_map`` / ``jax.pmap``
with an axis name, under ``nn.scan`` for 1000-layer nets, and is checkpointed by orbax without
any object graph traversal on the step's hot path.

Statistics are always computed in float32, whatever the activation dtype, and are reduced as
(sum, sum of squares, count) so that a padding mask or an uneven split never biases a mean.

BatchNorm cross-replica synchronisation is explicit (:class:`NormContext.bn_sync`):

* ``global``  statistics over the whole global batch (all data-parallel replicas);
* ``local``   statistics per replica ("ghost" BatchNorm, the original ResNet's 2-GPU setup);
* ``group:k`` statistics per group of ``k`` consecutive replicas.

The same definition holds in every execution style.  Under ``jax.jit`` on a global batch
(``axis_name=None``) the batch is viewed as ``(num_replicas / k, B / (num_replicas / k), ...)``
"ghost batches"; with the batch sharded contiguously over the devices that is exactly the
per-device math.  Inside a per-device program (``axis_name`` set) the per-replica sums are
reduced with ``psum`` (global) or ``all_gather`` + a per-group sum (``group:k``;
``axis_index_groups`` is not supported by ``shard_map``).  Running statistics are the mean
over groups of each group's batch statistics, identical on every replica.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from resnorm_jax.registry import ConfigError, Registry, Spec, parse_number

Array = jax.Array
@dataclasses.dataclass(frozen=True)
class NormInfo:
  """What the model builders need to know of a norm: ``sequences`` -- it has a meaning on
  token sequences (B, T, D), not only on images (``instance`` and ``switchable`` need
  spatial axes of their own)."""
  sequences: bool


NORMS = Registry("norm", NormInfo)
BN_SYNC_MODES = ("global", "local", "group:k")


# ----------------------------------------------------------------------------------------
# Context: how batch statistics are shared, momentum, epsilon.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NormContext:
  """Settings shared by every norm of a model.

  Attributes:
    bn_sync: ``global``, ``local`` or ``group:k`` (see module docstring).
    axis_name: the data-parallel axis name inside ``shard_map`` / ``pmap`` programs;
      ``None`` when the model sees the global batch (one device, or ``jax.jit`` on a mesh).
    num_replicas: how many data-parallel replicas the global batch is split over.
    momentum: running statistics ``r <- momentum * r + (1 - momentum) * batch_stat``.
    epsilon: added to the variance.
  """
  bn_sync: str = "global"
  axis_name: str | tuple[str, ...] | None = None
  num_replicas: int = 1
  momentum: float = 0.9
  epsilon: float = 1e-5
  # Number of consecutive replicas whose samples share BatchNorm statistics: ``bn_sync``
  # parsed once, here (a function of the fields above, so not part of equality or hash).
  group_size: int = dataclasses.field(init=False, repr=False, compare=False)

  def __post_init__(self):
    object.__setattr__(self, "group_size", bn_sync_group_size(self.bn_sync, self.num_replicas))

  @property
  def num_stat_groups(self) -> int:
    return self.num_replicas // self.group_size


def bn_sync_group_size(bn_sync: str, num_replicas: int) -> int:
  """Parses ``bn_sync`` into the number of replicas per statistics group."""
  if num_replicas < 1:
    raise ConfigError(f"num_replicas must be >= 1, got {num_replicas}")
  mode, _, arg = str(bn_sync).partition(":")
  if mode == "global" and not arg:
    return num_replicas
  if mode == "local" and not arg:
    return 1
  if mode == "group" and arg:
    k = parse_number(arg, f"bn_sync {bn_sync!r}: k", kind=int, minimum=1)
    if num_replicas % k:
      raise ConfigError(
          f"bn_sync {bn_sync!r}: k={k} must divide the number of data-parallel replicas "
          f"({num_replicas}); choose k among "
          f"{[d for d in range(1, num_replicas + 1) if num_replicas % d == 0]}")
    return k
  raise ConfigError(
      f"unknown bn_sync {bn_sync!r}; valid choices: global, local, group:k (k an integer "
      f"dividing the number of replicas)")


# ----------------------------------------------------------------------------------------
# Statistics helpers.
# ----------------------------------------------------------------------------------------
def _broadcast_mask(mask: Array | None, x: Array) -> Array | None:
  """(B, T) mask -> (B, T, 1) float32 mask broadcastable against x."""
  if mask is None:
    return None
  if mask.shape != x.shape[:mask.ndim]:
    raise ValueError(f"mask shape {mask.shape} does not match input shape {x.shape}")
  m = mask.astype(jnp.float32)
  return m.reshape(m.shape + (1,) * (x.ndim - m.ndim))


def masked_sums(x: Array, axes: Sequence[int], mask: Array | None = None):
  """Returns float32 (sum, sum of squares, count) over ``axes`` with keepdims."""
  x = x.astype(jnp.float32)
  axes = tuple(axes)
  m = _broadcast_mask(mask, x)
  if m is None:
    count = 1.0
    for a in axes:
      count *= x.shape[a]
    s = jnp.sum(x, axes, keepdims=True)
    ss = jnp.sum(jnp.square(x), axes, keepdims=True)
    return s, ss, jnp.asarray(count, jnp.float32)
  m = jnp.broadcast_to(m, x.shape[:-1] + (1,))
  s = jnp.sum(x * m, axes, keepdims=True)
  ss = jnp.sum(jnp.square(x) * m, axes, keepdims=True)
  count = jnp.sum(m, axes, keepdims=True)
  return s, ss, count


def moments_from_sums(s, ss, count):
  """Mean and (biased) variance from sums; the variance is clamped at 0."""
  count = jnp.maximum(count, 1.0)
  mean = s / count
  var = jnp.maximum(ss / count - jnp.square(mean), 0.0)
  return mean, var


def moments(x: Array, axes: Sequence[int], mask: Array | None = None):
  return moments_from_sums(*masked_sums(x, axes, mask))


def spatial_axes(x: Array) -> tuple[int, ...]:
  """Axes between batch and channels: (H, W) for images, (T,) for sequences."""
  return tuple(range(1, x.ndim - 1))


def sample_axes(x: Array) -> tuple[int, ...]:
  """Axes of one "sample" for per-sample norms.

  Images (B, H, W, C): H, W and C (one sample = one image).  Sequences (B, T, D) and flat
  (B, D) features: D only (one sample = one token), as in Transformers.
  """
  if x.ndim == 4:
    return (1, 2, 3)
  return (x.ndim - 1,)


def _require_spatial_axes(name: str, x: Array) -> None:
  if x.ndim < 3:
    raise ConfigError(
        f"norm {name!r} normalizes over spatial or time axes, but got flat features of "
        f"shape {x.shape}; use it on (B, H, W, C) images or (B, T, D) sequences, or choose "
        f"'layer', 'rms' or 'batch' for flat features")


def batch_moments(x: Array, mask: Array | None, ctx: NormContext):
  """BatchNorm statistics under ``ctx.bn_sync``.

  Returns ``(mean, var)`` broadcastable against ``x`` (leading dim 1, or B for ghost
  groups under jit) and ``(running_mean, running_var)`` of shape (C,): the mean over
  statistics groups of each group's mean and variance.
  """
  axes = tuple(range(x.ndim - 1))
  channels = x.shape[-1]
  if ctx.axis_name is None:
    groups = ctx.num_stat_groups
    if groups == 1:
      mean, var = moments(x, axes, mask)
      return (mean, var), (mean.reshape(channels), var.reshape(channels))
    if x.shape[0] % groups:
      raise ValueError(
          f"bn_sync={ctx.bn_sync!r} splits the batch into {groups} statistics groups, which "
          f"must divide the batch size {x.shape[0]}")
    xg = x.reshape((groups, x.shape[0] // groups) + x.shape[1:])
    mg = None if mask is None else mask.reshape((groups, -1) + mask.shape[1:])
    mean, var = moments(xg, tuple(range(1, xg.ndim - 1)), mg)  # (G, 1, ..., C)
    per_sample = lambda a: jnp.broadcast_to(a, (groups, x.shape[0] // groups) + a.shape[2:]
                                            ).reshape((x.shape[0],) + a.shape[2:])
    running = (jnp.mean(mean, axis=tuple(range(mean.ndim - 1))),
               jnp.mean(var, axis=tuple(range(var.ndim - 1))))
    return (per_sample(mean), per_sample(var)), running
  # Per-device program: reduce per-replica sums explicitly.
  s, ss, count = masked_sums(x, axes, mask)
  count = jnp.broadcast_to(count, s.shape)
  stats = jnp.stack([s, ss, count])
  n = ctx.num_replicas
  k = ctx.group_size
  if k == n:
    stats = lax.psum(stats, ctx.axis_name)
  elif k > 1:
    gathered = lax.all_gather(stats, ctx.axis_name)  # (n, 3, ...)
    grouped = gathered.reshape((n // k, k) + stats.shape).sum(axis=1)
    stats = grouped[lax.axis_index(ctx.axis_name) // k]
  mean, var = moments_from_sums(stats[0], stats[1], stats[2])
  running = (mean.reshape(channels), var.reshape(channels))
  if k < n:  # groups differ: keep the replicated running statistics identical
    running = lax.pmean(running, ctx.axis_name)
  return (mean, var), running


def _batch_statistics(module: nn.Module, x: Array, mask, ctx: NormContext, train: bool):
  """BatchNorm's (mean, var): synced batch statistics in training, which also update the
  running averages ``r <- momentum·r + (1 − momentum)·stat`` (not during init); the running
  averages in evaluation."""
  c = x.shape[-1]
  ra_mean = module.variable("batch_stats", "mean", lambda: jnp.zeros((c,), jnp.float32))
  ra_var = module.variable("batch_stats", "var", lambda: jnp.ones((c,), jnp.float32))
  if not train:
    return ra_mean.value, ra_var.value
  (mean, var), (run_mean, run_var) = batch_moments(x, mask, ctx)
  if not module.is_initializing():
    m = ctx.momentum
    ra_mean.value = m * ra_mean.value + (1 - m) * run_mean
    ra_var.value = m * ra_var.value + (1 - m) * run_var
  return mean, var


def _affine_params(module: nn.Module, features: int, use_scale: bool, use_bias: bool,
                   scale_init: Callable):
  """The per-channel (γ, β) parameters of a norm, ``None`` where not used."""
  scale = module.param("scale", scale_init, (features,), jnp.float32) if use_scale else None
  bias = (module.param("bias", nn.initializers.zeros, (features,), jnp.float32)
          if use_bias else None)
  return scale, bias


def _affine(module: nn.Module, y: Array, features: int, use_scale: bool, use_bias: bool,
            scale_init: Callable) -> Array:
  scale, bias = _affine_params(module, features, use_scale, use_bias, scale_init)
  return _scale_shift(y, scale, bias)


def _scale_shift(y, scale, bias):
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


def _normalize(x, mean, var, eps):
  return (x.astype(jnp.float32) - mean) * lax.rsqrt(var + eps)


def normalize_affine(x, mean, var, scale, bias, eps: float):
  """y = γ (x − μ) / sqrt(σ² + ε) + β in float32, for statistics of any broadcast shape.

  With per-channel statistics (BatchNorm in every sync mode, InstanceNorm, SwitchableNorm:
  ``mean.shape[-1] == C``) the derivative is written by hand, grouping every tangent that
  enters per statistic: with x̂ = (x − μ)·r, r = (σ² + ε)^(-1/2),

    dy = γr·dx + A + x̂·B,   A = dβ − γr·dμ,   B = dγ − ½γr²·dσ²   (A, B per statistic),

  so the reverse pass (its transpose) reduces the cotangent twice, Σ∂L/∂y → A and
  Σ∂L/∂y·x̂ → B, and gets ∂L/∂β, ∂L/∂γ, ∂L/∂μ, ∂L/∂σ² by per-channel rescaling, where
  differentiating the formula directly reduces it four times.  The gradients through μ and
  σ² continue into however they were computed (sums, psum across replicas, ghost groups,
  masks) by ordinary autodiff, so one definition serves every sync mode, and forward mode
  (the moments diagnostics' ``jax.jvp``) works as well.
  """
  if mean.shape[-1] != x.shape[-1] or var.shape != mean.shape:
    return _scale_shift(_normalize(x, mean, var, eps), scale, bias)
  gamma = jnp.ones(x.shape[-1], jnp.float32) if scale is None else scale
  beta = jnp.zeros(x.shape[-1], jnp.float32) if bias is None else bias
  return _normalize_affine_per_channel(x, mean, var, gamma, beta, eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _normalize_affine_per_channel(x, mean, var, scale, bias, eps):
  return _normalize(x, mean, var, eps) * scale + bias


@_normalize_affine_per_channel.defjvp
def _normalize_affine_jvp(eps, primals, tangents):
  x, mean, var, scale, bias = primals
  dx, dmean, dvar, dscale, dbias = tangents
  r = lax.rsqrt(var + eps)
  x_hat = (x.astype(jnp.float32) - mean) * r
  gain = scale * r
  a = dbias - gain * dmean             # per statistic
  b = dscale - 0.5 * gain * r * dvar   # per statistic
  return x_hat * scale + bias, gain * dx.astype(jnp.float32) + a + x_hat * b


# ----------------------------------------------------------------------------------------
# Modules.
# ----------------------------------------------------------------------------------------
class BatchNorm(nn.Module):
  """BatchNorm (Ioffe & Szegedy 2015): y = γ (x − μ_B) / sqrt(σ²_B + ε) + β.

  μ_B, σ²_B per channel over (N, H, W) or over the real tokens of (B, T); replicas share
  them according to ``ctx.bn_sync``.  In eval mode the running statistics are used.
  """
  ctx: NormContext = NormContext()
  use_scale: bool = True
  use_bias: bool = True
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None):
    c = x.shape[-1]
    mean, var = _batch_statistics(self, x, mask, self.ctx, train)
    scale, bias = _affine_params(self, c, self.use_scale, self.use_bias, self.scale_init)
    return normalize_affine(x, mean, var, scale, bias, self.ctx.epsilon).astype(x.dtype)


class SampleKind(enum.Enum):
  """The statistics of a :class:`SampleNorm`, chosen by the registry entry that builds it."""
  LAYER = "layer"
  RMS = "rms"
  INSTANCE = "instance"
  GROUP = "group"


class SampleNorm(nn.Module):
  """Per-sample normalization over ``kind``-dependent axes (a :class:`SampleKind`).

  * ``layer``: y = γ (x − μ) / sqrt(σ² + ε) + β with μ, σ² over H, W, C of each image or D
    of each token (Ba et al. 2016); ``per_position=True`` uses C only (per pixel).
  * ``rms``: y = γ x / sqrt(mean(x²) + ε) over the same axes, no centring (Zhang & Sennrich
    2019), no bias.
  * ``instance``: μ, σ² per sample and channel over H, W (Ulyanov et al. 2016); for
    sequences over the real tokens T.
  * ``group``: per sample over H, W and the C/G channels of each of G groups (Wu & He
    2018); for sequences per token over D/G.
  """
  kind: SampleKind
  groups: int = 1
  per_position: bool = False
  epsilon: float = 1e-5
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None):
    del train
    c = x.shape[-1]
    if self.kind is SampleKind.GROUP:
      if c % self.groups:
        raise ConfigError(
            f"norm 'group:{self.groups}': G={self.groups} must divide the {c} channels; "
            f"valid G for {c} channels: {[g for g in range(1, c + 1) if c % g == 0]}")
      xg = x.reshape(x.shape[:-1] + (self.groups, c // self.groups))
      axes = (tuple(range(1, x.ndim - 1)) if x.ndim == 4 else ()) + (xg.ndim - 1,)
      mean, var = moments(xg, axes)
      y = _normalize(xg, mean, var, self.epsilon).reshape(x.shape)
    elif self.kind is SampleKind.INSTANCE:
      _require_spatial_axes("instance", x)
      mean, var = moments(x, spatial_axes(x), mask)
      y = _normalize(x, mean, var, self.epsilon)
    else:
      axes = (x.ndim - 1,) if self.per_position else sample_axes(x)
      if self.kind is SampleKind.RMS:
        ms = jnp.mean(jnp.square(x.astype(jnp.float32)), axes, keepdims=True)
        y = x.astype(jnp.float32) * lax.rsqrt(ms + self.epsilon)
      else:
        mean, var = moments(x, axes)
        y = _normalize(x, mean, var, self.epsilon)
    y = _affine(self, y, c, True, self.kind is not SampleKind.RMS, self.scale_init)
    return y.astype(x.dtype)


class SwitchableNorm(nn.Module):
  """Switchable Normalization (Luo et al. 2018).

  μ = Σ_k softmax(w_μ)_k μ_k and σ² = Σ_k softmax(w_σ)_k σ²_k over k ∈ {IN, LN, BN};
  y = γ (x − μ) / sqrt(σ² + ε) + β.  The BN statistics are shared across replicas like
  :class:`BatchNorm` and kept as running averages for evaluation.
  """
  ctx: NormContext = NormContext()
  scale_init: Callable = nn.initializers.ones

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None):
    c = x.shape[-1]
    _require_spatial_axes("switchable", x)
    mean_in, var_in = moments(x, spatial_axes(x), mask)
    mean_ln, var_ln = moments(x, sample_axes(x), mask if x.ndim == 4 else None)
    mean_bn, var_bn = _batch_statistics(self, x, mask, self.ctx, train)
    w_mean = jax.nn.softmax(self.param("mean_weight", nn.initializers.ones, (3,), jnp.float32))
    w_var = jax.nn.softmax(self.param("var_weight", nn.initializers.ones, (3,), jnp.float32))
    mean = w_mean[0] * mean_in + w_mean[1] * mean_ln + w_mean[2] * mean_bn
    var = w_var[0] * var_in + w_var[1] * var_ln + w_var[2] * var_bn
    scale, bias = _affine_params(self, c, True, True, self.scale_init)
    return normalize_affine(x, mean, var, scale, bias, self.ctx.epsilon).astype(x.dtype)


class Identity(nn.Module):
  """No normalization: y = x."""

  @nn.compact
  def __call__(self, x, *, train: bool = False, mask=None):
    del train, mask
    return x


# ----------------------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------------------
_DEFAULT_CTX = NormContext()
DEFAULT_GROUPS = 32   # GroupNorm's G when `group` has no argument (Wu & He 2018)


@NORMS.register("batch", "BatchNorm over (N,H,W) / real (B,T) tokens per channel; "
                "replicas share statistics per `parallel.bn_sync` (global, local, group:k)",
                info=NormInfo(sequences=True))
def _batch(arg, ctx=_DEFAULT_CTX, scale_init=nn.initializers.ones, name=None):
  return BatchNorm(ctx=ctx, scale_init=scale_init, name=name)


def _register_per_sample(kind: str, doc: str):
  """``layer`` and ``rms``: all of H,W,C per image (or D per token); ``:c`` channels only."""
  def per_position(arg):
    if arg not in (None, "c"):
      raise ConfigError(f"valid arguments: none (all of H,W,C) or 'c', got {arg!r}")
    return arg == "c"

  sample_kind = SampleKind(kind)

  @NORMS.register(kind, doc, arg_doc="`c` = over channels only, per pixel",
                  parse=per_position, info=NormInfo(sequences=True))
  def build(per_position, ctx=_DEFAULT_CTX, scale_init=nn.initializers.ones, name=None):
    return SampleNorm(sample_kind, per_position=per_position, epsilon=ctx.epsilon,
                      scale_init=scale_init, name=name)


_register_per_sample("layer", "LayerNorm per sample over (H,W,C) of an image / D of a token")


@NORMS.register("instance", "InstanceNorm per sample and channel over (H,W) / real tokens T",
                info=NormInfo(sequences=False))
def _instance(arg, ctx=_DEFAULT_CTX, scale_init=nn.initializers.ones, name=None):
  return SampleNorm(SampleKind.INSTANCE, epsilon=ctx.epsilon, scale_init=scale_init, name=name)


@NORMS.register("group", "GroupNorm per sample over (H,W) and C/G channels of each group",
                arg_doc="G, the number of groups (default 32), must divide the channels",
                parse=lambda arg: DEFAULT_GROUPS if arg is None else parse_number(
                    arg, "G", kind=int, minimum=1),
                info=NormInfo(sequences=True))
def _group(groups, ctx=_DEFAULT_CTX, scale_init=nn.initializers.ones, name=None):
  return SampleNorm(SampleKind.GROUP, groups=groups, epsilon=ctx.epsilon, scale_init=scale_init,
                    name=name)


@NORMS.register("switchable", "Switchable Norm: learned softmax mix of IN, LN and BN "
                "statistics (BN part synced like `batch`)", info=NormInfo(sequences=False))
def _switchable(arg, ctx=_DEFAULT_CTX, scale_init=nn.initializers.ones, name=None):
  return SwitchableNorm(ctx=ctx, scale_init=scale_init, name=name)


_register_per_sample("rms", "RMSNorm: x / sqrt(mean(x²) + ε) per sample, scale only, no "
                     "centring")


@NORMS.register("none", "identity: no normalization", info=NormInfo(sequences=True))
def _none(arg, ctx=_DEFAULT_CTX, scale_init=nn.initializers.ones, name=None):
  return Identity(name=name)


@dataclasses.dataclass(frozen=True)
class NormFactory:
  """A norm resolved once: its parsed spec and its context.  Modules receive one and call
  it for each norm they place, ``factory(name=..., scale_init=...)``; hashable, so it can
  be a field of a Flax module or of a frozen spec."""
  spec: Spec
  ctx: NormContext = _DEFAULT_CTX

  def __call__(self, *, name: str | None = None,
               scale_init: Callable = nn.initializers.ones) -> nn.Module:
    return self.spec.entry.build(self.spec.arg, ctx=self.ctx, scale_init=scale_init,
                                 name=name)

  def __repr__(self):
    return f"NormFactory({self.spec.text!r}, {self.ctx!r})"

  @property
  def channel_groups(self) -> int:
    """The number of groups the norm splits the channels into (GroupNorm's G, 1 for the
    other norms): every channel count it sees must be a multiple of it."""
    norm = self()
    return norm.groups if isinstance(norm, SampleNorm) else 1


def norm_factory(spec: str | Spec, ctx: NormContext = _DEFAULT_CTX) -> NormFactory:
  """The :class:`NormFactory` of ``spec`` (e.g. ``"batch"``, ``"group:32"``) under ``ctx``;
  ConfigError for an unknown name or a bad argument."""
  return NormFactory(NORMS.parse(spec), ctx)


def make_norm(spec, ctx: NormContext = _DEFAULT_CTX, *,
              scale_init: Callable = nn.initializers.ones, name: str | None = None) -> nn.Module:
  """Builds the norm named by ``spec`` (e.g. ``"batch"``, ``"group:32"``, or a
  :class:`resnorm_jax.registry.Spec`) once, outside a model (a model resolves its norm
  into a :class:`NormFactory` instead)."""
  return norm_factory(spec, ctx)(name=name, scale_init=scale_init)

