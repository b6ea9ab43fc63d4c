"""Shared helpers of the benchmark scripts: timing, the machine's matmul peak, environment.

Every benchmark prints *ratios measured in one run on one machine* (ours vs a reference,
ours vs the bare jitted step, achieved FLOP/s vs the measured matmul peak); absolute times
are printed too, but only GPU ones are meant to be quoted.  Timings are medians over
repeats after warm-up; a JAX call is timed to ``block_until_ready``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)


def block(tree):
  """Waits for every JAX array in ``tree``; other leaves pass through."""
  import jax
  return jax.block_until_ready(tree)


def time_calls(fn: Callable[[], Any], *, warmup: int = 2, repeats: int = 5,
               sync: Callable[[Any], Any] = block) -> list[float]:
  """Seconds per call of ``fn()`` (``sync`` applied to its result), after ``warmup`` calls."""
  for _ in range(warmup):
    sync(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    sync(fn())
    times.append(time.perf_counter() - start)
  return times


def interleaved_rounds(contestants: dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]],
                       *, warmup: int, repeats: int):
  """Times several ``name -> (fn, sync)`` round-robin, one call of each per round, so that
  background load hits all alike.  Returns ``(first_call_s, times_s)``: each one's first call
  (compilation included), and its seconds per call over ``repeats`` rounds after ``warmup``
  calls in all (the first included)."""
  first_call = {}
  for name, (fn, sync) in contestants.items():
    start = time.perf_counter()
    time_calls(fn, warmup=1, repeats=0, sync=sync)
    first_call[name] = time.perf_counter() - start
    time_calls(fn, warmup=max(warmup - 1, 0), repeats=0, sync=sync)
  times = {name: [] for name in contestants}
  for _ in range(repeats):
    for name, (fn, sync) in contestants.items():
      times[name] += time_calls(fn, warmup=0, repeats=1, sync=sync)
  return first_call, times


def median(xs) -> float:
  return float(statistics.median(xs))


def SPEED_RATIO_COLUMNS(prefix: str) -> list[str]:  # pylint: disable=invalid-name
  return [f"{prefix} (median)", f"{prefix} (min)", f"{prefix} (per round)"]


def speed_ratios(reference: list[float], ours: list[float], prefix: str) -> dict[str, float]:
  """The reference's time over ours (above 1: we are faster), three ways: of the medians,
  of the minima, and the median over rounds of each round's ratio (the two calls of a round
  run back to back, so a load change between rounds cancels)."""
  return dict(zip(SPEED_RATIO_COLUMNS(prefix), (
      median(reference) / median(ours), min(reference) / min(ours),
      median([r / o for r, o in zip(reference, ours)]))))


def matmul_peak_flops(dtype: str = "float32", sizes=(1024, 2048, 4096),
                      repeats: int = 5) -> float:
  """The device's measured dense matmul throughput (FLOP/s): the best median over square
  ``n x n @ n x n`` products, 2 n^3 FLOPs each.  This is the MFU denominator."""
  import jax
  import jax.numpy as jnp
  best = 0.0
  for n in sizes:
    a = jnp.ones((n, n), dtype)
    b = jnp.ones((n, n), dtype)
    f = jax.jit(jnp.dot)
    t = median(time_calls(lambda: f(a, b), warmup=1, repeats=repeats))
    best = max(best, 2 * n ** 3 / t)
  return best


def environment() -> dict:
  """Device, versions and thread settings, for the record next to every figure."""
  import jax
  import jaxlib
  env = {
      "device": str(jax.devices()[0].device_kind),
      "platform": jax.devices()[0].platform,
      "num_devices": jax.device_count(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "load_average": os.getloadavg(),
  }
  try:
    import flax
    env["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    import torch
    env["torch"] = torch.__version__
    env["torch_threads"] = torch.get_num_threads()
  except ImportError:
    env["torch"] = None
  return env


def torch_or_none():
  """Imports PyTorch, or returns None with a note on how to install the CPU build."""
  try:
    import torch
    return torch
  except ImportError:
    print("PyTorch is not installed; its reference rows are skipped. On CPU: "
          "`pip install torch==2.13.0` (CPU build).", file=sys.stderr)
    return None


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
  """Prints ``rows`` as an aligned text table (and nothing else), for RESULTS.md."""
  print(f"\n## {title}")
  cells = [[_fmt(r.get(c, "")) for c in columns] for r in rows]
  widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
  print("| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths)) + " |")
  print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
  for row in cells:
    print("| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |")


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
  return str(v)


def write_json(path: str | None, payload: dict) -> None:
  """Writes ``payload`` (with the environment) to ``path`` when given."""
  if not path:
    return
  with open(path, "w") as f:
    json.dump(dict(payload, environment=environment()), f, indent=1)
