"""Per-layer statistics of training: gradient, parameter and update norms per layer, and the
moments of every residual unit's output (``train.layer_stats_every_steps``).

On a logging step the loop runs a second compiled variant of the train step that does the
same update and also returns, in ``metrics["layer_stats"]``:

* ``grad_sq``, ``param_sq``, ``update_sq``: per parameter leaf, the squared L2 norm of the
  gradient (after the cross-replica mean, before clipping: the one the optimizer receives),
  of the parameters the gradient was taken at, and of the update actually applied
  (new − old parameters, after clipping, learning rate and momentum);
* ``activations``: per residual unit, moments of its output in the training forward pass of
  that step (train-mode norms, dropout on), from per-channel sums reduced over the global
  batch (``psum`` by axis name in per-device programs, masked to real tokens for
  Transformers):  ``mean``, ``std`` and ``rms`` = sqrt(mean x²) over batch, positions and
  channels, and ``kurtosis``, the mean over channels of μ4/μ2² of each centred channel
  (:func:`resnorm_jax.analysis.stats.kurtosis`, the moments diagnostic's definition).

Squared norms add up, so the host groups leaves into layers exactly (:func:`summarize`).  A
residual unit is what the model taps: a module that calls
:func:`resnorm_jax.layers.taps.tap` on its output
(``self.sow`` into the :data:`TAPS` collection, which exists only while a statistics step
asks for it: nothing is added to the parameters, checkpoints or the plain step).  The unit's
name is the tapping module's path: ``stage2_unit3`` in a CIFAR ResNet,
``encoder/layer_0/ffn_skip`` in a Transformer; the model chooses it, not a pattern here.  A layer
(the parameter group of a unit) is the path up to the first name ending in ``unit<i>`` or
``layer_<i>``, else the module holding the leaf (``stem_conv``, ``classifier``,
``decoder/final_norm``).  Names and groups are listed in depth order: the order in which
the forward pass first calls each module.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from jax import lax

from resnorm_jax import parallelism
from resnorm_jax.analysis.stats import kurtosis_from_moments
from resnorm_jax.metrics import MetricWriter

from resnorm_jax.layers.taps import TAPS   # the collection models sow unit outputs into
NORMS = ("grad_norm", "param_norm", "update_norm")
MOMENTS = ("mean", "std", "rms", "kurtosis")
# TensorBoard tag prefixes: layer_grad_norm/stage2_unit3, act_std/stage2_unit3.
TAG_PREFIX = {"layers": "layer", "activations": "act"}
FILENAME = "layer_stats.jsonl"

# CifarResNet(scan_stages=True) stacks units 2..n of stage s under ``stage<s>_units``
# (leading axis: the unit); they are reported as stage<s>_unit2 .. stage<s>_unit<n>.
_STACKED = re.compile(r"^(stage\d+)_units$")
_UNIT = re.compile(r"(unit|layer)_?\d+$")

Path = tuple[str, ...]


# ----------------------------------------------------------------------------------------
# Inside the train step (traced).
# ----------------------------------------------------------------------------------------


def apply_kwargs(capture: bool) -> dict[str, Any]:
  """``model.apply`` keywords of a train step: mutable BatchNorm statistics, and with
  ``capture`` the residual units' tapped outputs in the :data:`TAPS` collection."""
  return {"mutable": ["batch_stats", TAPS] if capture else ["batch_stats"]}


def _is_stacked(path: Path) -> bool:
  return any(_STACKED.match(part) for part in path)


def _path(keys) -> Path:
  return tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in keys)


def leaf_square_norms(tree) -> dict[str, jax.Array]:
  """``{"a/b/kernel": Σ leaf²}`` per leaf (float32); a vector over units for stacked leaves."""
  out = {}
  for keys, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    path = _path(keys)
    axes = tuple(range(1 if _is_stacked(path) else 0, leaf.ndim))
    out["/".join(path)] = jnp.sum(jnp.square(leaf.astype(jnp.float32)), axis=axes)
  return out


def _psum(x, axis_name):
  return x if axis_name is None else lax.psum(x, axis_name)


