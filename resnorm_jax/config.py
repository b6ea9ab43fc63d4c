"""The configuration schema, its defaults and its validation.

Every experiment config (``configs/*.py``) starts from :func:`base_config` and overrides
fields; the returned ``ConfigDict`` is locked, so a misspelt key in a config file or on the
command line (``--config.model.nrom=...``) is an error.  :func:`validate` checks every value
against the registries and the machine before anything is compiled or written, raising
:class:`ConfigError` with a one-line message that names the bad value and the valid choices.

:data:`SCHEMA` holds every key once: its default, its own check and its *resume class*,
which says what changing it on resume means (:func:`resume_class`): ``tree`` keys change
the parameter tree (resuming is an error), ``trajectory`` keys change what the
continuation computes (allowed and reported), ``neutral`` keys change no number of the run
(``model.remat``, logging, evaluation, where data is read from).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Iterable

import ml_collections

from resnorm_jax.errors import ConfigError
from resnorm_jax.layers import COMBINATORS, NORMS, bn_sync_group_size


PARALLEL_MODES = ("jit", "shard_map", "pmap")
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "piecewise", "cosine", "rsqrt")
DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")
NONFINITE_GUARDS = ("auto", "where", "cond")


# ----------------------------------------------------------------------------------------
# The schema: every key with its default, its check and its resume class.
# ----------------------------------------------------------------------------------------
# Resume classes: what changing a key between a checkpoint and the run that resumes it means.
TREE = "tree"              # changes the parameter tree: resuming is an error (a fresh workdir)
TRAJECTORY = "trajectory"  # changes what the continuation computes: allowed, and reported
NEUTRAL = "neutral"        # changes no number of the training run (logging, evaluation,
                           # compilation, where the data is read from): allowed silently
RESUME_CLASSES = (TREE, TRAJECTORY, NEUTRAL)


@dataclasses.dataclass(frozen=True)
class Key:
  """One config key: ``default``, ``resume`` class, ``check(value, "section.key")`` (raises
  ConfigError; None: only the schema-wide number rules of :func:`check_numbers`), ``doc``;
  ``optional``: the type of a key whose default is None (a placeholder of that type)."""
  default: Any
  resume: str
  check: Callable[[Any, str], None] | None = None
  doc: str = ""
  optional: type | None = None

  def default_value(self):
    """The default as a config value (a fresh placeholder for an optional key: a shared
    one would tie the keys together)."""
    if self.optional is not None:
      return ml_collections.config_dict.placeholder(self.optional)
    return self.default


def _one_of(*choices):
  return lambda value, key: _choice(value, choices, key)


def _int_at_least(minimum: int, what: str = ""):
  def check(value, key):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
      kind = {0: "a non-negative integer", 1: "a positive integer"}.get(
          minimum, f"an integer >= {minimum}")
      raise ConfigError(f"{key}={value!r} must be {kind}{what}")
  return check


def _number(*, allow_zero: bool):
  return lambda value, key: _positive(value, key, allow_zero=allow_zero)


def _interval(low: float, high: float, **kwargs):
  return lambda value, key: value is None or _in_range(value, key, low, high, **kwargs)


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _boolean(value, key):
  if not isinstance(value, bool):
    raise ConfigError(f"{key}={value!r} must be true or false")


def _path(value, key):
  if not isinstance(value, str):
    raise ConfigError(f"{key}={value!r} must be a path")


def _seed(value, key):
  if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2 ** 32:
    raise ConfigError(f"{key}={value!r} must be an integer in [0, 2^32)")


def _schema() -> dict[str, dict[str, Key]]:
  K = Key
  return {
      "model": {
          "name": K("cifar_resnet", TREE, None, "model family (resnorm_jax.models.MODELS)"),
          "depth": K(20, TREE),
          "block": K("auto", TREE, None, "auto | basic | bottleneck"),
          "width": K(16, TREE, None, "channels of the first stage"),
          "norm": K("batch", TREE, None, "NORMS spec, e.g. group:32; every norm of the model "
                    "(ResNet units, stem and head; every LayerNorm of a Transformer)"),
          "unit": K("full_preact", TREE, None, "UNIT_ORDERINGS name"),
          "shortcut": K("identity", TREE, None, "SHORTCUTS spec"),
          "skip": K("skip", TREE, None, "COMBINATORS spec"),
          "skip_lambda": K(None, TRAJECTORY, optional=float),
          "weight_standardization": K(False, TRAJECTORY),
          "bn_momentum": K(0.9, TRAJECTORY, _interval(0, 1)),
          "bn_epsilon": K(1e-5, TRAJECTORY, _interval(0, math.inf, open_low=True)),
          "dtype": K("float32", TRAJECTORY, _one_of(*DTYPES),
                     "compute dtype; parameters and statistics stay float32"),
          "scan_stages": K(False, TREE, None, "one scanned body per stage (stacked params)"),
          "remat": K(False, NEUTRAL, None, "recompute each unit in the backward pass"),
          "preset": K("base", TREE, None, "Transformer: base | big | iwslt | tiny"),
          "vocab_size": K(37_000, TREE, None, "shared source/target subword vocabulary"),
          "max_len": K(512, TRAJECTORY, None, "longest sequence (sinusoidal positions)"),
          "summary_length": K(128, NEUTRAL, None, "tokens per side for resnorm-summary"),
          "dropout_rate": K(None, TRAJECTORY, _interval(0, 1, closed_high=False),
                            "None = the preset's", optional=float),
      },
      "data": {
          "name": K("synthetic", TREE, None, "see resnorm_jax.data.DATASETS and "
                    "resnorm_jax.tasks.translation.corpora.TRANSLATION_DATASETS"),
          "data_dir": K("", NEUTRAL, None, "TFDS data dir / directory holding the CIFAR "
                        "tarball / the IWSLT files"),
          "source": K("auto", NEUTRAL, None,
                      "CIFAR: auto (TFDS if prepared, else tarball) | tfds | tarball"),
          "augment": K("crop_flip", TRAJECTORY, None,
                       "crop_flip (pad + random crop + flip) | crop | none"),
          "pad": K(4, TRAJECTORY),
          "synthetic_train_size": K(1024, TRAJECTORY),
          "synthetic_test_size": K(256, TRAJECTORY),
      },
      "parallel": {
          "mode": K("jit", NEUTRAL, _one_of(*PARALLEL_MODES), "jit | shard_map | pmap"),
          "bn_sync": K("global", TRAJECTORY, None, "global | local | group:k"),
          "num_devices": K(0, NEUTRAL, None, "0 = all local devices"),
      },
      "train": {
          "steps": K(1000, TRAJECTORY, _POSITIVE),
          "batch_size": K(128, TRAJECTORY, _POSITIVE, "global batch"),
          "seed": K(0, TRAJECTORY),
          "optimizer": K("sgd", TRAJECTORY, _one_of(*OPTIMIZERS), "sgd | adamw | adam"),
          "learning_rate": K(0.1, TRAJECTORY, _number(allow_zero=False)),
          "momentum": K(0.9, TRAJECTORY, _interval(0, 1)),
          "nesterov": K(False, TRAJECTORY),
          "b1": K(0.9, TRAJECTORY, _interval(0, 1, closed_high=False)),
          "b2": K(0.999, TRAJECTORY, _interval(0, 1, closed_high=False)),
          "eps": K(1e-8, TRAJECTORY),
          "weight_decay": K(1e-4, TRAJECTORY, _number(allow_zero=True),
                            "never applied to norm parameters and biases"),
          "schedule": K("piecewise", TRAJECTORY, _one_of(*SCHEDULES),
                        "constant | piecewise | cosine | rsqrt"),
          "boundaries": K((0.5, 0.75), TRAJECTORY, None,
                          "piecewise: fractions of train.steps (or steps if > 1)"),
          "decay_factor": K(0.1, TRAJECTORY),
          "warmup_steps": K(0, TRAJECTORY, _number(allow_zero=True)),
          "warmup_learning_rate": K(0.0, TRAJECTORY, _number(allow_zero=True),
                                    "> 0: constant warm-up at this lr (He 2016: 0.01)"),
          "grad_clip_norm": K(0.0, TRAJECTORY, _number(allow_zero=True), "0 = no clipping"),
          "label_smoothing": K(0.0, TRAJECTORY, _interval(0, 1, closed_high=False)),
          "accumulate_steps": K(1, TRAJECTORY, _POSITIVE,
                                "gradient accumulation: each device's share of the global "
                                "batch in k microbatches, gradients summed, one update "
                                "(training.make_train_step; BatchNorm: a ghost batch per "
                                "microbatch)"),
          "on_nonfinite": K("stop", NEUTRAL, _one_of(*ON_NONFINITE), "stop | skip"),
          # How a non-finite step's update is dropped: the same state either way, chosen by
          # measurement (training.resolve_guard, benchmarks/RESULTS.md).
          "nonfinite_guard": K("auto", NEUTRAL, _one_of(*NONFINITE_GUARDS),
                               "where (select per leaf) | cond (lax.cond) | auto (cond on "
                               "CPU, where elsewhere)"),
          "cpu_workarounds": K(True, NEUTRAL, None,
                               "XLA:CPU workarounds (resnorm_jax/cpu_workarounds.py): the "
                               "same math, faster on CPU (incl. XLA's own convolution kernels "
                               "instead of YNNPACK's); no effect on GPU/TPU"),
          "log_every_steps": K(50, NEUTRAL, _POSITIVE),
          "layer_stats_every_steps": K(0, NEUTRAL, _int_at_least(
              0, ": 0 (off) or the number of steps between per-layer statistics"),
              "> 0: per-layer norms and unit-output moments every N steps "
              "(resnorm_jax/layer_stats.py)"),
      },
      "eval": {
          "every_steps": K(500, NEUTRAL, None, "0 = only at the end"),
          "batch_size": K(500, NEUTRAL, _POSITIVE),
      },
      # Translation (model.name=transformer): see resnorm_jax/tasks/translation/corpora.py.
      # The shared SentencePiece vocabulary has model.vocab_size pieces.
      "translation": {
          "max_length": K(256, TRAJECTORY, _POSITIVE,
                          "longest training sentence in pieces (EOS included)"),
          "max_tokens": K(4096, TRAJECTORY, _POSITIVE,
                          "token budget of a global batch: rows x bucket length"),
          "beam_size": K(4, NEUTRAL, _POSITIVE),
          "length_penalty": K(0.6, NEUTRAL, _number(allow_zero=True), "GNMT alpha"),
          "eval_max_sentences": K(0, NEUTRAL, _number(allow_zero=True),
                                  "0 = the whole test set"),
          "toy_train_size": K(20_000, TRAJECTORY, _POSITIVE),
          "toy_test_size": K(200, TRAJECTORY, _POSITIVE),
          "toy_vocab": K(40, TRAJECTORY, _POSITIVE),
          "toy_max_words": K(10, TRAJECTORY, _POSITIVE),
          # The prepared token cache (tasks/translation/cache.py) and packing (packing.py).
          "cache_dir": K("", NEUTRAL, _path, "'' = the workdir; else shared by runs of the "
                         "same data"),
          "spm_sample_sentences": K(1_000_000, TRAJECTORY, _int_at_least(2),
                                    "SentencePiece trains on at most this many sentences"),
          "spm_sample_seed": K(0, TRAJECTORY, _seed),
          "packing": K(False, TRAJECTORY, _boolean,
                       "several pairs per row (segment ids, per-segment positions)"),
          "tokenized_bleu": K("none", NEUTRAL, _one_of("none", "tokens", "t2t_compound"),
                              "bleu_tokenized beside sacreBLEU: none | tokens (multi-bleu "
                              "on the text as is) | t2t_compound (tensor2tensor's "
                              "get_ende_bleu.sh); tasks/translation/bleu.py"),
      },
      "checkpoint": {
          "every_steps": K(1000, NEUTRAL),
          "keep": K(3, NEUTRAL),
          # Checkpoint averaging (Vaswani et al. 2017: the last 5 / 20, 10 minutes apart):
          # resnorm_jax/averaging.py.
          "average_last": K(0, NEUTRAL, _NON_NEGATIVE,
                            "> 0: also keep the newest N checkpoints at average_every_steps "
                            "and, when training completes, evaluate their parameter average"),
          "average_every_steps": K(0, NEUTRAL, _NON_NEGATIVE,
                                   "steps between averaged checkpoints (0 = every_steps)"),
      },
  }


SCHEMA: dict[str, dict[str, Key]] = _schema()


def base_config() -> ml_collections.ConfigDict:
  """Every key of :data:`SCHEMA` with its default (a small CIFAR PreAct-ResNet), and
  ``published``: the result an experiment config reproduces -- test error in % (image
  classification) or test BLEU (translation) where it is published, and a note (e.g.
  "fail: > 20%"); None = no published number; ``measure``: the evaluation key of the
  measure the number is ('' = the task's headline key; translation: ``bleu`` for
  sacreBLEU, ``bleu_tokenized`` for the tokenized BLEU of ``translation.tokenized_bleu``).
  Read by resnorm-sweep for its results table, never by training."""
  c = ml_collections.ConfigDict()
  for section, keys in SCHEMA.items():
    c[section] = ml_collections.ConfigDict()
    for name, key in keys.items():
      c[section][name] = key.default_value()
  c.published = ml_collections.ConfigDict({
      "error": ml_collections.config_dict.placeholder(float),
      "bleu": ml_collections.config_dict.placeholder(float), "source": "", "note": "",
      "measure": ""})
  return c


def check_keys(config: ml_collections.ConfigDict) -> None:
  """Every key's own check (:attr:`Key.check`), section by section in schema order."""
  for section, keys in SCHEMA.items():
    for name, key in keys.items():
      if key.check is not None:
        key.check(config[section][name], f"{section}.{name}")


