"""The one path layer for every file a run, a sweep or an analysis reads or writes.

Workdirs and data directories are local paths or ``gs://bucket/...`` URLs.  Every read and
write goes through the functions here, which use ``etils.epath`` (the path type orbax, TFDS
and the JAX ecosystem use; ``gs://`` goes to ``gcsfs``), so that a local path and a bucket run
the same code.  Local paths keep their POSIX behaviour exactly (``O_EXCL`` creates, fsync'd
temporary files renamed into place).

What an object store cannot do, and what is done instead:

* **No rename.**  :func:`write_atomic` on ``gs://`` is one upload: GCS replaces an object
  atomically, so a reader sees the old object or the new one, never a part.
* **No append.**  JSON-lines files on a bucket are rewritten whole (see
  :class:`resnorm_jax.metrics.MetricWriter` for why nothing is lost on preemption).
* **Create-if-absent and compare-and-swap** are generation preconditions
  (``ifGenerationMatch``): :func:`create_exclusive`, :func:`replace_if_generation` and
  :func:`remove_if_generation`, which the workdir lock uses.  GCS honours them; the local GCS
  emulator used by the tests (``gcp-storage-emulator``) ignores them, which
  :func:`honours_preconditions` detects (see ``WorkdirLock``).

Only ``gs://`` is supported among URL schemes: :func:`check_scheme` refuses any other as a
one-line :class:`ConfigError` (exit 2), and :func:`check_bucket` refuses a bucket that does not
exist or that the credentials cannot read, before anything is compiled or written.

Against an emulator: ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` sends gcsfs there and
``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT`` sends orbax's tensorstore there.
"""

from __future__ import annotations

import functools
import os
import re
import tempfile
from typing import IO, Iterator

from resnorm_jax import errors
from resnorm_jax.errors import ConfigError, StorageError

# Retries of transient store errors (HTTP 408, 429, 5xx, reset or refused connections,
# timeouts), bounded so that a store that stays down ends a run (exit 5) within minutes:
# * gcsfs (every object but the checkpoint arrays: config, metrics, lock, data, orbax's
#   step metadata and commit markers) makes 6 attempts, sleeping 1, 2, 4, 8 and 16 s (+ up
#   to 1 s of jitter) between them (gcsfs.retry.retry_request; fixed by gcsfs).  Each
#   attempt is bounded here: REQUEST_TIMEOUT = (connect, between two reads) seconds, which
#   gcsfs reports as a retried aiohttp timeout error.
# * TensorStore (the checkpoint arrays and OCDBT manifests orbax writes) retries the same
#   errors with exponential backoff; its default budget (32 retries, delays 1 s doubling to
#   32 s: about 15 minutes) is lowered to TENSORSTORE_RETRIES by
#   resnorm_jax.checkpointing, to match gcsfs's.
# * orbax itself retries nothing.
# * A response that cannot be parsed (a corrupted body) is retried by nobody below: the
#   path layer retries its idempotent operations MALFORMED_RETRIES times (io_boundary).
REQUEST_TIMEOUT = (30.0, 60.0)
MALFORMED_RETRIES = 2
TENSORSTORE_RETRIES = {"max_retries": 6, "initial_delay": "1s", "max_delay": "16s"}

# The URL schemes a workdir or data directory may use (all others are a ConfigError).
SCHEMES = ("gs",)
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# ----------------------------------------------------------------------------------------
# Names.
# ----------------------------------------------------------------------------------------
def scheme(path) -> str | None:
  """``"gs"`` for ``gs://b/x``, None for a local path."""
  match = _URL.match(os.fspath(path or ""))
  return match.group(1).lower() if match else None


def is_url(path) -> bool:
  """True for a URL (``gs://...``): a path on an object store, not on a local disk."""
  return scheme(path) is not None


def bucket_of(path) -> str:
  """The bucket of ``gs://bucket/key`` (``''`` when missing)."""
  rest = _URL.sub("", os.fspath(path), count=1)
  return rest.split("/", 1)[0]


