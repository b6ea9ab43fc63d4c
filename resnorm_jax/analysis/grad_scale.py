"""Gradient scale at initialization through scaled skips and normalization.

Conv stacks (He et al. 2016, eq. 5-8; Liu et al. 2020).  With x_{l+1} = λ·x_l + F(x_l)
the gradient reaching unit l is

    ∂L/∂x_l = ∂L/∂x_L · ( ∏_{i=l}^{L−1} λ  +  terms through the branches F ),

so the shortcut path alone carries the factor λ^{L−l}: it explodes for λ > 1 and vanishes
for λ < 1 as the depth grows.  A norm after the addition (``xskip_ln``: y = LN(λx + F(x)))
divides by the standard deviation of λx + F(x) and removes the factor.  Each unit is the
training code's :class:`~resnorm_jax.layers.ConvUnit` (any ordering, norm and skip
combinator; default: ``full_preact`` with no norm, y = λx + conv(ReLU(conv(ReLU(x))))).
The loss is a fixed random linear read-out L = ⟨r, x_L⟩ / sqrt(#x_L), r ~ N(0, 1), so the
gradient entering the top has unit RMS whatever the forward scale, and every ratio
measured is the network's own backward gain.  Recorded per unit: |∂L/∂x_l| (the input of
unit l; via zero probes added to each unit's input) and |∂L/∂θ_l| (its parameters).  The
fitted growth factor per unit going down is compared with He's shortcut-only prediction
(λ without a norm after the addition, 1 with one).  A He-initialized branch without norm
is itself variance preserving, so without a norm the measured factor is about
sqrt(λ² + 1) (both paths), not λ; the factor is ~1 with LN after the addition.

Transformers (Xiong et al. 2020, "On Layer Normalization in the Transformer
Architecture", Fig. 3): the real :class:`~resnorm_jax.models.transformer.Transformer`
(encoder-decoder, any skip combinator: ``post_ln``, ``pre_ln``, ``xskip_ln:2``, ...) at
initialization, dropout off, on random tokens with the training loss (label-smoothed cross
entropy); recorded per layer and stack: |∂L/∂W₂| of the FFN's output projection (Xiong's
quantity) and the whole layer's parameter-gradient norm.  Post-LN: the gradient of the
layers near the output is the largest and it grows with the layer index; Pre-LN: about flat.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from resnorm_jax.analysis import common, stats
from resnorm_jax.layers import (COMBINATORS, NORMS, UNIT_ORDERINGS, ConvUnit, DepthInfo,
                                NormContext, conv_unit, make_combinator)
from resnorm_jax.errors import ConfigError


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.analysis = "grad_scale"
  c.seed = 0
  c.draws = 4
  c.draw_batch = 0            # 0 = auto (1 on CPU)
  c.conv = ml_collections.ConfigDict()
  c.conv.variants = "xskip:0.5,xskip:1,xskip:2,xskip_ln:0.5,xskip_ln:1,xskip_ln:2"  # '' = skip
  c.conv.ordering = "full_preact"
  c.conv.norm = "none"        # the norm inside the branch
  c.conv.units = 16
  c.conv.width = 16
  c.conv.spatial = 8
  c.conv.batch = 8
  c.transformer = ml_collections.ConfigDict()
  c.transformer.variants = "post_ln,pre_ln"   # skip combinator specs; '' = skip
  c.transformer.layers = 6    # encoder layers = decoder layers
  c.transformer.d_model = 64
  c.transformer.num_heads = 4
  c.transformer.d_ff = 256
  c.transformer.vocab = 512
  c.transformer.batch = 8
  c.transformer.length = 32
  c.transformer.label_smoothing = 0.1
  return c


def _variants(text: str, key: str) -> list[str]:
  return [] if not str(text).strip() else list(dict.fromkeys(common.split_list(text, key)))


def validate(config):
  common.require_int(config, "draws")
  common.require_int(config, "draw_batch", minimum=0)
  common.require_int(config, "seed", minimum=0)
  conv, tf = config.conv, config.transformer
  for key in ("units", "width", "spatial", "batch"):
    common.require_int(conv, key)
  conv_variants = _variants(conv.variants, "conv.variants")
  tf_variants = _variants(tf.variants, "transformer.variants")
  if not conv_variants and not tf_variants:
    raise ConfigError("conv.variants and transformer.variants are both empty; give at least "
                      "one skip combinator spec (e.g. xskip:2, post_ln)")
  try:
    UNIT_ORDERINGS.validate(conv.ordering)
    NORMS.validate(conv.norm)
  except ConfigError as e:
    raise ConfigError(f"conv: {e}") from None
  if not UNIT_ORDERINGS.build(conv.ordering).residual and conv_variants:
    raise ConfigError(f"conv.ordering={conv.ordering!r} has no shortcut, so the skip variants "
                      f"do not apply; choose a residual ordering: " + ", ".join(
                          o.name for o in UNIT_ORDERINGS if o.name != "plain"))
  for spec in conv_variants + tf_variants:
    try:
      COMBINATORS.validate(spec)
    except ConfigError as e:
      raise ConfigError(f"grad_scale variant: {e}") from None
  for spec in conv_variants:
    unit = _conv_unit(spec, config)
    try:
      jax.eval_shape(lambda: unit.init(_rngs(jax.random.key(0)),
                                       jnp.zeros((1, 1, 1, conv.width)), train=True))
    except ConfigError as e:
      raise ConfigError(f"conv variant {spec!r}: {e}") from None
  if tf_variants:
    for key in ("layers", "d_model", "num_heads", "d_ff", "vocab", "batch", "length"):
      common.require_int(tf, key)
    if tf.vocab < 4:
      raise ConfigError(f"transformer.vocab={tf.vocab} must be >= 4 (3 special tokens)")
    common.require_float(tf, "label_smoothing", strict=False)
    for spec in tf_variants:
      _transformer_config(spec, config)   # raises ConfigError
  return conv_variants, tf_variants


def _rngs(key):
  return {"params": key, "dropout": jax.random.fold_in(key, 1)}


def _conv_unit(spec: str, config) -> ConvUnit:
  conv = config.conv
  return conv_unit(conv.width, ordering=conv.ordering, norm=conv.norm, skip=spec,
                  ctx=NormContext(momentum=0.0), depth=DepthInfo("encoder_only", conv.units))


def he_prediction(spec: str) -> float:
  """He 2016's per-unit factor of the shortcut path: λ, or 1 after a norm on the sum."""
  template = make_combinator(spec)
  return 1.0 if template.post_norm is not None else float(template.x_scale)


