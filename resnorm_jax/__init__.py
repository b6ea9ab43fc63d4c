"""resnorm_jax: normalization and skip connections in deep networks, in JAX/Flax.

Importing the package registers its model families and tasks and loads the plug-ins the
environment names (:mod:`resnorm_jax.plugins`), so every config key is known before a
config is read.
"""

__version__ = "0.1.0"

from resnorm_jax import plugins as _plugins  # noqa: E402

_plugins.load()
