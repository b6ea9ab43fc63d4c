"""``resnorm-average``: evaluate the parameter average of a run's last N checkpoints.

    resnorm-average --workdir=runs/wmt_base --last=5   # default: checkpoint.average_last, else 5

What a completed run with ``checkpoint.average_last`` does at its end
(:mod:`resnorm_jax.averaging`), for any workdir (also a ``gs://`` one): the average of the
newest ``--last`` checkpoints at the averaging interval, evaluated with the run's task, its
``average`` record written to ``metrics.jsonl``, one line printed.  Exit codes
(``resnorm_jax/errors.py``): 0 done, 2 invalid flags, too few checkpoints or checkpoints of
different configs (nothing written), 5 storage failure, 70 internal error.
"""

from __future__ import annotations

import sys

from absl import flags
import jax

from resnorm_jax import averaging, cli, resume, storage, validation
from resnorm_jax.errors import ConfigError

_FLAGS = {}


def average_workdir(workdir: str, last: int) -> dict:
  """:func:`averaging.evaluate_average` of the run in ``workdir`` (the command's work)."""
  from resnorm_jax import checkpointing, parallelism, training
  config = resume.load_config_json(workdir)
  if last < 1:
    raise ConfigError(f"--last={last} must be a positive integer")
  validation.validate(config, jax.device_count())
  mesh = parallelism.make_mesh(config.parallel.num_devices)
  # Steps are selected and checked before the task is set up (set-up may write caches).
  ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), keep=10 ** 9,
                                    every_steps=0)
  try:
    averaging.select_steps(ckpt.all_steps(), last, averaging.average_interval(config),
                           ckpt.directory)
    task = training.build_task(config, mesh)
    task.setup(workdir)
    return averaging.evaluate_average(config, workdir, task, ckpt,
                                      training.abstract_state(task), last)
  finally:
    ckpt.close()


def define_flags():
  if _FLAGS:
    return
  _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "The training run's workdir.")
  _FLAGS["last"] = flags.DEFINE_integer(
      "last", None, "Checkpoints to average (default: the run's checkpoint.average_last, "
      "else 5).")


def main(argv):
  from absl import logging
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  workdir = _FLAGS["workdir"].value
  if not workdir:
    cli.fail("--workdir is required: the training run's workdir")

  def work():
    last = _FLAGS["last"].value
    if last is None:
      last = resume.load_config_json(workdir).checkpoint.average_last or 5
    return average_workdir(workdir, last)
  result = cli.run_guarded(work, workdir)
  from resnorm_jax import tasks
  task_class = tasks.task_class(resume.load_config_json(workdir))
  print(averaging.describe(result, task_class), file=sys.stdout)


def run():
  cli.run_command("resnorm-average", define_flags, main)


if __name__ == "__main__":
  run()