def branch_prediction(spec: str, config) -> float | None:
  """With a He-initialized branch and no norm at all, the branch's backward map is itself
  variance preserving and adds independently of the shortcut: sqrt(λ² + 1) per unit."""
  template = make_combinator(spec)
  if config.conv.norm != "none" or template.post_norm is not None or template.pre_norm:
    return None
  return float(math.sqrt(template.x_scale ** 2 + 1.0))


def global_norm(tree) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(a)) for a in jax.tree_util.tree_leaves(tree)))


def conv_draw_function(spec: str, config):
  """draw(key) -> |∂L/∂x_l| (l = 0..L, x_L the output) and |∂L/∂θ_l| (l = 0..L−1)."""
  conv = config.conv
  unit = _conv_unit(spec, config)
  shape = (conv.batch, conv.spatial, conv.spatial, conv.width)
  probe = jnp.zeros((1, 1, 1, conv.width), jnp.float32)
  units = conv.units

  def draw(key):
    kx, kr, kp, kd = jax.random.split(key, 4)
    x = jax.random.normal(kx, shape, jnp.float32)
    r = jax.random.normal(kr, shape, jnp.float32)
    variables = [unit.init(_rngs(jax.random.fold_in(kp, i)), probe, train=True)
                 for i in range(units)]
    params = [v["params"] for v in variables]
    rest = [{k: a for k, a in v.items() if k != "params"} for v in variables]

    def loss(params, probes):
      h = x
      for i in range(units):   # a Python loop: scan's backward is far slower on CPU
        h = unit.apply({"params": params[i], **rest[i]}, h + probes[i], train=True,
                       mutable=["batch_stats"], rngs={"dropout": jax.random.fold_in(kd, i)})[0]
      h = h + probes[units]
      return jnp.sum(h * r) / math.sqrt(h.size)

    probes = [jnp.zeros(shape, jnp.float32) for _ in range(units + 1)]
    g_params, g_probes = jax.grad(loss, argnums=(0, 1))(params, probes)
    return {"grad_x": jnp.stack([jnp.linalg.norm(g) for g in g_probes]),
            "grad_w": jnp.stack([global_norm(g) for g in g_params])}

  return draw


