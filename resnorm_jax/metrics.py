"""Metrics: JSON lines, TensorBoard event files and a console progress line."""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Mapping


class MetricWriter:
  """Appends ``{"step", "split", ...scalars}`` lines to ``metrics.jsonl`` and TensorBoard.

  Only the process that ``enabled`` writes (process 0 in multi-host runs).  Appending keeps
  the metrics of earlier runs in the same workdir (a resumed run continues the file).
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True):
    self.enabled, self.workdir = enabled, workdir
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._records: dict = {}
    self._file = open(self.path, "a", buffering=1) if enabled else None
    self._tb = None
    if enabled and tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # TensorBoard output is optional; JSON lines always exist.
        self._tb = None

  def write(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v)))
             for k, v in scalars.items()}
    self._file.write(json.dumps({"step": int(step), "split": split, **clean}) + "\n")
    self._scalars(step, split, scalars)

  def write_record(self, filename: str, step: int, record: Mapping,
                   tensorboard: Mapping[str, Mapping[str, float]] | None = None) -> None:
    """Appends ``{"step", **record}`` as a line of ``<workdir>/<filename>`` (JSON lines, e.g.
    per-layer arrays), and the scalars ``tensorboard[split][name]`` as ``split/name``."""
    if not self.enabled:
      return
    if filename not in self._records:
      self._records[filename] = open(os.path.join(self.workdir, filename), "a", buffering=1)
    self._records[filename].write(json.dumps({"step": int(step), **record}) + "\n")
    for split, scalars in (tensorboard or {}).items():
      self._scalars(step, split, scalars)

  def _scalars(self, step: int, split: str, scalars: Mapping[str, float]) -> None:
    if self._tb is not None:
      for k, v in scalars.items():
        self._tb.add_scalar(f"{split}/{k}", float(v), int(step))

  def close(self) -> None:
    for f in [self._file, *self._records.values()]:
      if f:
        f.close()
    self._file, self._records = None, {}
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str, filename: str = "metrics.jsonl") -> list[dict]:
  with open(os.path.join(workdir, filename)) as f:
    return [json.loads(line) for line in f if line.strip()]


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
