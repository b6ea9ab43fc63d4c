"""``resnorm-sweep``: run the variants of an experiment config and tabulate them.

    resnorm-sweep --config=configs/he2016_shortcuts.py --variants=identity,constant_0.5_1 \
        --workdir=runs/table1 --config.train.steps=2000      # overrides apply to every variant
    resnorm-sweep --config=configs/he2016_units.py --variants=all --workdir=runs/t2 --dry_run
    resnorm-sweep --config=configs/he2016_preact.py --variants=all --workdir=/mnt/b/preact \
        --print_commands                                     # one resnorm-train line each

Each variant trains in ``<workdir>/<variant>`` with the same engine as ``resnorm-train``
(a rerun resumes every unfinished variant from its newest checkpoint and re-evaluates the
finished ones).  After each variant, ``<workdir>/results.md`` (a Markdown table: variant,
steps, final test error, the published error and the difference) and ``results.json`` are
rewritten; rows of variants run by earlier invocations on the same workdir are kept.

``--dry_run`` resolves and validates every variant's config and prints the plan, writing
nothing.  Exit codes (``resnorm_jax/errors.py``): 0 done, 2 invalid flags, config, variant
name or workdir (nothing trained), 4 a variant's workdir is locked by another run, 5
storage failure, 70 internal error, 130 / 143 stopped by SIGINT / SIGTERM (the results so
far are written; rerun to resume).  A diverging variant (exit 1 for resnorm-train) is
recorded in the table and the sweep goes on.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import sys
from typing import Any

from absl import flags, logging
from ml_collections import config_flags

from resnorm_jax import errors, experiments
from resnorm_jax.errors import ConfigError, EXIT_USAGE, EXIT_PREEMPTED
OVERRIDE_PREFIX = "--config."


class UsageError(Exception):
  """A bad flag or variant: reported as one line, exit code 2."""


# ----------------------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------------------
def _sweep_flags() -> flags.FlagValues:
  fv = flags.FlagValues()
  flags.DEFINE_string("config", None, "Experiment config file (no ':variant'; use "
                      "--variants).", flag_values=fv)
  flags.DEFINE_string("variants", "all", "Comma-separated variant names, or 'all'.",
                      flag_values=fv)
  flags.DEFINE_string("workdir", None, "Sweep directory: one sub-workdir per variant, "
                      "results.md and results.json.", flag_values=fv)
  flags.DEFINE_bool("dry_run", False, "Validate every variant and print the plan; train "
                    "and write nothing.", flag_values=fv)
  flags.DEFINE_bool("print_commands", False, "Print one resnorm-train command per variant "
                    "(for a cluster) instead of training.", flag_values=fv)
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
  if not fv.config:
    raise UsageError("--config=<experiment config file> is required")
  if ":" in os.path.basename(fv.config):
    raise UsageError(f"--config={fv.config}: name the variants with --variants, not ':'")
  if not fv.workdir and not fv.dry_run:
    raise UsageError("--workdir is required")
  return fv, overrides


def select_variants(module, spec: str, config_path: str) -> list[str]:
  """The variants named by ``spec`` ('all' or a comma list), checked against VARIANTS."""
  valid = tuple(getattr(module, "VARIANTS", ()))
  if not valid:
    raise UsageError(f"{config_path} defines no VARIANTS tuple, so it is not a sweepable "
                     "experiment config")
  names = list(valid) if spec.strip() == "all" else [
      v.strip() for v in spec.split(",") if v.strip()]
  unknown = [v for v in names if v not in valid]
  if unknown or not names:
    raise UsageError(f"unknown variant{'s' if len(unknown) > 1 else ''} "
                     f"{', '.join(map(repr, unknown)) or repr(spec)} of {config_path}; "
                     f"valid: {', '.join(valid)} (or all)")
  return list(dict.fromkeys(names))


def resolve_config(config_path: str, variant: str, overrides: list[str]):
  """The variant's config with the overrides applied exactly as resnorm-train applies them."""
  fv = flags.FlagValues()
  argv = ["resnorm-sweep", f"--config={config_path}:{variant}"] + overrides
  holder = config_flags.DEFINE_config_file("config", None, "", flag_values=fv,
                                           lock_config=True, sys_argv=argv)
  fv(argv)
  return holder.value


def train_command(config_path: str, variant: str, workdir: str, overrides: list[str]) -> str:
  args = ["resnorm-train", f"--config={config_path}:{variant}",
          f"--workdir={os.path.join(workdir, variant)}"] + overrides
  return " ".join(shlex.quote(a) for a in args)


# ----------------------------------------------------------------------------------------
# Results.
# ----------------------------------------------------------------------------------------
def result_row(variant: str, config, workdir: str, status: str,
               summary: dict[str, Any] | None) -> dict[str, Any]:
  """One variant's result: our final test error (%) next to the published one."""
  ev = (summary or {}).get("eval") or {}
  error = 100.0 * ev["error"] if "error" in ev else None
  published = config.published.error
  return {
      "variant": variant,
      "workdir": workdir,
      "status": status,
      "steps": (summary or {}).get("step", config.train.steps),
      "test_error": error,
      "published_error": published,
      "published_source": config.published.source,
      "published_note": config.published.note,
      "difference": (error - published if error is not None and published is not None
                     else None),
  }


def _pct(value, signed=False) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:+.2f}" if signed else f"{value:.2f}"


