"""Error classes the commands turn into one line, and the exit code of each class.

Every command (``resnorm-train``, ``resnorm-sweep``, ``resnorm-analyze``) ends with one of
these codes, so a scheduler can tell a diverged run from a broken disk or a lost peer:

==== ==================================================================================
code meaning
==== ==================================================================================
0    done
1    non-finite loss or gradients (the last good checkpoint is kept)
2    invalid flags, config, data or workdir (nothing was trained; nothing written is lost)
3    another process of a multi-process run died (checkpoints so far are kept)
4    the workdir is locked by another run
5    I/O or storage failure: disk full, read-only or unwritable files (the last complete
     checkpoint is kept; rerun once the storage is fixed to resume)
70   internal error: a bug, reported with its traceback
130  interrupted by SIGINT (Ctrl-C) after saving a checkpoint; rerun to resume
143  preempted by SIGTERM after saving a checkpoint; rerun to resume
==== ==================================================================================
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import sys

__all__ = ["ConfigError", "NonFiniteLossError", "WorkdirLockedError", "StorageError",
           "EXIT_OK", "EXIT_NONFINITE", "EXIT_USAGE", "EXIT_PEER_LOST", "EXIT_LOCKED",
           "EXIT_STORAGE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_PREEMPTED",
           "exit_code_for_signal", "storage_error"]

class ConfigError(ValueError):
  """Bad input (config, flags, data, checkpoint): the message names the problem and the fix."""


EXIT_OK = 0
EXIT_NONFINITE = 1
EXIT_USAGE = 2
EXIT_PEER_LOST = 3
EXIT_LOCKED = 4
EXIT_STORAGE = 5
EXIT_INTERNAL = 70                         # sysexits.h EX_SOFTWARE
EXIT_INTERRUPTED = 128 + signal.SIGINT     # 130, the shell's code for Ctrl-C
EXIT_PREEMPTED = 128 + signal.SIGTERM      # 143


def exit_code_for_signal(name: str | None) -> int:
  """The exit code of a run stopped (after saving) by the signal called ``name``."""
  return EXIT_INTERRUPTED if name == "SIGINT" else EXIT_PREEMPTED


class NonFiniteLossError(RuntimeError):
  """Training stopped because a step's loss or gradients were not finite."""


class WorkdirLockedError(RuntimeError):
  """Another live run holds the workdir's lock."""


class StorageError(RuntimeError):
  """Reading or writing the workdir failed for a reason outside the program (disk full,
  read-only file system, permissions, I/O error)."""


# errno values that mean "the storage refused", not "the program is wrong".
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO,
                            errno.EACCES, errno.EPERM, errno.EFBIG})
_MESSAGES = {  # what the storage said, for errors that only carry it as text (tensorstore)
    "No space left on device": errno.ENOSPC,
    "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS,
    "Permission denied": errno.EACCES,
    "Input/output error": errno.EIO,
}


# Errors of gcsfs / aiohttp that mean "the object store failed" (a gs:// workdir).
_STORE_ERRORS = frozenset({"HttpError", "ClientConnectorError", "ServerDisconnectedError",
                           "ClientPayloadError", "ChecksumError"})


def storage_error(error: BaseException, where: str) -> StorageError | None:
  """A one-line :class:`StorageError` naming ``where`` if ``error`` (or anything in its
  cause/context chain, or the text of a wrapped tensorstore error) is a storage failure;
  else None."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, StorageError):
      return error
    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
      path = error.filename or where
      return StorageError(f"{os.strerror(error.errno).lower()} while writing {path}")
    for text, code in _MESSAGES.items():
      if text in str(error):
        return StorageError(f"{os.strerror(code).lower()} while writing {where}")
    if type(error).__name__ in _STORE_ERRORS:   # the object store failed (after retries)
      text = " ".join(str(error).split())[:200]
      return StorageError(f"the object store failed while writing {where} "
                          f"({type(error).__name__}: {text})")
    error = error.__cause__ or error.__context__
  return None


class _StorageLogFilter(logging.Filter):
  """Drops log records about storage failures (orbax and asyncio log every failed write of a
  checkpoint from each of their threads, with tracebacks): the command reports the failure
  once, as one line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno < logging.ERROR:
      return True
    if record.exc_info and record.exc_info[1] is not None and \
        storage_error(record.exc_info[1], "") is not None:
      return False
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except
      return True
    return not any(message in text for message in _MESSAGES)


def quiet_failed_write_reports() -> None:
  """For the rest of the process (a command calls it first): the reports a failed
  checkpoint write leaves behind after the command has said it in one line are dropped.

  * asyncio's "Task exception was never retrieved" for orbax's write tasks, logged when the
    task is garbage-collected -- often after :func:`quiet_storage_logs`' block has ended, at
    shutdown -- with the storage failure's traceback (a filter on the ``asyncio`` logger:
    other asyncio errors are kept);
  * "Exception ignored in: None ... RuntimeError: Event loop is closed": TensorStore's C++
    threads completing futures whose callbacks schedule work on the loop orbax has closed
    (an unraisable-exception hook: every other unraisable exception is printed as usual).
  """
  logging.getLogger("asyncio").addFilter(_StorageLogFilter())
  default = sys.unraisablehook

  def hook(unraisable):
    if isinstance(unraisable.exc_value, RuntimeError) and \
        "Event loop is closed" in str(unraisable.exc_value):
      return
    default(unraisable)
  sys.unraisablehook = hook


@contextlib.contextmanager
def quiet_storage_logs():
  """Within the block, the root logger's handlers drop storage-failure records."""
  handlers = list(logging.getLogger().handlers)
  log_filter = _StorageLogFilter()
  for handler in handlers:
    handler.addFilter(log_filter)
  try:
    yield
  finally:
    for handler in handlers:
      handler.removeFilter(log_filter)
