"""Pieces shared by the analyses: config checks, variant-list parsing, running draws."""

from __future__ import annotations

import difflib
import time
from typing import Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from resnorm_jax import config as config_lib, cpu_workarounds
from resnorm_jax.errors import ConfigError


def split_list(text, key: str) -> list[str]:
  """``"a,b, c"`` -> ``["a", "b", "c"]``; an empty list is an error."""
  if not isinstance(text, str):
    raise ConfigError(f"{key}={text!r} must be a comma-separated string")
  items = [t.strip() for t in text.split(",") if t.strip()]
  if not items:
    raise ConfigError(f"{key} is empty; give at least one comma-separated value")
  return items


def int_list(text, key: str, minimum: int = 1) -> list[int]:
  """``"1,2,4"`` -> ``[1, 2, 4]`` (each >= ``minimum``)."""
  out = []
  for item in split_list(text, key):
    try:
      value = int(item)
    except ValueError:
      raise ConfigError(f"{key}: {item!r} is not an integer (got {text!r})") from None
    if value < minimum:
      raise ConfigError(f"{key}: every value must be >= {minimum}, got {value}")
    out.append(value)
  return out


def require_int(config, key: str, minimum: int = 1) -> int:
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    raise ConfigError(f"{key}={value!r} must be an integer >= {minimum}")
  return value


def require_float(config, key: str, minimum: float = 0.0, strict: bool = True) -> float:
  value = config[key]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum or (
      strict and value == minimum):
    raise ConfigError(f"{key}={value!r} must be a number {'>' if strict else '>='} {minimum:g}")
  return float(value)


def require_choice(value, choices: Sequence[str], key: str) -> str:
  config_lib.choice(value, choices, key)
  return value


def unknown_variant(name: str, what: str, names: Iterable[str], custom: str) -> ConfigError:
  names = list(names)
  hint = difflib.get_close_matches(name, names, n=1)
  did = f" (did you mean {hint[0]!r}?)" if hint else ""
  return ConfigError(f"unknown {what} variant {name!r}{did}; valid names: {', '.join(names)}; "
                     f"or a custom spec {custom}")


def parse_config_arg(arg: str | None, scales: Sequence[str], names: Sequence[str],
                     config_file: str, custom: bool = False) -> tuple[str | None, list[str]]:
  """Splits a config file's ``:arg`` (``"paper,bn_res"``) into (scale, variant names).

  With ``custom``, a part containing '/' is a custom variant spec (checked later)."""
  scale, variants = None, []
  for part in [p.strip() for p in (arg or "").split(",") if p.strip()]:
    if part in scales:
      if scale is not None:
        raise ConfigError(f"{config_file}: two scales given ({scale!r}, {part!r})")
      scale = part
    elif part in names or (custom and "/" in part):
      variants.append(part)
    else:
      valid = list(scales) + list(names)
      hint = difflib.get_close_matches(part, valid, n=1)
      did = f" (did you mean {hint[0]!r}?)" if hint else ""
      raise ConfigError(f"unknown variant {part!r} of {config_file}{did}; valid: "
                        f"{', '.join(valid)}")
  return scale, variants


def resolve_draw_batch(draw_batch: int) -> int:
  """0 = automatic: draws one at a time on CPU (a vmapped convolution with per-draw kernels
  is a grouped convolution, ~7x slower than separate draws there), 8 at a time otherwise."""
  if draw_batch > 0:
    return draw_batch
  return 1 if jax.default_backend() == "cpu" else 8


PRNG_IMPL = "rbg"


def draw_keys(seed: int, num_draws: int) -> jax.Array:
  """Key of draw i: fold_in(key(seed), i); every variant sees the same draws (common random
  numbers: the same inputs, perturbations and, where shapes agree, weights).

  The keys use JAX's ``rbg`` generator: a stack that initialises its units inside a
  ``scan`` compiles ~2.5x faster than with threefry.  Same distributions, and a rerun with
  the same settings reproduces the numbers, but the streams depend on the platform and on
  ``draw_batch`` (under ``vmap`` an rbg key draws different bits than alone), so two runs
  that differ there agree statistically, not bit for bit."""
  base = jax.random.key(seed, impl=PRNG_IMPL)
  return jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(num_draws))


def run_draws(draw_fn: Callable, keys: jax.Array, draw_batch: int, *, data: tuple = (),
              label: str = "", log: Callable[[str], None] | None = None,
              every_s: float = 30.0):
  """Maps ``draw_fn(key, *data) -> pytree`` over ``keys``; returns numpy arrays with a
  leading draws axis.  ``draw_batch`` draws are vmapped together (the last chunk is padded).
  ``data`` (e.g. an image set the draws sample from) is shared by every draw and passed as
  an argument of the compiled function, never embedded in it as a constant."""
  n = keys.shape[0]
  batch = min(resolve_draw_batch(draw_batch), n)
  data = tuple(data)
  fn = jax.jit(draw_fn if batch == 1 else
               jax.vmap(draw_fn, in_axes=(0,) + (None,) * len(data)),
               compiler_options=cpu_workarounds.compiler_options(jax.default_backend()))
  chunks, done, start, last = [], 0, time.time(), time.time()
  while done < n:
    if batch == 1:
      out = jax.tree_util.tree_map(lambda a: np.asarray(a)[None], fn(keys[done], *data))
    else:
      chunk = keys[done:done + batch]
      if chunk.shape[0] < batch:
        pad = jnp.broadcast_to(chunk[-1:], (batch - chunk.shape[0],) + chunk.shape[1:])
        chunk = jnp.concatenate([chunk, pad])
      out = jax.tree_util.tree_map(np.asarray, fn(chunk, *data))
    take = min(batch, n - done)
    chunks.append(jax.tree_util.tree_map(lambda a: a[:take], out))
    done += take
    if log is not None and time.time() - last > every_s and done < n:
      elapsed = time.time() - start
      log(f"  {label}: {done}/{n} draws, {elapsed:.0f} s, about "
          f"{elapsed / done * (n - done):.0f} s left")
      last = time.time()
  return jax.tree_util.tree_map(lambda *a: np.concatenate(a), *chunks)
