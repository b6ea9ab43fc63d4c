"""The configuration schema: every key's default, its own check and its resume class.

This module is a leaf: it imports nothing of the package but :mod:`resnorm_jax.errors`.
The engine's sections (``train``, ``eval``, ``parallel``, ``checkpoint``, the keys every
model and data set share, ``published``) are defined here; a model family or a task adds
its own keys when it registers (:meth:`Schema.add`, called by
:func:`resnorm_jax.models.register_model` and :func:`resnorm_jax.tasks.register_task`).
Checks that involve several keys, the registries or the machine run once, on the engine
side, in :func:`resnorm_jax.validation.validate`.

Every experiment config (``configs/*.py``) starts from :func:`base_config` and overrides
fields; the returned ``ConfigDict`` is locked, so a misspelt key in a config file or on the
command line (``--config.model.nrom=...``) is an error.

Each key's *resume class* says what changing it on resume means (:func:`resume_class`):
``tree`` keys change the parameter tree (resuming is an error), ``trajectory`` keys change
what the continuation computes (allowed and reported), ``neutral`` keys change no number of
the run (``model.remat``, logging, evaluation, where data is read from).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Iterable, Mapping

import ml_collections

from resnorm_jax.errors import ConfigError

PARALLEL_MODES = ("jit", "shard_map", "pmap")
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "piecewise", "cosine", "rsqrt")
DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")
NONFINITE_GUARDS = ("auto", "where", "cond")
MAX_SEED = 2**32 - 1

# Resume classes: what changing a key between a checkpoint and the run that resumes it means.
TREE = "tree"              # changes the parameter tree: resuming is an error (a fresh workdir)
TRAJECTORY = "trajectory"  # changes what the continuation computes: allowed, and reported
NEUTRAL = "neutral"        # changes no number of the training run (logging, evaluation,
                           # compilation, where the data is read from): allowed silently
RESUME_CLASSES = (TREE, TRAJECTORY, NEUTRAL)


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: ``default``, ``resume`` class, ``check(value, "section.key")`` (raises
  ConfigError), ``doc``; ``optional``: the type of a key whose default is None (a
  placeholder of that type)."""
  default: Any
  resume: str
  check: Callable[[Any, str], None]
  doc: str = ""
  optional: type | None = None

  def __post_init__(self):
    if self.resume not in RESUME_CLASSES:
      raise ValueError(f"resume class {self.resume!r} is not one of {RESUME_CLASSES}")

  def default_value(self):
    """The default as a config value (a fresh placeholder for an optional key: a shared
    one would tie the keys together)."""
    if self.optional is not None:
      return ml_collections.config_dict.placeholder(self.optional)
    return self.default


# ----------------------------------------------------------------------------------------
# Per-key checks: ``check(value, "section.key")`` raises a one-line ConfigError.
# ----------------------------------------------------------------------------------------
def choice(value: Any, choices: Iterable[str], key: str) -> None:
  """ConfigError naming the closest valid choice when ``value`` is not one of ``choices``."""
  choices = tuple(choices)
  if value not in choices:
    hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"{key}={value!r} is not valid{did_you_mean}; valid choices: "
                      f"{', '.join(map(str, choices))}")


def one_of(*choices):
  return lambda value, key: choice(value, choices, key)


def int_at_least(minimum: int, what: str = ""):
  def check(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
          minimum, f"an integer >= {minimum}")
      raise ConfigError(f"{key}={value!r} must be {kind}{what}")
  return check


POSITIVE_INT, NON_NEGATIVE_INT = int_at_least(1), int_at_least(0)


def number(*, allow_zero: bool):
  """A real number > 0 (>= 0 with ``allow_zero``)."""
  def check(value, key):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (
        value == 0 and not allow_zero):
      raise ConfigError(f"{key}={value!r} must be a "
                        f"{'non-negative' if allow_zero else 'positive'} number")
  return check


def in_range(value, key: str, low: float, high: float, *, closed_high: bool = True,
             open_low: bool = False) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    raise ConfigError(f"{key}={value!r} must be a number")
  ok = (value > low if open_low else value >= low) and (
      value <= high if closed_high else value < high)
  if not ok:
    interval = (f"{'(' if open_low else '['}{low:g}, {high:g}{']' if closed_high else ')'}")
    raise ConfigError(f"{key}={value!r} must be in {interval}")


