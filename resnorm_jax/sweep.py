"""``resnorm-sweep``: run the variants of an experiment config over seeds and tabulate them.

    resnorm-sweep --config=configs/he2016_units.py --variants=original_110,full_preact_110 \
        --seeds=5 --workdir=runs/table2 --config.train.steps=2000  # overrides: every run
    resnorm-sweep --config=configs/he2016_shortcuts.py --variants=all --seeds=0,1,2 \
        --workdir=/shared/runs/table1 --submit=slurm   # one job array, a task per run
    resnorm-sweep --workdir=/shared/runs/table1 --collect   # tabulate what has finished
    resnorm-sweep --config=configs/he2016_preact.py --variants=all --dry_run

Every (variant, seed) trains in ``<workdir>/<variant>/seed_<s>`` (``train.seed = s``) with
the engine of ``resnorm-train``.  A rerun resumes the unfinished runs and never retrains or
overwrites a finished one (it is kept, with its ``result.json``).  After each run the sweep
rewrites, from every run found on disk:

* ``results.md``: per variant n, median, mean ± sd of the final test error % (BLEU for
  translation), the published number and median − published, and the difference of means
  to the config's ``BASELINE`` variant with a 95% Welch interval (see
  :mod:`resnorm_jax.sweep_stats`), saying when the interval includes 0 and when the seeds
  are too few to resolve a difference the size of the published gap;
* ``results.json`` (the same, with every run) and ``results.png`` (each run a dot, the
  median a bar, the published number a diamond).

``--seeds=N`` runs seeds 0..N-1; ``--seeds=0,3,7`` (a comma list; ``--seeds=7,`` is the
single seed 7) the seeds named.  A directory of an earlier single-seed sweep
(``<workdir>/<variant>`` holding a run) stays readable: that run counts as the seed its
``config.json`` was trained with, and is resumed or kept in place.

``--submit=slurm`` writes ``<workdir>/slurm/tasks_<k>.json`` (one entry per unfinished run)
and ``submit_<k>.sh``, an ``sbatch --array`` of ``launch/slurm.sbatch`` whose task i runs
entry i (``--sweep_tasks=<file> --task_index=i``), and runs it where ``sbatch`` exists.
``--submit=xpk`` writes one JobSet per unfinished run, from ``launch/xpk_workload.yaml``,
into ``<workdir>/xpk/``.  ``--collect`` only tabulates (runs still going are listed).

``--dry_run`` validates every variant and prints the plan, writing nothing.  Exit codes
(``resnorm_jax/errors.py``): 0 done, 2 invalid flags, config, variant, seeds or sweep
directory (nothing trained), 4 a run's workdir is locked by another run (each run holds its
own lock), 5 storage failure, 70 internal error, 130 / 143 stopped by SIGINT / SIGTERM (the
results so far are written; rerun to resume).  A diverging run (exit 1 for resnorm-train) is
recorded in the table and the sweep goes on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from resnorm_jax import cli, errors, experiments, storage, sweep_stats
from resnorm_jax.errors import ConfigError, EXIT_USAGE, EXIT_PREEMPTED, EXIT_STORAGE, StorageError
OVERRIDE_PREFIX = "--config."
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_SCRIPT = os.path.join(PACKAGE_ROOT, "launch", "slurm.sbatch")
XPK_TEMPLATE = os.path.join(PACKAGE_ROOT, "launch", "xpk_workload.yaml")
SWEEP_FILE, RESULT_FILE, CONFIG_FILE = "sweep.json", "result.json", "config.json"
SEED_DIR = "seed_{}"
# sbatch options of every array task: one run on one GPU (edit with --sbatch_args).
DEFAULT_SBATCH_ARGS = "--nodes=1 --ntasks-per-node=1 --gpus-per-node=1"


class UsageError(Exception):
  """A bad flag, variant, seed list or sweep directory: one line, exit code 2."""


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------
def _sweep_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "Experiment config file (no ':variant'; use "
                      "--variants).  With --collect: default, the sweep's own.", flag_values=fv)
  flags.DEFINE_string("variants", "all", "Comma-separated variant names, or 'all'.",
                      flag_values=fv)
  flags.DEFINE_string("seeds", "1", "N (seeds 0..N-1) or a comma list of seeds "
                      "(e.g. 0,3,7; '7,' is the one seed 7).", flag_values=fv)
  flags.DEFINE_string("baseline", None, "Variant every other is compared with (default: "
                      "the config's BASELINE).", flag_values=fv)
  flags.DEFINE_string("workdir", None, "Sweep directory: <variant>/seed_<s> per run, "
                      "results.md, results.json, results.png.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Validate every variant and print the plan; train "
                    "and write nothing.", flag_values=fv)
  flags.DEFINE_bool("print_commands", False, "Print one resnorm-train command per run "
                    "instead of training.", flag_values=fv)
  flags.DEFINE_enum("submit", None, ["slurm", "xpk"], "Write (slurm: and submit, where "
                    "sbatch exists) cluster jobs, one per unfinished run, instead of "
                    "training.", flag_values=fv)
  flags.DEFINE_string("sbatch_args", DEFAULT_SBATCH_ARGS, "sbatch options of the job "
                      "array (resources of one run).", flag_values=fv)
  flags.DEFINE_bool("collect", False, "Tabulate the finished runs in --workdir; train "
                    "nothing.", flag_values=fv)
  flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"], "Multi-process runtime "
                    "of each run, as resnorm-train --distributed.", flag_values=fv)
  flags.DEFINE_string("sweep_tasks", None, "Run one task of a submitted job array: the "
                      "tasks_<k>.json written by --submit=slurm ...", flag_values=fv)
  flags.DEFINE_integer("task_index", None, "... and the task's index in it "
                       "(SLURM_ARRAY_TASK_ID).", flag_values=fv)
  return fv


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
  """(sweep flags, ``--config.<key>=<value>`` overrides) from ``argv[1:]``."""
  own, overrides = [], []
  args = iter(argv)
  for arg in args:
    if arg.startswith(OVERRIDE_PREFIX):
      if "=" not in arg:  # --config.key value
        value = next(args, None)
        if value is None:
          raise UsageError(f"{arg} needs a value")
        arg = f"{arg}={value}"
      overrides.append(arg)
    else:
      own.append(arg)
  return own, overrides


def parse_args(argv: list[str]) -> tuple[flags.FlagValues, list[str]]:
  own, overrides = split_overrides(argv[1:])
  fv = _sweep_flags()
  try:
    rest = fv([argv[0]] + own)
  except flags.Error as e:
    raise UsageError(str(e)) from None
  if len(rest) > 1:
    raise UsageError(f"unexpected arguments {rest[1:]}")
  if fv.sweep_tasks:
    if overrides or any(not a.startswith(("--sweep_tasks", "--task_index")) for a in own):
      raise UsageError("--sweep_tasks takes only --task_index: the rest of the run is in "
                       "the tasks file")
    return fv, overrides
  modes = [m for m in ("dry_run", "print_commands", "collect") if fv[m].value]
  modes += ["submit"] if fv.submit else []
  if len(modes) > 1:
    raise UsageError(f"--{' and --'.join(modes)} exclude each other; give one")
  if fv.collect:
    extra = [f"--{n}" for n in ("variants", "seeds", "dry_run", "sbatch_args")
             if fv[n].present]
    if extra:
      raise UsageError(f"--collect tabulates every run in --workdir; drop {', '.join(extra)}")
  if not fv.config and not fv.collect:
    raise UsageError("--config=<experiment config file> is required")
  if fv.config and ":" in os.path.basename(fv.config):
    raise UsageError(f"--config={fv.config}: name the variants with --variants, not ':'")
  if not fv.workdir and not fv.dry_run:
    raise UsageError("--workdir is required")
  if any(o.split("=", 1)[0] == "--config.train.seed" for o in overrides):
    raise UsageError("--config.train.seed: a sweep sets the seed of each run; give the "
                     "seeds with --seeds (e.g. --seeds=5, for seed 5)")
  return fv, overrides


def parse_seeds(spec: str) -> list[int]:
  """``N`` -> [0, ..., N-1]; ``a,b,c`` (or ``a,``) -> those seeds; one-line errors for
  anything else, negative seeds and duplicates."""
  text = spec.strip()
  if re.fullmatch(r"\d+", text):
    if int(text) < 1:
      raise UsageError(f"--seeds={spec}: run at least one seed (--seeds=1, or a list "
                       "such as --seeds=0,1,2)")
    return list(range(int(text)))
  parts = [p.strip() for p in text.split(",")]
  if parts and parts[-1] == "":
    parts = parts[:-1]
  if not parts or not all(re.fullmatch(r"\d+", p) for p in parts):
    raise UsageError(f"--seeds={spec} is neither a count nor a comma list of seeds "
                     ">= 0; e.g. --seeds=3 or --seeds=0,1,2")
  seeds = [int(p) for p in parts]
  duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
  if duplicates:
    raise UsageError(f"--seeds={spec} names seed{'s' if len(duplicates) > 1 else ''} "
                     f"{', '.join(map(str, duplicates))} twice; list each seed once")
  return seeds


def select_variants(module, spec: str, config_path: str) -> list[str]:
  """The variants named by ``spec`` ('all' or a comma list), checked against VARIANTS."""
  valid = variants_of(module, config_path)
  names = list(valid) if spec.strip() == "all" else [
      v.strip() for v in spec.split(",") if v.strip()]
  unknown = [v for v in names if v not in valid]
  if unknown or not names:
    raise UsageError(f"unknown variant{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(map(repr, unknown)) or repr(spec)} of {config_path}; "
                     f"valid: {', '.join(valid)} (or all)")
  return list(dict.fromkeys(names))


def variants_of(module, config_path: str) -> tuple[str, ...]:
  valid = tuple(getattr(module, "VARIANTS", ()))
  if not valid:
    raise UsageError(f"{config_path} defines no VARIANTS tuple, so it is not a sweepable "
                     "experiment config")
  return valid


def baselines_of(module, config_path: str, override: str | None) -> dict[str, str]:
  """{variant: the variant it is compared with} from ``--baseline`` or the config's
  ``BASELINE`` (one variant name, or a dict variant -> baseline variant); {} = none."""
  valid = variants_of(module, config_path)
  spec = override if override else getattr(module, "BASELINE", None)
  if spec is None:
    return {}
  mapping = {v: spec for v in valid} if isinstance(spec, str) else dict(spec)
  bad = sorted({b for b in mapping.values() if b not in valid})
  if bad:
    where = "--baseline" if override else f"BASELINE of {config_path}"
    raise UsageError(f"{where}: unknown variant {', '.join(map(repr, bad))}; valid: "
                     f"{', '.join(valid)}")
  return mapping


def resolve_config(config_path: str, variant: str, overrides: list[str], seed: int = 0):
  """The variant's config with the overrides applied exactly as resnorm-train applies them,
  and ``train.seed = seed``."""
  fv = flags.FlagValues()
  argv = ["resnorm-sweep", f"--config={config_path}:{variant}"] + overrides
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  fv(argv)
  config = holder.value
  config.train.seed = seed
  return config


def train_command(config_path: str, variant: str, seed: int, run_dir: str,
                  overrides: list[str]) -> str:
  args = ["resnorm-train", f"--config={config_path}:{variant}", f"--workdir={run_dir}",
          f"--config.train.seed={seed}"] + overrides
  return " ".join(shlex.quote(a) for a in args)


# ----------------------------------------------------------------------------------------
# The metric of a config: test error % (images) or BLEU (translation).
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


def metric_value(eval_metrics: dict | None, key: str) -> float | None:
  """The table's number from an evaluation: 100 · error, or BLEU."""
  if not eval_metrics or key not in eval_metrics:
    return None
  value = float(eval_metrics[key])
  return 100.0 * value if key == "error" else value


