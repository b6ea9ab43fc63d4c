"""The checkpoint average: the parameter average of a run's last N checkpoints, evaluated.

Vaswani et al. (2017) report the base model with the average of the last 5 checkpoints
(written 10 minutes apart; the big model the last 20).  Here checkpoints are kept by step:
``checkpoint.average_last = N`` keeps, besides the newest ``checkpoint.keep``, the newest N
steps that are multiples of ``checkpoint.average_every_steps`` (0 = ``every_steps``;
:class:`resnorm_jax.checkpointing.Checkpointer`), and a completed training run evaluates their
average itself (:func:`evaluate_average` from the training loop); ``resnorm-average``
(:mod:`resnorm_jax.average`) does the same for any workdir, also a ``gs://`` one.

The average: the element-wise mean of the parameters of the N newest such steps (float32);
BatchNorm running statistics are averaged the same way (they are not re-estimated on
training data as SWA does).  The averaged state is evaluated with the task's own evaluation
(beam-search BLEU for translation, error for images), and the result is written beside the
run's metrics: a ``metrics.jsonl`` record of split ``average`` at the newest averaged step,
with ``averaged_steps``.  Translations go to ``translations/average_<first>-<last>.txt``.

Refused with one line (exit 2), before anything is written: fewer than N such checkpoints,
checkpoints written under different configs (their ``config_fingerprint`` metadata differ:
e.g. a resume with other training settings) or of another parameter tree.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from resnorm_jax import resume
from resnorm_jax.metrics import MetricWriter
from resnorm_jax.errors import ConfigError


def average_interval(config) -> int:
  c = config.checkpoint
  return c.average_every_steps or c.every_steps


def select_steps(steps: list[int], last: int, interval: int, directory: str) -> list[int]:
  """The newest ``last`` steps that are multiples of ``interval`` (0: any step)."""
  candidates = [s for s in steps if not interval or s % interval == 0]
  if len(candidates) < last:
    where = f" at multiples of {interval} steps" if interval else ""
    raise ConfigError(
        f"--last={last} needs {last} checkpoints{where} but {directory} keeps "
        f"{len(candidates)} ({', '.join(map(str, candidates)) or 'none'}); train with "
        f"--config.checkpoint.average_last={last} (and average_every_steps) to keep them")
  return candidates[-last:]


def averaged_state(ckpt, abstract, steps: list[int], expected_fingerprint: str = ""):
  """The newest step's state with parameters and BatchNorm statistics averaged over
  ``steps``; ConfigError for steps of different configs or trees."""
  prints = {s: ckpt.step_fingerprint(s) for s in steps}
  if len(set(prints.values())) > 1 or (expected_fingerprint and any(
      p and p != expected_fingerprint for p in prints.values())):
    listed = ", ".join(f"step {s}: {p or 'none'}" for s, p in prints.items())
    current = f"; config.json: {expected_fingerprint}" if expected_fingerprint else ""
    raise ConfigError(
        f"checkpoints {', '.join(map(str, steps))} in {ckpt.directory} were written under "
        f"different configs (fingerprints {listed}{current}); averaging across runs is "
        "refused: choose a --last within one run of one config")
  total, state = None, None
  for step in steps:
    try:
      state = ckpt.restore_step(step, abstract)
    except ConfigError as e:
      raise ConfigError(f"checkpoint step {step} cannot be averaged: "
                        f"{str(e).splitlines()[0]}") from None
    part = (state.params, state.batch_stats)
    total = part if total is None else jax.tree_util.tree_map(jnp.add, total, part)
  params, batch_stats = jax.tree_util.tree_map(lambda a: a / len(steps), total)
  return state.replace(params=params, batch_stats=batch_stats)


def evaluate_average(config, workdir: str, task, ckpt, abstract, last: int,
                     writer=None) -> dict:
  """Averages the newest ``last`` checkpoints of ``ckpt`` (at ``checkpoint.average_every_
  steps``; ``abstract``: the train state's shapes and shardings), evaluates the average
  with ``task`` and writes the ``average`` record (through ``writer``, or a new
  :class:`MetricWriter`).  Every check runs before anything is written.  Returns the
  evaluation with ``averaged_steps``."""
  ckpt.wait()
  steps = select_steps(ckpt.all_steps(), last, average_interval(config), ckpt.directory)
  state = averaged_state(ckpt, abstract, steps, resume.config_fingerprint(config.to_dict()))
  result = task.evaluate(state, steps[-1], name=f"average_{steps[0]}-{steps[-1]}")
  result = {**result, "averaged_steps": steps}
  own = writer is None
  if own:
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0, tensorboard=False)
  try:
    writer.write(steps[-1], "average", result)
    writer.sync()
  finally:
    if own:
      writer.close()
  return result


def describe(result: dict, task) -> str:
  """One line: the averaged steps and the task's description of the evaluation."""
  steps = result["averaged_steps"]
  return f"average of the {len(steps)} checkpoints of steps {steps}: {task.describe(result)}"