def check_scheme(path, flag: str = "--workdir") -> None:
  """ConfigError (one line, exit 2) for a URL of a scheme other than ``gs://``, or a
  ``gs://`` URL without a bucket."""
  name = scheme(path)
  if name is None:
    return
  if name not in SCHEMES:
    raise ConfigError(
        f"{flag}={path}: the scheme {name}:// is not supported; use a local path or "
        f"gs://BUCKET/PATH (or mount the store and pass the mount point)")
  if not bucket_of(path):
    raise ConfigError(f"{flag}={path} names no bucket; pass gs://BUCKET/PATH")
  _configure()


def join(base, *parts) -> str:
  """``base/part/...`` as a string: ``os.path.join`` for local paths, ``/`` for URLs."""
  base = os.fspath(base)
  if not is_url(base):
    return os.path.join(base, *(os.fspath(p) for p in parts))
  out = base.rstrip("/")
  for part in parts:
    out += "/" + os.fspath(part).strip("/")
  return out


def abspath(path) -> str:
  """A local path made absolute (``~`` expanded); a URL unchanged (without a trailing /)."""
  path = os.fspath(path)
  if is_url(path):
    _configure()   # callers hand this path to orbax, which opens it through epath
    return path.rstrip("/") if path.rstrip("/").count("/") > 2 else path
  return os.path.abspath(os.path.expanduser(path))


def dirname(path) -> str:
  path = os.fspath(path)
  if is_url(path):
    return path.rstrip("/").rsplit("/", 1)[0]
  return os.path.dirname(path)