# ----------------------------------------------------------------------------------------
# Runs on disk.
# ----------------------------------------------------------------------------------------
def _read_json(path: str) -> Any:
  try:
    return json.loads(storage.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError) as e:
    raise UsageError(f"{path} is unreadable ({e}); restore or remove it") from None


def _write_atomic(path: str, text: str | bytes) -> None:
  """Writes ``path`` through a temporary file and a rename (concurrent array tasks; on a
  bucket one upload, atomic there)."""
  storage.write_atomic(path, text)


def _saved_seed(path: str) -> int | None:
  saved = _read_json(storage.join(path, CONFIG_FILE))
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


def read_run(path: str, metric_key: str) -> dict[str, Any] | None:
  """The state of the run in ``path``: None (never started) or {"status": "completed" |
  "diverged" | "unfinished", "step", "steps", "value"}; ``value`` (the metric) only for a
  completed run."""
  result = _read_json(storage.join(path, RESULT_FILE))
  if result is not None:
    return result
  saved = _read_json(storage.join(path, CONFIG_FILE))
  if saved is None:
    return None
  steps = int(saved.get("train", {}).get("steps", 0))
  final = _final_eval_from_metrics(path, steps)
  if final is not None:
    return {"status": "completed", "step": steps, "steps": steps,
            "value": metric_value(final, metric_key)}
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
            "metric": metric["key"], "value": metric_value(ev, metric["key"]),
            "eval": {k: plain(v) for k, v in ev.items()}}
  _write_atomic(storage.join(path, RESULT_FILE), json.dumps(result, indent=2) + "\n")
  return result


