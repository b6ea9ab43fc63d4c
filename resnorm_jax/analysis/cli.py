"""``resnorm-analyze``: run a diagnostic analysis from a config file.

    resnorm-analyze --config=configs/moments.py:bn_res --workdir=runs/bn_res
    resnorm-analyze --config=configs/shattering.py --config.draws=50
    resnorm-analyze --config=configs/grad_scale.py:paper
    resnorm-analyze --layer_stats=runs/quickstart   # plot a training run's layer_stats.jsonl

Writes ``results.json`` (settings, per-layer arrays with their layer indices, fitted rates)
and PNG figures into the workdir, and prints a summary table.  Exit codes
(``resnorm_jax/errors.py``): 0 done, 2 invalid flags, config or workdir (one line on stderr;
nothing written), 4 the workdir is locked by another run, 5 storage failure, 70 internal
error, 130 interrupted.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from absl import flags, logging

from resnorm_jax import cli, errors, storage
from resnorm_jax.cli import fail
from resnorm_jax.errors import ConfigError

PROG = "resnorm-analyze"
DEFAULT_CONFIG = os.path.join(cli.PACKAGE_ROOT, "configs", "moments.py")
ANALYSIS_CONFIGS = "configs/moments.py, configs/shattering.py or configs/grad_scale.py"

_FLAGS = {}


def define_flags():
  """--config (an analysis config file, optionally ':variant'), --workdir, --layer_stats."""
  if _FLAGS:
    return
  cli.define_config_flags(
      DEFAULT_CONFIG, "Analysis config file, optionally with a ':variant' argument.",
      "Output directory (default: runs/<config name>[_<variant>]).")
  _FLAGS["layer_stats"] = flags.DEFINE_string(
      "layer_stats", None, "Instead of an analysis: plot the per-layer statistics of the "
      "training run in this workdir (train.layer_stats_every_steps) against depth.")


def config_name() -> str:
  return cli.config_name(DEFAULT_CONFIG).replace("/", "-")


def json_safe(value):
  """NaN / inf -> None (strict JSON), numpy scalars -> Python numbers, recursively."""
  if isinstance(value, dict):
    return {str(k): json_safe(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(v) for v in value]
  if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def write_json(path: str, payload: dict) -> None:
  storage.write_atomic(path, json.dumps(json_safe(payload), indent=1, allow_nan=False))


def log(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def figures(name: str, results: dict, workdir: str, title: str) -> list[str]:
  from resnorm_jax.analysis import plots
  return {"moments": plots.moments_figures, "shattering": plots.shattering_figures,
          "grad_scale": plots.grad_scale_figures}[name](results, workdir, title)


def plot_layer_stats(run: str, workdir: str | None) -> None:
  """layer_stats_depth.png of a training run (into ``workdir``, default the run's)."""
  from resnorm_jax import layer_stats
  from resnorm_jax.analysis import plots
  from resnorm_jax.metrics import read_metrics
  path = storage.join(run, layer_stats.FILENAME)
  if not storage.exists(path):
    fail(f"{path} does not exist; train with --config.train.layer_stats_every_steps=N "
         "(N > 0) to write it")
  storage.makedirs(workdir or run)
  for png in plots.layer_stats_figures(read_metrics(run, layer_stats.FILENAME),
                                       workdir or run, title=storage.abspath(run)):
    print(f"  figure   {png}")


def main(argv):
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> for overrides")
  if _FLAGS["layer_stats"].value:
    return plot_layer_stats(_FLAGS["layer_stats"].value, cli.flag_value("workdir"))
  config = cli.flag_value("config")
  if "analysis" not in config:
    fail(f"--config is not an analysis config (it has no 'analysis' key); use "
         f"{ANALYSIS_CONFIGS}")
  logging.set_verbosity(logging.WARNING)
  from resnorm_jax.analysis import registry
  try:
    module = registry.load(config.analysis)
    module.validate(config)
  except ConfigError as e:
    fail(str(e))
  explicit = cli.flag_value("workdir") is not None
  workdir = cli.flag_value("workdir") or os.path.join("runs", config_name())
  from resnorm_jax import workdir as workdir_lib
  try:  # a URL, a file, a read-only directory, a missing parent
    workdir_lib.check_workdir(workdir, parent_must_exist=explicit)
  except ConfigError as e:
    fail(str(e))
  except errors.StorageError as e:   # the store failed while it was checked
    fail(f"{workdir}: {e}", errors.EXIT_STORAGE)
  storage.makedirs(workdir)

  def analyze():
    with workdir_lib.WorkdirLock(workdir):
      return _analyze(config, module, workdir)
  cli.run_guarded(analyze, workdir)


def _analyze(config, module, workdir: str) -> None:
  import jax
  from resnorm_jax.analysis import common
  device = jax.devices()[0]
  log(f"{PROG}: {config.analysis} on {device.platform} ({device.device_kind}) -> {workdir}")
  start = time.time()
  results = module.run(config, log=log)
  payload = {"analysis": config.analysis, "config": config_name(),
             "settings": config.to_dict(),
             "environment": {"jax": jax.__version__, "platform": device.platform,
                             "device": device.device_kind, "prng": common.PRNG_IMPL,
                             "draw_batch": common.resolve_draw_batch(config.draw_batch)},
             "seconds": time.time() - start, **results}
  path = storage.join(workdir, "results.json")
  write_json(path, payload)
  title = f"{config.analysis} ({config_name()}, {config.draws} draws)"
  pngs = figures(config.analysis, results, workdir, title)
  print(module.table(results))
  print(f"\n{PROG}: {config.analysis} done in {time.time() - start:.1f} s")
  print(f"  results  {path}")
  for png in pngs:
    print(f"  figure   {png}")


def run():
  cli.run_command(PROG, define_flags, main)


if __name__ == "__main__":
  run()
