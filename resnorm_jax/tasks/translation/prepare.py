"""``resnorm-prepare``: prepare a translation config's token cache without training.

    resnorm-prepare --config=configs/iwslt15_envi_transformer.py --workdir=runs/iwslt
    resnorm-prepare --config=configs/wmt14_ende_transformer.py \
        --config.translation.cache_dir=/shared/cache

Makes ``spm.model`` and ``tokens/`` (:mod:`resnorm_jax.tasks.translation.cache`) in the
workdir, or in ``translation.cache_dir``, exactly as the training run does on its first
start, and prints each split's pair and token counts; a valid cache is only checked.  Exit
codes (``resnorm_jax/errors.py``): 0 done, 2 invalid flags, config or corpus, 5 storage
failure, 70 internal error.
"""

from __future__ import annotations

from absl import logging

from resnorm_jax import cli
from resnorm_jax.errors import ConfigError

PROG = "resnorm-prepare"


def define_flags() -> None:
  cli.define_config_flags(None, "Translation config file, optionally with a ':variant' "
                          "argument.", "Run directory (or translation.cache_dir's parent).")


def prepare_cache(config, workdir: str) -> tuple[str, dict]:
  """(the cache directory, its manifest) of ``config``, prepared (the command's work)."""
  from resnorm_jax import validation
  from resnorm_jax.tasks.translation import cache
  validation.validate(config, max(1, config.parallel.num_devices))
  directory = cache.cache_directory(config, workdir)
  if not directory:
    raise ConfigError("give --workdir or --config.translation.cache_dir")
  return directory, cache.prepare(directory, config)


def main(argv):
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; use --config.<key>=<value> for overrides")
  config = cli.flag_value("config")
  if config is None:
    cli.fail("--config=<translation config file> is required")
  logging.set_verbosity(logging.WARNING)
  workdir = cli.flag_value("workdir") or ""
  directory, manifest = cli.run_guarded(lambda: prepare_cache(config, workdir), workdir)
  print(f"{directory}: " + ", ".join(
      f"{s} {e['pairs']:,} pairs ({e['tokens']['src']:,} + {e['tokens']['tgt']:,} tokens)"
      for s, e in manifest["splits"].items()))


def run():
  cli.run_command(PROG, define_flags, main)


if __name__ == "__main__":
  run()