def resume_class(dotted: str, model_keys: Iterable[str] | None = None) -> str:
  """The resume class of ``"section.key"``.  A ``model`` key that the model family does not
  read (``model_keys``: its ``config_keys``) is neutral for it; a key outside the schema is
  ``TREE`` in ``model`` and ``TRAJECTORY`` elsewhere (the safe side)."""
  section, _, name = dotted.partition(".")
  name = name.split(".")[0].split("[")[0]
  if section == "model" and model_keys is not None and name != "name" and \
      name not in model_keys:
    return NEUTRAL
  if section == "published":
    return NEUTRAL
  key = SCHEMA.get(section, {}).get(name)
  if key is None:
    return TREE if section == "model" else TRAJECTORY
  return key.resume


def _choice(value: Any, choices: Iterable[str], key: str) -> None:
  choices = tuple(choices)
  if value not in choices:
    hint = difflib.get_close_matches(str(value), choices, n=1)
    did_you_mean = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise ConfigError(f"{key}={value!r} is not valid{did_you_mean}; valid choices: "
                      f"{', '.join(choices)}")


def _positive(value, key: str, *, allow_zero=False) -> None:
  if not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
    raise ConfigError(f"{key}={value!r} must be a {'non-negative' if allow_zero else 'positive'}"
                      " number")


