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
5    I/O or storage failure, whatever exception class the storage libraries raise:
     disk full, read-only or unwritable files, a store that stays down or answers wrongly
     past the retries (the last complete checkpoint is kept; rerun once the storage is
     fixed to resume).  The command ends right after its error line (exit_now).
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
import re
import signal
import sys
import threading

__all__ = ["ConfigError", "NonFiniteLossError", "WorkdirLockedError", "StorageError",
           "EXIT_OK", "EXIT_NONFINITE", "EXIT_USAGE", "EXIT_PEER_LOST", "EXIT_LOCKED",
           "EXIT_STORAGE", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "EXIT_PREEMPTED",
           "exit_code_for_signal", "storage_error", "store_unavailable", "one_line",
           "within", "exit_now", "CLEANUP_SECONDS", "malformed_response"]

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
# Modules whose exceptions are failures of the store or of the way to it, whatever their
# class: gcsfs and fsspec (HttpError, ChecksumError), aiohttp (connection resets, timeouts),
# google.auth (credentials that stopped working), requests / urllib3 (gcsfs maps a 502 to
# requests' ProxyError), tensorstore.
_STORE_MODULES = ("gcsfs", "fsspec", "aiohttp", "google.auth", "google.api_core",
                  "requests", "urllib3", "tensorstore")
# TensorStore (orbax's checkpoint I/O) raises its absl::Status as a *builtin* exception
# (ValueError, mostly) whose text starts with the status code: "UNAVAILABLE: Error writing
# ... in OCDBT database ...: HTTP response code: 503".  Every status TensorStore returns
# from a read or write of the store is a storage failure.
_TENSORSTORE_STATUS = re.compile(
    r"^(CANCELLED|UNKNOWN|INVALID_ARGUMENT|DEADLINE_EXCEEDED|NOT_FOUND|ALREADY_EXISTS|"
    r"PERMISSION_DENIED|RESOURCE_EXHAUSTED|FAILED_PRECONDITION|ABORTED|OUT_OF_RANGE|"
    r"UNIMPLEMENTED|INTERNAL|UNAVAILABLE|DATA_LOSS|UNAUTHENTICATED): ")
# The statuses, HTTP codes and exception classes of "the store did not answer (now)", as
# opposed to "it answered, and the data is missing or damaged".
_UNAVAILABLE_STATUS = re.compile(
    r"^(DEADLINE_EXCEEDED|PERMISSION_DENIED|RESOURCE_EXHAUSTED|UNAVAILABLE|"
    r"UNAUTHENTICATED|ABORTED|CANCELLED): ")
_UNAVAILABLE_HTTP = re.compile(r"HTTP response code: (401|403|408|429|5\d\d)\b")