def _transformer_config(spec: str, config):
  from resnorm_jax.models.transformer import transformer_preset
  tf = config.transformer
  try:
    return transformer_preset(
        "base", vocab_size=tf.vocab, num_encoder_layers=tf.layers,
        num_decoder_layers=tf.layers, d_model=tf.d_model, num_heads=tf.num_heads,
        d_ff=tf.d_ff, dropout_rate=0.0, max_len=tf.length, skip=spec)
  except ConfigError as e:
    raise ConfigError(f"transformer variant {spec!r}: {e}") from None


def transformer_draw_function(spec: str, config):
  """draw(key) -> per-layer |∂L/∂W₂| (FFN output projection) and whole-layer gradient norms
  of the encoder and decoder, for random tokens and the label-smoothed loss."""
  from resnorm_jax.models.transformer import (Transformer, label_smoothed_cross_entropy,
                                              shift_right)
  tf = config.transformer
  cfg = _transformer_config(spec, config)
  model = Transformer(cfg)
  shape = (tf.batch, tf.length)

  def draw(key):
    ks, kt, kp = jax.random.split(key, 3)
    first = max(cfg.pad_id, cfg.bos_id, cfg.eos_id) + 1
    src = jax.random.randint(ks, shape, first, cfg.vocab_size)
    tgt = jax.random.randint(kt, shape, first, cfg.vocab_size)
    tgt_in = shift_right(tgt, cfg.bos_id)
    variables = model.init(kp, src, tgt_in)
    rest = {k: v for k, v in variables.items() if k != "params"}

    def loss(params):
      logits, _ = model.apply({"params": params, **rest}, src, tgt_in, train=True,
                              mutable=["batch_stats"])
      total, count = label_smoothed_cross_entropy(logits, tgt, cfg.pad_id, tf.label_smoothing)
      return total / count

    g = jax.grad(loss)(variables["params"])
    out = {}
    for stack in ("encoder", "decoder"):
      layers = [g[stack][f"layer_{i}"] for i in range(tf.layers)]
      out[f"{stack}_ffn_w2"] = jnp.stack([jnp.linalg.norm(l["ffn"]["wo"]["kernel"])
                                          for l in layers])
      out[f"{stack}_layer"] = jnp.stack([global_norm(l) for l in layers])
    return out

  return draw


def _log_agg(values) -> dict:
  """Aggregate positive values over draws in log space (geometric mean, percentiles)."""
  agg = stats.aggregate(np.log(np.maximum(np.asarray(values, np.float64), 1e-300)))
  return {k: np.exp(v).tolist() for k, v in agg.items()}


