"""Shortcuts, residual unit orderings and skip+norm combinators (SPEC.md sections 2-3).

Three registries compose into every residual design of the seeds:

* ``SHORTCUTS`` transform the two terms of an addition: ``(s, f) = shortcut(x, F(x))``
  (He et al. 2016, Table 1: identity, constant scaling, gating, 1x1 conv, dropout).
* ``COMBINATORS`` decide how the terms are added and normalized around any branch F,
  a conv unit's or a Transformer sublayer's (Liu et al. 2020 and the related designs):
  ``y = combinator(x, F)``.
* ``UNIT_ORDERINGS`` place norms, ReLUs and convolutions inside a conv unit's branch and
  after the addition (He et al. 2016, Fig. 4 (a)-(e), plus ``plain``).

:class:`ConvUnit` composes the three: ``y = after_add(combinator(x, branch, shortcut))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax.numpy as jnp

from resnorm_jax import cpu_workarounds
from resnorm_jax.layers.conv import Conv, he_normal
from resnorm_jax.layers.norms import NormContext, make_norm
from resnorm_jax.layers.taps import tap
from resnorm_jax.registry import ConfigError, Registry, parse_number

SHORTCUTS = Registry("shortcut")
UNIT_ORDERINGS = Registry("unit")
COMBINATORS = Registry("skip")
_DEFAULT_CTX = NormContext()


# ----------------------------------------------------------------------------------------
# Shortcuts.
# ----------------------------------------------------------------------------------------
class Shortcut(nn.Module):
  """Returns the two terms ``(s, f)`` that a combinator adds: s from x, f from F(x).

  When the branch changes the shape (``strides > 1`` or ``features != channels``) x is
  first projected by a 1x1 convolution with that stride (He et al. 2016); ``conv1x1``
  projects every shortcut.  Gates are g = sigmoid(W_g x + b_g) from a 1x1 convolution (a
  Dense layer over channels, so sequences work too) of the (projected) shortcut input.
  """
  kind: str = "identity"
  features: int | None = None  # channels of F(x); None = same as x
  strides: int = 1
  x_scale: float = 1.0
  f_scale: float = 1.0
  gate_bias_init: float = -6.0
  dropout_rate: float = 0.5
  weight_standardization: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, fx, *, train: bool = False):
    features = self.features or x.shape[-1]
    if self.kind == "conv1x1" or self.strides != 1 or features != x.shape[-1]:
      if x.ndim != 4:
        raise ValueError(f"a projection shortcut needs NHWC input, got shape {x.shape}")
      x = Conv(features, 1, self.strides, weight_standardization=self.weight_standardization,
               dtype=self.dtype, name="projection")(x)
    if self.kind in ("exclusive_gate", "shortcut_gate"):
      g = nn.sigmoid(nn.Dense(features, dtype=self.dtype, param_dtype=jnp.float32,
                              bias_init=nn.initializers.constant(self.gate_bias_init),
                              name="gate")(x))
      fx = g * fx if self.kind == "exclusive_gate" else fx
      return (1.0 - g) * x, fx
    if self.kind == "dropout":
      return nn.Dropout(self.dropout_rate)(x, deterministic=not train), fx
    return self.x_scale * x, self.f_scale * fx


def _floats(arg: str, what: str, count: int) -> list[float]:
  parts = arg.split(",")
  if len(parts) != count:
    raise ConfigError(f"{what} needs {count} comma-separated numbers, got {arg!r}")
  return [parse_number(p, what) for p in parts]


@SHORTCUTS.register("identity", "s = x (projection 1x1 conv only where the shape changes)")
def _identity(arg, **kw):
  return Shortcut("identity", **kw)


@SHORTCUTS.register("constant", "constant scaling: y = a·x + b·F(x)",
                    arg_doc="`a,b` (default 0.5,0.5; He 2016 also ran 0.5,1)")
def _constant(arg, **kw):
  a, b = (0.5, 0.5) if arg is None else _floats(arg, f"shortcut 'constant:{arg}'", 2)
  return Shortcut("constant", x_scale=a, f_scale=b, **kw)


@SHORTCUTS.register("exclusive_gate", "y = (1−g)·x + g·F(x), g = sigmoid(1x1 conv(x) + b_g)",
                    arg_doc="b_g, the gate bias init (default -6)")
def _exclusive_gate(arg, **kw):
  b = -6.0 if arg is None else parse_number(arg, f"shortcut 'exclusive_gate:{arg}': b_g")
  return Shortcut("exclusive_gate", gate_bias_init=b, **kw)


@SHORTCUTS.register("shortcut_gate", "shortcut-only gating: y = (1−g)·x + F(x)",
                    arg_doc="b_g, the gate bias init (default -6)")
def _shortcut_gate(arg, **kw):
  b = -6.0 if arg is None else parse_number(arg, f"shortcut 'shortcut_gate:{arg}': b_g")
  return Shortcut("shortcut_gate", gate_bias_init=b, **kw)


@SHORTCUTS.register("conv1x1", "s = 1x1 conv(x) on every unit")
def _conv1x1(arg, **kw):
  return Shortcut("conv1x1", **kw)


@SHORTCUTS.register("dropout", "s = dropout(x) in training", arg_doc="p (default 0.5)")
def _dropout(arg, **kw):
  p = 0.5 if arg is None else parse_number(arg, f"shortcut 'dropout:{arg}': p", minimum=0.0)
  if p >= 1.0:
    raise ConfigError(f"shortcut 'dropout:{arg}': p must be < 1")
  return Shortcut("dropout", dropout_rate=p, **kw)


def make_shortcut(spec: str, *, features=None, strides=1, weight_standardization=False,
                  dtype=jnp.float32, name=None) -> Shortcut:
  return SHORTCUTS.build(spec, features=features, strides=strides, dtype=dtype,
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
  builders to scale the branch's initialisation.
  """
  x_scale: float = 1.0
  post_norm: str | None = None
  repeats: int = 0
  pre_norm: str | None = None
  branch_gain_init: float | None = None
  init_scale: float = 1.0
  ctx: NormContext = _DEFAULT_CTX
  tap_output: bool = False   # the combinator is a residual unit of its model (layers/taps.py)

  @nn.compact
  def __call__(self, x, branch: Callable, *, train: bool = False, mask=None,
               shortcut: Callable | None = None):
    h = x
    if self.pre_norm is not None:
      h = make_norm(self.pre_norm, self.ctx, name="pre_norm")(x, train=train, mask=mask)
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
      z = make_norm(self.post_norm, self.ctx, name=f"post_norm_{k}")(z, train=train, mask=mask)
    return tap(self, z) if self.tap_output else z


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


