"""The XLA:CPU workarounds, in one place: each is the same math, only faster on CPU.

1. :func:`materialize_grad` (used by the models at each residual unit's output when
   ``train.cpu_workarounds`` is on): the stream gradient is computed once into a buffer
   instead of being re-fused into every consumer; lowered to a conditional on CPU only.
2. :func:`canonicalize_convs` (applied by the step builder, :func:`apply`): canonical
   convolution layouts inside loop bodies.
3. :func:`compiler_options` (passed to every ``jax.jit`` of the engine, the analysis
   commands and the benchmarks; :data:`XLA_FLAG` is the same setting for the environment,
   which tests/conftest.py uses): XLA's own convolution kernels instead of YNNPACK's.

``--config.train.cpu_workarounds=False`` switches them off (e.g. to measure them, or when a
newer XLA no longer needs them); GPUs and TPUs never see any of them.

Fast convolution gradients inside loops on CPU: canonical dimension numbers everywhere.

XLA's CPU backend runs a convolution through Eigen's fast kernel only when its dimension
numbers are canonical (input ``N,spatial...,C``, kernel ``spatial...,I,O``, output
``N,spatial...,C``); any other convolution falls back to a naive loop nest.  Its
canonicalization pass (transposes around the convolution) rewrites only the convolutions
of the entry computation, not those inside a ``while`` body.  Autodiff writes the kernel
gradient of an NHWC convolution with batch and feature axes swapped (and the input gradient
with a swapped kernel), so the backward pass of a scanned stack of convolutions
(``model.scan_stages``) ran ~10-50x slower than the same network unrolled.

:func:`canonicalize_convs` does that rewrite at the jaxpr level, where it reaches into
``scan``/``while``/``cond``/``jit``/``remat`` bodies: each non-canonical
``conv_general_dilated`` becomes transpose → canonical convolution → transpose: the same
computation (the fast kernel may sum in another order).  ``training.make_train_step``
applies it to CPU steps of models with loops (:func:`apply`); GPUs and TPUs choose
convolution layouts in every computation themselves.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable

import jax
import jaxlib
import jax.numpy as jnp
from jax import lax
import jax.extend.core as jcore
from jax.sharding import NamedSharding, PartitionSpec as P

_CONV = lax.conv_general_dilated_p


def _canonical_specs(nd: int):
  """ConvDimensionNumbers specs of N,spatial...,C / spatial...,I,O / N,spatial...,C."""
  spatial = tuple(range(1, nd + 1))
  return lax.ConvDimensionNumbers(lhs_spec=(0, nd + 1) + spatial,
                                  rhs_spec=(nd + 1, nd) + tuple(range(nd)),
                                  out_spec=(0, nd + 1) + spatial)


def is_canonical(params: dict) -> bool:
  dn = params["dimension_numbers"]
  return tuple(map(tuple, dn)) == tuple(map(tuple, _canonical_specs(len(dn.lhs_spec) - 2)))


def _rewritable(params: dict) -> bool:
  sharding = params.get("out_sharding")
  return (not is_canonical(params) and (sharding is None or hasattr(sharding, "spec"))
          and params["feature_group_count"] == 1 and params["batch_group_count"] == 1)


def _canonical_conv_eqns(eqn) -> list:
  """Equations computing ``eqn``'s convolution as transpose → canonical conv → transpose
  into its original output variable."""
  params = eqn.params
  dn = params["dimension_numbers"]
  nd = len(dn.lhs_spec) - 2
  eqns = []

  def transpose(var, perm, out=None):
    if out is None:
      out = jcore.Var(lax.transpose_p.abstract_eval(var.aval, permutation=perm)[0])
    eqns.append(jcore.new_jaxpr_eqn([var], [out], lax.transpose_p, {"permutation": perm},
                                    frozenset(), eqn.source_info, eqn.ctx))
    return out

  lhs, rhs = eqn.invars
  lhs_t = transpose(lhs, (dn.lhs_spec[0],) + tuple(dn.lhs_spec[2:]) + (dn.lhs_spec[1],))
  rhs_t = transpose(rhs, tuple(dn.rhs_spec[2:]) + (dn.rhs_spec[1], dn.rhs_spec[0]))
  # The canonical output is (N, spatial..., C): axis a of it is axis ``order[a]`` of the
  # original output.
  order = (dn.out_spec[0],) + tuple(dn.out_spec[2:]) + (dn.out_spec[1],)
  new = dict(params, dimension_numbers=_canonical_specs(nd))
  sharding = params.get("out_sharding")
  if sharding is not None:  # the output's spec, permuted like the output
    spec = tuple(sharding.spec) + (None,) * (nd + 2 - len(sharding.spec))
    new["out_sharding"] = NamedSharding(sharding.mesh, P(*(spec[a] for a in order)))
  aval, effects = _CONV.abstract_eval(lhs_t.aval, rhs_t.aval, **new)
  out_t = jcore.Var(aval)
  eqns.append(jcore.new_jaxpr_eqn([lhs_t, rhs_t], [out_t], _CONV, new, effects,
                                  eqn.source_info, eqn.ctx))
  transpose(out_t, tuple(order.index(j) for j in range(nd + 2)), out=eqn.outvars[0])
  return eqns


def _needs_rewrite(jaxpr) -> bool:
  """Whether ``jaxpr`` (open or closed) holds a non-canonical convolution at any depth."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  for eqn in jaxpr.eqns:
    if eqn.primitive is _CONV and _rewritable(eqn.params):
      return True
    if any(_needs_rewrite(sub) for sub in jcore.jaxprs_in_params(eqn.params)):
      return True
  return False


