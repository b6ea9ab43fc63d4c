"""``python -m resnorm_jax.analysis`` = ``resnorm-analyze``."""

from resnorm_jax.analysis.cli import run

if __name__ == "__main__":
  run()