def _config_id(config_path: str) -> str:
  """What identifies an experiment config across machines: its file name."""
  return os.path.basename(config_path)


def sweep_config_path(workdir: str) -> str | None:
  """The config path recorded in ``workdir`` (sweep.json, or an older sweep's
  results.json), or None."""
  for name in (SWEEP_FILE, "results.json"):
    saved = _read_json(storage.join(workdir, name))
    if isinstance(saved, dict) and saved.get("config"):
      return saved["config"]
  return None


def check_sweep_dir(workdir: str, config_path: str) -> None:
  """UsageError when ``workdir`` holds the runs of another experiment config."""
  recorded = sweep_config_path(workdir)
  if recorded and _config_id(recorded) != _config_id(config_path):
    raise UsageError(f"{workdir} holds a sweep of {recorded}, not of {config_path}; use "
                     "another --workdir (finished runs are never overwritten)")


def record_sweep(workdir: str, config_path: str) -> None:
  if not storage.exists(storage.join(workdir, SWEEP_FILE)):
    storage.makedirs(workdir)
    _write_atomic(storage.join(workdir, SWEEP_FILE),
                  json.dumps({"config": config_path}, indent=2) + "\n")


def check_existing_run(path: str, config, metric_key: str) -> dict | None:
  """The run in ``path`` if it may be kept or resumed with ``config``; UsageError when it was
  trained with another model or data, or finished with other settings."""
  from resnorm_jax import checkpointing, resume
  state = read_run(path, metric_key)
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


