"""``python -m resnorm_jax.sweep`` = ``resnorm-sweep``."""

from resnorm_jax.sweep.cli import run

if __name__ == "__main__":
  run()
