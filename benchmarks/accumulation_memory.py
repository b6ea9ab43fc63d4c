"""Peak device memory of the train step vs ``train.accumulate_steps`` (XLA's own accounting).

For each k the framework's jitted train step (``training.make_train_step``, one device) of
a PreAct-ResNet on synthetic CIFAR-shaped data is lowered and compiled, nothing is run, and
``compiled.memory_analysis()`` gives XLA's buffer assignment: arguments (train state + the
step's inputs), outputs, and temporaries (activations kept for the backward pass, gradients,
workspace).  The activations live in the temporaries; with k microbatches in a ``lax.scan``
only one microbatch's activations are live at a time, so the temporaries should fall about
k-fold down to what does not scale with the batch (the gradient accumulator, the update).

Usage: ``python benchmarks/accumulation_memory.py [--depth 56] [--batch 128] [--ks 1,2,4,8]
[--json out.json]`` (CPU: ``JAX_PLATFORMS=cpu``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402,F401  (benchmarks/ is not a package; puts the repo on sys.path)

import jax  # noqa: E402

from resnorm_jax import config as config_lib, parallelism, training  # noqa: E402
from resnorm_jax import validation

MIB = 2 ** 20


def step_memory(depth: int, width: int, batch: int, k: int, norm: str) -> dict:
  """XLA's memory analysis of the compiled train step with ``accumulate_steps = k``."""
  c = config_lib.base_config()
  c.model.depth, c.model.width, c.model.norm = depth, width, norm
  c.data.synthetic_train_size, c.data.synthetic_test_size = batch, 8
  c.train.batch_size, c.train.accumulate_steps = batch, k
  c.parallel.num_devices = 1
  validation.validate(c, jax.device_count())
  task = training.build_task(c, parallelism.make_mesh(1))
  task.setup(workdir="")
  step = training.make_train_step(task)
  compiled = step.lower(training.abstract_state(task), task.inputs(0)).compile()
  return _row(compiled.memory_analysis(), k, batch // k)


def transformer_step_memory(preset: str, vocab: int, max_tokens: int, length: int,
                            k: int) -> dict:
  """The same for the Transformer's step on a bucketed batch of ``length``-token rows
  within ``max_tokens`` (rows a multiple of k, as training rounds them); the step is lowered
  on abstract inputs, so no data or vocabulary is built."""
  from resnorm_jax.tasks.translation import corpora
  c = config_lib.base_config()
  c.model.name, c.model.preset, c.model.vocab_size = "transformer", preset, vocab
  c.model.norm, c.model.skip, c.model.max_len = "layer", "post_ln", max(256, length)
  c.data.name = "toy_translation"
  c.train.optimizer, c.train.accumulate_steps = "adam", k
  c.translation.max_tokens, c.translation.max_length = max_tokens, length
  c.parallel.num_devices = 1
  validation.validate(c, jax.device_count())
  task = training.build_task(c, parallelism.make_mesh(1))
  rows = corpora.rows_for(length, max_tokens, k)
  sharding = parallelism.batch_sharded(task.mesh)
  inputs = {side: jax.ShapeDtypeStruct((rows, length), "int32", sharding=sharding)
            for side in ("src", "tgt")}
  compiled = training.make_train_step(task).lower(training.abstract_state(task),
                                                  inputs).compile()
  return _row(compiled.memory_analysis(), k, rows // k)


def _row(m, k: int, microbatch: int) -> dict:
  return {"k": k, "microbatch": microbatch,
          "temp MiB": m.temp_size_in_bytes / MIB,
          "argument MiB": m.argument_size_in_bytes / MIB,
          "output MiB": m.output_size_in_bytes / MIB,
          "alias MiB": m.alias_size_in_bytes / MIB,
          # Every buffer XLA assigns, donated state counted once: the step's peak at most.
          # (XLA:CPU's own peak_memory_in_bytes leaves the temporaries out.)
          "total MiB": (m.temp_size_in_bytes + m.argument_size_in_bytes
                        + m.output_size_in_bytes - m.alias_size_in_bytes) / MIB}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--model", default="resnet", choices=("resnet", "transformer"))
  p.add_argument("--preset", default="base", help="transformer preset")
  p.add_argument("--vocab", type=int, default=37_000)
  p.add_argument("--max_tokens", type=int, default=25_000)
  p.add_argument("--length", type=int, default=64, help="transformer: tokens per row")
  p.add_argument("--depth", type=int, default=56)
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--norm", default="batch")
  p.add_argument("--ks", default="1,2,4,8")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  if args.model == "resnet":
    rows = [step_memory(args.depth, args.width, args.batch, int(k), args.norm)
            for k in args.ks.split(",")]
    title = (f"PreAct-ResNet-{args.depth} (width {args.width}, norm {args.norm}), global "
             f"batch {args.batch}")
  else:
    rows = [transformer_step_memory(args.preset, args.vocab, args.max_tokens, args.length,
                                    int(k)) for k in args.ks.split(",")]
    title = (f"Transformer {args.preset} (vocabulary {args.vocab}), {args.max_tokens} "
             f"tokens per batch in rows of {args.length}")
  base = rows[0]
  for row in rows:
    row["temp / k=1"] = row["temp MiB"] / base["temp MiB"]
    row["total / k=1"] = row["total MiB"] / base["total MiB"]
  cols = list(rows[0])
  print(f"{title}, one {jax.devices()[0].platform} device; compiled.memory_analysis()")
  print("| " + " | ".join(cols) + " |")
  print("|" + "|".join("---" for _ in cols) + "|")
  for row in rows:
    print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v)
                            for v in row.values()) + " |")
  result = {"args": vars(args), "rows": rows}
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
  return result


if __name__ == "__main__":
  main()
