"""Metrics: JSON lines, TensorBoard event files and a console progress line."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Mapping

from resnorm_jax import storage, workdir as workdir_lib
from resnorm_jax.errors import StorageError

# On an object store, at most this long passes between uploads of a JSON-lines file that
# has new records (and each checkpoint uploads them at once: see MetricWriter).
OBJECT_FLUSH_SECONDS = 30.0


class MetricWriter:
  """Appends ``{"step", "split", ...scalars}`` lines to ``metrics.jsonl`` and TensorBoard.

  Only the process that ``enabled`` writes (process 0 in multi-host runs).  A resumed run
  continues the file, which holds exactly one record per ``(step, split)`` (per ``step`` in
  the other JSON-lines files): when the writer opens a file it drops a last line cut by a
  crash and the records of steps after ``resume_step`` (the restored checkpoint's step:
  the continuing run writes them again), and a record written again for an existing key
  replaces the old one.  Each line is flushed when written.

  On an object store (a ``gs://`` workdir) objects cannot be appended to, so each file is
  kept in memory (its repaired records plus the new ones) and uploaded whole, as one object
  that replaces the previous one atomically: at every :meth:`sync` (called when a checkpoint
  is saved, and at the end), at :meth:`close`, and at most ``OBJECT_FLUSH_SECONDS`` after a
  record arrives.  Why this loses nothing on preemption: a resumed run restores a
  checkpoint and drops every record of a later step anyway (it writes them again), and
  every record up to a checkpoint's step is uploaded when that checkpoint is saved -- also
  the one saved on SIGTERM -- so what survives is exactly what a resume keeps on a local
  disk.  Readers always see one complete file (no cut line, no chunks to merge), which
  ``gcloud storage cat`` and the analysis tools read as they are.  The cost, one upload of
  the whole file per flush, is small: metrics files are kilobytes to a few megabytes and
  flushes are tens of seconds apart.  (Chunk objects merged by the reader would save the
  re-uploads but leave every reader to merge them; GCS ``compose`` caps a composite at
  1024 components.)
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled, self.workdir, self.resume_step = enabled, workdir, resume_step
    self.path = storage.join(workdir, "metrics.jsonl")
    self.on_bucket = storage.is_url(workdir)
    self._files: dict = {}   # filename -> open file (local) or its records (object store)
    self._keys: dict = {}    # filename -> keys of the records in it
    self._dirty: dict = {}   # object store: filename -> time of its oldest unuploaded record
    self._tb = None
    if enabled:
      self._open("metrics.jsonl")
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        if self.on_bucket:
          _register_tensorboard_writer()
        self._tb = SummaryWriter(storage.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard output is optional; JSON lines always exist.
        self._tb = None

  @staticmethod
  def _key(filename: str, record: Mapping) -> tuple:
    return ((record.get("step"), record.get("split")) if filename == "metrics.jsonl"
            else (record.get("step"),))

  def _open(self, filename: str):
    """Repairs ``filename`` (see the class docstring) and opens it for appending."""
    path = storage.join(self.workdir, filename)
    last = self.resume_step
    kept = workdir_lib.repair_jsonl(
        path, keep=lambda r: last is None or int(r.get("step", 0)) <= last,
        key=lambda r: self._key(filename, r))
    self._keys[filename] = {self._key(filename, r) for r in kept}
    if self.on_bucket:
      self._files[filename] = kept
      return kept
    self._files[filename] = open(path, "a", buffering=1)
    return self._files[filename]

  def _append(self, filename: str, record: dict) -> None:
    key = self._key(filename, record)
    if self.on_bucket:
      self._append_object(filename, key, record)
      return
    f = self._files.get(filename) or self._open(filename)
    if key in self._keys[filename]:  # written again (a re-evaluation): replace the old one
      f.close()
      workdir_lib.repair_jsonl(os.path.join(self.workdir, filename),
                               keep=lambda r: self._key(filename, r) != key)
      f = self._files[filename] = open(os.path.join(self.workdir, filename), "a",
                                       buffering=1)
    f.write(json.dumps(record) + "\n")
    self._keys[filename].add(key)

  def _append_object(self, filename: str, key: tuple, record: dict) -> None:
    records = self._files[filename] if filename in self._files else self._open(filename)
    if key in self._keys[filename]:  # written again: replace the old one
      records[:] = [r for r in records if self._key(filename, r) != key]
    records.append(json.loads(json.dumps(record)))
    self._keys[filename].add(key)
    now = time.monotonic()
    first = self._dirty.setdefault(filename, now)
    if now - first >= OBJECT_FLUSH_SECONDS:
      self._upload(filename)

  def _upload(self, filename: str) -> None:
    """Object store: replaces ``filename`` by the file of all its records (one upload)."""
    text = "".join(json.dumps(r) + "\n" for r in self._files[filename])
    storage.write_atomic(storage.join(self.workdir, filename), text.encode())
    self._dirty.pop(filename, None)

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    # Text and lists (a BLEU signature, the steps of an average) go to the JSON lines only.
    texts = {k: v for k, v in scalars.items() if isinstance(v, (str, list, tuple))}
    numbers = {k: v for k, v in scalars.items() if k not in texts}
    clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v)))
             for k, v in numbers.items()}
    self._append("metrics.jsonl", {"step": int(step), "split": split, **clean, **texts})
    self._scalars(step, split, numbers)

  def write_record(self, filename: str, step: int, record: Mapping,
                   tensorboard: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Appends ``{"step", **record}`` as a line of ``<workdir>/<filename>`` (JSON lines, e.g.
    per-layer arrays), and the scalars ``tensorboard[split][name]`` as ``split/name``."""
    if not self.enabled:
      return
    self._append(filename, {"step": int(step), **record})
    for split, scalars in (tensorboard or {}).items():
      self._scalars(step, split, scalars)

  def sync(self) -> None:
    """Makes every record written so far durable (called when a checkpoint is saved)."""
    if self.on_bucket:
      self._upload_dirty()
    else:
      for f in self._files.values():
        f.flush()
        os.fsync(f.fileno())
    if self._tb is not None:
      self._tb.flush()

  def _upload_dirty(self) -> None:
    """Uploads every JSON-lines file with records not yet in the bucket (whole objects)."""
    for filename in list(self._dirty):
      self._upload(filename)

  def _scalars(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self) -> None:
    if self.on_bucket:
      self._upload_dirty()
    else:
      for f in self._files.values():
        f.close()
    self._files = {}
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str, filename: str = "metrics.jsonl") -> list[dict]:
  """The records of ``<workdir>/<filename>``; a last line cut by a crash is left out."""
  return workdir_lib.read_jsonl(storage.join(workdir, filename))


class _ObjectRecordWriter:
  """A TensorBoard event file on an object store: the bytes written so far, uploaded whole
  (replacing the object) at each flush, since objects cannot be appended to.

  tensorboardX flushes from a thread of its own, where a failing store would end in a
  traceback: a failed upload is a one-line warning instead (the next flush uploads the
  whole file again; the metrics and checkpoints report the failure as the run's error)."""

  def __init__(self, path: str):
    self.path, self._data, self._uploaded = path, bytearray(), -1

  def write(self, data: bytes) -> None:
    self._data += data

  def flush(self) -> None:
    if len(self._data) != self._uploaded:
      try:
        storage.write_atomic(self.path, bytes(self._data))
      except StorageError as e:
        logging.getLogger(__name__).warning("TensorBoard events not uploaded: %s", e)
        return
      self._uploaded = len(self._data)

  def close(self) -> None:
    self.flush()


class _ObjectRecordWriterFactory:
  def open(self, path: str) -> _ObjectRecordWriter:
    return _ObjectRecordWriter(path)

  def directory_check(self, path: str) -> None:
    del path  # objects need no directories


def _register_tensorboard_writer() -> None:
  """Makes tensorboardX write ``gs://`` event files through :mod:`resnorm_jax.storage`
  (instead of its own google-cloud-storage client)."""
  from tensorboardX import record_writer  # pylint: disable=import-outside-toplevel
  record_writer.register_writer_factory("gs", _ObjectRecordWriterFactory())


class Progress:
  """A console progress bar with step/s, the job's throughput and ETA (tqdm), on process 0
  only."""

  # Short labels for the throughputs jobs report ("examples_per_sec", "tokens_per_sec").
  RATE_LABELS = {"examples_per_sec": "ex_s", "tokens_per_sec": "tok_s"}

  def __init__(self, total_steps: int, start_step: int, *, enabled: bool = True):
    self._bar = None
    if enabled:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       file=sys.stderr, mininterval=1.0, smoothing=0.1)

  def update(self, step: int, rates: dict | None = None, **postfix) -> None:
    """Advances to ``step``; ``rates`` are the throughputs measured over the last logging
    window (``Task.throughput``), shown as ``ex_s`` / ``tok_s``."""
    if self._bar is None:
      return
    self._bar.update(step - self._bar.n)
    shown = {self.RATE_LABELS.get(k, k): f"{v:.0f}" for k, v in (rates or {}).items()}
    self._bar.set_postfix(**shown, **postfix, refresh=False)

  def write(self, message: str) -> None:
    if self._bar is not None:
      self._bar.write(message, file=sys.stderr)
    else:
      print(message, file=sys.stderr)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
