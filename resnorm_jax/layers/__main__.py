"""``python -m resnorm_jax.layers`` prints the Markdown table of every registry name."""

from resnorm_jax.layers import registry_markdown

print(registry_markdown())
