"""``resnorm-train``: train and evaluate a model from a config file.

    resnorm-train --config=configs/cifar_resnet.py:resnet110 --workdir=runs/r110 \
        --config.model.norm=group:16 --config.parallel.bn_sync=local

With no ``--config`` it runs ``configs/quickstart.py``.  A workdir that holds checkpoints
resumes from the newest one.  Exit codes: 0 done, 1 non-finite loss (the last good
checkpoint is kept), 2 invalid flags or config (nothing written), 143 preempted by SIGTERM
after saving a checkpoint (rerun the same command to resume).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnorm_jax.layers.registry import ConfigError

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(PACKAGE_ROOT, "configs", "quickstart.py")
EXIT_NONFINITE, EXIT_USAGE, EXIT_PREEMPTED = 1, 2, 143

_CONFIG = config_flags.DEFINE_config_file(
    "config", DEFAULT_CONFIG, "Config file, optionally with a ':variant' argument.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for checkpoints, metrics and the resolved config "
    "(default: runs/<config name>[_<variant>]).")


def fail(message: str, code: int = EXIT_USAGE):
  print(f"resnorm-train: error: {message}", file=sys.stderr)
  sys.exit(code)


def _root_cause(error: BaseException) -> BaseException:
  while error.__cause__ is not None or error.__context__ is not None:
    if isinstance(error, ConfigError):
      return error
    error = error.__cause__ or error.__context__
  return error


def parse_flags(argv):
  """absl parsing with one-line errors and exit code 2 (no traceback)."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, ConfigError, KeyError, AttributeError, ValueError, TypeError,
          FileNotFoundError, ImportError) as e:
    cause = _root_cause(e)
    message = str(cause).strip().strip('"') or type(cause).__name__
    if "Did you mean" not in message and isinstance(cause, (KeyError, AttributeError)):
      message += " (no such config key; see resnorm_jax/config.py for the schema)"
    fail(message)


def default_workdir() -> str:
  path = flags.FLAGS["config"].config_filename if hasattr(flags.FLAGS["config"],
                                                          "config_filename") else ""
  name, _, variant = os.path.basename(path or DEFAULT_CONFIG).partition(":")
  name = os.path.splitext(name)[0]
  return os.path.join("runs", name + (f"_{variant.replace(',', '_')}" if variant else ""))


def print_summary(summary: dict) -> None:
  ev = summary["eval"]
  lines = [
      "",
      f"resnorm-train: {summary['status']} at step {summary['step']}"
      + (f" (resumed from step {summary['start_step']})" if summary["start_step"] else ""),
  ]
  if ev:
    lines.append(f"  test accuracy  {ev['accuracy']:.4f}   (error {100 * ev['error']:.2f}%, "
                 f"loss {ev['loss']:.4f})")
  lines += [
      f"  time           {summary['total_seconds']:.1f} s total, "
      f"{summary['train_seconds']:.1f} s in training steps",
      f"  metrics        {summary['metrics']} (JSON lines; TensorBoard in "
      f"{os.path.join(summary['workdir'], 'tensorboard')})",
      f"  checkpoints    {summary['checkpoints']}",
  ]
  if summary["skipped_steps"]:
    lines.append(f"  skipped steps  {summary['skipped_steps']} (non-finite)")
  print("\n".join(lines))


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> for overrides")
  from resnorm_jax import training  # imports jax: after flags are valid
  config = _CONFIG.value
  workdir = _WORKDIR.value or default_workdir()
  logging.set_verbosity(logging.WARNING)
  try:
    summary = training.train_and_evaluate(config, workdir)
  except ConfigError as e:
    fail(str(e))
  except training.NonFiniteLossError as e:
    fail(str(e), EXIT_NONFINITE)
  print_summary(summary)
  if summary["status"] == "preempted":
    sys.exit(EXIT_PREEMPTED)


def run():
  app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
  run()