def interval(low: float, high: float, *, optional: bool = False, **kwargs):
  """A number in the interval (``closed_high``, ``open_low``); None too if ``optional``."""
  def check(value, key):
    if value is None and optional:
      return
    in_range(value, key, low, high, **kwargs)
  return check


def boolean(value, key) -> None:
  if not isinstance(value, bool):
    raise ConfigError(f"{key}={value!r} must be true or false")


def path(value, key) -> None:
  if not isinstance(value, str):
    raise ConfigError(f"{key}={value!r} must be a path")


def text(value, key) -> None:
  if not isinstance(value, str):
    raise ConfigError(f"{key}={value!r} must be a string")


def name(value, key) -> None:
  """A non-empty string: a registry name or spec (the registry checks it at validation)."""
  if not isinstance(value, str) or not value.strip():
    raise ConfigError(f"{key}={value!r} must be a non-empty name")


def seed(value, key) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
    raise ConfigError(f"{key}={value!r} must be an integer in [0, {MAX_SEED}]")


def optional_number(value, key) -> None:
  if value is not None:
    number(allow_zero=True)(value, key)


def increasing_numbers(value, key) -> None:
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in value):
    raise ConfigError(f"{key}={value!r} must be a sequence of non-negative numbers")
  if list(value) != sorted(value):
    raise ConfigError(f"{key}={tuple(value)} must be increasing")


# ----------------------------------------------------------------------------------------
# The schema.
# ----------------------------------------------------------------------------------------
class Schema:
  """Every config key, by section: the engine's (defined here) and those the registered
  model families and tasks contribute (each key has one owner)."""

  def __init__(self, sections: Mapping[str, Mapping[str, Key]]):
    self._sections: dict[str, dict[str, Key]] = {}
    self._owners: dict[tuple[str, str], str] = {}
    for section, keys in sections.items():
      self.add(section, keys, owner="engine")

  def add(self, section: str, keys: Mapping[str, Key], owner: str) -> None:
    """Adds ``keys`` to ``section`` (a new section if need be) on behalf of ``owner`` (a
    model family or task name); a key another owner added is an error."""
    for name_, key in keys.items():
      if not isinstance(key, Key):
        raise TypeError(f"{section}.{name_} of {owner}: a config.Key is needed, got {key!r}")
      held = self._owners.get((section, name_))
      if held is not None and held != owner:
        raise ValueError(f"config key {section}.{name_} of {owner} is already defined by "
                         f"{held}; use another name or read the existing key")
    for name_, key in keys.items():
      self._sections.setdefault(section, {})[name_] = key
      self._owners[(section, name_)] = owner

  def remove(self, owner: str) -> None:
    """Removes the keys ``owner`` added (a registry entry removed again, e.g. by a test)."""
    for (section, name_), held in list(self._owners.items()):
      if held == owner:
        del self._owners[(section, name_)]
        del self._sections[section][name_]
        if not self._sections[section]:
          del self._sections[section]

  def owner(self, section: str, key: str) -> str | None:
    return self._owners.get((section, key))

  def keys_of(self, owner: str, section: str) -> tuple[str, ...]:
    return tuple(k for (s, k), o in self._owners.items() if o == owner and s == section)

  def get(self, section: str, key: str) -> Key | None:
    return self._sections.get(section, {}).get(key)

  def items(self):
    return self._sections.items()

  def __getitem__(self, section: str) -> dict[str, Key]:
    return self._sections[section]

  def __contains__(self, section: str) -> bool:
    return section in self._sections


