"""``resnorm-summary``: a model's layer table, parameter count and forward FLOPs.

    resnorm-summary --config=configs/cifar_resnet.py:resnet1001 --config.model.norm=group:16

FLOPs are analytic: the model is traced abstractly (``jax.eval_shape``, nothing computed)
while every convolution and dense layer call is intercepted and charged
2·k·k·C_in·C_out·H_out·W_out (conv) or 2·D_in·D_out per position (dense) multiply-adds;
models add the terms that are not layers (attention's QKᵀ and AV products, tied output
logits) through ``extra_flops``.  Norms, activations and additions are not counted (they are O(activations),
not O(parameters × positions)).  Unlike XLA's cost analysis this counts a scanned stage
once per unit, because the summary always traces the unrolled model.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict

import flax.linen as nn
import jax

from resnorm_jax import cli
from resnorm_jax.errors import ConfigError
from resnorm_jax.layers.conv import Conv


@dataclasses.dataclass
class Row:
  name: str
  params: int = 0
  flops: int = 0
  output: tuple = ()


def _layer_flops(module, args, output) -> int:
  if isinstance(module, Conv):
    k = module.kernel_size
    return 2 * k * k * args[0].shape[-1] * math.prod(output.shape)
  if isinstance(module, nn.Dense):
    return 2 * args[0].shape[-1] * math.prod(output.shape)
  return 0


def model_summary(model, example_inputs: tuple, *, init_kwargs=None, apply_kwargs=None,
                  extra_flops: int = 0):
  """Rows per top-level child (params, forward FLOPs per example, output shape), totals.

  ``example_inputs`` have a batch dimension of 1, so FLOPs are per example.
  """
  init_kwargs = init_kwargs or {}
  apply_kwargs = apply_kwargs or {}
  rng = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.eval_shape(lambda: model.init(rng, *example_inputs, **init_kwargs))
  rows: "OrderedDict[str, Row]" = OrderedDict()  # in call order

  def interceptor(next_fun, args, kwargs, context):
    output = next_fun(*args, **kwargs)
    path = context.module.path
    if path and context.method_name == "__call__":
      row = rows.setdefault(path[0], Row(path[0]))
      row.flops += _layer_flops(context.module, args, output)
      first = output[0] if isinstance(output, tuple) else output
      if len(path) == 1 and hasattr(first, "shape"):
        row.output = tuple(first.shape[1:])
    return output

  def forward(variables, inputs):
    with nn.intercept_methods(interceptor):
      return model.apply(variables, *inputs, rngs=rng, **apply_kwargs)

  jax.eval_shape(forward, variables, example_inputs)
  for name, subtree in variables.get("params", {}).items():
    rows.setdefault(name, Row(name)).params = sum(
        math.prod(x.shape) for x in jax.tree_util.tree_leaves(subtree))
  total_params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(
      variables.get("params", {})))
  return list(rows.values()), total_params, sum(r.flops for r in rows.values()) + extra_flops


def format_table(rows, total_params, total_flops, title="") -> str:
  width = max([len(r.name) for r in rows] + [5])
  lines = [title] if title else []
  lines.append(f"{'layer':<{width}}  {'output':>16}  {'params':>12}  {'GFLOPs/ex':>10}")
  lines.append("-" * (width + 44))
  for r in rows:
    shape = "x".join(map(str, r.output)) if r.output else ""
    lines.append(f"{r.name:<{width}}  {shape:>16}  {r.params:>12,}  {r.flops / 1e9:>10.4f}")
  lines.append("-" * (width + 44))
  lines.append(f"{'total':<{width}}  {'':>16}  {total_params:>12,}  {total_flops / 1e9:>10.4f}")
  lines.append(f"parameters: {total_params / 1e6:.3f}M   forward FLOPs per example: "
               f"{total_flops / 1e9:.4f} GFLOPs")
  return "\n".join(lines)


def summary_inputs(config):
  """(model, example inputs with batch 1, call kwargs, FLOPs not in layers) of ``config``'s
  model family, with the data shapes its task knows from the config alone."""
  from resnorm_jax import models, tasks
  data = tasks.task_class(config).static_data(config)
  model = models.build_model(config, models.norm_context(config), data)
  return (model, models.example_inputs(config, data), {"train": False},
          models.family(config).extra_flops(config, model))


def summarize_config(config) -> str:
  """The table for a training config (one example of the data's shape)."""
  from resnorm_jax import models
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():   # e.g. each unit counted, not one scanned body per stage
    for key, value in models.family(cfg).summary_overrides.items():
      cfg.model[key] = value
  model, inputs, kwargs, extra = summary_inputs(cfg)
  rows, params, flops = model_summary(model, inputs, init_kwargs=kwargs, apply_kwargs=kwargs,
                                      extra_flops=extra)
  m = cfg.model
  keys = models.family(cfg).title_keys
  shapes = " x ".join(str(tuple(x.shape[1:])) for x in inputs)
  title = (f"{m.name} " + " ".join(f"{k}={m[k]}" for k in keys if m[k] is not None)
           + f" (FLOPs per example of shape {shapes})")
  return format_table(rows, params, flops, title)


def main(argv):
  del argv
  from absl import logging
  from resnorm_jax import validation
  logging.set_verbosity(logging.WARNING)
  config = cli.flag_value("config")
  try:
    validation.validate_model(config)
    print(summarize_config(config))
  except ConfigError as e:
    cli.fail(str(e))


def run():
  cli.run_command("resnorm-summary", cli.define_flags, main)


if __name__ == "__main__":
  run()