# ----------------------------------------------------------------------------------------
# Results: per-variant statistics, the table, the figure.
# ----------------------------------------------------------------------------------------
def collect_rows(workdir: str, configs: dict, order: tuple[str, ...],
                 baselines: dict[str, str]) -> list[dict[str, Any]]:
  """One row per variant with runs on disk (in ``order``): its runs, statistics of the
  completed ones, and the comparison with its baseline.  ``configs``: variant -> config
  (published numbers, metric)."""
  rows = {}
  for variant in order:
    runs = find_runs(workdir, variant)
    if not runs:
      continue
    metric = metric_of(configs[variant])
    states = []
    for seed, path in runs.items():
      state = read_run(path, metric["key"]) or {"status": "unfinished", "step": None,
                                                "steps": None, "value": None}
      states.append({"seed": seed, "workdir": path, "status": state["status"],
                     "step": state.get("step"), "steps": state.get("steps"),
                     "value": state.get("value")})
    values = [s["value"] for s in states if s["status"] == "completed"
              and s["value"] is not None]
    stats = sweep_stats.summarize(values)
    published = metric["published"]
    published_cfg = configs[variant].published
    rows[variant] = {
        "variant": variant, "metric": metric["key"], "label": metric["label"],
        "runs": states,
        "seeds": [s["seed"] for s in states if s["status"] == "completed"],
        "values": values, **stats,
        "steps": sorted({s["steps"] for s in states if s["steps"] is not None}),
        "published": published, "published_source": published_cfg.source,
        "published_note": published_cfg.note,
        "median_minus_published": (stats["median"] - published
                                   if values and published is not None else None),
        "diverged": [s["seed"] for s in states if s["status"] == "diverged"],
        "unfinished": [s["seed"] for s in states if s["status"] == "unfinished"],
    }
  for variant, row in rows.items():
    base = baselines.get(variant)
    row["baseline"] = base
    if base is None or base == variant or base not in rows:
      row["comparison"] = None
      continue
    gap = (row["published"] - rows[base]["published"]
           if row["published"] is not None and rows[base]["published"] is not None else None)
    row["comparison"] = sweep_stats.compare(row["values"], rows[base]["values"], gap)
  return list(rows.values())


def _num(value, signed=False) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:+.2f}" if signed else f"{value:.2f}"


def _seed_list(seeds) -> str:
  return ", ".join(map(str, seeds))


