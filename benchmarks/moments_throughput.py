"""Throughput of the moments diagnostics (``resnorm-analyze``, configs/moments.py).

    python benchmarks/moments_throughput.py                        # width 128, 50 units, ...
    python benchmarks/moments_throughput.py --variants bn_res,bn_ff --draws 16

One random draw of ``resnorm_jax.analysis.moments`` propagates a batch x and a perturbation
dx through a stack of freshly initialized conv units (``jax.jvp`` of each unit, statistics
of both at every unit: χ, r_eff of signal and noise via the 128x128 covariance's
eigenvalues, kurtosis).  Setting (fixed, overridable): width 128, 50 units (100 conv layers)
for every variant, batch 64, 8x8 positions (photo inputs), periodic boundaries, exact BN tangent,
8 draws, one draw at a time (the CPU default).  Rows per variant:

* ``moments draw``: ``moments.draw_function`` through ``analysis.common.run_draws`` as
  ``resnorm-analyze`` runs it; ``draws·layers/s`` = draws x conv layers / seconds;
* ``forward``: the same units (same module code, boundary and train-mode BN) with fixed,
  pre-initialized parameters, a plain forward pass of x in a ``scan``: the reference cost;
* ``forward + jvp``: that pass carrying dx by ``jax.jvp`` (the draw minus per-unit init,
  statistics and rescaling).

``x forward`` is a row's time per draw over the forward pass's.  The first call (compile +
one draw) is reported separately (``compile s``); then ``--repeats`` rounds time every row
once over all draws (interleaved, so the rows see the same machine load), and the medians
are reported.  The authors' moments-dnns reports no timings (SPEC.md and the seeds quote none),
so there is no published throughput to compare with.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import common  # noqa: E402  (also puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

COLUMNS = ["variant", "row", "compile s", "s / draw", "draws·layers/s", "x forward"]


def make_config(args):
  from resnorm_jax.analysis import moments
  c = moments.default_config()
  c.update(dict(width=args.width, batch=args.batch, ff_units=args.units, res_units=args.units,
                draws=args.draws, variants=args.variants, draw_batch=1, tap_every=1))
  return c


def reference_functions(variant, config):
  """(forward(key, *data), forward_jvp(key, *data)): the stack with pre-initialized
  parameters; ``data`` is what the draws get (the input images, if any)."""
  from resnorm_jax.analysis import common as analysis_common, moments
  units = moments.num_units(variant, config)
  unit = moments.build_unit(variant, config.width, units)
  probe = jnp.zeros((1, 1, 1, config.width), jnp.float32)
  base = jax.random.key(config.seed, impl=analysis_common.PRNG_IMPL)
  stacked = jax.jit(jax.vmap(lambda i: unit.init(moments._rngs(jax.random.fold_in(base, i)),
                                                 probe, train=True)))(jnp.arange(units))
  stacked = jax.block_until_ready(stacked)

  def apply(variables, h):
    with moments.boundary_context(config.boundary):
      return unit.apply(variables, h, train=True, mutable=["batch_stats"])[0]

  def forward(key, *data):
    x, _ = moments.make_inputs(key, config, *data)
    y, _ = lax.scan(lambda h, v: (apply(v, h), None), x, stacked)
    return jnp.mean(y)

  def forward_jvp(key, *data):
    x, dx = moments.make_inputs(key, config, *data)

    def body(carry, v):
      return jax.jvp(lambda h: apply(v, h), carry[:1], carry[1:]), None

    (y, dy), _ = lax.scan(body, (x, dx), stacked)
    return jnp.mean(y), jnp.mean(dy)

  return forward, forward_jvp


def variant_rows(name, variant, config, args) -> list[dict]:
  from resnorm_jax.analysis import common as analysis_common, moments
  keys = analysis_common.draw_keys(config.seed, config.draws)
  layers = moments.num_units(variant, config) * moments.CONVS_PER_UNIT
  n = config.draws
  draw = moments.draw_function(variant, config)   # run as resnorm-analyze runs it
  images = moments.input_images(config)
  data = () if images is None else (jnp.asarray(images),)
  forward, forward_jvp = (jax.jit(f) for f in reference_functions(variant, config))
  passes = {
      "moments draw": (lambda k: analysis_common.run_draws(draw, k[None], 1, data=data),
                       lambda: analysis_common.run_draws(draw, keys, 1, data=data)),
      "forward": (lambda k: forward(k, *data),
                  lambda: [forward(keys[i], *data) for i in range(n)]),
      "forward + jvp": (lambda k: forward_jvp(k, *data),
                        lambda: [forward_jvp(keys[i], *data) for i in range(n)]),
  }
  compile_s, times = {}, {row: [] for row in passes}
  for row, (one, _) in passes.items():   # the first call compiles
    start = time.perf_counter()
    jax.block_until_ready(one(keys[0]))
    compile_s[row] = time.perf_counter() - start
  for _ in range(args.repeats):          # rounds: every row once per round (same load)
    for row, (_, all_draws) in passes.items():
      times[row] += common.time_calls(all_draws, warmup=0, repeats=1)
  per_forward = common.median(times["forward"]) / n
  rows = []
  for row in passes:
    total = common.median(times[row])
    rows.append({"variant": name, "row": row, "compile s": compile_s[row], "s / draw": total / n,
                 "draws·layers/s": n * layers / total, "x forward": total / n / per_forward})
  return rows


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variants", default="bn_res", help="moments variants (configs/moments.py)")
  p.add_argument("--width", type=int, default=128)
  p.add_argument("--units", type=int, default=50, help="units (2 conv layers each)")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--draws", type=int, default=8)
  p.add_argument("--repeats", type=int, default=5, help="timed rounds over all draws")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  from resnorm_jax.analysis import moments
  args = parse_args(argv)
  config = make_config(args)
  rows = []
  for name, variant in moments.validate(config):
    rows += variant_rows(name, variant, config, args)
  common.print_table(f"Moments diagnostics throughput (width {args.width}, {args.units} units "
                     f"= {args.units * moments.CONVS_PER_UNIT} conv layers, batch "
                     f"{args.batch}, 8x8, {args.draws} draws, 1 draw at a time)", rows, COLUMNS)
  print("\nmoments-dnns (Labatie 2019) publishes no timings to compare with: reference = a "
        "plain forward pass of the same network.")
  result = {"rows": rows, "args": vars(args)}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
