"""Translation input pipeline at WMT shapes, from the prepared token cache (issue 15).

    python benchmarks/make_corpus.py --pairs 2000000 --out /work/scratch-data/gen2m
    python benchmarks/token_pipeline.py --data /work/scratch-data/gen2m \
        --workdir /work/scratch-data/run2m [--step]

``--workdir`` holds (or receives: the first call prepares it) ``spm.model`` and ``tokens/``
of the IWSLT'15-layout corpus in ``--data`` (``configs/iwslt15_envi_transformer.py``,
vocabulary ``--vocab``).  For each mode (bucketed = ``translation.packing=False``, packed)
at ``--max_tokens`` tokens per global batch (Vaswani et al. 2017: ~25k) and
``--max_length``, it times ``--steps`` consecutive global batches on one device
(the translation task's ``inputs(step)``: the host builds the rows from the memory-mapped
cache and transfers them) and reports:

* ``ms / batch`` and ``real tgt tok/s``: target tokens that are not padding, per second of
  pipeline time (what the train step's loss consumes; ``tokens_per_sec`` of the metrics);
* ``src fill``, ``tgt fill``, ``fill``: fraction of non-padding positions of each side and
  of both (the metrics' ``*_nonpad_fraction``, averaged over the batches);
* ``x base step (CPU)``: pipeline tokens/s over what one Transformer-base train step
  consumes on this CPU (``--step``: measured with ``benchmarks/transformer_step.py``'s
  framework row, 16 x 64 tokens; else ``--step_tokens_per_sec``);
* ``H100 40 % MFU tok/s``: what an H100 (989 TFLOP/s dense bf16) at 40 % MFU consumes,
  from the analytic FLOPs of a base step on rows of this mode's shape (transformer_step's
  count: 3 x forward, attention over whole rows) divided by the real target tokens of a
  batch; ``x H100`` = pipeline / that.
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
import numpy as np  # noqa: E402

H100_BF16_FLOPS = 989e12
COLUMNS = ["mode", "rows x len", "ms / batch", "real tgt tok/s", "src fill", "tgt fill", "fill",
           "x base step (CPU)", "H100 40% MFU tok/s", "x H100"]


def base_step_tokens_per_sec() -> float:
  """Target tokens/s of the framework's Transformer-base train step on this machine."""
  import transformer_step
  result = transformer_step.main(["--no_torch", "--repeats", "2", "--warmup", "1"])
  rows = {r["implementation"]: r for r in result["rows"]}
  return float(rows["framework"]["tokens/s"])


_FORWARD: dict = {}


def flops_per_step(rows: int, src_len: int, tgt_len: int) -> float:
  """3 x the analytic forward FLOPs of Transformer base (37k vocabulary) on ``rows`` rows."""
  import transformer_step
  if (src_len, tgt_len) not in _FORWARD:
    args = transformer_step.parse_args(["--no_torch", "--src_len", str(src_len),
                                        "--tgt_len", str(tgt_len)])
    model = transformer_step.build_model(transformer_step.make_config(args))
    _FORWARD[(src_len, tgt_len)] = transformer_step.forward_flops(model, src_len, tgt_len)
  return 3.0 * rows * _FORWARD[(src_len, tgt_len)]


def measure(args, packed: bool, step_tps: float) -> dict:
  from configs import iwslt15_envi_transformer
  from resnorm_jax import config as config_lib, parallelism
  from resnorm_jax import validation
  from resnorm_jax.tasks.translation.task import Translation
  c = iwslt15_envi_transformer.get_config()
  c.model.preset = "tiny"           # the model is not run here; only its vocabulary matters
  c.model.vocab_size = args.vocab
  c.data.data_dir = args.data
  c.translation.max_tokens = args.max_tokens
  c.translation.max_length = args.max_length
  c.translation.packing = packed
  c.parallel.num_devices = 1
  validation.validate(c, jax.device_count())
  job = Translation(c, parallelism.make_mesh(1))
  t0 = time.perf_counter()
  job.setup(args.workdir)
  setup_s = time.perf_counter() - t0
  jax.block_until_ready(job.inputs(0))   # warm-up (first transfer)
  real_tgt, fills, shapes = 0, [], {}
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    batch = job.inputs(step)
    jax.block_until_ready(batch)
  elapsed = time.perf_counter() - start
  for step in range(1, args.steps + 1):   # counted outside the timed loop
    host = job.batches.batch(step)
    src, tgt = (host["src"], host["tgt"]) if packed else host
    real_tgt += int((tgt != 0).sum())
    fills.append(((src != 0).mean(), (tgt != 0).mean(),
                  ((src != 0).sum() + (tgt != 0).sum()) / (src.size + tgt.size)))
    shapes[(src.shape, tgt.shape)] = shapes.get((src.shape, tgt.shape), 0) + 1
  tps = real_tgt / elapsed
  fill = np.mean(fills, axis=0)
  # Train FLOPs of the batches timed (each at its own shape), per real target token.
  flops = sum(count * flops_per_step(s[0], s[1], t[1]) for (s, t), count in shapes.items())
  per_token = flops / real_tgt
  h100 = 0.4 * H100_BF16_FLOPS / per_token
  (s_shape, t_shape) = max(shapes, key=shapes.get)
  return {"mode": "packed" if packed else "bucketed",
          "rows x len": f"{s_shape[0]} x {s_shape[1]}/{t_shape[1]}" + (
              f" (+{len(shapes) - 1} shapes)" if len(shapes) > 1 else ""),
          "ms / batch": 1e3 * elapsed / args.steps, "real tgt tok/s": tps,
          "src fill": fill[0], "tgt fill": fill[1], "fill": fill[2],
          "x base step (CPU)": tps / step_tps if step_tps else float("nan"),
          "H100 40% MFU tok/s": h100, "x H100": tps / h100, "setup s": setup_s,
          "flops/real tgt token": per_token}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data", required=True, help="IWSLT'15-layout corpus directory")
  p.add_argument("--workdir", required=True, help="cache directory (spm.model, tokens/)")
  p.add_argument("--vocab", type=int, default=16_000)
  p.add_argument("--max_tokens", type=int, default=25_000)
  p.add_argument("--max_length", type=int, default=256)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--step", action="store_true",
                 help="measure the Transformer-base train step here (slow)")
  p.add_argument("--step_tokens_per_sec", type=float, default=591.3,
                 help="base step's target tokens/s when --step is not given (RESULTS.md)")
  p.add_argument("--json", default=None)
  args = p.parse_args(argv)
  step_tps = base_step_tokens_per_sec() if args.step else args.step_tokens_per_sec
  rows = [measure(args, packed, step_tps) for packed in (False, True)]
  common.print_table(f"token pipeline, {args.max_tokens} tokens/batch, max_length "
                     f"{args.max_length}; base step {step_tps:.1f} tgt tok/s on this CPU",
                     rows, COLUMNS)
  for r in rows:
    print(f"{r['mode']}: setup {r['setup s']:.1f} s, {r['flops/real tgt token']:.3e} "
          "train FLOPs per real target token")
  common.write_json(args.json, {"rows": rows, "base_step_tokens_per_sec": step_tps,
                                "environment": common.environment()})
  return rows


if __name__ == "__main__":
  main()