def comparison_cell(row: dict) -> str:
  """``+0.31 [−0.12, +0.74] ∘`` (∘: the interval includes 0), ``baseline``, or why not."""
  if row["baseline"] is None:
    return ""
  if row["baseline"] == row["variant"]:
    return "baseline"
  c = row["comparison"]
  if c is None:
    return f"– ({row['baseline']} not run)"
  ci = c["interval"]
  if ci is None:
    return "– (n < 2)"
  return (f"{ci['difference']:+.2f} [{ci['low']:+.2f}, {ci['high']:+.2f}]"
          + (" ∘" if c["includes_zero"] else ""))


def row_notes(row: dict) -> list[str]:
  """The notes of a row: too few seeds, diverged and unfinished runs, the published note."""
  notes = []
  c = row["comparison"]
  if c is not None and c["interval"] is None and c["published_gap"] is not None:
    notes.append("too few seeds for an interval (needs n ≥ 2 on both sides)")
  elif c is not None and c["resolvable"] is False:
    half, gap = c["interval"]["half_width"], c["published_gap"]
    needed = c["seeds_needed"]
    enough = (f"≈ {needed} seeds per variant would" if needed else
              f"more than {sweep_stats.MAX_SEEDS} seeds per variant would be needed")
    notes.append(f"too few seeds to resolve a difference the size of the published gap "
                 f"{gap:+.2f} (interval ±{half:.2f}); {enough}")
  if row["diverged"]:
    notes.append(f"diverged: seed {_seed_list(row['diverged'])}")
  if row["unfinished"]:
    notes.append(f"not finished (running or stopped): seed {_seed_list(row['unfinished'])}")
  if row["published_note"]:
    notes.append(row["published_note"])
  return notes


def results_markdown(config_path: str, rows: list[dict[str, Any]]) -> str:
  """The Markdown results table (see the module docstring)."""
  label = rows[0]["label"] if rows else "test error %"
  sources = sorted({r["published_source"] for r in rows if r["published_source"]})
  baselines = {r["baseline"] for r in rows if r["baseline"]}
  versus = (f"Δ mean vs {next(iter(baselines))} [95% CI]" if len(baselines) == 1
            else "Δ mean vs baseline [95% CI]")
  lines = [
      f"# Sweep results: {config_path}", "",
      f"Final {label} over seeds (n: finished runs).", "",
      f"| variant | n | steps | median | mean ± sd | published | median − published | "
      f"{versus} | published Δ | notes |",
      "|---|---:|---:|---:|---:|---:|---:|---|---:|---|",
  ]
  for r in rows:
    mean_sd = (f"{r['mean']:.2f} ± {_num(r['sd'])}" if r["n"] else "–")
    c = r["comparison"]
    versus_cell = comparison_cell(r)
    if len(baselines) > 1 and r["baseline"] and r["baseline"] != r["variant"]:
      versus_cell = f"vs {r['baseline']}: {versus_cell}"
    lines.append(
        f"| {r['variant']} | {r['n']} | {'/'.join(map(str, r['steps'])) or '–'} | "
        f"{_num(r['median']) if r['n'] else '–'} | {mean_sd} | {_num(r['published'])} | "
        f"{_num(r['median_minus_published'], signed=True)} | {versus_cell} | "
        f"{_num(c['published_gap'] if c else None, signed=True)} | "
        f"{'; '.join(row_notes(r))} |")
  lines += [
      "",
      "median − published: our median minus the published number.  Δ mean: mean(variant) − "
      "mean(baseline) with a 95% Welch t interval (resnorm_jax/sweep_stats.py); ∘ marks an "
      "interval that includes 0.  Published Δ: the same difference in the paper; a gap is "
      "too small for the seeds run when the interval's half-width reaches it.",
  ]
  if sources:
    lines.append("Published numbers: " + "; ".join(sources) + ".")
  return "\n".join(lines) + "\n"


def write_results(workdir: str, config_path: str, overrides: list[str], rows: list[dict],
                  figure: bool = True) -> str:
  """Writes results.json, results.md and (``figure``) results.png; returns the table."""
  from resnorm_jax.analysis import plots
  table = results_markdown(config_path, rows)
  storage.makedirs(workdir)
  _write_atomic(storage.join(workdir, "results.json"), json.dumps(
      {"config": config_path, "overrides": overrides, "rows": rows}, indent=2) + "\n")
  _write_atomic(storage.join(workdir, "results.md"), table)
  if figure and any(r["n"] for r in rows):
    plots.sweep_figure(rows, workdir, title=f"{_config_id(config_path)} "
                       f"({'BLEU' if rows[0]['metric'] == 'bleu' else 'test error %'})")
  return table


# ----------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------
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


