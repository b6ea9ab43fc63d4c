"""The workdir of a run: checks before anything is written, the run lock, JSON-lines repair.

* :func:`check_workdir` refuses, before anything is written, a workdir that is a file, whose
  parent does not exist (a mistyped mount point would otherwise fill the local disk), that
  is on a read-only file system or not writable, or whose ``checkpoints`` / metrics entries
  have the wrong kind; a ``gs://`` workdir whose bucket does not exist or cannot be read
  with the credentials found, or a URL of another scheme.
* :class:`WorkdirLock` makes a workdir belong to one run at a time (see its docstring for
  the protocol and why it works on shared file systems and on buckets).
* :func:`repair_jsonl` makes a JSON-lines file hold exactly one complete record per key on
  resume: a line cut by a crash is dropped, and records of steps after the restored
  checkpoint are dropped because the continuing run writes them again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Callable, Iterable

from resnorm_jax import storage
from resnorm_jax.errors import ConfigError, StorageError, WorkdirLockedError

log = logging.getLogger(__name__)

LOCK_FILE = ".resnorm.lock"
# Entries the engine writes in a run's workdir, and the kind each must be when it already
# exists; each task adds its own (TaskInfo.workdir_directories / workdir_files).
DIRECTORIES = ("checkpoints", "tensorboard")
FILES = ("config.json", "metrics.jsonl", "layer_stats.jsonl", LOCK_FILE)


def run_entries() -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(directories, files) a run may keep in its workdir: the engine's and those of every
  registered task."""
  from resnorm_jax import tasks
  infos = [entry.info for entry in tasks.TASKS]
  directories = DIRECTORIES + tuple(d for i in infos for d in i.workdir_directories)
  files = FILES + tuple(f for i in infos for f in i.workdir_files)
  return tuple(dict.fromkeys(directories)), tuple(dict.fromkeys(files))


# ----------------------------------------------------------------------------------------
# Checks before anything is written.
# ----------------------------------------------------------------------------------------
def check_not_url(workdir: str, flag: str = "--workdir") -> None:
  """ConfigError for a URL of an unsupported scheme (``s3://``, ...) or without a bucket;
  ``gs://`` workdirs are written natively (see :mod:`resnorm_jax.storage`)."""
  storage.check_scheme(workdir, flag)


def check_workdir(workdir: str, *, parent_must_exist: bool = True,
                  flag: str = "--workdir") -> None:
  """ConfigError (one line, exit 2) if ``workdir`` cannot hold a run; writes nothing.

  ``parent_must_exist``: the directory above ``workdir`` must exist (commands that create
  their own tree below a checked root, like a sweep's variant directories, pass False)."""
  check_not_url(workdir, flag)
  if storage.is_url(workdir):
    _check_bucket_workdir(workdir, flag)
    return
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{flag}={workdir} is a file, not a directory; pass a directory "
                      "(it is created if missing)")
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    raise ConfigError(f"{flag}={workdir}: {existing} is a file, so the workdir cannot be "
                      "created below it; pass another --workdir")
  parent = os.path.dirname(path)
  if parent_must_exist and not os.path.isdir(parent):
    raise ConfigError(f"{flag}={workdir}: its parent directory {parent} does not exist (a "
                      f"mistyped mount point?); create it first (mkdir -p {parent}) or fix "
                      "the path")
  _check_writable(existing, workdir, flag)
  if existing == path:
    directories, files = run_entries()
    for name in directories:
      entry = os.path.join(path, name)
      if os.path.exists(entry) and not os.path.isdir(entry):
        raise ConfigError(f"{entry} is a file, but the run keeps a directory there; move "
                          "it away or use another --workdir")
    for name in files:
      entry = os.path.join(path, name)
      if os.path.isdir(entry):
        raise ConfigError(f"{entry} is a directory, but the run keeps a file there; move "
                          "it away or use another --workdir")
      if os.path.exists(entry) and not os.access(entry, os.R_OK | os.W_OK):
        raise ConfigError(f"{entry} is not readable and writable by this user; fix its "
                          "permissions or use another --workdir")


