"""``resnorm-sweep``: the variants of an experiment config over seeds, and their table.

* :mod:`~resnorm_jax.sweep.cli`: the command (flags, the plan, ``main``; its docstring
  documents the command);
* :mod:`~resnorm_jax.sweep.runs`: the runs on disk (their directories, the legacy
  single-seed layout, each run's state and ``result.json``) and the task metric they report;
* :mod:`~resnorm_jax.sweep.results`: per-variant statistics rows, ``results.md``,
  ``results.json`` and the figure;
* :mod:`~resnorm_jax.sweep.stats`: the statistics (median, mean ± sd, Welch intervals);
* :mod:`~resnorm_jax.sweep.local`: training the runs here, one after another;
* :mod:`~resnorm_jax.sweep.submit`: SLURM job arrays and xpk JobSets instead.
"""

from resnorm_jax.sweep import local, results, runs, stats, submit
from resnorm_jax.sweep.cli import (baselines_of, main, parse_args, parse_seeds,
                                   resolve_config, run, select_variants, variants_of)
from resnorm_jax.sweep.local import run_one, train_run
from resnorm_jax.sweep.results import collect_rows, results_markdown, row_notes, write_results
from resnorm_jax.sweep.runs import (UsageError, find_runs, metric_of, metric_value, read_run,
                                    run_dir, write_result)
from resnorm_jax.sweep.submit import k8s_name, xpk_jobset

__all__ = ["UsageError", "baselines_of", "collect_rows", "find_runs", "k8s_name", "local",
           "main", "metric_of", "metric_value", "parse_args", "parse_seeds", "read_run",
           "resolve_config", "results", "results_markdown", "row_notes", "run", "run_dir",
           "run_one", "runs", "select_variants", "stats", "submit", "train_run",
           "variants_of", "write_result", "write_results", "xpk_jobset"]