def plan_runs(workdir: str, variants: list[str], seeds: list[int], configs: dict,
              overrides: list[str], config_path: str) -> list[dict[str, Any]]:
  """Every (variant, seed) with its config, directory and state on disk (None: not started);
  UsageError for a run that may not be resumed or kept with these settings."""
  plan = []
  for variant in variants:
    for seed in seeds:
      config = configs[(variant, seed)]
      path = run_dir(workdir, variant, seed) if workdir else None
      state = (check_existing_run(path, config, metric_of(config)["key"])
               if path else None)
      plan.append({"variant": variant, "seed": seed, "config": config, "workdir": path,
                   "state": state})
  return plan


def _finished(entry) -> bool:
  return entry["state"] is not None and entry["state"]["status"] != "unfinished"


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
            + (f" ({entry['state']['status']}: kept)" if _finished(entry) else ""),
            flush=True)
    if _finished(entry):
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


# ----------------------------------------------------------------------------------------
# Cluster submission.
# ----------------------------------------------------------------------------------------
def describe_model(c) -> str:
  """The model settings a variant changes, for the --dry_run plan."""
  from resnorm_jax import models
  keys = models.family(c).title_keys
  return f"model={c.model.name} " + " ".join(
      f"{k}={c.model[k]:g}" if isinstance(c.model[k], float) else f"{k}={c.model[k]}"
      for k in keys if c.model[k] is not None)


def _task_argv(config_path: str, workdir: str, variant: str, seed: int,
               overrides: list[str], distributed: str) -> list[str]:
  return [f"--config={config_path}", f"--workdir={workdir}", f"--variants={variant}",
          f"--seeds={seed},", f"--distributed={distributed}"] + overrides


def submit_slurm(config_path: str, workdir: str, todo: list[dict], overrides: list[str],
                 sbatch_args: str) -> int:
  """Writes ``<workdir>/slurm/tasks_<k>.json`` and ``submit_<k>.sh`` (k: the first unused
  number; an sbatch job array of launch/slurm.sbatch, one task per run in ``todo``) and
  runs it where sbatch exists."""
  slurm_dir = _submission_dir(workdir, "slurm")
  os.makedirs(slurm_dir, exist_ok=True)
  config_abs, workdir_abs = os.path.abspath(config_path), storage.abspath(workdir)
  tasks = [{"variant": e["variant"], "seed": e["seed"],
            "argv": _task_argv(config_abs, workdir_abs, e["variant"], e["seed"], overrides,
                               "auto")} for e in todo]
  # A new file per submission: tasks of an earlier array still queued keep reading theirs.
  number = 0
  while True:
    tasks_path = os.path.join(slurm_dir, f"tasks_{number}.json")
    try:
      fd = os.open(tasks_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      number += 1
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps({"config": config_abs, "tasks": tasks}, indent=2) + "\n")
  name = "sweep-" + os.path.splitext(_config_id(config_path))[0]
  command = (["sbatch", f"--array=0-{len(tasks) - 1}", f"--job-name={name}",
              f"--output={os.path.join(slurm_dir, '%A_%a.out')}"]
             + shlex.split(sbatch_args) + [SLURM_SCRIPT, f"--sweep_tasks={tasks_path}"])
  script = os.path.join(slurm_dir, f"submit_{number}.sh")
  _write_atomic(script, "#!/usr/bin/env bash\n# Written by resnorm-sweep --submit=slurm: "
                f"{len(tasks)} runs, one array task each.\nset -euo pipefail\ncd "
                f"{shlex.quote(PACKAGE_ROOT)}\n" + shlex.join(command) + "\n")
  os.chmod(script, 0o755)
  print(f"resnorm-sweep: {len(tasks)} array tasks in {tasks_path}")
  if shutil.which("sbatch") is None:
    print(f"resnorm-sweep: no sbatch here; submit on the cluster with: bash {script}")
    return 0
  done = subprocess.run(["bash", script], check=False)
  if done.returncode != 0:
    print(f"resnorm-sweep: error: sbatch failed (exit {done.returncode}); fix and run "
          f"bash {script}", file=sys.stderr)
    return EXIT_USAGE
  print(f"resnorm-sweep: submitted; tabulate with resnorm-sweep --workdir={workdir} "
        "--collect")
  return 0


def k8s_name(*parts: str) -> str:
  """A JobSet name (DNS label: lowercase letters, digits and '-', at most 63 characters)."""
  name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
  if len(name) > 63:   # cut, with a hash of the whole name so that cut names stay distinct
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    name = f"{name[:54].rstrip('-')}-{digest}"
  return name