def _register_lambda_combinator(name, doc, *, norm, recursive):
  @COMBINATORS.register(name, doc, arg_doc="λ (or `model.skip_lambda`)" +
                        (", an integer >= 1" if recursive else ", a float >= 0"))
  def build(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, name=None, layer_norm="layer"):
    del depth
    value = _resolve_lambda(build.spec_name, arg, lam, default=1,
                            integer=recursive, minimum=1 if recursive else 0.0)
    post = layer_norm if norm == "layer" else norm
    if recursive:
      return SkipCombinator(post_norm=post, repeats=value, ctx=ctx, name=name)
    return SkipCombinator(x_scale=value, post_norm=post, repeats=1 if norm else 0, ctx=ctx,
                          name=name)
  build.spec_name = name


def _with_layer_norm(fields: dict, layer_norm: str) -> dict:
  """Replaces the LayerNorm of an LN-based combinator by ``layer_norm`` (e.g. ``rms``)."""
  return {k: (layer_norm if k in ("pre_norm", "post_norm") and v == "layer" else v)
          for k, v in fields.items()}


def _register_fixed_combinator(name, doc, **fields):
  @COMBINATORS.register(name, doc)
  def build(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, name=None, layer_norm="layer"):
    del depth
    _no_lambda(build.spec_name, arg, lam)
    return SkipCombinator(ctx=ctx, name=name, **_with_layer_norm(fields, layer_norm))
  build.spec_name = name


_register_fixed_combinator("skip", "y = x + F(x)")
_register_lambda_combinator("xskip", "y = λ·x + F(x), λ fixed", norm=None, recursive=False)
_register_lambda_combinator("xskip_ln", "y = LN(λ·x + F(x))", norm="layer", recursive=False)
_register_lambda_combinator("xskip_bn", "y = BN(λ·x + F(x))", norm="batch", recursive=False)
_register_lambda_combinator("rskip_ln", "G_1 = LN(x + F(x)), G_k = LN(x + G_{k−1}), "
                            "y = G_λ (λ=1: Post-LN)", norm="layer", recursive=True)
_register_lambda_combinator("rskip_bn", "rskip_ln with BN in place of LN", norm="batch",
                            recursive=True)