def _check_bucket_workdir(workdir: str, flag: str) -> None:
  """check_workdir for ``gs://``: the bucket exists and is readable with the credentials
  found, the workdir is not an object, and its entries have the right kind."""
  storage.check_bucket(workdir, flag)
  if storage.isfile(workdir):
    raise ConfigError(f"{flag}={workdir} is an object, not a directory; pass a directory")
  directories, files = run_entries()
  for name in directories:
    entry = storage.join(workdir, name)
    if storage.isfile(entry):
      raise ConfigError(f"{entry} is an object, but the run keeps a directory there; move "
                        "it away or use another --workdir")
  for name in files:
    entry = storage.join(workdir, name)
    if storage.isdir(entry):
      raise ConfigError(f"{entry} is a directory, but the run keeps a file there; move "
                        "it away or use another --workdir")


def _check_writable(directory: str, workdir: str, flag: str) -> None:
  """ConfigError if files cannot be created in ``directory`` (read-only mount, permissions)."""
  read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
  if read_only or not os.access(directory, os.W_OK | os.X_OK):
    why = "is on a read-only file system" if read_only else "is not writable by this user"
    where = "" if os.path.abspath(workdir) == directory else f" ({directory})"
    raise ConfigError(f"{flag}={workdir}{where} {why}; pass a writable directory")


def checkpoint_bytes_needed(state_bytes: int) -> int:
  """Free space a run needs at its start: one checkpoint of a state of ``state_bytes``
  (arrays uncompressed, +10%) and 256 KiB for orbax's metadata, the config and metrics."""
  return int(1.1 * state_bytes) + 256 * 1024


def check_free_space(workdir: str, needed_bytes: int) -> None:
  """StorageError (exit 5) if the workdir's file system has less than ``needed_bytes`` free:
  a checkpoint of the state would not fit, so the run would fail at its first save."""
  import shutil  # pylint: disable=import-outside-toplevel
  if storage.is_url(workdir):
    return  # a bucket has no free space to measure; a failed write is a StorageError
  free = shutil.disk_usage(workdir).free
  if free < needed_bytes:
    raise StorageError(f"{workdir} has {_mib(free)} free, but a checkpoint of this run needs "
                       f"about {_mib(needed_bytes)}; free space (or lower checkpoint.keep) "
                       "and rerun: the run resumes from its last checkpoint")


def _mib(n: int) -> str:
  return f"{n / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------------------
# The run lock.
# ----------------------------------------------------------------------------------------
def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return ""


