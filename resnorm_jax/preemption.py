"""Preemption: SIGTERM (a scheduler taking the machine back) and Ctrl-C become a flag the
training loop polls, so it saves a checkpoint and exits cleanly; a second Ctrl-C exits at
once."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

log = logging.getLogger(__name__)


class PreemptionGuard:
  """Context manager turning SIGTERM (and, with ``sigint=True``, SIGINT) into a flag.

  The handler only sets ``self.requested = True`` (and records the first ``self.signal``);
  it never saves.  The training loop polls ``guard.requested`` each step, saves, and exits
  cleanly.  A *second* SIGINT (Ctrl-C pressed again) exits at once with code 130, even while
  the main thread is inside a long XLA compilation or step (where Python signal handlers
  cannot run): a watcher thread reads the signal numbers from ``signal.set_wakeup_fd``, calls
  ``on_abort`` (e.g. releasing the workdir lock) and ends the process with ``os._exit``.
  Nothing is corrupted by that: checkpoints are renamed into place only when complete (a
  partial one is removed at the next start) and a cut metrics line is repaired on resume.
  Further SIGTERMs are ignored: the checkpoint being written is what a scheduler waits for.
  The previous handlers and wakeup fd are restored on exit.  Signal handlers can only be
  installed from the main thread; elsewhere the guard logs a warning and stays inert.
  """

  def __init__(self, *, sigint: bool = False, on_abort=None):
    self.signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
    self.requested = False
    self.signal: str | None = None
    self.on_abort = on_abort
    self._previous: dict[int, Any] = {}
    self._interrupts = 0
    self._lock = threading.Lock()
    self._pipe: tuple[int, int] | None = None
    self._previous_wakeup = -1
    self._watcher: threading.Thread | None = None

  def _note(self, signum: int, count: bool = True) -> None:
    """Records a signal; with ``count``, the second SIGINT ends the process."""
    with self._lock:
      self.requested = True
      if self.signal is None:
        self.signal = signal.Signals(signum).name
      if count and signum == signal.SIGINT:
        self._interrupts += 1
        abort = self._interrupts == 2
      else:
        abort = False
    if abort:
      os.write(2, b"\nSecond interrupt: exiting now without saving (the last complete "
                  b"checkpoint is kept; rerun to resume)\n")
      try:
        if self.on_abort is not None:
          self.on_abort()
      finally:
        os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    # With a watcher, it counts the interrupts (it sees them even during a long XLA call);
    # the handler still sets the flag at once.
    self._note(signum, count=self._watcher is None)

  def _watch(self, read_fd: int) -> None:
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in self.signals:
          self._note(signum)

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionGuard entered outside the main thread; signals not intercepted")
      return self
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
      self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # not the main thread of the main interpreter
      os.close(read_fd)
      os.close(write_fd)
      return self
    self._pipe = (read_fd, write_fd)
    self._watcher = threading.Thread(target=self._watch, args=(read_fd,),
                                     name="signal-watcher", daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      # None means the old handler was not installed from Python; fall back to the default.
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
    if self._pipe is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
      os.close(self._pipe[1])        # the watcher reads EOF and ends
      self._watcher.join(timeout=5)
      os.close(self._pipe[0])
      self._pipe, self._watcher = None, None