def unit_moments(x: jax.Array, weights: jax.Array | None = None, *, stacked: bool = False,
                 axis_name: str | None = None) -> dict[str, jax.Array]:
  """Moments (:data:`MOMENTS`) of features ``x`` (..., C) over every axis but the channels,
  weighted by ``weights`` (x's shape without the channel axis, e.g. a token mask), and over
  all replicas of ``axis_name``.  ``stacked``: axis 0 indexes units; one value per unit.

  Two passes (channel means, then central moments), each a ``psum`` of per-channel sums and
  the count, so a per-device program gives the global batch's values.
  """
  x = x.astype(jnp.float32)
  lead = 1 if stacked else 0
  axes = tuple(range(lead, x.ndim - 1))
  w = (jnp.ones(x.shape[lead:-1], jnp.float32) if weights is None
       else weights.astype(jnp.float32))[..., None]
  count = _psum(jnp.sum(w), axis_name)
  total = lambda v: _psum(jnp.sum(w * v, axis=axes), axis_name) / count
  mu = total(x)                                             # (units?, C)
  d2 = jnp.square(x - mu.reshape(mu.shape[:-1] + (1,) * len(axes) + mu.shape[-1:]))
  mu2, mu4 = total(d2), total(jnp.square(d2))
  mean = jnp.mean(mu, -1)
  return {"mean": mean,
          "std": jnp.sqrt(jnp.mean(mu2, -1) + jnp.mean(jnp.square(mu - mean[..., None]), -1)),
          "rms": jnp.sqrt(jnp.mean(mu2 + jnp.square(mu), -1)),
          "kurtosis": kurtosis_from_moments(mu2, mu4)}


def unweighted(path: Path) -> None:
  """Weights of every unit output: none (all elements count)."""
  del path


def activation_moments(taps, *, axis_name: str | None = None,
                       weights_for: Callable[[Path], jax.Array | None] = unweighted
                       ) -> dict[str, dict[str, jax.Array]]:
  """:func:`unit_moments` of every tapped unit output, keyed by module path;
  ``weights_for(module path)``: the weights of that unit's positions (e.g. a token mask)."""
  out = {}
  for key, outputs in traverse_util.flatten_dict(taps).items():
    path = key[:-1]                                         # drop the tap's own name
    for i, y in enumerate(outputs):
      name = "/".join(path) + (f"#{i}" if len(outputs) > 1 else "")
      out[name] = unit_moments(y, weights_for(path), stacked=_is_stacked(path),
                               axis_name=axis_name)
  return out


def step_stats(grads, params, new_params, taps, *, axis_name: str | None = None,
               weights_for: Callable[[Path], jax.Array | None] = unweighted) -> dict:
  """``metrics["layer_stats"]`` of one step; see the module docstring."""
  return {"grad_sq": leaf_square_norms(grads), "param_sq": leaf_square_norms(params),
          "update_sq": leaf_square_norms(jax.tree_util.tree_map(jnp.subtract, new_params,
                                                                params)),
          "activations": activation_moments(taps, axis_name=axis_name,
                                            weights_for=weights_for)}


# ----------------------------------------------------------------------------------------
# On the host.
# ----------------------------------------------------------------------------------------
def module_call_order(model: nn.Module, *args, **kwargs) -> list[Path]:
  """Module paths in the order a forward pass ``model.init(…, *args, **kwargs)`` first
  calls them (parents before children); traced abstractly, nothing is compiled."""
  order: dict[Path, None] = {}

  def record(next_fun, fun_args, fun_kwargs, context):
    order.setdefault(tuple(context.module.path), None)
    return next_fun(*fun_args, **fun_kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda key: model.init({"params": key, "dropout": key}, *args, **kwargs),
                   jax.random.key(0))
  return list(order)


def _unstack(path: Path, count: int) -> list[Path]:
  """One path per unit of a stacked path (stage1_units -> stage1_unit2, stage1_unit3, …)."""
  for i, part in enumerate(path):
    match = _STACKED.match(part)
    if match:
      return [path[:i] + (f"{match.group(1)}_unit{j + 2}",) + path[i + 1:]
              for j in range(count)]
  return [path]


def _group_length(module_path: Path) -> int:
  """How many leading names of a module path name its layer (see the module docstring)."""
  for i, part in enumerate(module_path):
    if _UNIT.search(part) or _STACKED.match(part):
      return i + 1
  return len(module_path)


