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
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from resnorm_jax import errors, storage
from resnorm_jax.errors import (EXIT_INTERNAL, EXIT_LOCKED, EXIT_NONFINITE, EXIT_PEER_LOST,
                                EXIT_STORAGE, EXIT_USAGE, ConfigError)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(PACKAGE_ROOT, "configs", "quickstart.py")

_FLAGS = {}


def define_flags():
  """Defines --config and --workdir.  config_flags inspects the command line when the flag
  is defined (to register override flags), so this runs inside the error handling of run()."""
  if _FLAGS:
    return
  _FLAGS["config"] = config_flags.DEFINE_config_file(
      "config", DEFAULT_CONFIG, "Config file, optionally with a ':variant' argument.",
      lock_config=True)
  _FLAGS["workdir"] = flags.DEFINE_string(
      "workdir", None, "Directory for checkpoints, metrics and the resolved config "
      "(default: runs/<config name>[_<variant>]).")
  _FLAGS["distributed"] = flags.DEFINE_enum(
      "distributed", "auto", ["auto", "on", "off"],
      "Multi-process runtime: auto = on when --coordinator_address is given or SLURM / "
      "Open MPI / a TPU VM pod is detected; on = always (jax detects the cluster).")
  _FLAGS["coordinator_address"] = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, e.g. 127.0.0.1:12355.")
  _FLAGS["num_processes"] = flags.DEFINE_integer("num_processes", None,
                                                 "Number of processes (with an address).")
  _FLAGS["process_id"] = flags.DEFINE_integer("process_id", None,
                                              "This process's index (with an address).")
  _FLAGS["heartbeat_timeout"] = flags.DEFINE_integer(
      "heartbeat_timeout", 100, "Seconds after which a silent process counts as dead and "
      "the others stop with an error.")


_PROG = ["resnorm-train"]  # the running command's name, set by run_command


def fail(message: str, code: int = EXIT_USAGE):
  print(f"{_PROG[0]}: error: {message}", file=sys.stderr)
  sys.exit(code)


def describe_error(error: BaseException) -> str:
  """One line for a flag/config error: the outermost message plus a ConfigError cause."""
  messages, seen = [], set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = _one_line(error)
    if text and not any(text in m for m in messages):
      messages.append(text)
    if isinstance(error, ConfigError):
      return text
    error = error.__cause__ or error.__context__
  return messages[0] if messages else "invalid flags"


def _one_line(error: BaseException) -> str:
  text = str(error).strip().replace("\\n", "\n").replace("\\'", "'")
  if isinstance(error, (KeyError, AttributeError)):
    text = text.strip("'\"")
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  if not lines:
    return ""
  missing_key = re.match(r"'?([\w.]+)'?$", lines[0])
  if isinstance(error, (KeyError, AttributeError)) and missing_key:
    hint = f" ({lines[1].strip()})" if len(lines) > 1 else ""
    return (f"no config key {missing_key.group(1)!r}{hint}; every key is listed in "
            "resnorm_jax/config.py:base_config")
  if len(lines) > 1:  # config_flags nests the loader's trace: keep its last line
    lines = [lines[0].rstrip(":"), lines[-1]] if not lines[0].startswith("Traceback") \
        else [lines[-1]]
  return ": ".join(re.sub(r"^([\w.]+\.)?\w+(Error|Exception): ", "", line)
                   for line in lines)