def one_line(error: BaseException, limit: int = 300) -> str:
  """``Type: first line`` of ``error``, without TensorStore's appended spec and source
  locations, shortened to ``limit`` characters."""
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ""
  for cut in (" [tensorstore_spec=", " [source locations=", " See full TensorStore details"):
    text = text.split(cut)[0]
  text = text if len(text) <= limit else text[:limit] + "..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _chain(error: BaseException | None):
  """``error`` and its causes/contexts, outermost first (each once)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _is_store_library_error(error: BaseException) -> bool:
  module = type(error).__module__ or ""
  if module.split(".")[0] in ("jax", "jaxlib"):
    # JAX's runtime errors carry an absl status too ("UNKNOWN: Gloo AllGather failed ...":
    # a peer process died during a collective inside orbax): not the store's.
    return False
  return (type(error).__name__ in _STORE_ERRORS
          or any(module == m or module.startswith(m + ".") for m in _STORE_MODULES)
          or bool(_TENSORSTORE_STATUS.match(str(error).lstrip())))


# Where the storage clients live: a ValueError (a JSON or text decoding error) raised while
# one of them parsed a response means the store answered with something malformed.
_STORE_CODE = tuple(f"{os.sep}{name}{os.sep}" for name in ("gcsfs", "fsspec", "aiohttp"))


def malformed_response(error: BaseException) -> bool:
  """Whether ``error`` is a ValueError raised while a storage client parsed a response (a
  corrupted or truncated body), judged by the frames of its traceback."""
  if not isinstance(error, ValueError) or _TENSORSTORE_STATUS.match(str(error).lstrip()):
    return False
  tb = error.__traceback__
  while tb is not None:
    if any(part in tb.tb_frame.f_code.co_filename for part in _STORE_CODE):
      return True
    tb = tb.tb_next
  return False


def storage_error(error: BaseException, where: str) -> StorageError | None:
  """A one-line :class:`StorageError` naming ``where`` if ``error`` (or anything in its
  cause/context chain) is a failure of storage I/O, whatever its class: an ``OSError``
  (disk full, read-only, permissions, a timeout, a reset connection), an exception of the
  storage libraries (gcsfs, aiohttp, google.auth, requests), or a TensorStore status;
  else None (a bug)."""
  for link in _chain(error):
    if isinstance(link, StorageError):
      return link
    if isinstance(link, OSError) and link.errno in STORAGE_ERRNOS:
      path = link.filename or where
      return StorageError(f"{os.strerror(link.errno).lower()} while writing {path}")
    for text, code in _MESSAGES.items():
      if text in str(link):
        return StorageError(f"{os.strerror(code).lower()} while writing {where}")
  for link in _chain(error):
    if malformed_response(link):
      return StorageError(f"the object store answered with a malformed response while "
                          f"accessing {where} ({' '.join(one_line(link, 200).split())})")
    if _is_store_library_error(link) or isinstance(link, OSError):
      what = "the object store" if _is_store_library_error(link) else "the storage"
      return StorageError(f"{what} failed while accessing {where} "
                          f"({' '.join(one_line(link, 200).split())})")
  return None


def store_unavailable(error: BaseException) -> bool:
  """Whether ``error`` says the store did not answer (a timeout, a refused or reset
  connection, HTTP 401/403/408/429/5xx, TensorStore's UNAVAILABLE, DEADLINE_EXCEEDED, ...)
  rather than that it answered and the data is missing or damaged."""
  for link in _chain(error):
    text = str(link).lstrip()
    code = getattr(link, "code", None)
    if (isinstance(link, (TimeoutError, ConnectionError, PermissionError))
        or type(link).__name__ in ("ClientConnectorError", "ServerDisconnectedError",
                                   "ClientOSError", "ServerTimeoutError", "ProxyError",
                                   "ConnectionTimeoutError", "SocketTimeoutError")
        or (type(link).__name__ == "HttpError" and isinstance(code, int)
            and (code in (401, 403, 408, 429) or code >= 500))
        or text.startswith("Forbidden: ")
        or _UNAVAILABLE_STATUS.match(text) or _UNAVAILABLE_HTTP.search(text)):
      return True
  return False


# After a storage failure, each step of the cleanup (the checkpointer's close, the last
# metrics upload, the lock's release) is given at most this long: they talk to the store
# that has just failed, and its client retries for a minute or more.
CLEANUP_SECONDS = 10.0


def within(seconds: float, fn) -> bool:
  """Runs ``fn()`` in a daemon thread and waits for it at most ``seconds``; whether it
  finished.  For the cleanup after a failure that is already being reported: its own
  errors are dropped, and what it still does afterwards ends with the process."""
  done = threading.Event()

  def run():
    try:
      fn()
    except BaseException:  # pylint: disable=broad-except
      pass
    finally:
      done.set()
  threading.Thread(target=run, name="cleanup", daemon=True).start()
  return done.wait(seconds)


def exit_now(code: int) -> None:
  """Flushes the standard streams and ends the process with ``code`` at once: no thread,
  atexit handler or pending write of the storage libraries (gcsfs retry loops, orbax's
  async save, the lock's heartbeat) can keep it alive or print after the error line."""
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(code)  # pylint: disable=protected-access


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
    (an unraisable-exception hook: every other unraisable exception is printed as usual);
  * gcsfs's "out of retries" / "non-retriable exception" records with the store error's
    traceback (a filter on the ``gcsfs`` logger): gcsfs raises the same error to its
    caller, whose I/O boundary reports it as the command's one line.
  """
  logging.getLogger("asyncio").addFilter(_StorageLogFilter())
  logging.getLogger("gcsfs").addFilter(_StorageLogFilter())
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
