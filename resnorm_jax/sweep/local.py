"""Training a sweep's runs here, one after another (``resnorm-sweep`` without
``--submit``): each with the engine of ``resnorm-train``, its ``result.json`` written when it
ends, the results rewritten after each run.
"""

from __future__ import annotations

import sys
from typing import Any

from resnorm_jax import errors, storage
from resnorm_jax.sweep.results import collect_rows, write_results
from resnorm_jax.sweep.runs import finished, record_sweep, write_result


def train_run(config, path: str) -> dict[str, Any]:
  """Trains (or resumes) one run in ``path``: the only place the sweep trains."""
  from resnorm_jax import training
  return training.train_and_evaluate(config, path)


def run_one(variant: str, seed: int, config, path: str) -> str:
  """Trains one (variant, seed) run and writes its result.json when it ends (completed or
  diverged); returns its status (``preempted`` and ``interrupted`` write nothing)."""
  import jax
  from resnorm_jax import training
  try:
    summary = train_run(config, path)
    status = summary["status"]
  except training.NonFiniteLossError as e:
    summary, status = None, "diverged"
    print(f"resnorm-sweep: {variant} seed {seed}: {e}", file=sys.stderr)
  if status not in ("preempted", "interrupted") and jax.process_index() == 0:
    write_result(path, variant, seed, config, status, summary)
  return status


def sweep(config_path: str, plan: list[dict], workdir: str, overrides: list[str],
          order: tuple[str, ...], baselines: dict[str, str], all_configs: dict) -> int:
  """Trains the unfinished runs of ``plan`` one after another, rewriting the results after
  each; returns the exit code."""
  import jax
  main_process = jax.process_index() == 0
  if main_process:
    record_sweep(workdir, config_path)
  for i, entry in enumerate(plan):
    variant, seed, path = entry["variant"], entry["seed"], entry["workdir"]
    if main_process:
      print(f"resnorm-sweep: [{i + 1}/{len(plan)}] {variant} seed {seed} -> {path}"
            + (f" ({entry['state']['status']}: kept)" if finished(entry) else ""),
            flush=True)
    if finished(entry):
      continue
    status = run_one(variant, seed, entry["config"], path)
    if main_process:
      write_results(workdir, config_path, overrides,
                    collect_rows(workdir, all_configs, order, baselines))
    if status in ("preempted", "interrupted"):
      print(f"resnorm-sweep: {status} during {variant} seed {seed}; rerun the same command "
            "to resume", file=sys.stderr)
      return errors.exit_code_for_signal("SIGINT" if status == "interrupted" else "SIGTERM")
  if main_process:
    table = write_results(workdir, config_path, overrides,
                          collect_rows(workdir, all_configs, order, baselines))
    print(f"resnorm-sweep: results in {storage.join(workdir, 'results.md')} (figure: "
          "results.png)")
    print(table)
  return 0