def basename(path) -> str:
  return os.fspath(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else \
      os.path.basename(os.fspath(path))


def Path(path):  # pylint: disable=invalid-name
  """``etils.epath.Path(path)`` (``~`` expanded for local paths)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  if is_url(path):
    _configure()   # before epath (or orbax through it) creates its gcsfs instance
  return epath.Path(path if is_url(path) else os.path.expanduser(path))


# ----------------------------------------------------------------------------------------
# The I/O boundary.
# ----------------------------------------------------------------------------------------
def io_boundary(fn=None, *, idempotent: bool = False):
  """Makes ``fn(path, ...)`` an I/O boundary: a failure of the storage, whatever exception
  class the OS, gcsfs, aiohttp or google.auth raise it as (after their retries), leaves as
  a one-line :class:`StorageError` naming ``path`` and the cause (exit 5).  Passed through
  unchanged: ``FileNotFoundError`` / ``FileExistsError`` (answers the callers act on),
  :class:`ConfigError`, and anything that is not a storage failure (a bug: exit 70).

  With ``idempotent`` (reads, and writes that replace a whole object), a response of the
  store that cannot be parsed (a corrupted body: gcsfs does not retry it) is retried
  :data:`MALFORMED_RETRIES` times, 1 s and then 2 s later."""
  if fn is None:
    return functools.partial(io_boundary, idempotent=idempotent)

  @functools.wraps(fn)
  def boundary(path, *args, **kwargs):
    for attempt in range(MALFORMED_RETRIES + 1 if idempotent else 1):
      try:
        return fn(path, *args, **kwargs)
      except (FileNotFoundError, FileExistsError, ConfigError, StorageError):
        raise
      except Exception as e:  # pylint: disable=broad-except  (classified, else re-raised)
        failure = errors.storage_error(e, os.fspath(path))
        if failure is None:
          raise
        if idempotent and attempt < MALFORMED_RETRIES and errors.malformed_response(e):
          import time  # pylint: disable=import-outside-toplevel
          time.sleep(2 ** attempt)
          continue
        raise failure from e
  return boundary


# ----------------------------------------------------------------------------------------
# Files.
# ----------------------------------------------------------------------------------------
@io_boundary(idempotent=True)
def exists(path) -> bool:
  return Path(path).exists()


@io_boundary(idempotent=True)
def isdir(path) -> bool:
  return Path(path).is_dir()


@io_boundary(idempotent=True)
def isfile(path) -> bool:
  return Path(path).is_file()


@io_boundary
def makedirs(path) -> None:
  """Creates ``path`` and its parents (a no-op on a bucket beyond a check: object stores
  have no directories)."""
  if is_url(path):
    return
  os.makedirs(os.path.expanduser(os.fspath(path)), exist_ok=True)


@io_boundary(idempotent=True)
def listdir(path) -> list[str]:
  """Names in directory ``path`` (sorted); [] if it does not exist."""
  p = Path(path)
  if not p.is_dir():
    return []
  return sorted(child.name for child in p.iterdir())


@io_boundary(idempotent=True)
def glob(path, pattern: str) -> list[str]:
  """Paths below ``path`` matching ``pattern`` (sorted strings)."""
  p = Path(path)
  if not p.is_dir():
    return []
  return sorted(os.fspath(child) for child in p.glob(pattern))


@io_boundary(idempotent=True)
def files_under(path) -> list[str]:
  """Every file below directory ``path``, recursively (sorted paths)."""
  path = os.fspath(path)
  if is_url(path):
    prefix = scheme(path) + "://"
    return sorted(prefix + p for p in _gcs().find(_key(path)))
  return sorted(os.path.join(base, name) for base, _, names in os.walk(path)
                for name in names)


@io_boundary
def open(path, mode: str = "r", **kwargs) -> IO:  # pylint: disable=redefined-builtin
  """``open`` for local paths and URLs (URLs: modes r, w, rb, wb)."""
  if is_url(path):
    return Path(path).open(mode, **kwargs)
  import builtins  # pylint: disable=import-outside-toplevel
  return builtins.open(os.path.expanduser(os.fspath(path)), mode, **kwargs)


@io_boundary(idempotent=True)
def read_bytes(path) -> bytes:
  return Path(path).read_bytes()


@io_boundary(idempotent=True)
def read_text(path) -> str:
  return Path(path).read_text(encoding="utf-8")


@io_boundary(idempotent=True)
def write_bytes(path, data: bytes) -> None:
  """Writes ``data`` to ``path`` (not atomically on a local disk: see write_atomic)."""
  if not is_url(path):
    makedirs(dirname(os.fspath(path)) or ".")
  Path(path).write_bytes(data)


def write_text(path, text: str) -> None:
  write_bytes(path, text.encode("utf-8"))


@io_boundary(idempotent=True)
def write_atomic(path, data: bytes | str) -> None:
  """Writes ``data`` so that a crash leaves the old content or the new one, never a part.

  Local: a synced temporary file renamed over ``path``.  ``gs://``: one upload, since GCS
  replaces an object atomically."""
  if isinstance(data, str):
    data = data.encode("utf-8")
  path = os.fspath(path)
  if is_url(path):
    _gcs().pipe_file(_key(path), data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path),
                             suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


@io_boundary(idempotent=True)
def copy(src, dst) -> None:
  """Copies file ``src`` to ``dst`` (either may be a URL)."""
  write_atomic(dst, read_bytes(src))


@io_boundary
def remove(path, missing_ok: bool = True) -> None:
  try:
    Path(path).unlink()
  except FileNotFoundError:
    if not missing_ok:
      raise


@io_boundary
def rmtree(path) -> None:
  p = Path(path)
  if p.exists():
    p.rmtree()


def local_copy(path) -> Iterator[str]:
  """A context giving a local file name for ``path``: itself when local, else a temporary
  copy of the object (for readers that need a real file, e.g. ``tarfile`` seeking)."""
  return _LocalCopy(path)


class _LocalCopy:
  def __init__(self, path):
    self.path, self._tmp = os.fspath(path), None

  def __enter__(self) -> str:
    return io_boundary(self._enter)(self.path)

  def _enter(self, path) -> str:
    del path
    if not is_url(self.path):
      return os.path.expanduser(self.path)
    fd, self._tmp = tempfile.mkstemp(suffix="-" + basename(self.path))
    import shutil  # pylint: disable=import-outside-toplevel
    with os.fdopen(fd, "wb") as f, Path(self.path).open("rb") as src:
      shutil.copyfileobj(src, f, 8 << 20)
    return self._tmp

  def __exit__(self, *exc) -> None:
    if self._tmp is not None:
      os.remove(self._tmp)


# ----------------------------------------------------------------------------------------
# Generation preconditions (gs://): the primitives of the workdir lock.
# ----------------------------------------------------------------------------------------
def _key(path) -> str:
  """``bucket/key`` of ``gs://bucket/key``."""
  return _URL.sub("", os.fspath(path), count=1)


@functools.lru_cache(maxsize=None)
def _configure() -> None:
  """Turns off gcsfs's listing cache (processes of a run share a bucket and must see each
  other's writes: a cached listing once made a reader restore a checkpoint step that the
  writing process had already deleted) and, against an emulator, its probe for zonal and
  hierarchical buckets (which needs real credentials and only logs a warning there).

  It also bounds each request (see :data:`REQUEST_TIMEOUT`): gcsfs sets no timeout of its
  own, so a store that accepts a connection and never answers held a run for aiohttp's
  default of 5 minutes per attempt, 6 attempts."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  import fsspec  # pylint: disable=import-outside-toplevel
  try:
    import aiohttp  # pylint: disable=import-outside-toplevel
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=REQUEST_TIMEOUT[0],
                                    sock_read=REQUEST_TIMEOUT[1])
  except ImportError:   # no gcsfs either: _gcs() says so
    timeout = None
  for name in ("gs", "gcs"):
    conf = fsspec.config.conf.setdefault(name, {})
    conf["use_listings_cache"] = False
    if timeout is not None:
      conf.setdefault("requests_timeout", timeout)


def _gcs():
  """The gcsfs file system (ConfigError if gcsfs is not installed)."""
  _configure()
  try:
    import fsspec  # pylint: disable=import-outside-toplevel
    return fsspec.filesystem("gs")
  except ImportError as e:
    raise ConfigError(f"gs:// paths need gcsfs ({e}); pip install gcsfs") from None


@io_boundary(idempotent=True)
def stat(path) -> tuple[float, int | None]:
  """(modification time in seconds since the epoch, GCS generation or None locally);
  FileNotFoundError if absent."""
  if not is_url(path):
    return os.stat(os.fspath(path)).st_mtime, None
  fs = _gcs()
  fs.invalidate_cache(_key(path))
  info = fs.info(_key(path))
  return info["mtime"].timestamp(), _generation(info, path)


@io_boundary(idempotent=True)
def read_with_generation(path) -> tuple[bytes, float, int | None]:
  """(content, modification time, generation): one consistent version of ``path``."""
  if not is_url(path):
    mtime, _ = stat(path)
    with open(path, "rb") as f:
      return f.read(), mtime, None
  mtime, generation = stat(path)
  bucket, _, key = _key(path).partition("/")
  from urllib.parse import quote  # pylint: disable=import-outside-toplevel
  fs = _gcs()
  base = fs._location  # pylint: disable=protected-access
  url = f"{base}/download/storage/v1/b/{quote(bucket)}/o/{quote(key, safe='')}"
  _, data = fs.call("GET", url, alt="media", generation=str(generation))
  return data, mtime, generation


@io_boundary
def create_exclusive(path, data: bytes) -> int | None:
  """Creates ``path`` holding ``data`` only if it does not exist; returns the new object's
  generation (None locally).  FileExistsError if it exists.

  Local: ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+).  ``gs://``: an upload with
  ``ifGenerationMatch=0``, which GCS makes atomic: of several creators exactly one wins."""
  if not is_url(path):
    fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    return None
  return _upload(path, data, 0)


@io_boundary
def replace_if_generation(path, data: bytes, generation: int) -> int:
  """Overwrites the object ``path`` only if its generation is still ``generation``
  (compare-and-swap); returns the new generation.  FileExistsError if it changed,
  FileNotFoundError if it is gone.  ``gs://`` only."""
  return _upload(path, data, generation)


