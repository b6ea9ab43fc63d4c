"""The framework every console command shares: flags, one-line errors, exit codes.

A command (``resnorm-train``, ``resnorm-summary``, ``resnorm-average``, ``resnorm-prepare``,
``resnorm-analyze``, ``resnorm-sweep``) is run by :func:`run_command`, which names it (the
``<prog>: error:`` prefix of :func:`fail`), defines its flags and runs its ``main`` under
absl.  A flag or config error is one line and exit 2 (:func:`parse_flags`,
:func:`describe_error`); :func:`run_guarded` turns every other failure a user can cause into
one line and its exit code (``resnorm_jax/errors.py``), and a bug into its traceback and
exit 70.  Commands that read a config file define ``--config`` / ``--workdir`` with
:func:`define_config_flags` (and the multi-process flags with
:func:`define_distributed_flags`) and read them with :func:`flag_value`.
"""

from __future__ import annotations

import os
import re
import sys

from absl import app, flags
from ml_collections import config_flags

from resnorm_jax import errors
from resnorm_jax.errors import (EXIT_INTERNAL, EXIT_LOCKED, EXIT_NONFINITE, EXIT_PEER_LOST,
                                EXIT_STORAGE, EXIT_USAGE, ConfigError)

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The config of resnorm-train and resnorm-summary without --config.
DEFAULT_CONFIG = os.path.join(PACKAGE_ROOT, "configs", "quickstart.py")

_prog = ["resnorm"]      # the running command's name (run_command, set_prog)
_holders: dict[str, flags.FlagHolder] = {}   # the flags defined here, by name


# ----------------------------------------------------------------------------------------
# One-line errors.
# ----------------------------------------------------------------------------------------
def prog() -> str:
  """The running command's name."""
  return _prog[0]


def set_prog(name: str) -> None:
  """Names the running command (for commands that do not start through run_command)."""
  _prog[0] = name


def fail(message: str, code: int = EXIT_USAGE):
  """``<prog>: error: <message>`` on stderr, then exit ``code``."""
  print(f"{prog()}: error: {message}", file=sys.stderr)
  sys.exit(code)


def describe_error(error: BaseException) -> str:
  """One line for a flag/config error: the innermost ConfigError of the chain (config_flags
  re-raises a config file's ConfigError as another one that wraps its trace), else the
  outermost message."""
  messages, seen, config_error = [], set(), None
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    text = one_line(error)
    if text and not any(text in m for m in messages):
      messages.append(text)
    if isinstance(error, ConfigError):
      config_error = text
    elif config_error is not None:
      break
    error = error.__cause__ or error.__context__
  if config_error is not None:
    return config_error
  return messages[0] if messages else "invalid flags"


def one_line(error: BaseException) -> str:
  """``error``'s message as one line: a missing config key named as such, the last line of
  a nested trace, no exception class prefixes."""
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


# ----------------------------------------------------------------------------------------
# Flags.
# ----------------------------------------------------------------------------------------
def define_config_flags(default_config: str | None = DEFAULT_CONFIG,
                        config_help: str = "Config file, optionally with a ':variant' "
                        "argument.",
                        workdir_help: str = "Directory for checkpoints, metrics and the "
                        "resolved config (default: runs/<config name>[_<variant>]).") -> None:
  """Defines --config (a config file and its ``--config.<key>=<value>`` overrides) and
  --workdir, once.  config_flags inspects the command line when the flag is defined (to
  register the override flags), so this runs inside :func:`run_command`'s error handling."""
  if "config" in _holders:
    return
  _holders["config"] = config_flags.DEFINE_config_file("config", default_config, config_help,
                                                       lock_config=True)
  _holders["workdir"] = flags.DEFINE_string("workdir", None, workdir_help)


