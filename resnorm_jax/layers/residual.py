"""Shortcuts, residual unit orderings and skip+norm combinators (SPEC.md sections 2-3).

Three registries compose into every residual design of the seeds:

* ``SHORTCUTS`` transform the two terms of an addition: ``(s, f) = shortcut(x, F(x))``
  (He et al. 2016, Table 1: identity, constant scaling, gating, 1x1 conv, dropout).
* ``COMBINATORS`` decide how the terms are added and normalized around any branch F,
  a conv unit's or a Transformer sublayer's (Liu et al. 2020 and the related designs):
  ``y = combinator(x, F)``.
* ``UNIT_ORDERINGS`` place norms, ReLUs and convolutions inside a conv unit's branch and
  after the addition (He et al. 2016, Fig. 4 (a)-(e), plus ``plain``).

Each registry resolves a spec once, into a frozen value (:class:`ShortcutSpec`,
:class:`SkipSpec`, :class:`UnitOrdering`); a :class:`UnitVariant` bundles them with the
norm's :class:`~resnorm_jax.layers.norms.NormFactory`, and :class:`ConvUnit` composes
them: ``y = after_add(combinator(x, branch, shortcut))``.  Modules receive these values and
never see a variant's name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from resnorm_jax import cpu_workarounds
from resnorm_jax.layers.conv import Conv, he_normal
from resnorm_jax.layers.norms import NormContext, NormFactory, norm_factory
from resnorm_jax.layers.taps import tap
from resnorm_jax.registry import ConfigError, Registry, parse_number

SHORTCUTS = Registry("shortcut")
UNIT_ORDERINGS = Registry("unit")
COMBINATORS = Registry("skip")
_DEFAULT_CTX = NormContext()


# ----------------------------------------------------------------------------------------
# Shortcuts.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShortcutSpec:
  """A shortcut variant resolved once by its registry entry (what :class:`Shortcut` does).

  ``project``: a 1x1 convolution on every unit, not only where the shape changes;
  ``gate``: s = (1 − g)·x with a learned gate g (bias init ``gate_bias_init``), and also
  f = g·F(x) when ``gate_branch``; ``dropout_rate``: s = dropout(x) in training; otherwise
  s = ``x_scale``·x and f = ``f_scale``·F(x).
  """
  x_scale: float = 1.0
  f_scale: float = 1.0
  project: bool = False
  gate: bool = False
  gate_branch: bool = False
  gate_bias_init: float = -6.0
  dropout_rate: float | None = None


class Shortcut(nn.Module):
  """Returns the two terms ``(s, f)`` that a combinator adds: s from x, f from F(x).

  When the branch changes the shape (``strides > 1`` or ``features != channels``) x is
  first projected by a 1x1 convolution with that stride (He et al. 2016); ``conv1x1``
  projects every shortcut.  Gates are g = sigmoid(W_g x + b_g) from a 1x1 convolution (a
  Dense layer over channels, so sequences work too) of the (projected) shortcut input.
  """
  spec: ShortcutSpec = ShortcutSpec()
  features: int | None = None  # channels of F(x); None = same as x
  strides: int = 1
  weight_standardization: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, fx, *, train: bool = False):
    spec = self.spec
    features = self.features or x.shape[-1]
    if spec.project or self.strides != 1 or features != x.shape[-1]:
      if x.ndim != 4:
        raise ValueError(f"a projection shortcut needs NHWC input, got shape {x.shape}")
      x = Conv(features, 1, self.strides, weight_standardization=self.weight_standardization,
               dtype=self.dtype, name="projection")(x)
    if spec.gate:
      g = nn.sigmoid(nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                              bias_init=nn.initializers.constant(spec.gate_bias_init),
                              name="gate")(x))
      fx = g * fx if spec.gate_branch else fx
      return (1.0 - g) * x, fx
    if spec.dropout_rate is not None:
      return nn.Dropout(spec.dropout_rate)(x, deterministic=not train), fx
    return spec.x_scale * x, spec.f_scale * fx


def _floats(arg: str, what: str, count: int) -> list[float]:
  parts = arg.split(",")
  if len(parts) != count:
    raise ConfigError(f"{what} needs {count} comma-separated numbers, got {arg!r}")
  return [parse_number(p, what) for p in parts]


@SHORTCUTS.register("identity", "s = x (projection 1x1 conv only where the shape changes)")
def _identity(arg) -> ShortcutSpec:
  return ShortcutSpec()


@SHORTCUTS.register("constant", "constant scaling: y = a·x + b·F(x)",
                    arg_doc="`a,b` (default 0.5,0.5; He 2016 also ran 0.5,1)")
def _constant(arg) -> ShortcutSpec:
  a, b = (0.5, 0.5) if arg is None else _floats(arg, f"shortcut 'constant:{arg}'", 2)
  return ShortcutSpec(x_scale=a, f_scale=b)


@SHORTCUTS.register("exclusive_gate", "y = (1−g)·x + g·F(x), g = sigmoid(1x1 conv(x) + b_g)",
                    arg_doc="b_g, the gate bias init (default -6)")
def _exclusive_gate(arg) -> ShortcutSpec:
  b = -6.0 if arg is None else parse_number(arg, f"shortcut 'exclusive_gate:{arg}': b_g")
  return ShortcutSpec(gate=True, gate_branch=True, gate_bias_init=b)


@SHORTCUTS.register("shortcut_gate", "shortcut-only gating: y = (1−g)·x + F(x)",
                    arg_doc="b_g, the gate bias init (default -6)")
def _shortcut_gate(arg) -> ShortcutSpec:
  b = -6.0 if arg is None else parse_number(arg, f"shortcut 'shortcut_gate:{arg}': b_g")
  return ShortcutSpec(gate=True, gate_bias_init=b)


@SHORTCUTS.register("conv1x1", "s = 1x1 conv(x) on every unit")
def _conv1x1(arg) -> ShortcutSpec:
  return ShortcutSpec(project=True)


@SHORTCUTS.register("dropout", "s = dropout(x) in training", arg_doc="p (default 0.5)")
def _dropout(arg) -> ShortcutSpec:
  p = 0.5 if arg is None else parse_number(arg, f"shortcut 'dropout:{arg}': p", minimum=0.0)
  if p >= 1.0:
    raise ConfigError(f"shortcut 'dropout:{arg}': p must be < 1")
  return ShortcutSpec(dropout_rate=p)


def make_shortcut(spec: str | ShortcutSpec, *, features=None, strides=1,
                  weight_standardization=False, dtype=jnp.float32, name=None) -> Shortcut:
  """The :class:`Shortcut` of ``spec`` (a SHORTCUTS spec, or its resolved ShortcutSpec)."""
  resolved = spec if isinstance(spec, ShortcutSpec) else SHORTCUTS.build(spec)
  return Shortcut(resolved, features=features, strides=strides, dtype=dtype,
                  weight_standardization=weight_standardization, name=name)


# ----------------------------------------------------------------------------------------
# Skip + norm combinators.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DepthInfo:
  """Depth of the network a combinator sits in (for DeepNorm's constants).

  ``stack`` is ``encoder_only`` (also conv nets), ``encoder`` or ``decoder`` (of an
  encoder-decoder); ``num_encoder`` / ``num_decoder`` count residual sublayers' layers (N, M).
  """
  stack: str = "encoder_only"
  num_encoder: int = 1
  num_decoder: int = 0


def deepnorm_constants(depth: DepthInfo) -> tuple[float, float]:
  """DeepNet (Wang et al. 2022, Table 1) residual scale α and init gain β.

  encoder-only: α = (2N)^¼, β = (8N)^−¼; encoder of enc-dec: α = 0.81 (N⁴M)^1/16,
  β = 0.87 (N⁴M)^−1/16; decoder of enc-dec: α = (3M)^¼, β = (12M)^−¼.
  """
  n, m = depth.num_encoder, depth.num_decoder
  if depth.stack == "encoder_only":
    return (2 * n) ** 0.25, (8 * n) ** -0.25
  if depth.stack == "encoder":
    return 0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)
  if depth.stack == "decoder":
    return (3 * m) ** 0.25, (12 * m) ** -0.25
  raise ConfigError(f"unknown DeepNorm stack {depth.stack!r}; valid choices: "
                    "encoder_only, encoder, decoder")


class SkipCombinator(nn.Module):
  """y = combinator(x, F): one formula family covering every registered skip design.

  With ``h = PreNorm(x)`` (or x), ``(s, f) = shortcut(x, F(h))`` and ``a`` the learned
  branch gain (or 1):

      z_1 = x_scale · s + a · f
      z_k = N_k(s + z_{k−1})  for k = 2..repeats, after z_1 ← N_1(z_1) when repeats ≥ 1

  i.e. ``skip``: s + f; ``xskip``: λs + f; ``xskip_ln``: LN(λs + f); ``rskip_ln``
  (λ = repeats): G_1 = LN(s + f), G_k = LN(s + G_{k−1}); ``pre_ln``: s + F(LN(x));
  ``post_ln``: LN(s + f); ``rezero``/``skipinit``: s + α f; ``deepnorm``: LN(α s + f).
  Each recursion step of rSkip has its own norm parameters (each step builds a different
  feature distribution, Liu et al. 2020).  ``init_scale`` is DeepNorm's β, read by model
  builders to scale the branch's initialisation.  The norms are resolved
  :class:`~resnorm_jax.layers.norms.NormFactory` s (``None``: no norm there).
  """
  x_scale: float = 1.0
  post_norm: NormFactory | None = None
  repeats: int = 0
  pre_norm: NormFactory | None = None
  branch_gain_init: float | None = None
  init_scale: float = 1.0
  tap_output: bool = False   # the combinator is a residual unit of its model (layers/taps.py)

  @nn.compact
  def __call__(self, x, branch: Callable, *, train: bool = False, mask=None,
               shortcut: Callable | None = None):
    h = x
    if self.pre_norm is not None:
      h = self.pre_norm(name="pre_norm")(x, train=train, mask=mask)
    fx = branch(h)
    s, f = shortcut(x, fx) if shortcut is not None else (x, fx)
    if self.branch_gain_init is not None:
      gain = self.param("branch_gain", nn.initializers.constant(self.branch_gain_init), (),
                        jnp.float32)
      f = gain.astype(f.dtype) * f
    z = self.x_scale * s + f
    for k in range(self.repeats):
      if k > 0:
        z = s + z
      z = self.post_norm(name=f"post_norm_{k}")(z, train=train, mask=mask)
    return tap(self, z) if self.tap_output else z


@dataclasses.dataclass(frozen=True)
class SkipSpec:
  """A combinator variant resolved once (λ, its norms, DeepNorm's constants): the fields
  of a :class:`SkipCombinator`.  A model reads ``init_scale`` (β) and builds one
  combinator per residual unit or sublayer with :meth:`build`."""
  x_scale: float = 1.0
  post_norm: NormFactory | None = None
  repeats: int = 0
  pre_norm: NormFactory | None = None
  branch_gain_init: float | None = None
  init_scale: float = 1.0

  def build(self, name: str | None = None, *, tap_output: bool = False) -> SkipCombinator:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    return SkipCombinator(**fields, tap_output=tap_output, name=name)


@dataclasses.dataclass(frozen=True)
class _Norm:
  """Where a combinator's registration puts a norm: ``fixed`` (a NORMS spec, e.g. BN of
  ``xskip_bn``), or ``None`` for the model's LayerNorm (``layer_norm`` of
  :func:`resolve_combinator`, e.g. RMSNorm in an RMSNorm Transformer)."""
  fixed: str | None = None

  def resolve(self, layer_norm: NormFactory, ctx: NormContext) -> NormFactory:
    return layer_norm if self.fixed is None else norm_factory(self.fixed, ctx)


_LN, _BN = _Norm(), _Norm("batch")


def _resolve_lambda(name: str, arg: str | None, lam, *, default, integer=False, minimum=0.0):
  """λ from the spec argument (``xskip:2``) or ``model.skip_lambda``; they must agree."""
  what = f"skip '{name}' lambda"
  value = None if arg is None else parse_number(arg, what)
  if lam is not None:
    lam = float(lam)
    if value is not None and value != lam:
      raise ConfigError(f"{what} given twice: {arg!r} in the spec and skip_lambda={lam}")
    value = lam
  value = default if value is None else value
  if value < minimum:
    raise ConfigError(f"{what} must be >= {minimum:g}, got {value:g}")
  if integer:
    if value != int(value):
      raise ConfigError(f"{what} must be an integer >= 1 (the number of recursive "
                        f"skip+norm steps), got {value:g}")
    return int(value)
  return value


def _no_lambda(name, arg, lam):
  if arg is not None or lam is not None:
    raise ConfigError(
        f"skip {name!r} takes no lambda (got {arg if arg is not None else lam!r}); lambda "
        f"applies to: {', '.join(LAMBDA_COMBINATORS)}")


LAMBDA_COMBINATORS = ("xskip", "xskip_ln", "xskip_bn", "rskip_ln", "rskip_bn")


def _register_lambda_combinator(name, doc, *, norm: _Norm | None, recursive):
  @COMBINATORS.register(name, doc, arg_doc="λ (or `model.skip_lambda`)" +
                        (", an integer >= 1" if recursive else ", a float >= 0"))
  def build(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, layer_norm=None) -> SkipSpec:
    del depth
    value = _resolve_lambda(name, arg, lam, default=1,
                            integer=recursive, minimum=1 if recursive else 0.0)
    post = None if norm is None else norm.resolve(_layer_norm(layer_norm, ctx), ctx)
    if recursive:
      return SkipSpec(post_norm=post, repeats=value)
    return SkipSpec(x_scale=value, post_norm=post, repeats=1 if norm else 0)


def _register_fixed_combinator(name, doc, **fields):
  @COMBINATORS.register(name, doc)
  def build(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, layer_norm=None) -> SkipSpec:
    del depth
    _no_lambda(name, arg, lam)
    ln = _layer_norm(layer_norm, ctx)
    return SkipSpec(**{k: (v.resolve(ln, ctx) if isinstance(v, _Norm) else v)
                       for k, v in fields.items()})


def _layer_norm(layer_norm: str | NormFactory | None, ctx: NormContext) -> NormFactory:
  """The LayerNorm of LN-based combinators: ``layer_norm`` (a spec or a resolved factory),
  LayerNorm itself by default."""
  if isinstance(layer_norm, NormFactory):
    return layer_norm
  return norm_factory("layer" if layer_norm is None else layer_norm, ctx)


_register_fixed_combinator("skip", "y = x + F(x)")
_register_lambda_combinator("xskip", "y = λ·x + F(x), λ fixed", norm=None, recursive=False)
_register_lambda_combinator("xskip_ln", "y = LN(λ·x + F(x))", norm=_LN, recursive=False)
_register_lambda_combinator("xskip_bn", "y = BN(λ·x + F(x))", norm=_BN, recursive=False)
_register_lambda_combinator("rskip_ln", "G_1 = LN(x + F(x)), G_k = LN(x + G_{k−1}), "
                            "y = G_λ (λ=1: Post-LN)", norm=_LN, recursive=True)
_register_lambda_combinator("rskip_bn", "rskip_ln with BN in place of LN", norm=_BN,
                            recursive=True)
_register_fixed_combinator("pre_ln", "y = x + F(LN(x))", pre_norm=_LN)
_register_fixed_combinator("post_ln", "y = LN(x + F(x)) (Vaswani et al. 2017)",
                           post_norm=_LN, repeats=1)
_register_fixed_combinator("rezero", "y = x + α·F(x), α learned, init 0 (Bachlechner 2020)",
                           branch_gain_init=0.0)


@COMBINATORS.register("skipinit", "y = x + α·F(x), α learned scalar on the branch (De & "
                      "Smith 2020)", arg_doc="α init (default 0)")
def _skipinit(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, layer_norm=None) -> SkipSpec:
  if lam is not None:
    _no_lambda("skipinit", None, lam)
  a = 0.0 if arg is None else parse_number(arg, f"skip 'skipinit:{arg}': alpha init")
  return SkipSpec(branch_gain_init=a)


@COMBINATORS.register("deepnorm", "y = LN(α·x + F(x)), α and branch init gain β from the "
                      "depth (DeepNet, Wang 2022)")
def _deepnorm(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, layer_norm=None) -> SkipSpec:
  _no_lambda("deepnorm", arg, lam)
  alpha, beta = deepnorm_constants(depth or DepthInfo())
  return SkipSpec(x_scale=alpha, post_norm=_layer_norm(layer_norm, ctx), repeats=1,
                  init_scale=beta)


def resolve_combinator(spec, *, lam=None, ctx: NormContext = _DEFAULT_CTX,
                       depth: DepthInfo | None = None,
                       layer_norm: str | NormFactory | None = None) -> SkipSpec:
  """The :class:`SkipSpec` of the combinator ``spec`` (a COMBINATORS spec or its parsed
  :class:`~resnorm_jax.registry.Spec`).  ``layer_norm`` is the norm (a spec, or a resolved
  factory) that LN-based combinators (``pre_ln``, ``post_ln``, ``xskip_ln``, ``rskip_ln``,
  ``deepnorm``) use in place of LayerNorm, e.g. ``rms`` for an RMSNorm Transformer; BN
  variants keep BN."""
  return COMBINATORS.build(spec, lam=lam, ctx=ctx, depth=depth, layer_norm=layer_norm)


def make_combinator(spec, *, lam=None, ctx: NormContext = _DEFAULT_CTX,
                    depth: DepthInfo | None = None, name=None,
                    layer_norm: str | NormFactory | None = None) -> SkipCombinator:
  """Builds the combinator ``spec`` once, outside a model (:func:`resolve_combinator`;
  a model resolves a :class:`SkipSpec` once and builds its combinators from it)."""
  return resolve_combinator(spec, lam=lam, ctx=ctx, depth=depth,
                            layer_norm=layer_norm).build(name)


# ----------------------------------------------------------------------------------------
# Unit orderings (He et al. 2016, Fig. 4).
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UnitOrdering:
  """Where norm / ReLU / conv sit in a unit.

  The branch is ``pattern`` repeated once per convolution with the last ``trim`` ops
  dropped; ``after_add`` follows the addition; ``residual=False`` drops the shortcut.
  A network of such units starts with ``stem`` (after its first convolution) and ends
  with ``head`` before pooling, so that every unit sees and emits what its ordering
  expects: post-activation nets (a)-(c) activate in the stem, (d) normalizes in the stem and
  activates in the head, (e) does both in the head (He et al. 2016, Sec. 4.1).
  """
  name: str
  pattern: tuple[str, ...]
  trim: int = 0
  after_add: tuple[str, ...] = ()
  residual: bool = True
  stem: tuple[str, ...] = ("norm", "relu")
  head: tuple[str, ...] = ()

  def branch_ops(self, num_convs: int) -> tuple[str, ...]:
    ops = self.pattern * num_convs
    return ops[:len(ops) - self.trim]


_ORDERINGS = [
    (UnitOrdering("original", ("conv", "norm", "relu"), trim=1, after_add=("relu",)),
     "(a) y = ReLU(x + BN(conv(ReLU(BN(conv(x))))))"),
    (UnitOrdering("bn_after_add", ("conv", "norm", "relu"), trim=2, after_add=("norm", "relu")),
     "(b) y = ReLU(BN(x + conv(ReLU(BN(conv(x))))))"),
    (UnitOrdering("relu_before_add", ("conv", "norm", "relu")),
     "(c) y = x + ReLU(BN(conv(ReLU(BN(conv(x))))))"),
    (UnitOrdering("relu_preact", ("relu", "conv", "norm"), stem=("norm",), head=("relu",)),
     "(d) y = x + BN(conv(ReLU(BN(conv(ReLU(x))))))"),
    (UnitOrdering("full_preact", ("norm", "relu", "conv"), stem=(), head=("norm", "relu")),
     "(e) y = x + conv(ReLU(BN(conv(ReLU(BN(x))))))"),
    (UnitOrdering("plain", ("conv", "norm", "relu"), residual=False),
     "no shortcut: y = ReLU(BN(conv(ReLU(BN(conv(x))))))"),
]
for _ordering, _doc in _ORDERINGS:
  UNIT_ORDERINGS.register(_ordering.name, _doc)(lambda arg, _o=_ordering: _o)


# ----------------------------------------------------------------------------------------
# Residual-stream gradient materialization (a CPU compile-time fix; identity in value).
# ----------------------------------------------------------------------------------------
def apply_op(op: str, module, x, *, train: bool):
  if op == "relu":
    return nn.relu(x)
  if op == "norm":
    return module(x, train=train)
  return module(x)


@dataclasses.dataclass(frozen=True)
class UnitVariant:
  """Every variant of a residual unit, resolved once by the model's builder
  (:func:`resolve_unit`): the ordering, the norm, the shortcut and the combinator."""
  ordering: UnitOrdering
  norm: NormFactory
  shortcut: ShortcutSpec
  skip: SkipSpec


def resolve_unit(ordering: str = "full_preact", norm: str = "batch",
                 shortcut: str = "identity", skip: str = "skip", *,
                 skip_lambda: float | None = None, ctx: NormContext = _DEFAULT_CTX,
                 depth: DepthInfo | None = None) -> UnitVariant:
  """The :class:`UnitVariant` of the named variants (registry specs; ConfigError listing
  the valid choices for an unknown one).  ``depth``: the network's (DeepNorm's α, β)."""
  return UnitVariant(ordering=UNIT_ORDERINGS.build(ordering), norm=norm_factory(norm, ctx),
                     shortcut=SHORTCUTS.build(shortcut),
                     skip=resolve_combinator(skip, lam=skip_lambda, ctx=ctx, depth=depth))


class ConvUnit(nn.Module):
  """One residual unit of a CIFAR ResNet: ``y = after_add(combinator(x, F, shortcut))``.

  Basic branch: two 3x3 convolutions with ``features`` channels; bottleneck: 1x1
  (features/4), 3x3 (features/4, carrying the stride), 1x1 (features).  When the shortcut
  is a projection, the branch's leading ops before its first convolution (the
  pre-activation of (d)/(e)) are applied once and shared by both paths, as in He et al.'s
  pre-activation code.  Every branch convolution's init is multiplied by the combinator's
  ``init_scale`` (DeepNorm's β; 1 otherwise).  ``variant`` is resolved by the model
  (:func:`resolve_unit`); :func:`conv_unit` builds a unit from variant names.
  """
  features: int
  strides: int = 1
  bottleneck: bool = False
  variant: UnitVariant = resolve_unit()
  weight_standardization: bool = False
  dtype: Any = jnp.float32
  # The output's gradient computed once into a buffer on CPU (cpu_workarounds.materialize_grad).
  materialize_stream_grad: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    order, variant = self.variant.ordering, self.variant
    f = self.features
    if self.bottleneck:
      if f % 4:
        raise ConfigError(f"bottleneck units need features divisible by 4, got {f}")
      conv_specs = [(1, f // 4, 1), (3, f // 4, self.strides), (1, f, 1)]
    else:
      conv_specs = [(3, f, self.strides), (3, f, 1)]
    combinator = None
    init_gain = 1.0
    if order.residual:
      combinator = variant.skip.build("skip")
      init_gain = combinator.init_scale
    kernel_init = he_normal if init_gain == 1.0 else (
        lambda key, shape, dtype: init_gain * he_normal(key, shape, dtype))
    ops = order.branch_ops(len(conv_specs))
    modules, n_conv, n_norm = [], 0, 0
    for op in ops:
      if op == "conv":
        k, c, s = conv_specs[n_conv]
        modules.append(Conv(c, k, s, weight_standardization=self.weight_standardization,
                            dtype=self.dtype, kernel_init=kernel_init, name=f"conv_{n_conv}"))
        n_conv += 1
      elif op == "norm":
        modules.append(variant.norm(name=f"norm_{n_norm}"))
        n_norm += 1
      else:
        modules.append(None)
    after = [variant.norm(name="norm_after_add") if op == "norm" else None
             for op in order.after_add]

    projects = self.strides != 1 or x.shape[-1] != f or variant.shortcut.project
    shared = ops.index("conv") if (projects and order.residual) else 0
    preact = {}

    def branch(h):
      for op, module in zip(ops[:shared], modules[:shared]):
        h = apply_op(op, module, h, train=train)
      preact["h"] = h
      for op, module in zip(ops[shared:], modules[shared:]):
        h = apply_op(op, module, h, train=train)
      return h

    if not order.residual:
      y = branch(x)
    else:
      short = Shortcut(variant.shortcut, features=f, strides=self.strides,
                       weight_standardization=self.weight_standardization,
                       dtype=self.dtype, name="shortcut")
      y = combinator(x, branch, train=train,
                     shortcut=lambda s, fx: short(preact["h"] if shared else s, fx,
                                                  train=train))
    for op, module in zip(order.after_add, after):
      y = apply_op(op, module, y, train=train)
    return cpu_workarounds.materialize_grad(y) if self.materialize_stream_grad else y


def conv_unit(features: int, *, ordering: str = "full_preact", norm: str = "batch",
              shortcut: str = "identity", skip: str = "skip",
              skip_lambda: float | None = None, ctx: NormContext = _DEFAULT_CTX,
              depth: DepthInfo | None = None, **fields) -> ConvUnit:
  """A :class:`ConvUnit` from variant names (one unit outside a model: tools and tests);
  ``fields``: the unit's other fields (``strides``, ``bottleneck``, ``name``, ...)."""
  variant = resolve_unit(ordering, norm, shortcut, skip, skip_lambda=skip_lambda, ctx=ctx,
                         depth=depth)
  return ConvUnit(features, variant=variant, **fields)