def xpk_jobset(template: str, name: str, args: list[str]) -> str:
  """``template`` (launch/xpk_workload.yaml) with metadata.name ``name``, the container
  running ``resnorm-sweep`` and its ``args``."""
  lines, out, i = template.splitlines(), [], 0
  while i < len(lines):
    line = lines[i]
    if re.match(r"^  name: ", line):
      out.append(f"  name: {name}")
    elif re.match(r"^\s+command: ", line):
      out.append(re.sub(r"command: .*", 'command: ["resnorm-sweep"]', line))
    elif re.match(r"^\s+args:\s*$", line):
      indent = len(line) - len(line.lstrip()) + 2
      out.append(line)
      out += [" " * indent + "- " + json.dumps(a) for a in args]
      i += 1
      while i < len(lines) and lines[i].strip().startswith("- "):
        i += 1
      continue
    else:
      out.append(line)
    i += 1
  return "\n".join(out) + "\n"


def _submission_dir(workdir: str, kind: str) -> str:
  """Where the files a scheduler reads go: ``<workdir>/<kind>``, or for a bucket workdir
  (``kubectl`` and ``sbatch`` read local files) ``runs/<kind>/<bucket>/<path>`` here."""
  if storage.is_url(workdir):
    return os.path.abspath(os.path.join("runs", kind, workdir.split("://", 1)[1]))
  return os.path.join(os.path.abspath(workdir), kind)


def submit_xpk(config_path: str, workdir: str, todo: list[dict], overrides: list[str]) -> int:
  """Writes one JobSet per run in ``todo`` into ``<workdir>/xpk/``."""
  with open(XPK_TEMPLATE) as f:
    template = f.read()
  xpk_dir = _submission_dir(workdir, "xpk")
  os.makedirs(xpk_dir, exist_ok=True)
  config_rel = os.path.relpath(os.path.abspath(config_path), PACKAGE_ROOT)
  config_arg = config_rel if not config_rel.startswith("..") else config_path
  stem = os.path.splitext(_config_id(config_path))[0]
  for e in todo:
    name = k8s_name("resnorm", stem, e["variant"], f"s{e['seed']}")
    text = xpk_jobset(template, name, _task_argv(config_arg, workdir, e["variant"],
                                                 e["seed"], overrides, "on"))
    _write_atomic(storage.join(xpk_dir, f"{e['variant']}-seed{e['seed']}.yaml"), text)
  print(f"resnorm-sweep: {len(todo)} JobSets in {xpk_dir}; submit with kubectl apply -f "
        f"{xpk_dir}, tabulate with resnorm-sweep --workdir={workdir} --collect")
  return 0


# ----------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------
def task_argv(tasks_path: str, index: int | None) -> list[str]:
  """The argv of task ``index`` of a tasks_<k>.json written by --submit=slurm."""
  saved = _read_json(tasks_path)
  if saved is None:
    raise UsageError(f"--sweep_tasks={tasks_path}: no such file; resubmit with "
                     "resnorm-sweep --submit=slurm")
  tasks = saved.get("tasks", [])
  if index is None or not 0 <= index < len(tasks):
    raise UsageError(f"--task_index={index} is not a task of {tasks_path} (0..{len(tasks) - 1});"
                     " set it to SLURM_ARRAY_TASK_ID")
  return ["resnorm-sweep"] + tasks[index]["argv"]


def _resolve_all(config_path, variants, seeds, overrides, num_devices) -> dict:
  from resnorm_jax import config as config_lib
  from resnorm_jax import validation
  configs = {}
  for variant in variants:
    try:
      config = resolve_config(config_path, variant, overrides, seeds[0])
      validation.validate(config, num_devices)
      for seed in seeds:
        configs[(variant, seed)] = copy.deepcopy(config)
        configs[(variant, seed)].train.seed = seed
    except Exception as e:  # pylint: disable=broad-except  (one line per bad variant)
      raise UsageError(f"variant {variant}: {cli.describe_error(e)}") from None
  return configs


