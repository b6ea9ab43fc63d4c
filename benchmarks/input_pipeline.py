"""Input pipeline throughput vs train-step throughput: the pipeline is never the bottleneck.

    python benchmarks/input_pipeline.py                   # CIFAR shapes + toy translation
    python benchmarks/input_pipeline.py --depth 110       # against the ResNet-110 step

Images (``resnorm_jax.data`` / ``tasks.image``): the uint8 training set lives on the
device; each step the host computes the batch's example indices and sends them, and the
jitted step gathers, augments (pad 4 + random crop + flip) and normalizes the batch before
the model.  Rows, on synthetic CIFAR-shaped data (``--examples`` x 32x32x3 uint8), batch
``--batch``, 1 device:

* ``host indices + transfer``: ``data.batch_indices`` (the epoch permutation from
  (seed, epoch)) and ``parallelism.host_to_global`` of the index array, per step;
* ``device gather+augment+normalize``: those three alone, jitted (what the step's
  ``prepare`` does: the same functions, keys and arguments);
* ``train step``: ``training.make_train_step`` of ``configs/cifar_resnet.py`` at
  ``--depth`` (the smallest CIFAR ResNet, 20, by default: the fastest step to feed);
* ``training loop``: host indices + transfer + the step dispatched asynchronously, steps
  back to back as the training loop runs them (the host work overlaps the device's).

``x step`` is a row's examples/s over the train step's: > 1 means that stage alone could
feed the step that many times over (the device stage is also *inside* the step: its share
of the step time is 1 / that ratio).

Translation (``resnorm_jax.tasks.translation``): token-count batches of
``configs/toy_translation.py`` (toy pairs; words mapped to ids directly instead of the
SentencePiece model, same lengths ± a piece), ``TokenBatches.batch`` (bucketed padded
rows) + transfer vs the Transformer ("tiny" preset) train step, in target tokens/s.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import common  # noqa: E402  (also puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

COLUMNS = ["task", "stage", "ms / batch", "items / s", "x step"]


def _per_call(fn, repeats, warmup=2):
  return common.median(common.time_calls(fn, warmup=warmup, repeats=repeats))


def image_rows(args) -> list[dict]:
  from configs import cifar_resnet
  from resnorm_jax import config as config_lib, data as data_lib, parallelism, training
  from resnorm_jax import validation

  config = cifar_resnet.get_config()
  config.model.depth = args.depth
  config.model.width = args.width
  config.data.name = "synthetic"
  config.data.synthetic_train_size = args.examples
  config.data.synthetic_test_size = 16
  config.train.batch_size = args.batch
  config.parallel.num_devices = 1
  validation.validate(config, jax.device_count())
  dataset = data_lib.load_dataset(config)
  mesh = parallelism.make_mesh(1)
  replicated, sharded = parallelism.replicated(mesh), parallelism.batch_sharded(mesh)
  images, labels = (parallelism.host_to_global(a, replicated)
                    for a in (dataset.train_images, dataset.train_labels))
  n, batch, seed = len(dataset.train_labels), args.batch, config.train.seed
  counter = itertools.count()

  def host():   # what the image task's inputs(step) does on the host
    idx = data_lib.batch_indices(seed, next(counter), n, batch)
    return parallelism.host_to_global(idx, sharded)

  seed_key = jax.random.key(seed)

  @jax.jit
  def device(step, indices):  # training.make_train_step's prepare
    key = jax.random.fold_in(seed_key, step)
    x = data_lib.augment(images[indices], jax.random.fold_in(key, 0), pad=config.data.pad,
                         mode=config.data.augment)
    return data_lib.normalize(x, dataset.mean, dataset.std), labels[indices]

  idx0 = host()
  step0 = jnp.zeros((), jnp.int32)
  host_s = _per_call(host, args.host_repeats)
  device_s = _per_call(lambda: device(step0, idx0), args.repeats)

  task = training.build_task(config, mesh)
  state = [training.init_state(task)]
  train_step = training.make_train_step(task)

  def step():
    state[0], metrics = train_step(state[0], (images, labels, idx0))
    return state[0]

  step_s = _per_call(step, args.step_repeats, warmup=1)

  def loop():   # steps back to back, dispatched asynchronously, one sync at the end
    for _ in range(args.step_repeats):
      state[0], _ = train_step(state[0], (images, labels, host()))
    return state[0]

  loop_s = _per_call(loop, 1, warmup=0) / args.step_repeats
  rows = []
  for stage, seconds in (("host indices + transfer", host_s),
                         ("device gather+augment+normalize", device_s),
                         (f"train step (ResNet-{args.depth})", step_s),
                         ("training loop (host + step)", loop_s)):
    rows.append({"task": f"CIFAR b{batch}", "stage": stage, "ms / batch": 1e3 * seconds,
                 "items / s": batch / seconds, "x step": step_s / seconds})
  return rows


def _word_ids(sentences: list[str], vocab: dict) -> list[np.ndarray]:
  from resnorm_jax.tasks.translation import corpora
  out = []
  for s in sentences:
    ids = [vocab.setdefault(w, corpora.UNK_ID + 1 + len(vocab)) for w in s.split()]
    out.append(np.asarray(ids + [corpora.EOS_ID], np.int32))
  return out


def translation_rows(args) -> list[dict]:
  from configs import toy_translation
  from resnorm_jax import config as config_lib, parallelism, training
  from resnorm_jax import validation
  from resnorm_jax.tasks.translation import corpora

  config = toy_translation.get_config()
  config.translation.toy_train_size = args.pairs
  config.parallel.num_devices = 1
  validation.validate(config, jax.device_count())
  corpus = corpora.load_corpus(config)
  vocab: dict = {}
  sources, targets = _word_ids(corpus.train[0], vocab), _word_ids(corpus.train[1], vocab)
  assert len(vocab) + 4 <= config.model.vocab_size
  tr = config.translation
  batches = corpora.make_token_batches(sources, targets, max_length=tr.max_length,
                                           max_tokens=tr.max_tokens, replicas=1,
                                           seed=config.train.seed)
  mesh = parallelism.make_mesh(1)
  sharded = parallelism.batch_sharded(mesh)
  counter = itertools.count()
  tokens = lambda tgt: int(np.sum(tgt != corpora.PAD_ID))

  def host():   # the translation task's inputs(step)
    src, tgt = batches.batch(next(counter))
    return (parallelism.host_to_global(src, sharded),
            parallelism.host_to_global(tgt, sharded)), tokens(tgt)

  per_batch = [tokens(batches.batch(s)[1]) for s in range(args.step_repeats)]
  host_s = _per_call(lambda: jax.block_until_ready(host()[0]), args.host_repeats)

  task = training.build_task(config, mesh)
  state = [training.init_state(task)]
  train_step = training.make_train_step(task)
  fixed = [tuple(parallelism.host_to_global(a, sharded) for a in batches.batch(s))
           for s in range(args.step_repeats)]
  for src, tgt in fixed:   # compile every bucket shape first
    state[0], _ = train_step(state[0], {"src": src, "tgt": tgt})
  jax.block_until_ready(state[0])
  start = time.perf_counter()
  for src, tgt in fixed:
    state[0], _ = train_step(state[0], {"src": src, "tgt": tgt})
  jax.block_until_ready(state[0])
  step_s = (time.perf_counter() - start) / len(fixed)
  mean_tokens = float(np.mean(per_batch))
  rows = []
  for stage, seconds in (("host TokenBatches.batch + transfer", host_s),
                         ("train step (Transformer tiny)", step_s)):
    rows.append({"task": f"toy translation {tr.max_tokens} tok", "stage": stage,
                 "ms / batch": 1e3 * seconds, "items / s": mean_tokens / seconds,
                 "x step": step_s / seconds})
  return rows


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depth", type=int, default=20, help="CIFAR ResNet depth of the step")
  p.add_argument("--width", type=int, default=16)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--examples", type=int, default=50_000, help="synthetic training images")
  p.add_argument("--repeats", type=int, default=20, help="timed calls of the device stage")
  p.add_argument("--host_repeats", type=int, default=50, help="timed host batches")
  p.add_argument("--step_repeats", type=int, default=5, help="timed train steps")
  p.add_argument("--pairs", type=int, default=20_000, help="toy translation pairs")
  p.add_argument("--no_translation", action="store_true")
  p.add_argument("--json", default=None)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  rows = image_rows(args)
  if not args.no_translation:
    rows += translation_rows(args)
  common.print_table("Input pipeline vs train step (items: examples for CIFAR, target "
                     "tokens for translation; x step = stage items/s over the step's)",
                     rows, COLUMNS)
  result = {"rows": rows, "args": vars(args)}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