def _engine_sections() -> dict[str, dict[str, Key]]:
  K = Key
  positive, non_negative = POSITIVE_INT, NON_NEGATIVE_INT
  return {
      # The keys every model family may read; a family adds its own (register_model).
      "model": {
          "name": K("cifar_resnet", TREE, name, "model family (resnorm_jax.models.MODELS)"),
          "norm": K("batch", TREE, name, "NORMS spec, e.g. group:32; every norm of the model "
                    "(ResNet units, stem and head; every LayerNorm of a Transformer)"),
          "skip": K("skip", TREE, name, "COMBINATORS spec"),
          "skip_lambda": K(None, TRAJECTORY, optional_number,
                           "λ of a λ-combinator (None = the spec's argument or default)",
                           optional=float),
          "bn_momentum": K(0.9, TRAJECTORY, interval(0, 1)),
          "bn_epsilon": K(1e-5, TRAJECTORY, interval(0, math.inf, open_low=True)),
          "dtype": K("float32", TRAJECTORY, one_of(*DTYPES),
                     "compute dtype; parameters and statistics stay float32"),
          "remat": K(False, NEUTRAL, boolean, "recompute each unit in the backward pass"),
      },
      # The keys every data set may read; a task adds its own (register_task).
      "data": {
          "name": K("synthetic", TREE, name, "a data set of the model's task (resnorm-train "
                    "lists them for a bad name)"),
          "data_dir": K("", NEUTRAL, path, "where the data set is read from"),
      },
      "parallel": {
          "mode": K("jit", NEUTRAL, one_of(*PARALLEL_MODES), "jit | shard_map | pmap"),
          "bn_sync": K("global", TRAJECTORY, name, "global | local | group:k"),
          "num_devices": K(0, NEUTRAL, non_negative, "0 = all local devices"),
      },
      "train": {
          "steps": K(1000, TRAJECTORY, positive),
          "batch_size": K(128, TRAJECTORY, positive, "global batch"),
          "seed": K(0, TRAJECTORY, seed),
          "optimizer": K("sgd", TRAJECTORY, one_of(*OPTIMIZERS), "sgd | adamw | adam"),
          "learning_rate": K(0.1, TRAJECTORY, number(allow_zero=False)),
          "momentum": K(0.9, TRAJECTORY, interval(0, 1)),
          "nesterov": K(False, TRAJECTORY, boolean),
          "b1": K(0.9, TRAJECTORY, interval(0, 1, closed_high=False)),
          "b2": K(0.999, TRAJECTORY, interval(0, 1, closed_high=False)),
          "eps": K(1e-8, TRAJECTORY, number(allow_zero=True), "Adam's ε (> 0 for adam/adamw)"),
          "weight_decay": K(1e-4, TRAJECTORY, number(allow_zero=True),
                            "never applied to norm parameters and biases"),
          "schedule": K("piecewise", TRAJECTORY, one_of(*SCHEDULES),
                        "constant | piecewise | cosine | rsqrt"),
          "boundaries": K((0.5, 0.75), TRAJECTORY, increasing_numbers,
                          "piecewise: fractions of train.steps (or steps if > 1)"),
          "decay_factor": K(0.1, TRAJECTORY, number(allow_zero=True)),
          "warmup_steps": K(0, TRAJECTORY, number(allow_zero=True)),
          "warmup_learning_rate": K(0.0, TRAJECTORY, number(allow_zero=True),
                                    "> 0: constant warm-up at this lr (He 2016: 0.01)"),
          "grad_clip_norm": K(0.0, TRAJECTORY, number(allow_zero=True), "0 = no clipping"),
          "label_smoothing": K(0.0, TRAJECTORY, interval(0, 1, closed_high=False)),
          "accumulate_steps": K(1, TRAJECTORY, positive,
                                "gradient accumulation: each device's share of the global "
                                "batch in k microbatches, gradients summed, one update "
                                "(training.make_train_step; BatchNorm: a ghost batch per "
                                "microbatch)"),
          "on_nonfinite": K("stop", NEUTRAL, one_of(*ON_NONFINITE), "stop | skip"),
          # How a non-finite step's update is dropped: the same state either way, chosen by
          # measurement (training.resolve_guard, benchmarks/RESULTS.md).
          "nonfinite_guard": K("auto", NEUTRAL, one_of(*NONFINITE_GUARDS),
                               "where (select per leaf) | cond (lax.cond) | auto (cond on "
                               "CPU, where elsewhere)"),
          "cpu_workarounds": K(True, NEUTRAL, boolean,
                               "XLA:CPU workarounds (resnorm_jax/cpu_workarounds.py): the "
                               "same math, faster on CPU (incl. XLA's own convolution kernels "
                               "instead of YNNPACK's); no effect on GPU/TPU"),
          "log_every_steps": K(50, NEUTRAL, positive),
          "layer_stats_every_steps": K(0, NEUTRAL, int_at_least(
              0, ": 0 (off) or the number of steps between per-layer statistics"),
              "> 0: per-layer norms and unit-output moments every N steps "
              "(resnorm_jax/layer_stats.py)"),
      },
      "eval": {
          "every_steps": K(500, NEUTRAL, non_negative, "0 = only at the end"),
          "batch_size": K(500, NEUTRAL, positive),
      },
      "checkpoint": {
          "every_steps": K(1000, NEUTRAL, non_negative, "0 = only at the end"),
          "keep": K(3, NEUTRAL, positive),
          # Checkpoint averaging (Vaswani et al. 2017: the last 5 / 20, 10 minutes apart):
          # resnorm_jax/averaging.py.
          "average_last": K(0, NEUTRAL, non_negative,
                            "> 0: also keep the newest N checkpoints at average_every_steps "
                            "and, when training completes, evaluate their parameter average"),
          "average_every_steps": K(0, NEUTRAL, non_negative,
                                   "steps between averaged checkpoints (0 = every_steps)"),
      },
      # The result an experiment config reproduces, read by resnorm-sweep's table, never by
      # training.  Each task adds its headline key (e.g. ``published.error``, test error in
      # %; ``published.bleu``), None = no published number.
      "published": {
          "source": K("", NEUTRAL, text, "where the number is published"),
          "note": K("", NEUTRAL, text, 'e.g. "fail: > 20%"'),
          "measure": K("", NEUTRAL, text, "the evaluation key of the measure the number is "
                       "('' = the task's headline key; translation: bleu for sacreBLEU, "
                       "bleu_tokenized for translation.tokenized_bleu's)"),
      },
  }