@io_boundary
def remove_if_generation(path, generation: int) -> None:
  """Deletes the object ``path`` only if its generation is ``generation``; FileExistsError if
  it changed meanwhile, FileNotFoundError if it is gone.  ``gs://`` only."""
  bucket, _, key = _key(path).partition("/")
  fs = _gcs()
  fs.call("DELETE", "b/{}/o/{}", bucket, key, ifGenerationMatch=str(generation))
  fs.invalidate_cache(_key(path))


def _upload(path, data: bytes, if_generation: int) -> int:
  from urllib.parse import quote  # pylint: disable=import-outside-toplevel
  bucket, _, key = _key(path).partition("/")
  fs = _gcs()
  url = f"{fs._location}/upload/storage/v1/b/{quote(bucket)}/o"  # pylint: disable=protected-access
  try:
    out = fs.call("POST", url, uploadType="media", name=key, ifGenerationMatch=str(if_generation),
                  headers={"Content-Type": "application/octet-stream"}, data=data,
                  json_out=True)
  finally:
    fs.invalidate_cache(_key(path))
  return _generation(out, path)


@io_boundary
def _generation(metadata, path) -> int:
  """The ``generation`` of an object's metadata as the store answered it; a missing or
  malformed one is a storage failure, not a bug."""
  try:
    return int(metadata["generation"])
  except (KeyError, TypeError, ValueError):
    value = metadata.get("generation") if isinstance(metadata, dict) else None
    raise StorageError(f"the object store answered without a valid generation for {path} "
                       f"({value!r})") from None


