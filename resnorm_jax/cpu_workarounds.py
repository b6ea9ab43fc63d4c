"""Fast convolution gradients inside loops on CPU: canonical dimension numbers everywhere.

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
applies it to scanned CPU steps; GPUs and TPUs choose convolution layouts in every
computation themselves.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
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