SCHEMA = Schema(_engine_sections())
# Plug-ins that could not be loaded (resnorm_jax.plugins): each a one-line message.
LOAD_ERRORS: list[str] = []
# Sections whose numbers training reads (``published`` is only read by resnorm-sweep).
NOT_TRAINING = ("published",)


def base_config() -> ml_collections.ConfigDict:
  """Every key of :data:`SCHEMA` with its default (a small CIFAR PreAct-ResNet): the
  engine's and those of every registered model family and task.  A plug-in that could not
  be loaded is a ConfigError here (:data:`LOAD_ERRORS`)."""
  if LOAD_ERRORS:
    raise ConfigError(LOAD_ERRORS[0])
  c = ml_collections.ConfigDict()
  for section, keys in SCHEMA.items():
    c[section] = ml_collections.ConfigDict()
    for name_, key in keys.items():
      c[section][name_] = key.default_value()
  return c


def check_keys(config: ml_collections.ConfigDict, sections: Iterable[str] | None = None) -> None:
  """Every key's own check (:attr:`Key.check`), section by section in schema order (only
  ``sections`` if given)."""
  for section, keys in SCHEMA.items():
    if section not in config or (sections is not None and section not in sections):
      continue
    for name_, key in keys.items():
      if name_ in config[section]:
        key.check(config[section][name_], f"{section}.{name_}")


def resume_class(dotted: str, model_keys: Iterable[str] | None = None) -> str:
  """The resume class of ``"section.key"``.  A ``model`` key that the model family does not
  read (``model_keys``: its ``config_keys``) is neutral for it; a key outside the schema is
  ``TREE`` in ``model`` and ``TRAJECTORY`` elsewhere (the safe side)."""
  section, _, name_ = dotted.partition(".")
  name_ = name_.split(".")[0].split("[")[0]
  if section == "model" and model_keys is not None and name_ != "name" and \
      name_ not in model_keys:
    return NEUTRAL
  if section in NOT_TRAINING:
    return NEUTRAL
  key = SCHEMA.get(section, name_)
  if key is None:
    return TREE if section == "model" else TRAJECTORY
  return key.resume


def numeric_leaves(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{"train.learning_rate": 0.1, ...}``: every int or float value (not bool) of the
  sections training reads, sequences element by element (``train.boundaries[0]``)."""
  out = {}
  for section in config.keys():
    if section in NOT_TRAINING:
      continue
    for key, value in config[section].items():
      values = value if isinstance(value, (list, tuple)) else [value]
      for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          name_ = f"{section}.{key}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
          out[name_] = v
  return out


def check_numbers(config: ml_collections.ConfigDict, *, negatives: bool = True) -> None:
  """Schema-wide rules: every number is finite and (with ``negatives``) >= 0 -- no key of the
  schema has a meaning for nan, inf or a negative value.  Validation checks finiteness
  first and negatives last, after the per-key checks whose messages say more."""
  for key, value in numeric_leaves(config).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{key}={value!r} must be a finite number")
    if negatives and value < 0:
      kind = "integer" if isinstance(value, int) else "number"
      raise ConfigError(f"{key}={value!r} must be a non-negative {kind}")