def define_distributed_flags() -> None:
  """Defines the multi-process runtime's flags (see :func:`resnorm_jax.parallelism.
  initialize_distributed`), once."""
  if "distributed" in _holders:
    return
  _holders["distributed"] = flags.DEFINE_enum(
      "distributed", "auto", ["auto", "on", "off"],
      "Multi-process runtime: auto = on when --coordinator_address is given or SLURM / "
      "Open MPI / a TPU VM pod is detected; on = always (jax detects the cluster).")
  _holders["coordinator_address"] = flags.DEFINE_string(
      "coordinator_address", None, "host:port of process 0, e.g. 127.0.0.1:12355.")
  _holders["num_processes"] = flags.DEFINE_integer("num_processes", None,
                                                   "Number of processes (with an address).")
  _holders["process_id"] = flags.DEFINE_integer("process_id", None,
                                                "This process's index (with an address).")
  _holders["heartbeat_timeout"] = flags.DEFINE_integer(
      "heartbeat_timeout", 100, "Seconds after which a silent process counts as dead and "
      "the others stop with an error.")


def define_flags() -> None:
  """The flags of commands that run a training config: --config (default
  ``configs/quickstart.py``), --workdir and the multi-process flags."""
  define_config_flags()
  define_distributed_flags()


def flag_value(name: str):
  """The parsed value of flag ``name`` defined here (``config``: the loaded ConfigDict)."""
  return _holders[name].value


def distributed_settings() -> tuple:
  """The arguments of :func:`resnorm_jax.parallelism.initialize_distributed` from the
  multi-process flags."""
  return tuple(flag_value(name) for name in ("distributed", "coordinator_address",
                                             "num_processes", "process_id",
                                             "heartbeat_timeout"))


def config_name(default_config: str = DEFAULT_CONFIG) -> str:
  """``<config file name>[_<variant>]`` of --config (the default workdir's name)."""
  holder = flags.FLAGS["config"]
  path = getattr(holder, "config_filename", "") or default_config
  name, _, variant = os.path.basename(path).partition(":")
  name = os.path.splitext(name)[0]
  return name + (f"_{variant.replace(',', '_')}" if variant else "")


def parse_flags(argv):
  """absl parsing, then the config file and its overrides (when --config is defined and
  given), with one-line errors (exit 2)."""
  try:
    rest = flags.FLAGS(argv)
    if "config" in _holders and _holders["config"].value is not None:
      _holders["config"].value.to_dict()  # load the file and apply overrides now, not lazily
    return rest
  except Exception as e:  # pylint: disable=broad-except  (any bad flag: one line, no trace)
    fail(describe_error(e))


# ----------------------------------------------------------------------------------------
# Running a command.
# ----------------------------------------------------------------------------------------
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
      internal_error(e)
    fail(f"process {jax.process_index()} lost its peers ({str(e).splitlines()[0][:300]}); "
         f"another process probably died. Checkpoints written so far are kept in {workdir}: "
         f"restart all processes with the same command to resume", EXIT_PEER_LOST)
  except KeyboardInterrupt:  # commands without a checkpoint to save (analysis)
    fail("interrupted (SIGINT); rerun the same command", errors.EXIT_INTERRUPTED)
  except Exception as e:  # pylint: disable=broad-except
    failure = errors.storage_error(e, workdir)
    if failure is not None:
      fail(f"{workdir}: {failure}; free space or fix the storage, then rerun", EXIT_STORAGE)
    internal_error(e)


def internal_error(error: BaseException):
  """A bug: ``error``'s traceback, then one line and exit 70."""
  import traceback  # pylint: disable=import-outside-toplevel
  traceback.print_exception(error)
  first_line = str(error).splitlines()[0][:300] if str(error) else ""
  fail(f"internal error ({type(error).__name__}: {first_line}); this is a bug: please "
       "report it with the traceback above", EXIT_INTERNAL)


def run_command(name: str, define, main_fn, flags_parser=parse_flags) -> None:
  """Runs console command ``name``: defines its flags (config_flags reads the command line
  while defining, so errors there are one line too) and runs ``main_fn`` under absl."""
  set_prog(name)
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
