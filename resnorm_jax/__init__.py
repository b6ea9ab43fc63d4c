"""resnorm_jax: normalization and skip connections in deep networks, in JAX/Flax."""

__version__ = "0.1.0"
