"""Metrics: JSON lines, TensorBoard event files and a console progress line."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping

from resnorm_jax import workdir as workdir_lib


class MetricWriter:
  """Appends ``{"step", "split", ...scalars}`` lines to ``metrics.jsonl`` and TensorBoard.

  Only the process that ``enabled`` writes (process 0 in multi-host runs).  A resumed run
  continues the file, which holds exactly one record per ``(step, split)`` (per ``step`` in
  the other JSON-lines files): when the writer opens a file it drops a last line cut by a
  crash and the records of steps after ``resume_step`` (the restored checkpoint's step:
  the continuing run writes them again), and a record written again for an existing key
  replaces the old one.  Each line is flushed when written.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               resume_step: int | None = None):
    self.enabled, self.workdir, self.resume_step = enabled, workdir, resume_step
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._files: dict = {}   # filename -> open file
    self._keys: dict = {}    # filename -> keys of the records in it
    self._tb = None
    if enabled:
      self._open("metrics.jsonl")
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard output is optional; JSON lines always exist.
        self._tb = None

  @staticmethod
  def _key(filename: str, record: Mapping) -> tuple:
    return ((record.get("step"), record.get("split")) if filename == "metrics.jsonl"
            else (record.get("step"),))

  def _open(self, filename: str):
    """Repairs ``filename`` (see the class docstring) and opens it for appending."""
    path = os.path.join(self.workdir, filename)
    last = self.resume_step
    kept = workdir_lib.repair_jsonl(
        path, keep=lambda r: last is None or int(r.get("step", 0)) <= last,
        key=lambda r: self._key(filename, r))
    self._keys[filename] = {self._key(filename, r) for r in kept}
    self._files[filename] = open(path, "a", buffering=1)
    return self._files[filename]

  def _append(self, filename: str, record: dict) -> None:
    key = self._key(filename, record)
    f = self._files.get(filename) or self._open(filename)
    if key in self._keys[filename]:  # written again (a re-evaluation): replace the old one
      f.close()
      workdir_lib.repair_jsonl(os.path.join(self.workdir, filename),
                               keep=lambda r: self._key(filename, r) != key)
      f = self._files[filename] = open(os.path.join(self.workdir, filename), "a",
                                       buffering=1)
    f.write(json.dumps(record) + "\n")
    self._keys[filename].add(key)

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v)))
             for k, v in scalars.items()}
    self._append("metrics.jsonl", {"step": int(step), "split": split, **clean})
    self._scalars(step, split, scalars)

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
    for f in self._files.values():
      f.flush()
      os.fsync(f.fileno())
    if self._tb is not None:
      self._tb.flush()

  def _scalars(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self) -> None:
    for f in self._files.values():
      f.close()
    self._files = {}
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str, filename: str = "metrics.jsonl") -> list[dict]:
  """The records of ``<workdir>/<filename>``; a last line cut by a crash is left out."""
  return workdir_lib.read_jsonl(os.path.join(workdir, filename))


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
    window (``job.throughput``), shown as ``ex_s`` / ``tok_s``."""
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