class _Ranks:
  """Depth order: a path's rank is that of its longest prefix in the call order."""

  def __init__(self, call_order: Sequence[Path]):
    self._rank = {tuple(p): i for i, p in enumerate(call_order)}

  def __call__(self, path: Path) -> int:
    for k in range(len(path), -1, -1):
      if path[:k] in self._rank:
        return self._rank[path[:k]]
    return len(self._rank)


def _entries(sizes: dict[str, int], ranks: _Ranks, *, leaf: bool):
  """(sort key, path, layer path, index in the key's value vector, key) per unit of every
  key of ``sizes`` (key -> number of units); ``leaf``: keys are parameter paths (module
  path + leaf name), else module paths (``#i``: the i-th call)."""
  out = []
  for key, size in sizes.items():
    path = tuple(key.split("/"))
    module = path[:-1] if leaf else path[:-1] + (path[-1].split("#")[0],)
    g = _group_length(module)
    for i, unstacked in enumerate(_unstack(path, size)):
      sort_key = (ranks(module[:g]), i, ranks(module), path[-1])
      out.append((sort_key, unstacked, unstacked[:g], i, key))
  return sorted(out)


def _display(path: Path) -> str:
  return "/".join(path)


def _jsonable(values) -> list:
  """Floats with float32 precision; non-finite values as null."""
  return [float(f"{v:.7g}") if np.isfinite(v) else None for v in np.asarray(values, float)]


def summarize(stats: dict, call_order: Sequence[Path]) -> dict[str, dict[str, list]]:
  """Host ``metrics["layer_stats"]`` -> ``{"params", "layers", "activations"}`` sections,
  each ``{"names": [...], <statistic>: [...]}`` in depth order (JSON-ready).

  ``params``: per parameter leaf; ``layers``: per layer, the norms of all its leaves
  together (sqrt of the summed squares); ``activations``: per residual unit output.
  """
  ranks = _Ranks(call_order)
  sq = {"grad_norm": stats["grad_sq"], "param_norm": stats["param_sq"],
        "update_norm": stats["update_sq"]}
  params = {"names": []} | {k: [] for k in NORMS}
  layers: dict[str, dict[str, float]] = {}
  for _, path, group, i, key in _entries(
      {k: np.size(v) for k, v in stats["grad_sq"].items()}, ranks, leaf=True):
    params["names"].append("/".join(path))
    layer = layers.setdefault(_display(group), dict.fromkeys(NORMS, 0.0))
    for k in NORMS:
      value = float(np.ravel(sq[k][key])[i])
      params[k].append(value)
      layer[k] += value
  activations = {"names": []} | {k: [] for k in MOMENTS}
  for _, path, _, i, key in _entries(
      {k: np.size(v["mean"]) for k, v in stats["activations"].items()}, ranks, leaf=False):
    activations["names"].append(_display(path))
    for k in MOMENTS:
      activations[k].append(float(np.ravel(stats["activations"][key][k])[i]))
  return {
      "params": {k: v if k == "names" else _jsonable(np.sqrt(v)) for k, v in params.items()},
      "layers": {"names": list(layers)} | {
          k: _jsonable(np.sqrt([layer[k] for layer in layers.values()])) for k in NORMS},
      "activations": {k: v if k == "names" else _jsonable(v) for k, v in activations.items()},
  }


def tensorboard_scalars(summary: dict) -> dict[str, dict[str, float]]:
  """``{"layer_grad_norm": {"stage2_unit3": value, …}, "act_std": {…}, …}`` of a summary:
  per layer and per unit, not per leaf (the JSON lines have those)."""
  out = {}
  for section, prefix in TAG_PREFIX.items():
    table = summary[section]
    for stat, values in table.items():
      if stat != "names":
        out[f"{prefix}_{stat}"] = {n: (float("nan") if v is None else v)
                                   for n, v in zip(table["names"], values)}
  return out


def write(writer: MetricWriter, step: int, stats, call_order: Sequence[Path]) -> None:
  """Fetches a step's ``metrics["layer_stats"]`` and writes its :func:`summarize` as a line
  of ``layer_stats.jsonl`` and its :func:`tensorboard_scalars` (on the writing process)."""
  if writer.enabled:
    summary = summarize(parallelism.to_host(stats), call_order)
    writer.write_record(FILENAME, step, summary, tensorboard_scalars(summary))
