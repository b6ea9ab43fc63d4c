"""``resnorm-train``: train and evaluate a model from a config file.

    resnorm-train --config=configs/cifar_resnet.py:resnet110 --workdir=runs/r110 \
        --config.model.norm=group:16 --config.parallel.bn_sync=local

With no ``--config`` it runs ``configs/quickstart.py``.  A workdir that holds checkpoints
resumes from the newest one.  Exit codes (``resnorm_jax/errors.py``): 0 done, 1 non-finite
loss (the last good checkpoint is kept), 2 invalid flags, config, data or workdir (nothing
written), 3 another process of a multi-process run died, 4 the workdir is locked by another
run, 5 storage failure (disk full, read-only, a failing store; the last complete checkpoint
is kept), 70
internal error, 130 / 143 stopped by SIGINT / SIGTERM after saving a checkpoint (rerun the
same command to resume).

Multi-process (several hosts, or several processes on one host): ``--coordinator_address``,
``--num_processes`` and ``--process_id``, or automatic detection on TPU VM pods, SLURM and
Open MPI (``--distributed``); see launch/.
"""

from __future__ import annotations

import os
import sys

from absl import logging

from resnorm_jax import cli, errors, storage
from resnorm_jax.errors import EXIT_STORAGE, ConfigError


def default_workdir() -> str:
  """``runs/<config name>[_<variant>]``."""
  return os.path.join("runs", cli.config_name())


def print_summary(summary: dict) -> None:
  ev = summary["eval"]
  lines = [
      "",
      f"resnorm-train: {summary['status']} at step {summary['step']}"
      + (f" (resumed from step {summary['start_step']})" if summary["start_step"] else ""),
  ]
  if ev:
    lines += summary["eval_lines"]
  lines += [
      f"  time           {summary['total_seconds']:.1f} s total, "
      f"{summary['train_seconds']:.1f} s in training steps",
      f"  metrics        {summary['metrics']} (JSON lines; TensorBoard in "
      f"{storage.join(summary['workdir'], 'tensorboard')})",
      f"  checkpoints    {summary['checkpoints']}",
  ]
  if summary.get("layer_stats"):
    lines.append(f"  layer stats    {summary['layer_stats']} (JSON lines; TensorBoard "
                 "layer_*/ and act_*/ tags)")
  if summary["skipped_steps"]:
    lines.append(f"  skipped steps  {summary['skipped_steps']} (non-finite)")
  print("\n".join(lines))


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> for overrides")
  logging.set_verbosity(logging.WARNING)
  explicit = cli.flag_value("workdir") is not None
  workdir = cli.flag_value("workdir") or default_workdir()
  from resnorm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  try:  # the default runs/<name> may create runs/; an explicit parent must exist
    workdir_lib.check_workdir(workdir, parent_must_exist=explicit)
  except ConfigError as e:
    cli.fail(str(e))
  except errors.StorageError as e:   # the store failed while it was checked
    cli.fail(f"{workdir}: {e}", EXIT_STORAGE)
  from resnorm_jax import parallelism  # imports jax: after flags are valid
  try:
    parallelism.initialize_distributed(*cli.distributed_settings())
  except ValueError as e:
    cli.fail(str(e))
  from resnorm_jax import training
  summary = cli.run_guarded(
      lambda: training.train_and_evaluate(cli.flag_value("config"), workdir), workdir)
  import jax
  if jax.process_index() == 0:
    print_summary(summary)
  if summary["status"] != "completed":
    sys.exit(errors.exit_code_for_signal("SIGINT" if summary["status"] == "interrupted"
                                         else "SIGTERM"))


def run():
  cli.run_command("resnorm-train", cli.define_flags, main)


if __name__ == "__main__":
  run()
