"""A sweep's results: per-variant statistics rows, the Markdown table, the figure.

From every run on disk (:mod:`resnorm_jax.sweep.runs`), :func:`collect_rows` makes one row
per variant: its runs, the median and mean ± sd of the completed ones' metric
(:mod:`resnorm_jax.sweep.stats`), the published number, and the difference of means to the
variant's baseline with a 95% Welch interval.  :func:`write_results` writes ``results.json``,
``results.md`` and ``results.png`` (:func:`resnorm_jax.analysis.plots.sweep_figure`); the
metric's label (the task's, e.g. "test error %", "test BLEU") titles the table and the
figure.
"""

from __future__ import annotations

import json
import math
from typing import Any

from resnorm_jax import storage
from resnorm_jax.sweep import stats as sweep_stats
from resnorm_jax.sweep.runs import config_id, find_runs, metric_of, read_run


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
      state = read_run(path, metric) or {"status": "unfinished", "step": None,
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


def format_number(value, signed=False) -> str:
  """A table cell: two decimals (``signed``: with its sign), "–" for none."""
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:+.2f}" if signed else f"{value:.2f}"


def seed_list(seeds) -> str:
  """``0, 3, 7``."""
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
    notes.append(f"diverged: seed {seed_list(row['diverged'])}")
  if row["unfinished"]:
    notes.append(f"not finished (running or stopped): seed {seed_list(row['unfinished'])}")
  if row["published_note"]:
    notes.append(row["published_note"])
  return notes


def results_markdown(config_path: str, rows: list[dict[str, Any]]) -> str:
  """The Markdown results table (see the module docstring)."""
  label = rows[0]["label"] if rows else "metric"
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
    mean_sd = (f"{r['mean']:.2f} ± {format_number(r['sd'])}" if r["n"] else "–")
    c = r["comparison"]
    versus_cell = comparison_cell(r)
    if len(baselines) > 1 and r["baseline"] and r["baseline"] != r["variant"]:
      versus_cell = f"vs {r['baseline']}: {versus_cell}"
    lines.append(
        f"| {r['variant']} | {r['n']} | {'/'.join(map(str, r['steps'])) or '–'} | "
        f"{format_number(r['median']) if r['n'] else '–'} | {mean_sd} | "
        f"{format_number(r['published'])} | "
        f"{format_number(r['median_minus_published'], signed=True)} | {versus_cell} | "
        f"{format_number(c['published_gap'] if c else None, signed=True)} | "
        f"{'; '.join(row_notes(r))} |")
  lines += [
      "",
      "median − published: our median minus the published number.  Δ mean: mean(variant) − "
      "mean(baseline) with a 95% Welch t interval (resnorm_jax/sweep/stats.py); ∘ marks an "
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
  storage.write_atomic(storage.join(workdir, "results.json"), json.dumps(
      {"config": config_path, "overrides": overrides, "rows": rows}, indent=2) + "\n")
  storage.write_atomic(storage.join(workdir, "results.md"), table)
  if figure and any(r["n"] for r in rows):
    plots.sweep_figure(rows, workdir, title=f"{config_id(config_path)} ({rows[0]['label']})")
  return table