def _process_start(pid: int) -> str:
  """The start time of process ``pid`` (clock ticks since boot; '' if unknown), so that a
  recycled pid is not mistaken for the lock holder."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[19]
  except (OSError, IndexError):
    return ""


def _pid_alive(pid: int, start: str) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # exists, owned by someone else
  now = _process_start(pid)
  return not (start and now and now != start)


class WorkdirLock:
  """An exclusive lock on a workdir for the life of a run.

  Protocol: the lock is the file ``<workdir>/.resnorm.lock``, created with ``O_CREAT |
  O_EXCL`` (atomic on local disks and on NFS v3+), holding its owner (host, boot id, pid,
  the pid's start time, a random token, the command).  The owner touches it every
  ``heartbeat_seconds`` from a daemon thread.  A lock is *stale*, and is taken over, when its
  owner is on this host and that process is gone (``kill -9``, a crash: detected at once),
  or it is on another host and has not been touched for ``stale_seconds``.  A live owner's
  lock is never taken.  Takeover renames the stale file to a unique name (only one of
  several contenders can rename it), checks that the renamed file is the stale one it
  judged (else puts it back without overwriting and reports the workdir as locked), and
  then creates its own lock with ``O_EXCL`` again.  Advisory ``flock`` is not used: it does
  not cross hosts on many shared file systems and not at all on bucket mounts.

  On a bucket (``gs://`` workdir) the same protocol runs on GCS generation preconditions,
  since objects have no rename, link or ``O_EXCL``: the lock object is created with
  ``ifGenerationMatch=0`` (create-if-absent: of several creators exactly one succeeds); the
  heartbeat rewrites it with ``ifGenerationMatch=<the generation this run wrote last>``, so
  a heartbeat never revives a lock another run has taken over (it fails and warns); a stale
  lock is deleted with ``ifGenerationMatch=<the generation judged stale>``, so a lock renewed
  meanwhile is never removed; release deletes only this run's generation.  Its age is the
  object's ``updated`` time (the store's clock) against this host's clock.  Stores that
  ignore preconditions (``gcp-storage-emulator``, which the tests use, does) are detected
  when the lock is taken; there the lock is checked for existence before it is created and
  read back after, which refuses a run started while another holds the lock but cannot
  order two runs started within the same few milliseconds -- a warning says so.
  """

  def __init__(self, workdir: str, *, heartbeat_seconds: float = 30.0,
               stale_seconds: float = 300.0):
    self.workdir = workdir
    self.path = storage.join(workdir, LOCK_FILE)
    self.on_bucket = storage.is_url(workdir)
    self.heartbeat_seconds, self.stale_seconds = heartbeat_seconds, stale_seconds
    self.token = uuid.uuid4().hex
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._generation: int | None = None   # on a bucket: the lock object's generation
    self.preconditions = True              # on a bucket: whether the store honours them
    self.held = False

  def _record(self) -> dict:
    pid = os.getpid()
    return {"host": socket.gethostname(), "boot_id": _boot_id(), "pid": pid,
            "pid_start": _process_start(pid), "token": self.token,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:500]}

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises :class:`WorkdirLockedError` naming the holder."""
    if self.on_bucket:
      self.preconditions = storage.honours_preconditions(self.path)
      if not self.preconditions:
        log.warning("the store of %s ignores generation preconditions (an emulator?): the "
                    "workdir lock refuses runs started while one holds it, but two runs "
                    "started at the same instant may both get it", self.workdir)
    for _ in range(5):
      try:
        if self.on_bucket and not self.preconditions and storage.exists(self.path):
          raise FileExistsError(self.path)
        self._generation = storage.create_exclusive(self.path,
                                                    json.dumps(self._record()).encode())
      except FileExistsError:
        self._take_over_if_stale()
        continue
      if self.on_bucket:
        found = self._read(self.path)
        if found is None or found[0].get("token") != self.token:
          raise WorkdirLockedError(f"{self.workdir} was just locked by another run; use "
                                   "another --workdir or wait for it to finish")
      self.held = True
      self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
      self._thread.start()
      return self
    raise WorkdirLockedError(f"{self.workdir} is locked: its lock file {self.path} keeps "
                             "changing hands; another run is starting there")

  def _read(self, path: str) -> tuple[dict, float, int | None] | None:
    """(owner record, seconds since its last heartbeat, generation on a bucket), or None if
    the file is gone."""
    try:
      if self.on_bucket:
        data, mtime, generation = storage.read_with_generation(path)
        text = data.decode("utf-8", "replace")
      else:
        mtime, generation = os.stat(path).st_mtime, None
        with open(path) as f:
          text = f.read()
    except FileNotFoundError:
      return None
    try:
      owner = json.loads(text)
    except ValueError:
      owner = {}  # being written right now, or cut by a crash: judged by its age alone
    return (owner if isinstance(owner, dict) else {}), time.time() - mtime, generation

  def stale_reason(self, owner: dict, age: float) -> str | None:
    """Why the lock of ``owner`` (last touched ``age`` seconds ago) is stale, or None."""
    same_host = (owner.get("host") == socket.gethostname()
                 and owner.get("boot_id", "") == _boot_id())
    if same_host and isinstance(owner.get("pid"), int):
      if not _pid_alive(owner["pid"], owner.get("pid_start", "")):
        return f"its process {owner['pid']} on {owner['host']} is gone"
      return None
    if age > self.stale_seconds:
      return f"it has had no heartbeat for {age:.0f} s"
    return None

  def _take_over_if_stale(self) -> None:
    found = self._read(self.path)
    if found is None:
      return  # released meanwhile: try to create it again
    owner, age, generation = found
    reason = self.stale_reason(owner, age)
    if reason is None:
      raise WorkdirLockedError(
          f"{self.workdir} is in use by another run ({_describe_owner(owner, age)}); wait "
          f"for it to finish or stop it, or use another --workdir (if no such run exists, "
          f"delete {self.path})")
    if self.on_bucket:
      try:   # only the very version judged stale: a renewed or replaced lock stays
        storage.remove_if_generation(self.path, generation)
      except FileNotFoundError:
        return  # another contender took it first
      except FileExistsError:
        raise WorkdirLockedError(f"{self.workdir} was just locked by another run; use "
                                 "another --workdir or wait for it to finish") from None
      log.warning("took over the stale lock of %s: %s", self.workdir, reason)
      return
    aside = f"{self.path}.stale-{self.token}"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return  # another contender took it first
    moved = self._read(aside)
    if moved is not None and moved[0].get("token") != owner.get("token"):
      # A contender replaced the stale lock with a live one between our read and rename:
      # put it back (never overwriting a newer one) and report the workdir as taken.
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
      os.remove(aside)
      raise WorkdirLockedError(f"{self.workdir} was just locked by another run; use "
                               "another --workdir or wait for it to finish")
    os.remove(aside)
    log.warning("took over the stale lock of %s: %s", self.workdir, reason)

  def _touch(self) -> bool:
    """Refreshes the heartbeat if the lock is still this run's; returns whether it is."""
    if self.on_bucket:
      try:
        self._generation = storage.replace_if_generation(
            self.path, json.dumps(self._record()).encode(), self._generation)
      except (FileExistsError, FileNotFoundError):
        return False
      if self.preconditions:
        return True
      found = self._read(self.path)   # without preconditions: check what was overwritten
      return found is not None and found[0].get("token") == self.token
    with open(self.path) as f:
      mine = json.load(f).get("token") == self.token
    if mine:
      os.utime(self.path)
    return mine

  def _beat(self) -> None:
    warned = False
    while not self._stop.wait(self.heartbeat_seconds):
      try:
        if self._touch():
          continue
      except (OSError, ValueError):
        pass
      except Exception as e:  # pylint: disable=broad-except  (HTTP errors of the store)
        log.warning("heartbeat of the lock %s failed: %s", self.path, e)
        continue
      if not warned:
        log.warning("the lock file %s was removed or replaced while this run holds it; "
                    "another run may be writing the same workdir", self.path)
        warned = True

  def release(self) -> None:
    """Stops the heartbeat and removes the lock file if it is still this run's."""
    if not self.held:
      return
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    self.held = False
    try:
      if self.on_bucket:
        found = None if self.preconditions else self._read(self.path)
        if found is None or found[0].get("token") == self.token:
          storage.remove_if_generation(self.path, self._generation)
        return
      with open(self.path) as f:
        if json.load(f).get("token") == self.token:
          os.remove(self.path)
    except Exception:  # pylint: disable=broad-except  (gone, replaced, or the store failed)
      pass

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _describe_owner(owner: dict, age: float) -> str:
  if not owner:
    return f"lock file written {age:.0f} s ago"
  return (f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}, "
          f"heartbeat {age:.0f} s ago")