def _rewrite(value: Any) -> Any:
  """A jaxpr (open or closed; or a tuple of them, as ``cond`` branches) with its
  convolutions made canonical at every depth; anything else unchanged."""
  if isinstance(value, tuple) and value and all(
      isinstance(v, (jcore.Jaxpr, jcore.ClosedJaxpr)) for v in value):
    return tuple(_rewrite(v) for v in value)
  if isinstance(value, jcore.ClosedJaxpr):
    if not _needs_rewrite(value):
      return value
    return jcore.ClosedJaxpr(_rewrite(value.jaxpr), value.consts)
  if not isinstance(value, jcore.Jaxpr) or not _needs_rewrite(value):
    return value
  eqns = []
  for eqn in value.eqns:
    if eqn.primitive is _CONV and _rewritable(eqn.params):
      eqns.extend(_canonical_conv_eqns(eqn))
    else:
      params = {k: _rewrite(v) for k, v in eqn.params.items()}
      changed = any(params[k] is not v for k, v in eqn.params.items())
      eqns.append(eqn.replace(params=params) if changed else eqn)
  return value.replace(eqns=eqns)


def canonicalize_convs(fn: Callable) -> Callable:
  """``fn`` with every convolution (also inside loop bodies) in canonical dimension numbers.

  Meant for the function given to ``jax.jit`` (its gradients included): traces ``fn`` to a
  jaxpr, replaces each non-canonical convolution equation (at any depth: ``scan``,
  ``while``, ``cond``, ``jit``, ``remat``, ``shard_map`` bodies) by transpose → canonical
  convolution → transpose, and evaluates the result.  Equations keep their source and name
  stack, so profiles and HLO metadata still name the modules.
  """
  @functools.wraps(fn)
  def wrapped(*args):
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out = jcore.jaxpr_as_fun(_rewrite(closed))(*jax.tree_util.tree_leaves(args))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), out)
  return wrapped


def for_platform(fn: Callable, platform: str) -> Callable:
  """:func:`canonicalize_convs` (``fn``) on ``cpu``, where XLA needs it; ``fn`` itself on
  ``gpu``/``tpu`` and any other platform, whose compilers choose convolution layouts in loop
  bodies too, so the rewrite would only add transposes there."""
  return canonicalize_convs(fn) if platform == "cpu" else fn


def enabled(config) -> bool:
  """``train.cpu_workarounds`` (default on); a config without a ``train`` section (the
  analysis commands') has them on."""
  train = config.get("train") if hasattr(config, "get") else None
  return bool(train.get("cpu_workarounds", True)) if train is not None else True


# ----------------------------------------------------------------------------------------
# Which library runs XLA:CPU's convolutions, dots and reductions.
# ----------------------------------------------------------------------------------------
# jaxlib 0.10.x hands XLA:CPU's dots, convolutions and reductions to YNNPACK by default
# (``__ynn_fusion`` in the compiled HLO; the flag's own help says "the default list is
# currently empty", which is not what the compiler does).  Measured on this machine's two
# cores (benchmarks/RESULTS.md, "Which library runs each op"): YNNPACK's convolutions are
# 1.5-3x slower than XLA's own (Eigen) kernels, its weight gradients worst (3.3 s vs 0.55 s
# for one 3x3 64->64 weight gradient on 128x32x32x64); its dots are as fast or faster
# (a Transformer FFN's forward + backward 157 vs 185 ms), and its reductions 5x faster
# (BatchNorm's per-channel sums of a 128x32x32x16 activation 0.4 vs 2.6 ms).  So the list
# keeps dots and reductions and drops convolutions: the XLA_FLAGS form
# ``-individual_convolution``.  As a per-program compiler option XLA takes only the
# overwrite form, with the enum's full names, comma separated.
YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
_YNN_KEEP = ("individual_dot", "reduce")
_YNN_JAXLIB_DEFAULT = ("individual_dot", "individual_convolution", "reduce")
# jaxlib versions [low, high) whose XLA knows the option and those enum names (verified on
# 0.10.2).  XLA refuses an unknown option, so any other version (the GPU machine's 0.11.x
# included, until measured there) gets nothing: its own default.
_VERIFIED_JAXLIB = ((0, 10, 2), (0, 11, 0))


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in re.findall(r"\d+", text)[:3])


