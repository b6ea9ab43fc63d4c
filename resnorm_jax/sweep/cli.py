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

* ``results.md``: per variant n, median, mean ± sd of the final value of the task's metric
  (its headline metric as the task shows it: test error % for images, BLEU for
  translation), the published number and median − published, and the difference of means
  to the config's ``BASELINE`` variant with a 95% Welch interval (see
  :mod:`resnorm_jax.sweep.stats`), saying when the interval includes 0 and when the seeds
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
import os
import re
import shlex
import sys

from absl import flags, logging
from ml_collections import config_flags

from resnorm_jax import cli, experiments
from resnorm_jax.errors import ConfigError, EXIT_STORAGE, EXIT_USAGE, StorageError
from resnorm_jax.sweep import local, submit
from resnorm_jax.sweep.results import collect_rows, format_number, seed_list, write_results
from resnorm_jax.sweep.runs import (SWEEP_FILE, UsageError, check_sweep_dir, find_runs,
                                    finished, metric_of, plan_runs, record_sweep, run_dir,
                                    sweep_config_path)

OVERRIDE_PREFIX = "--config."


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
  flags.DEFINE_string("sbatch_args", submit.DEFAULT_SBATCH_ARGS, "sbatch options of the job "
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


def describe_model(c) -> str:
  """The model settings a variant changes, for the --dry_run plan."""
  from resnorm_jax import models
  keys = models.family(c).title_keys
  values = {k: c.model.get(k) for k in keys}
  return f"model={c.model.name} " + " ".join(
      f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
      for k, v in values.items() if v is not None)


def _resolve_all(config_path, variants, seeds, overrides, num_devices) -> dict:
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
      return main(submit.task_argv(fv.sweep_tasks, fv.task_index))
    if fv.collect:
      return collect(fv, overrides)
    config_path = fv.config
    module = experiments.load_config_module(config_path)
    variants = select_variants(module, fv.variants, config_path)
    seeds = parse_seeds(fv.seeds)
    order = variants_of(module, config_path)
    baselines = baselines_of(module, config_path, fv.baseline)
    from resnorm_jax import workdir as workdir_lib  # imports jax: after the flags are valid
    workdir_lib.check_not_url(fv.workdir, "--workdir")
    if fv.workdir:
      check_sweep_dir(fv.workdir, config_path)
    if fv.workdir and not (fv.print_commands or fv.dry_run):
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
    plan = plan_runs(fv.workdir, variants, seeds, configs)
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
          + (f" ({e['state']['status']}: kept)" if finished(e) else
             " (resumes)" if e["state"] else "") for e in entries if e["workdir"])
      print(f"{variant}: {describe_model(c)} data={c.data.name} steps={c.train.steps} "
            f"published={format_number(metric_of(c)['published'])} seeds={seed_list(seeds)}"
            + where)
    return 0
  todo = [e for e in plan if not finished(e)]
  if fv.submit:
    kept = len(plan) - len(todo)
    if kept:
      print(f"resnorm-sweep: {kept} finished run{'s' if kept > 1 else ''} kept")
    if not todo:
      print("resnorm-sweep: every run has finished; nothing to submit")
      return 0
    record_sweep(fv.workdir, config_path)
    if fv.submit == "slurm":
      return submit.submit_slurm(config_path, fv.workdir, todo, overrides, fv.sbatch_args)
    return submit.submit_xpk(config_path, fv.workdir, todo, overrides)
  logging.set_verbosity(logging.WARNING)
  all_configs = {v: configs.get((v, seeds[0])) or resolve_config(config_path, v, overrides)
                 for v in order if v in variants or find_runs(fv.workdir, v)}
  cli.set_prog("resnorm-sweep")
  return cli.run_guarded(lambda: local.sweep(config_path, plan, fv.workdir, overrides, order,
                                             baselines, all_configs), fv.workdir)


def run():
  cli.exit_promptly(lambda: sys.exit(main(sys.argv)))


if __name__ == "__main__":
  run()