# ----------------------------------------------------------------------------------------
# JSON-lines repair.
# ----------------------------------------------------------------------------------------
def _complete_lines(path: str) -> tuple[bytes, list[bytes]]:
  """(the file's bytes, its complete lines): the part after the last newline is empty, or a
  record cut by a crash while it was written, and is left out."""
  data = storage.read_bytes(path)
  return data, data.split(b"\n")[:-1]


def read_jsonl(path: str) -> list[dict]:
  """The complete records of a JSON-lines file: a last line without its newline (cut by a
  crash while it was written) is left out; any other unreadable line is an error."""
  records = []
  for number, line in enumerate(_complete_lines(path)[1], 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except ValueError as e:
      raise ConfigError(f"{path}, line {number}, is not JSON ({e}); the file was damaged "
                        "outside a crash: repair or remove that line") from None
  return records


def repair_jsonl(path: str, keep: Callable[[dict], bool],
                 key: Callable[[dict], Iterable] | None = None) -> list[dict]:
  """Rewrites ``path`` (atomically) with only its complete, parseable records for which
  ``keep(record)`` holds, and for each ``key(record)`` only the last such record; returns
  those records.  A file that needs no change is not rewritten; a missing one is none."""
  if not storage.exists(path):
    return []
  data, lines = _complete_lines(path)
  records = []
  for line in lines:
    try:
      records.append(json.loads(line))
    except ValueError:
      continue  # a line damaged by a crash (e.g. a cut line later appended to)
  kept = [r for r in records if isinstance(r, dict) and keep(r)]
  if key is not None:
    last = {tuple(key(r)): i for i, r in enumerate(kept)}
    kept = [r for i, r in enumerate(kept) if last[tuple(key(r))] == i]
  text = "".join(json.dumps(r) + "\n" for r in kept).encode()
  if text != data:
    storage.write_atomic(path, text)
  return kept