def honours_preconditions(path) -> bool:
  """Whether the store of ``gs://`` ``path`` refuses a create-if-absent of an existing
  object, i.e. honours generation preconditions (GCS does; gcp-storage-emulator does not).
  Writes and removes ``<path>.precondition-probe``."""
  probe = str(path) + ".precondition-probe"
  write_atomic(probe, b"probe")
  try:
    create_exclusive(probe, b"again")
  except FileExistsError:
    return True
  finally:
    remove(probe)
  return False


# ----------------------------------------------------------------------------------------
# Checks before anything is written.
# ----------------------------------------------------------------------------------------
def check_bucket(path, flag: str = "--workdir") -> None:
  """ConfigError (one line, exit 2) if the bucket of ``gs://`` ``path`` does not exist or
  cannot be read with the credentials found; nothing is written.  Local paths: no-op."""
  check_scheme(path, flag)
  if not is_url(path):
    return
  bucket = bucket_of(path)
  fs = _gcs()
  try:
    fs.call("GET", "b/{}/o", bucket, maxResults="1", json_out=True)
  except FileNotFoundError:
    raise ConfigError(f"{flag}={path}: the bucket gs://{bucket} does not exist; create it "
                      f"(gcloud storage buckets create gs://{bucket}) or fix the "
                      "name") from None
  except Exception as e:  # pylint: disable=broad-except  (auth, HTTP, connection errors)
    text = " ".join(str(e).split())[:200]
    if _is_auth_error(e):
      raise ConfigError(
          f"{flag}={path}: no credentials that may read gs://{bucket} ({text}); run "
          "`gcloud auth application-default login`, or give this VM's service account "
          "access to the bucket") from None
    raise ConfigError(f"{flag}={path}: cannot reach gs://{bucket} "
                      f"({type(e).__name__}: {text})") from None


def _is_auth_error(e: BaseException) -> bool:
  code = getattr(e, "code", None)
  if code in (401, 403) or isinstance(e, PermissionError):
    return True
  name = type(e).__name__
  return "Credential" in name or "Auth" in name or "credentials" in str(e).lower()