def collect(fv, overrides: list[str]) -> int:
  """--collect: tabulates the runs in --workdir."""
  workdir = fv.workdir
  config_path = fv.config or sweep_config_path(workdir)
  if config_path is None:
    raise UsageError(f"no runs in {workdir} (no {SWEEP_FILE}); give the sweep directory "
                     "of an earlier resnorm-sweep, or --config")
  check_sweep_dir(workdir, config_path)
  module = experiments.load_config_module(config_path)
  order = variants_of(module, config_path)
  present = [v for v in order if find_runs(workdir, v)]
  if not present:
    raise UsageError(f"no runs in {workdir} (no <variant>/seed_<s> of {config_path}); "
                     "start them with resnorm-sweep or check --workdir")
  configs = {v: resolve_config(config_path, v, overrides) for v in present}
  rows = collect_rows(workdir, configs, order, baselines_of(module, config_path, fv.baseline))
  print(write_results(workdir, config_path, overrides, rows))
  return 0


def main(argv: list[str]) -> int:
  """Runs the sweep for ``argv``; returns the exit code (errors: one line, code 2)."""
  try:
    fv, overrides = parse_args(argv)
    if fv.sweep_tasks:
      return main(task_argv(fv.sweep_tasks, fv.task_index))
    if fv.collect:
      return collect(fv, overrides)
    config_path = fv.config
    module = experiments.load_config_module(config_path)
    variants = select_variants(module, fv.variants, config_path)
    seeds = parse_seeds(fv.seeds)
    order = variants_of(module, config_path)
    baselines = baselines_of(module, config_path, fv.baseline)
    from resnorm_jax import config as config_lib  # imports jax: after the flags are valid
    from resnorm_jax import validation
    from resnorm_jax import workdir as workdir_lib
    workdir_lib.check_not_url(fv.workdir, "--workdir")
    if fv.workdir:
      check_sweep_dir(fv.workdir, config_path)
    if fv.workdir and not (fv.print_commands or fv.dry_run):
      from resnorm_jax import workdir as workdir_lib
      workdir_lib.check_workdir(fv.workdir, parent_must_exist=True)
    if fv.print_commands:
      for variant in variants:
        for seed in seeds:
          print(train_command(config_path, variant, seed,
                              run_dir(fv.workdir, variant, seed), overrides))
      return 0
    training_here = not (fv.dry_run or fv.submit)
    if training_here:
      from resnorm_jax import parallelism
      try:
        parallelism.initialize_distributed(fv.distributed)
      except ValueError as e:
        raise UsageError(str(e)) from None
    import jax
    configs = _resolve_all(config_path, variants, seeds, overrides, jax.device_count())
    plan = plan_runs(fv.workdir, variants, seeds, configs, overrides, config_path)
  except (UsageError, ConfigError) as e:
    print(f"resnorm-sweep: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except StorageError as e:   # reading the sweep's workdir (a failing store)
    print(f"resnorm-sweep: error: {e}", file=sys.stderr)
    return EXIT_STORAGE
  if fv.dry_run:
    for variant in variants:
      c = configs[(variant, seeds[0])]
      entries = [e for e in plan if e["variant"] == variant]
      where = "".join(
          f"\n  seed {e['seed']} -> {e['workdir']}"
          + (f" ({e['state']['status']}: kept)" if _finished(e) else
             " (resumes)" if e["state"] else "") for e in entries if e["workdir"])
      print(f"{variant}: {describe_model(c)} data={c.data.name} steps={c.train.steps} "
            f"published={_num(metric_of(c)['published'])} seeds={_seed_list(seeds)}"
            + where)
    return 0
  todo = [e for e in plan if not _finished(e)]
  if fv.submit:
    kept = len(plan) - len(todo)
    if kept:
      print(f"resnorm-sweep: {kept} finished run{'s' if kept > 1 else ''} kept")
    if not todo:
      print("resnorm-sweep: every run has finished; nothing to submit")
      return 0
    record_sweep(fv.workdir, config_path)
    if fv.submit == "slurm":
      return submit_slurm(config_path, fv.workdir, todo, overrides, fv.sbatch_args)
    return submit_xpk(config_path, fv.workdir, todo, overrides)
  logging.set_verbosity(logging.WARNING)
  all_configs = {v: configs.get((v, seeds[0])) or resolve_config(config_path, v, overrides)
                 for v in order if v in variants or find_runs(fv.workdir, v)}
  cli.set_prog("resnorm-sweep")
  return cli.run_guarded(lambda: sweep(config_path, plan, fv.workdir, overrides, order,
                                       baselines, all_configs), fv.workdir)


def run():
  cli.exit_promptly(lambda: sys.exit(main(sys.argv)))


if __name__ == "__main__":
  run()
