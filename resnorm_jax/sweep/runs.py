"""A sweep's runs on disk: where each (variant, seed) trains, its state, its result.

Every run lives in ``<workdir>/<variant>/seed_<s>``; a directory of an earlier single-seed
sweep (``<workdir>/<variant>`` holding a run) counts as the seed its ``config.json`` was
trained with.  A finished run (completed or diverged) has a ``result.json``; a run trained by
``resnorm-train`` directly is read from its ``metrics.jsonl``.  The number a run contributes
is its task's metric (:func:`metric_of`), as the task shows it (``Metric.scale``).
``sweep.json`` records which experiment config the sweep directory belongs to.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from resnorm_jax import storage
from resnorm_jax.errors import ConfigError

SWEEP_FILE, RESULT_FILE, CONFIG_FILE = "sweep.json", "result.json", "config.json"
SEED_DIR = "seed_{}"


class UsageError(Exception):
  """A bad flag, variant, seed list or sweep directory: one line, exit code 2."""


# ----------------------------------------------------------------------------------------
# The metric of a config: its task's headline metric, or the measure published.measure names.
# ----------------------------------------------------------------------------------------
def metric_of(config) -> dict[str, Any]:
  """{"key", "label", "higher_is_better", "scale", "published"} of the number the config's
  results table shows: the task's headline metric (the number papers report), or the
  measure ``published.measure`` names (e.g. translation's ``bleu_tokenized``), so the table
  puts our number in the paper's measure beside the paper's; ``published`` is None when no
  number is published."""
  from resnorm_jax import tasks
  metric = tasks.measure(config)
  headline = tasks.task_info(config).headline
  return {"key": metric.key, "label": metric.label, "higher_is_better": metric.higher_is_better,
          "scale": metric.scale, "published": config.published.get(headline.key)}


def metric_value(eval_metrics: dict | None, metric: dict[str, Any]) -> float | None:
  """The table's number from an evaluation: the value of ``metric`` (:func:`metric_of`)
  times its display scale (e.g. 100 · error for test error %), None when absent."""
  key = metric["key"]
  if not eval_metrics or key not in eval_metrics:
    return None
  return float(eval_metrics[key]) * metric["scale"]


# ----------------------------------------------------------------------------------------
# Runs on disk.
# ----------------------------------------------------------------------------------------
def read_json(path: str) -> Any:
  """The JSON in ``path``, None when it does not exist; UsageError when it is unreadable."""
  try:
    return json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UsageError(f"{path} is unreadable ({e}); restore or remove it") from None


def _saved_seed(path: str) -> int | None:
  saved = read_json(storage.join(path, CONFIG_FILE))
  return None if saved is None else int(saved.get("train", {}).get("seed", 0))


def run_dir(workdir: str, variant: str, seed: int) -> str:
  """``<workdir>/<variant>/seed_<seed>``, or ``<workdir>/<variant>`` itself where an earlier
  single-seed sweep trained this seed there."""
  legacy = storage.join(workdir, variant)
  if _saved_seed(legacy) == seed:
    return legacy
  return storage.join(legacy, SEED_DIR.format(seed))


def find_runs(workdir: str, variant: str) -> dict[int, str]:
  """{seed: run directory} of every run of ``variant`` on disk (a directory with a
  config.json: started at least)."""
  base = storage.join(workdir, variant)
  runs = {}
  legacy_seed = _saved_seed(base)
  if legacy_seed is not None:
    runs[legacy_seed] = base
  if storage.isdir(base):
    for name in storage.listdir(base):
      m = re.fullmatch(SEED_DIR.format(r"(\d+)"), name)
      path = storage.join(base, name)
      if m and storage.isfile(storage.join(path, CONFIG_FILE)):
        runs.setdefault(int(m.group(1)), path)
  return dict(sorted(runs.items()))


def _final_eval_from_metrics(path: str, steps: int) -> dict | None:
  """The last ``eval`` record at step ``steps`` in ``<path>/metrics.jsonl`` (a run trained by
  resnorm-train directly has no result.json), or None; the checkpoint average's record
  (split ``average``, resnorm_jax/averaging.py) at that step when there is one."""
  found = {}
  try:
    with storage.open(storage.join(path, "metrics.jsonl")) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:
          continue      # a line cut by a crash
        if record.get("split") in ("eval", "average") and record.get("step") == steps:
          found[record["split"]] = record
  except FileNotFoundError:
    return None
  return found.get("average") or found.get("eval")


def _last_checkpoint(path: str) -> int | None:
  ckpt = storage.join(path, "checkpoints")
  steps = [int(n) for n in storage.listdir(ckpt) if n.isdigit()]
  return max(steps) if steps else None


def read_run(path: str, metric: dict[str, Any]) -> dict[str, Any] | None:
  """The state of the run in ``path``: None (never started) or {"status": "completed" |
  "diverged" | "unfinished", "step", "steps", "value"}; ``value`` (``metric``, of
  :func:`metric_of`) only for a completed run."""
  result = read_json(storage.join(path, RESULT_FILE))
  if result is not None:
    return result
  saved = read_json(storage.join(path, CONFIG_FILE))
  if saved is None:
    return None
  steps = int(saved.get("train", {}).get("steps", 0))
  final = _final_eval_from_metrics(path, steps)
  if final is not None:
    return {"status": "completed", "step": steps, "steps": steps,
            "value": metric_value(final, metric)}
  return {"status": "unfinished", "step": _last_checkpoint(path), "steps": steps,
          "value": None}


def write_result(path: str, variant: str, seed: int, config, status: str,
                 summary: dict | None) -> dict[str, Any]:
  """``<path>/result.json`` of a completed or diverged run (what marks it finished).  With
  ``checkpoint.average_last`` the value is the averaged checkpoints' (as the papers report
  it), and ``eval`` holds that evaluation with its ``averaged_steps``."""
  metric = metric_of(config)
  ev = (summary or {}).get("average") or (summary or {}).get("eval") or {}
  plain = lambda v: v if isinstance(v, (str, list, tuple)) else float(v)
  result = {"variant": variant, "seed": seed, "status": status,
            "step": (summary or {}).get("step"), "steps": config.train.steps,
            "metric": metric["key"], "value": metric_value(ev, metric),
            "eval": {k: plain(v) for k, v in ev.items()}}
  storage.write_atomic(storage.join(path, RESULT_FILE), json.dumps(result, indent=2) + "\n")
  return result


def config_id(config_path: str) -> str:
  """What identifies an experiment config across machines: its file name."""
  return os.path.basename(config_path)


def sweep_config_path(workdir: str) -> str | None:
  """The config path recorded in ``workdir`` (sweep.json, or an older sweep's
  results.json), or None."""
  for name in (SWEEP_FILE, "results.json"):
    saved = read_json(storage.join(workdir, name))
    if isinstance(saved, dict) and saved.get("config"):
      return saved["config"]
  return None


def check_sweep_dir(workdir: str, config_path: str) -> None:
  """UsageError when ``workdir`` holds the runs of another experiment config."""
  recorded = sweep_config_path(workdir)
  if recorded and config_id(recorded) != config_id(config_path):
    raise UsageError(f"{workdir} holds a sweep of {recorded}, not of {config_path}; use "
                     "another --workdir (finished runs are never overwritten)")


def record_sweep(workdir: str, config_path: str) -> None:
  """``sweep.json``: the experiment config of the sweep in ``workdir`` (written once)."""
  if not storage.exists(storage.join(workdir, SWEEP_FILE)):
    storage.makedirs(workdir)
    storage.write_atomic(storage.join(workdir, SWEEP_FILE),
                         json.dumps({"config": config_path}, indent=2) + "\n")


def check_existing_run(path: str, config) -> dict | None:
  """The run in ``path`` if it may be kept or resumed with ``config``; UsageError when it was
  trained with another model or data, or finished with other settings."""
  from resnorm_jax import resume
  state = read_run(path, metric_of(config))
  if state is None:
    return None
  config_dict = config.to_dict()
  try:
    resume.check_config_compatible(path, config_dict)
  except ConfigError as e:
    first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
    raise UsageError(f"{path} holds a run of another config ({first}); use another "
                     "--workdir") from None
  if state["status"] != "unfinished":
    changes = resume.resume_changes(path, config_dict)
    if changes:
      raise UsageError(f"{path} finished with other settings ({changes[0]}); finished runs "
                       "are never retrained: use another --workdir or drop that override")
  return state


def plan_runs(workdir: str | None, variants: list[str], seeds: list[int],
              configs: dict) -> list[dict[str, Any]]:
  """Every (variant, seed) with its config, directory and state on disk (None: not started);
  UsageError for a run that may not be resumed or kept with these settings."""
  plan = []
  for variant in variants:
    for seed in seeds:
      config = configs[(variant, seed)]
      path = run_dir(workdir, variant, seed) if workdir else None
      state = check_existing_run(path, config) if path else None
      plan.append({"variant": variant, "seed": seed, "config": config, "workdir": path,
                   "state": state})
  return plan


def finished(entry) -> bool:
  """Whether a :func:`plan_runs` entry has finished (completed or diverged: kept)."""
  return entry["state"] is not None and entry["state"]["status"] != "unfinished"