def _spec(registry, value, key, **context) -> None:
  try:
    registry.validate(value, **context)
  except ConfigError as e:
    raise ConfigError(f"{key}: {e}") from None


def validate_workdir(workdir: str, flag: str = "--workdir") -> None:
  """ConfigError for a URL of an unsupported scheme or without a bucket (see
  :func:`resnorm_jax.storage.check_scheme`)."""
  from resnorm_jax import workdir as workdir_lib
  workdir_lib.check_not_url(workdir, flag)


def validate_model(config: ml_collections.ConfigDict) -> None:
  """Checks the ``model`` section against the registries (no data, no devices)."""
  from resnorm_jax import models

  m = config.model
  _choice(m.name, models.MODELS.names(), "model.name")
  _choice(m.dtype, DTYPES, "model.dtype")
  _spec(NORMS, m.norm, "model.norm")
  _spec(COMBINATORS, m.skip, "model.skip", lam=m.skip_lambda)
  models.validate_model_config(config)     # the family's own checks

# Sections read by training (``published`` is only read by resnorm-sweep's table).
VALIDATED_SECTIONS = ("model", "data", "parallel", "train", "eval", "translation",
                      "checkpoint")
MAX_SEED = 2**32 - 1


def numeric_leaves(config: ml_collections.ConfigDict,
                   sections: Iterable[str] = VALIDATED_SECTIONS) -> dict[str, Any]:
  """``{"train.learning_rate": 0.1, ...}``: every int or float value (not bool) of
  ``sections``, sequences element by element (``train.boundaries[0]``)."""
  out = {}
  for section in sections:
    for key, value in config[section].items():
      values = value if isinstance(value, (list, tuple)) else [value]
      for i, v in enumerate(values):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
          name = f"{section}.{key}" + (f"[{i}]" if isinstance(value, (list, tuple)) else "")
          out[name] = v
  return out


