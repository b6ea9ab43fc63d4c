"""The configuration schema, its defaults and its validation.

Every experiment config (``configs/*.py``) starts from :func:`base_config` and overrides
fields; the returned ``ConfigDict`` is locked, so a misspelt key in a config file or on the
command line (``--config.model.nrom=...``) is an error.  :func:`validate` checks every value
against the registries and the machine before anything is compiled or written, raising
:class:`ConfigError` with a one-line message that names the bad value and the valid choices.
"""

from __future__ import annotations

import difflib
import math
from typing import Any, Iterable

import ml_collections

from resnorm_jax.layers import (COMBINATORS, NORMS, SHORTCUTS, UNIT_ORDERINGS, ConfigError,
                                bn_sync_group_size)

PARALLEL_MODES = ("jit", "shard_map", "pmap")
OPTIMIZERS = ("sgd", "adamw", "adam")
SCHEDULES = ("constant", "piecewise", "cosine", "rsqrt")
DTYPES = ("float32", "bfloat16")
ON_NONFINITE = ("stop", "skip")
NONFINITE_GUARDS = ("auto", "where", "cond")


def base_config() -> ml_collections.ConfigDict:
  """Every key the engine reads, with its default (a small CIFAR PreAct-ResNet)."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.name = "cifar_resnet"
  c.model.depth = 20
  c.model.block = "auto"          # auto | basic | bottleneck
  c.model.width = 16              # channels of the first stage
  c.model.norm = "batch"          # NORMS spec, e.g. group:32
  c.model.unit = "full_preact"    # UNIT_ORDERINGS name
  c.model.shortcut = "identity"   # SHORTCUTS spec
  c.model.skip = "skip"           # COMBINATORS spec
  c.model.skip_lambda = ml_collections.config_dict.placeholder(float)
  c.model.weight_standardization = False
  c.model.bn_momentum = 0.9
  c.model.bn_epsilon = 1e-5
  c.model.dtype = "float32"       # compute dtype; parameters and statistics stay float32
  c.model.scan_stages = False
  c.model.remat = False
  # Transformer (model.name=transformer); model.norm then replaces its LayerNorms.
  c.model.preset = "base"         # base | big | iwslt | tiny
  c.model.vocab_size = 37_000     # shared source/target subword vocabulary
  c.model.max_len = 512
  c.model.summary_length = 128    # tokens per side for resnorm-summary's FLOPs
  c.model.dropout_rate = ml_collections.config_dict.placeholder(float)  # None = the preset's

  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"       # see resnorm_jax.data.DATASETS
  c.data.data_dir = ""            # TFDS data dir / directory holding the CIFAR tarball
  c.data.source = "auto"          # CIFAR: auto (TFDS if prepared, else tarball) | tfds | tarball
  c.data.augment = "crop_flip"    # crop_flip (pad + random crop + flip) | crop | none
  c.data.pad = 4
  c.data.synthetic_train_size = 1024
  c.data.synthetic_test_size = 256

  c.parallel = ml_collections.ConfigDict()
  c.parallel.mode = "jit"         # jit | shard_map | pmap
  c.parallel.bn_sync = "global"   # global | local | group:k
  c.parallel.num_devices = 0      # 0 = all local devices

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 128        # global batch
  c.train.seed = 0
  c.train.optimizer = "sgd"       # sgd | adamw | adam
  c.train.learning_rate = 0.1
  c.train.momentum = 0.9
  c.train.nesterov = False
  c.train.b1 = 0.9
  c.train.b2 = 0.999
  c.train.eps = 1e-8
  c.train.weight_decay = 1e-4     # never applied to norm parameters and biases
  c.train.schedule = "piecewise"  # constant | piecewise | cosine | rsqrt
  c.train.boundaries = (0.5, 0.75)  # piecewise: fractions of train.steps (or steps if > 1)
  c.train.decay_factor = 0.1
  c.train.warmup_steps = 0
  c.train.warmup_learning_rate = 0.0  # > 0: constant warm-up at this lr (He 2016: 0.01)
  c.train.grad_clip_norm = 0.0    # 0 = no clipping
  c.train.label_smoothing = 0.0
  c.train.on_nonfinite = "stop"   # stop | skip
  # How a non-finite step's update is dropped: where (select per leaf) | cond (lax.cond) |
  # auto (cond on CPU, where elsewhere); the same state either way, chosen by measurement
  # (training.resolve_guard, benchmarks/RESULTS.md).
  c.train.nonfinite_guard = "auto"
  c.train.log_every_steps = 50
  # > 0: every N steps, per-layer gradient/parameter/update norms and the moments of every
  # residual unit's output to TensorBoard and layer_stats.jsonl (resnorm_jax/layer_stats.py).
  c.train.layer_stats_every_steps = 0   # 0 = off

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 500        # 0 = only at the end
  c.eval.batch_size = 500

  # Translation (model.name=transformer): see resnorm_jax/tasks/translation/corpora.py.  The shared
  # SentencePiece vocabulary has model.vocab_size pieces.
  c.translation = ml_collections.ConfigDict()
  c.translation.max_length = 256    # longest training sentence in pieces (EOS included)
  c.translation.max_tokens = 4096   # token budget of a global batch: rows x bucket length
  c.translation.beam_size = 4
  c.translation.length_penalty = 0.6  # GNMT alpha
  c.translation.eval_max_sentences = 0  # 0 = the whole test set
  c.translation.toy_train_size = 20_000
  c.translation.toy_test_size = 200
  c.translation.toy_vocab = 40
  c.translation.toy_max_words = 10
  # Prepared token cache (resnorm_jax/tasks/translation/cache.py) and packing (packing.py).
  c.translation.cache_dir = ""      # "" = the workdir; else shared by runs of the same data
  c.translation.spm_sample_sentences = 1_000_000  # SentencePiece trains on at most this many
  c.translation.spm_sample_seed = 0
  c.translation.packing = False     # several pairs per row (segment ids, positions)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 1000
  c.checkpoint.keep = 3

  # The published result an experiment config reproduces: test error in % (image
  # classification) or test BLEU (translation), where it is published, and a note (e.g.
  # "fail: > 20%"); None = no published number.  Read by resnorm-sweep for its results
  # table, never by training.
  c.published = ml_collections.ConfigDict({
      "error": ml_collections.config_dict.placeholder(float),
      "bleu": ml_collections.config_dict.placeholder(float), "source": "", "note": ""})
  return c


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
  """ConfigError for a URL workdir (see :func:`resnorm_jax.workdir.check_not_url`)."""
  from resnorm_jax import workdir as workdir_lib
  workdir_lib.check_not_url(workdir, flag)


def validate_model(config: ml_collections.ConfigDict) -> None:
  """Checks the ``model`` section against the registries (no data, no devices)."""
  from resnorm_jax import models

  m = config.model
  _choice(m.name, models.MODELS.names(), "model.name")
  _choice(m.dtype, DTYPES, "model.dtype")
  _spec(NORMS, m.norm, "model.norm")
  if m.name == "cifar_resnet":
    _spec(UNIT_ORDERINGS, m.unit, "model.unit")
    _spec(SHORTCUTS, m.shortcut, "model.shortcut")
  _spec(COMBINATORS, m.skip, "model.skip", lam=m.skip_lambda)
  models.validate_model_config(config)


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
  """Raises ConfigError for the first invalid value; compiles and writes nothing."""
  from resnorm_jax import data as data_lib  # local: data imports optional loaders

  p, t = config.parallel, config.train
  check_numbers(config, negatives=False)
  validate_model(config)
  _choice(p.mode, PARALLEL_MODES, "parallel.mode")
  _choice(t.optimizer, OPTIMIZERS, "train.optimizer")
  _choice(t.schedule, SCHEDULES, "train.schedule")
  _choice(t.on_nonfinite, ON_NONFINITE, "train.on_nonfinite")
  _choice(t.nonfinite_guard, NONFINITE_GUARDS, "train.nonfinite_guard")
  from resnorm_jax.tasks.translation import corpora
  _choice(config.data.name, data_lib.DATASETS.names() +
          corpora.TRANSLATION_DATASETS.names(), "data.name")
  is_text = config.data.name in corpora.TRANSLATION_DATASETS.names()
  if (config.model.name == "transformer") != is_text:
    needs = ("a translation data set" if config.model.name == "transformer"
             else "an image data set")
    valid = (corpora.TRANSLATION_DATASETS if config.model.name == "transformer"
             else data_lib.DATASETS).names()
    raise ConfigError(f"model.name={config.model.name!r} needs {needs}, not "
                      f"data.name={config.data.name!r}; valid choices: {', '.join(valid)}")

  requested = p.num_devices or num_devices
  if p.num_devices < 0 or requested > num_devices:
    raise ConfigError(f"parallel.num_devices={p.num_devices} but this machine has "
                      f"{num_devices} devices; use 0 (all) or a number <= {num_devices}")
  try:
    bn_sync_group_size(p.bn_sync, requested)
  except ConfigError as e:
    raise ConfigError(f"parallel.bn_sync: {e}") from None
  for key in ("steps", "batch_size", "log_every_steps"):
    if not isinstance(t[key], int) or t[key] < 1:
      raise ConfigError(f"train.{key}={t[key]!r} must be a positive integer")
  every = t.layer_stats_every_steps
  if isinstance(every, bool) or not isinstance(every, int) or every < 0:
    raise ConfigError(f"train.layer_stats_every_steps={every!r} must be a non-negative "
                      "integer: 0 (off) or the number of steps between per-layer statistics")
  if t.batch_size % requested:
    raise ConfigError(f"train.batch_size={t.batch_size} must be divisible by the "
                      f"{requested} data-parallel devices; e.g. use "
                      f"{requested * max(1, t.batch_size // requested)}")
  if config.eval.batch_size < 1:
    raise ConfigError(f"eval.batch_size={config.eval.batch_size} must be a positive integer")
  _positive(t.learning_rate, "train.learning_rate")
  _ranges(config)
  for key in ("weight_decay", "grad_clip_norm", "label_smoothing", "warmup_steps",
              "warmup_learning_rate", "momentum"):
    _positive(t[key], f"train.{key}", allow_zero=True)
  if not 0 <= t.label_smoothing < 1:
    raise ConfigError(f"train.label_smoothing={t.label_smoothing} must be in [0, 1)")
  if t.schedule == "piecewise" and list(t.boundaries) != sorted(t.boundaries):
    raise ConfigError(f"train.boundaries={tuple(t.boundaries)} must be increasing")
  for key in ("every_steps",):
    if config.eval[key] < 0 or config.checkpoint[key] < 0:
      raise ConfigError("eval.every_steps and checkpoint.every_steps must be >= 0")
  if config.checkpoint.keep < 1:
    raise ConfigError(f"checkpoint.keep={config.checkpoint.keep} must be >= 1")
  if is_text:
    validate_translation(config, requested)
  else:
    data_lib.validate_data_config(config)
  check_numbers(config)


def _in_range(value, key: str, low: float, high: float, *, closed_high: bool = True,
              open_low: bool = False) -> None:
  ok = (value > low if open_low else value >= low) and (
      value <= high if closed_high else value < high)
  if not ok:
    interval = (f"{'(' if open_low else '['}{low:g}, {high:g}{']' if closed_high else ')'}")
    raise ConfigError(f"{key}={value!r} must be in {interval}")


def _ranges(config: ml_collections.ConfigDict) -> None:
  """Keys whose valid values are an interval (nan, inf and negatives are refused for every
  key by :func:`check_numbers`)."""
  m, t = config.model, config.train
  _in_range(m.bn_momentum, "model.bn_momentum", 0, 1)
  _in_range(m.bn_epsilon, "model.bn_epsilon", 0, math.inf, open_low=True)
  if m.dropout_rate is not None:
    _in_range(m.dropout_rate, "model.dropout_rate", 0, 1, closed_high=False)
  _in_range(t.momentum, "train.momentum", 0, 1)
  for key in ("b1", "b2"):
    _in_range(t[key], f"train.{key}", 0, 1, closed_high=False)
  if t.optimizer in ("adam", "adamw"):
    _in_range(t.eps, "train.eps", 0, math.inf, open_low=True)
  for key in ("synthetic_train_size", "synthetic_test_size"):
    if config.data.name == "synthetic" and config.data[key] < 1:
      raise ConfigError(f"data.{key}={config.data[key]!r} must be a positive integer")


def validate_translation(config: ml_collections.ConfigDict, replicas: int) -> None:
  tr, m = config.translation, config.model
  for key in ("max_length", "max_tokens", "beam_size", "toy_train_size", "toy_test_size",
              "toy_vocab", "toy_max_words"):
    if not isinstance(tr[key], int) or tr[key] < 1:
      raise ConfigError(f"translation.{key}={tr[key]!r} must be a positive integer")
  if tr.max_length > m.max_len:
    raise ConfigError(f"translation.max_length={tr.max_length} exceeds model.max_len="
                      f"{m.max_len}")
  if tr.max_tokens < replicas * tr.max_length:
    raise ConfigError(f"translation.max_tokens={tr.max_tokens} must be >= {replicas} "
                      f"replicas x translation.max_length={tr.max_length} = "
                      f"{replicas * tr.max_length}")
  _positive(tr.length_penalty, "translation.length_penalty", allow_zero=True)
  _positive(tr.eval_max_sentences, "translation.eval_max_sentences", allow_zero=True)
  if not isinstance(tr.spm_sample_sentences, int) or tr.spm_sample_sentences < 2:
    raise ConfigError(f"translation.spm_sample_sentences={tr.spm_sample_sentences!r} must be "
                      "an integer >= 2")
  if not isinstance(tr.spm_sample_seed, int) or not 0 <= tr.spm_sample_seed < 2 ** 32:
    raise ConfigError(f"translation.spm_sample_seed={tr.spm_sample_seed!r} must be an "
                      "integer in [0, 2^32)")
  if not isinstance(tr.packing, bool):
    raise ConfigError(f"translation.packing={tr.packing!r} must be true or false")
  if not isinstance(tr.cache_dir, str):
    raise ConfigError(f"translation.cache_dir={tr.cache_dir!r} must be a path")