_register_fixed_combinator("pre_ln", "y = x + F(LN(x))", pre_norm="layer")
_register_fixed_combinator("post_ln", "y = LN(x + F(x)) (Vaswani et al. 2017)",
                           post_norm="layer", repeats=1)
_register_fixed_combinator("rezero", "y = x + α·F(x), α learned, init 0 (Bachlechner 2020)",
                           branch_gain_init=0.0)


@COMBINATORS.register("skipinit", "y = x + α·F(x), α learned scalar on the branch (De & "
                      "Smith 2020)", arg_doc="α init (default 0)")
def _skipinit(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, name=None, layer_norm="layer"):
  if lam is not None:
    _no_lambda("skipinit", None, lam)
  a = 0.0 if arg is None else parse_number(arg, f"skip 'skipinit:{arg}': alpha init")
  return SkipCombinator(branch_gain_init=a, ctx=ctx, name=name)


@COMBINATORS.register("deepnorm", "y = LN(α·x + F(x)), α and branch init gain β from the "
                      "depth (DeepNet, Wang 2022)")
def _deepnorm(arg, lam=None, ctx=_DEFAULT_CTX, depth=None, name=None, layer_norm="layer"):
  _no_lambda("deepnorm", arg, lam)
  alpha, beta = deepnorm_constants(depth or DepthInfo())
  return SkipCombinator(x_scale=alpha, post_norm=layer_norm, repeats=1, init_scale=beta,
                        ctx=ctx, name=name)


def make_combinator(spec: str, *, lam=None, ctx: NormContext = _DEFAULT_CTX,
                    depth: DepthInfo | None = None, name=None,
                    layer_norm: str = "layer") -> SkipCombinator:
  """Builds the combinator ``spec``.  ``layer_norm`` is the norm spec that LN-based
  combinators (``pre_ln``, ``post_ln``, ``xskip_ln``, ``rskip_ln``, ``deepnorm``) use in
  place of LayerNorm, e.g. ``rms`` for an RMSNorm Transformer; BN variants keep BN."""
  return COMBINATORS.build(spec, lam=lam, ctx=ctx, depth=depth, name=name,
                           layer_norm=layer_norm)


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


class ConvUnit(nn.Module):
  """One residual unit of a CIFAR ResNet: ``y = after_add(combinator(x, F, shortcut))``.

  Basic branch: two 3x3 convolutions with ``features`` channels; bottleneck: 1x1
  (features/4), 3x3 (features/4, carrying the stride), 1x1 (features).  When the shortcut
  is a projection, the branch's leading ops before its first convolution (the
  pre-activation of (d)/(e)) are applied once and shared by both paths, as in He et al.'s
  pre-activation code.  Every branch convolution's init is multiplied by the combinator's
  ``init_scale`` (DeepNorm's β; 1 otherwise).
  """
  features: int
  strides: int = 1
  bottleneck: bool = False
  ordering: str = "full_preact"
  norm: Any = "batch"     # a NORMS spec, or its parsed Spec (registry.Spec)
  shortcut: str = "identity"
  skip: str = "skip"
  skip_lambda: float | None = None
  ctx: NormContext = _DEFAULT_CTX
  depth: DepthInfo | None = None
  weight_standardization: bool = False
  dtype: Any = jnp.float32
  # The output's gradient computed once into a buffer on CPU (cpu_workarounds.materialize_grad).
  materialize_stream_grad: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    order: UnitOrdering = UNIT_ORDERINGS.build(self.ordering)
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
      combinator = make_combinator(self.skip, lam=self.skip_lambda, ctx=self.ctx,
                                   depth=self.depth, name="skip")
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
        modules.append(make_norm(self.norm, self.ctx, name=f"norm_{n_norm}"))
        n_norm += 1
      else:
        modules.append(None)
    after = [make_norm(self.norm, self.ctx, name="norm_after_add") if op == "norm" else None
             for op in order.after_add]

    projects = self.strides != 1 or x.shape[-1] != f or self.shortcut == "conv1x1"
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
      short = make_shortcut(self.shortcut, features=f, strides=self.strides,
                            weight_standardization=self.weight_standardization,
                            dtype=self.dtype, name="shortcut")
      y = combinator(x, branch, train=train,
                     shortcut=lambda s, fx: short(preact["h"] if shared else s, fx,
                                                  train=train))
    for op, module in zip(order.after_add, after):
      y = apply_op(op, module, y, train=train)
    return cpu_workarounds.materialize_grad(y) if self.materialize_stream_grad else y