def check_numbers(config: ml_collections.ConfigDict, *, negatives: bool = True) -> None:
  """Schema-wide rules: every number is finite and (with ``negatives``) >= 0 -- no key of the
  schema has a meaning for nan, inf or a negative value -- and the seed fits in 32 bits.
  :func:`validate` checks finiteness first and negatives last, after the per-key checks
  whose messages say more."""
  for key, value in numeric_leaves(config).items():
    if isinstance(value, float) and not math.isfinite(value):
      raise ConfigError(f"{key}={value!r} must be a finite number")
    if negatives and value < 0:
      kind = "integer" if isinstance(value, int) else "number"
      raise ConfigError(f"{key}={value!r} must be a non-negative {kind}")
  seed = config.train.seed
  if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= MAX_SEED:
    raise ConfigError(f"train.seed={seed!r} must be an integer in [0, {MAX_SEED}]")


def validate(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError for the first invalid value; compiles and writes nothing.

  Order: finite numbers; the model (registries, the family's checks); every key's own check
  (:data:`SCHEMA`); the data set against the model's task; keys that depend on each other
  or on the machine; the task's section; no negative numbers anywhere."""
  p, t = config.parallel, config.train
  check_numbers(config, negatives=False)
  validate_model(config)
  check_keys(config)
  from resnorm_jax import models, tasks
  task = models.family(config).meta["task"]
  data_sets = tasks.data_sets(task)
  if config.data.name not in data_sets.names():
    everything = [n for name in tasks.TASKS.names() for n in tasks.data_sets(name).names()]
    _choice(config.data.name, everything, "data.name")   # a typo: the closest name
    raise ConfigError(f"model.name={config.model.name!r} trains on {task} data, not "
                      f"data.name={config.data.name!r}; valid choices: "
                      f"{', '.join(data_sets.names())}")

  requested = p.num_devices or num_devices
  if p.num_devices < 0 or requested > num_devices:
    raise ConfigError(f"parallel.num_devices={p.num_devices} but this machine has "
                      f"{num_devices} devices; use 0 (all) or a number <= {num_devices}")
  try:
    bn_sync_group_size(p.bn_sync, requested)
  except ConfigError as e:
    raise ConfigError(f"parallel.bn_sync: {e}") from None
  if t.batch_size % requested:
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                      f"{requested} data-parallel devices; e.g. use "
                      f"{requested * max(1, t.batch_size // requested)}")
  if t.optimizer in ("adam", "adamw"):
    _in_range(t.eps, "train.eps", 0, math.inf, open_low=True)
  for key in ("synthetic_train_size", "synthetic_test_size"):
    if config.data.name == "synthetic" and config.data[key] < 1:
      raise ConfigError(f"data.{key}={config.data[key]!r} must be a positive integer")
  if t.schedule == "piecewise" and list(t.boundaries) != sorted(t.boundaries):
    raise ConfigError(f"train.boundaries={tuple(t.boundaries)} must be increasing")
  for key in ("every_steps",):
    if config.eval[key] < 0 or config.checkpoint[key] < 0:
      raise ConfigError("eval.every_steps and checkpoint.every_steps must be >= 0")
  if config.checkpoint.keep < 1:
    raise ConfigError(f"checkpoint.keep={config.checkpoint.keep} must be >= 1")
  ck = config.checkpoint
  if ck.average_last and not (ck.average_every_steps or ck.every_steps):
    raise ConfigError(f"checkpoint.average_last={ck.average_last} needs an interval: set "
                      "checkpoint.average_every_steps or checkpoint.every_steps")
  tasks.task_class(config).validate(config, requested)   # the task's data section
  check_numbers(config)


def _in_range(value, key: str, low: float, high: float, *, closed_high: bool = True,
              open_low: bool = False) -> None:
  ok = (value > low if open_low else value >= low) and (
      value <= high if closed_high else value < high)
  if not ok:
    interval = (f"{'(' if open_low else '['}{low:g}, {high:g}{']' if closed_high else ')'}")
    raise ConfigError(f"{key}={value!r} must be in {interval}")


def validate_accumulation(config: ml_collections.ConfigDict, share: int, what: str) -> None:
  """``train.accumulate_steps`` must divide ``share``, each device's rows of a batch."""
  k = config.train.accumulate_steps
  if share % k:
    fits = max(d for d in range(1, k + 1) if share % d == 0)
    raise ConfigError(f"train.accumulate_steps={k} must divide each device's share of the "
                      f"batch, {what} = {share}; e.g. use {fits}")


def validate_translation(config: ml_collections.ConfigDict, replicas: int) -> None:
  """Checks across keys of the translation task (each key's own check is in SCHEMA)."""
  tr, m = config.translation, config.model
  measure = config.published.get("measure", "")
  if measure not in ("", "bleu", "bleu_tokenized"):
    raise ConfigError(f"published.measure={measure!r} is not valid; valid choices: bleu "
                      "(sacreBLEU), bleu_tokenized")
  if measure == "bleu_tokenized" and tr.tokenized_bleu == "none":
    raise ConfigError("published.measure='bleu_tokenized' needs translation.tokenized_bleu "
                      "(tokens or t2t_compound), or the table has no number to compare")
  if tr.max_length > m.max_len:
    raise ConfigError(f"translation.max_length={tr.max_length} exceeds model.max_len="
                      f"{m.max_len}")
  if tr.max_tokens < replicas * tr.max_length:
    raise ConfigError(f"translation.max_tokens={tr.max_tokens} must be >= {replicas} "
                      f"replicas x translation.max_length={tr.max_length} = "
                      f"{replicas * tr.max_length}")
  # A global batch's rows are rounded down to a multiple of replicas x k
  # (corpora.rows_for), so every bucket splits into k microbatches per device as long as the
  # longest bucket has replicas x k rows.
  k = config.train.accumulate_steps
  if tr.max_tokens < replicas * k * tr.max_length:
    raise ConfigError(
        f"train.accumulate_steps={k} must divide each device's share of the batch, but "
        f"translation.max_tokens={tr.max_tokens} gives rows of translation.max_length="
        f"{tr.max_length} tokens fewer than {replicas} replicas x {k} rows; use max_tokens >= "
        f"{replicas * k * tr.max_length} or a smaller k")