def run(config, log=print) -> dict:
  conv_variants, tf_variants = validate(config)
  keys = common.draw_keys(config.seed, config.draws)
  out = {"conv": {}, "transformer": {}}
  for spec in conv_variants:
    start = time.time()
    d = common.run_draws(conv_draw_function(spec, config), keys, config.draw_batch,
                         label=spec, log=log)
    rel = d["grad_x"] / d["grad_x"][:, -1:]            # |∂L/∂x_l| / |∂L/∂x_L|
    units = config.conv.units
    below_top = units - np.arange(units + 1)           # units between x_l and the output
    mean_log = np.mean(np.log(rel), axis=0)
    fit = stats.fit_line(below_top, mean_log)
    factor = float(np.exp(fit["slope"]))
    out["conv"][spec] = {
        "unit": list(range(units + 1)), "units_below_output": below_top.tolist(),
        "grad_x_rel": _log_agg(rel), "grad_w": _log_agg(d["grad_w"]),
        "growth_per_unit": factor, "fit_r2": fit["r2"],
        "he_prediction": he_prediction(spec),
        "branch_prediction": branch_prediction(spec, config),
        "input_over_output": float(np.exp(mean_log[0])),
        "max_over_min": float(np.exp(mean_log.max() - mean_log.min())),
        "seconds": time.time() - start}
    log(f"  conv {spec}: growth per unit {factor:.3f} (He: {he_prediction(spec):g}), "
        f"{time.time() - start:.1f} s")
  for spec in tf_variants:
    start = time.time()
    d = common.run_draws(transformer_draw_function(spec, config), keys, config.draw_batch,
                         label=spec, log=log)
    entry = {"layer": list(range(1, config.transformer.layers + 1))}
    for stack in ("encoder", "decoder"):
      w2 = d[f"{stack}_ffn_w2"]
      fit = stats.fit_line(entry["layer"], np.mean(np.log(w2), axis=0))
      entry[stack] = {"ffn_w2": _log_agg(w2), "layer_total": _log_agg(d[f"{stack}_layer"]),
                      "growth_per_layer": float(np.exp(fit["slope"])),
                      "last_over_first": float(np.exp(np.mean(np.log(w2[:, -1] / w2[:, 0]))))}
    entry["seconds"] = time.time() - start
    out["transformer"][spec] = entry
    log(f"  transformer {spec}: FFN W2 gradient growth per layer encoder "
        f"{entry['encoder']['growth_per_layer']:.3f}, decoder "
        f"{entry['decoder']['growth_per_layer']:.3f}, {time.time() - start:.1f} s")
  return out


def table(results: dict) -> str:
  lines = []
  if results["conv"]:
    head = (f"{'conv skip':<14} {'growth/unit':>11} {'He pred.':>8} {'+branch':>8} "
            f"{'in/out grad':>11} {'max/min':>9} {'R2':>6}")
    lines += ["gradient |dL/dx_l| per unit, going from the output down (conv stack)", head,
              "-" * len(head)]
    for spec, r in results["conv"].items():
      branch = r["branch_prediction"]
      branch = "" if branch is None else f"{branch:.3g}"
      lines.append(f"{spec:<14} {r['growth_per_unit']:>11.3f} {r['he_prediction']:>8.3g} "
                   f"{branch:>8} {r['input_over_output']:>11.3g} {r['max_over_min']:>9.3g} "
                   f"{r['fit_r2']:>6.3f}")
  if results["transformer"]:
    head = (f"{'transformer skip':<16} {'enc growth':>10} {'enc last/1st':>12} "
            f"{'dec growth':>10} {'dec last/1st':>12}")
    lines += (["", ] if lines else []) + [
        "FFN W2 gradient norm per layer (Xiong et al. 2020), growth per layer toward output",
        head, "-" * len(head)]
    for spec, r in results["transformer"].items():
      e, d = r["encoder"], r["decoder"]
      lines.append(f"{spec:<16} {e['growth_per_layer']:>10.3f} {e['last_over_first']:>12.3g} "
                   f"{d['growth_per_layer']:>10.3f} {d['last_over_first']:>12.3g}")
  return "\n".join(lines)