def parse_flags(argv):
  """absl parsing, then the config file and its overrides, with one-line errors (exit 2)."""
  try:
    rest = flags.FLAGS(argv)
    _FLAGS["config"].value.to_dict()  # load the file and apply overrides now, not lazily
    return rest
  except Exception as e:  # pylint: disable=broad-except  (any bad flag: one line, no trace)
    fail(describe_error(e))


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
    fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> for overrides")
  logging.set_verbosity(logging.WARNING)
  explicit = _FLAGS["workdir"].value is not None
  workdir = _FLAGS["workdir"].value or default_workdir()
  from resnorm_jax import workdir as workdir_lib  # pylint: disable=import-outside-toplevel
  try:  # the default runs/<name> may create runs/; an explicit parent must exist
    workdir_lib.check_workdir(workdir, parent_must_exist=explicit)
  except ConfigError as e:
    fail(str(e))
  except errors.StorageError as e:   # the store failed while it was checked
    fail(f"{workdir}: {e}", EXIT_STORAGE)
  from resnorm_jax import parallelism  # imports jax: after flags are valid
  try:
    parallelism.initialize_distributed(
        _FLAGS["distributed"].value, _FLAGS["coordinator_address"].value,
        _FLAGS["num_processes"].value, _FLAGS["process_id"].value,
        _FLAGS["heartbeat_timeout"].value)
  except ValueError as e:
    fail(str(e))
  from resnorm_jax import training
  summary = run_guarded(lambda: training.train_and_evaluate(_FLAGS["config"].value, workdir),
                        workdir)
  import jax
  if jax.process_index() == 0:
    print_summary(summary)
  if summary["status"] != "completed":
    sys.exit(errors.exit_code_for_signal("SIGINT" if summary["status"] == "interrupted"
                                         else "SIGTERM"))


def run_guarded(fn, workdir: str):
  """``fn()``, with every failure a user can cause turned into one line and its exit code
  (``resnorm_jax/errors.py``); anything else is a bug: its traceback, then exit 70."""
  import jax
  try:
    return fn()
  except ConfigError as e:
    fail(str(e))
  except errors.NonFiniteLossError as e:
    fail(str(e), EXIT_NONFINITE)
  except errors.WorkdirLockedError as e:
    fail(str(e), EXIT_LOCKED)
  except errors.StorageError as e:
    fail(str(e), EXIT_STORAGE)
  except jax.errors.JaxRuntimeError as e:
    if jax.process_count() == 1:
      _internal_error(e)
    fail(f"process {jax.process_index()} lost its peers ({str(e).splitlines()[0][:300]}); "
         f"another process probably died. Checkpoints written so far are kept in {workdir}: "
         f"restart all processes with the same command to resume", EXIT_PEER_LOST)
  except KeyboardInterrupt:  # commands without a checkpoint to save (analysis)
    fail("interrupted (SIGINT); rerun the same command", errors.EXIT_INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    failure = errors.storage_error(e, workdir)
    if failure is not None:
      fail(f"{workdir}: {failure}; free space or fix the storage, then rerun", EXIT_STORAGE)
    _internal_error(e)


def _internal_error(error: BaseException):
  import traceback  # pylint: disable=import-outside-toplevel
  traceback.print_exception(error)
  first_line = str(error).splitlines()[0][:300] if str(error) else ""
  fail(f"internal error ({type(error).__name__}: {first_line}); this is a bug: please "
       "report it with the traceback above", EXIT_INTERNAL)


def run_command(prog: str, define, main_fn, flags_parser) -> None:
  """Runs a console command: defines its flags (config_flags reads the command line while
  defining, so errors there are one line too) and runs ``main_fn`` under absl."""
  _PROG[0] = prog
  errors.quiet_failed_write_reports()
  try:
    define()
  except Exception as e:  # pylint: disable=broad-except
    fail(describe_error(e))
  exit_promptly(lambda: app.run(main_fn, flags_parser=flags_parser))


def exit_promptly(fn) -> None:
  """``fn()``; if it ends with exit code 5 (a storage failure, already reported in one line),
  the process ends at once (:func:`errors.exit_now`): the threads of the storage clients
  that still retry against the failed store (gcsfs, orbax's async save, the lock's
  heartbeat) would otherwise keep it alive for minutes and print their tracebacks."""
  try:
    fn()
  except SystemExit as e:
    if e.code == EXIT_STORAGE:
      errors.exit_now(EXIT_STORAGE)
    raise


def run():
  run_command("resnorm-train", define_flags, main, parse_flags)


if __name__ == "__main__":
  run()