def library_fusions_known(version: str | None = None) -> bool:
  """Whether this jaxlib (or ``version``) is one whose YNNPACK option is verified."""
  low, high = _VERIFIED_JAXLIB
  return low <= _version(version or jaxlib.__version__) < high


def compiler_options(platform: str, config=None, *, version: str | None = None) -> dict:
  """XLA debug options for a ``jax.jit`` on ``platform`` (``compiler_options=``): on CPU,
  with the workarounds on (``config``'s ``train.cpu_workarounds``; on when ``config`` is
  None) and a verified jaxlib, convolutions on XLA's own kernels; ``{}`` otherwise."""
  if (platform != "cpu" or (config is not None and not enabled(config))
      or not library_fusions_known(version)):
    return {}
  return {YNN_FUSION_OPTION: _option_value(_YNN_KEEP)}


def _option_value(types) -> str:
  return ",".join("LIBRARY_FUSION_TYPE_" + t.upper() for t in types)


# jaxlib 0.10.x's own default, written out as a compiler option: to compare against it in a
# process whose XLA_FLAGS already hold :func:`xla_flag` (tests, benchmarks).
JAXLIB_DEFAULT_OPTIONS = {YNN_FUSION_OPTION: _option_value(_YNN_JAXLIB_DEFAULT)}


def with_options(options: dict | None, platform: str, config=None) -> dict:
  """``options`` (a jit's own compiler options, may be None) plus :func:`compiler_options`."""
  return {**compiler_options(platform, config), **(options or {})}


def hlo_computations(hlo: str) -> dict[str, str]:
  """``name -> text`` of each non-entry computation of a compiled program's text."""
  return {m.group(1): m.group(0) for m in re.finditer(r"^%(\S+) \(.*?^}", hlo, re.M | re.S)}


def library_convolutions(hlo: str) -> int:
  """How many convolutions of a compiled program's text (``.compile().as_text()``) run
  inside a YNNPACK fusion: the count of ``__ynn_fusion`` instructions whose fused
  computation holds a ``convolution``."""
  bodies = hlo_computations(hlo)
  calls = re.findall(r"kind=kCustom, calls=%([^,\s]+).*__ynn_fusion", hlo)
  return sum("convolution(" in bodies.get(name, "") for name in calls)


def xla_flag(*, version: str | None = None) -> str:
  """The same setting as an ``XLA_FLAGS`` entry, for a process whose every program should
  have it (read once, when jax starts its backends; it touches only the CPU backend);
  ``""`` on an unverified jaxlib."""
  if not library_fusions_known(version):
    return ""
  return f"--{YNN_FUSION_OPTION}={','.join(_YNN_KEEP)}"


def apply(train_step: Callable, config, platform: str, model) -> Callable:
  """The step builder's hook: :func:`canonicalize_convs` around ``train_step`` on CPU when
  the workarounds are on and the step runs convolutions inside loops (a model with a true
  ``scan_stages`` field, or the microbatch loop of ``train.accumulate_steps`` > 1);
  ``train_step`` itself otherwise."""
  loops = getattr(model, "scan_stages", False) or config.train.accumulate_steps > 1
  if not enabled(config) or not loops:
    return train_step
  return for_platform(train_step, platform)


# ----------------------------------------------------------------------------------------
# The residual stream's gradient, materialized once per unit.
# ----------------------------------------------------------------------------------------
def _materialized_on_cpu(x, t):
  """``t`` returned through a conditional: XLA must compute a conditional's operand into one
  buffer, so every consumer reads it instead of fusing (and re-running) its producers.
  Both branches are the identity (written differently, or JAX would inline the cond); the
  predicate, from the primal ``x``, is always true but opaque to the compiler."""
  first = x.reshape(-1)[:1]
  opaque_true = jnp.all(first == first) | jnp.all(first != first)
  return lax.cond(opaque_true, lambda a: a, lambda a: a * jnp.ones((), a.dtype), t)


@jax.custom_jvp
def materialize_grad(x):
  """Identity whose derivative (and so the gradient) is computed once into a buffer on CPU.

  In a residual stack the gradient of the stream is a running sum over every later unit,
  ``dL/dx_l = dL/dx_{l+1} + J_l^T(...)``.  XLA's CPU fusion treats those additions as cheap
  and duplicates them into every consumer fusion, so each unit re-reads the activations of
  all later units it can fit into one fusion: on a PreAct-ResNet-110 step that is 3,244
  copies of 111 additions and 29 GB of memory traffic.  Materializing the stream gradient
  once per unit brings it to 539 copies and 21 GB (benchmarks/RESULTS.md).  The rule is
  linear in the tangent, so reverse mode transposes it into the same conditional on the
  cotangent; other backends keep the plain identity.
  """
  return x


@materialize_grad.defjvp
def _materialize_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return x, lax.platform_dependent(x, t, cpu=_materialized_on_cpu, default=lambda x, t: t)