def results_markdown(config_path: str, rows: list[dict[str, Any]]) -> str:
  """The Markdown results table; the difference is ours minus the published error."""
  sources = sorted({r["published_source"] for r in rows if r["published_source"]})
  lines = [
      f"# Sweep results: {config_path}", "",
      "| variant | steps | final test error % | published error % | difference | notes |",
      "|---|---:|---:|---:|---:|---|",
  ]
  for r in rows:
    notes = [n for n in (r["status"] if r["status"] != "completed" else "",
                         r["published_note"]) if n]
    lines.append(f"| {r['variant']} | {r['steps']} | {_pct(r['test_error'])} | "
                 f"{_pct(r['published_error'])} | {_pct(r['difference'], signed=True)} | "
                 f"{'; '.join(notes)} |")
  lines += ["", "Difference = final test error − published error (percentage points)."]
  if sources:
    lines.append("Published numbers: " + "; ".join(sources) + ".")
  return "\n".join(lines) + "\n"


def merge_rows(previous: list[dict], new: list[dict], order: tuple[str, ...]) -> list[dict]:
  """Rows of ``previous`` with ``new`` replacing same-variant rows, in VARIANTS order."""
  by_variant = {r["variant"]: r for r in previous}
  by_variant.update({r["variant"]: r for r in new})
  rank = {v: i for i, v in enumerate(order)}
  return sorted(by_variant.values(), key=lambda r: rank.get(r["variant"], len(rank)))


def write_results(workdir: str, config_path: str, overrides: list[str], rows: list[dict],
                  order: tuple[str, ...]) -> list[dict]:
  """Writes results.json and results.md, keeping other variants' rows of the same config."""
  json_path = os.path.join(workdir, "results.json")
  previous = []
  if os.path.exists(json_path):
    try:
      with open(json_path) as f:
        saved = json.load(f)
      if saved.get("config") == config_path:
        previous = saved.get("rows", [])
    except (OSError, ValueError):
      previous = []
  rows = merge_rows(previous, rows, order)
  os.makedirs(workdir, exist_ok=True)
  with open(json_path + ".tmp", "w") as f:
    json.dump({"config": config_path, "overrides": overrides, "rows": rows}, f, indent=2)
  os.replace(json_path + ".tmp", json_path)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(results_markdown(config_path, rows))
  return rows


# ----------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------
def sweep(config_path: str, variants: list[str], configs: dict, workdir: str,
          overrides: list[str], order: tuple[str, ...]) -> int:
  """Trains the variants one after another; returns the exit code."""
  import jax
  from resnorm_jax import training

  rows, main_process = [], jax.process_index() == 0
  for i, variant in enumerate(variants):
    config, subdir = configs[variant], os.path.join(workdir, variant)
    if main_process:
      print(f"resnorm-sweep: [{i + 1}/{len(variants)}] {variant} -> {subdir}", flush=True)
    try:
      summary = training.train_and_evaluate(config, subdir)
      status = summary["status"]
    except training.NonFiniteLossError as e:
      summary, status = None, "diverged (non-finite loss)"
      print(f"resnorm-sweep: {variant}: {e}", file=sys.stderr)
    rows.append(result_row(variant, config, subdir, status, summary))
    if main_process:
      write_results(workdir, config_path, overrides, rows, order)
    if status in ("preempted", "interrupted"):
      print(f"resnorm-sweep: {status} during {variant}; rerun the same command to resume",
            file=sys.stderr)
      return errors.exit_code_for_signal("SIGINT" if status == "interrupted" else "SIGTERM")
  if main_process:
    print(f"resnorm-sweep: results in {os.path.join(workdir, 'results.md')}")
    print(open(os.path.join(workdir, "results.md")).read())
  return 0


def main(argv: list[str]) -> int:
  """Runs the sweep for ``argv``; returns the exit code (errors: one line, code 2)."""
  try:
    fv, overrides = parse_args(argv)
    config_path = fv.config
    module = experiments.load_config_module(config_path)
    variants = select_variants(module, fv.variants, config_path)
    from resnorm_jax import config as config_lib  # imports jax: after the flags are valid
    config_lib.validate_workdir(fv.workdir)
    if fv.workdir and not (fv.print_commands or fv.dry_run):
      from resnorm_jax import workdir as workdir_lib
      workdir_lib.check_workdir(fv.workdir, parent_must_exist=True)
    if fv.print_commands:
      for variant in variants:
        print(train_command(config_path, variant, fv.workdir or "runs/sweep", overrides))
      return 0
    import jax
    configs = {}
    for variant in variants:
      try:
        configs[variant] = resolve_config(config_path, variant, overrides)
        config_lib.validate(configs[variant], jax.device_count())
      except Exception as e:  # pylint: disable=broad-except  (one line per bad variant)
        from resnorm_jax.train import describe_error
        raise UsageError(f"variant {variant}: {describe_error(e)}") from None
  except (UsageError, ConfigError) as e:
    print(f"resnorm-sweep: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  if fv.dry_run:
    for variant in variants:
      c = configs[variant]
      print(f"{variant}: model.depth={c.model.depth} unit={c.model.unit} "
            f"shortcut={c.model.shortcut} skip={c.model.skip} data={c.data.name} "
            f"steps={c.train.steps} published={_pct(c.published.error)}"
            + (f" -> {os.path.join(fv.workdir, variant)}" if fv.workdir else ""))
    return 0
  logging.set_verbosity(logging.WARNING)
  from resnorm_jax.train import run_guarded, _PROG
  _PROG[0] = "resnorm-sweep"
  return run_guarded(lambda: sweep(config_path, variants, configs, fv.workdir, overrides,
                                   tuple(module.VARIANTS)), fv.workdir)


def run():
  sys.exit(main(sys.argv))


if __name__ == "__main__":
  run()
