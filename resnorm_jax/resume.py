"""What resuming a workdir with a config means: ``<workdir>/config.json``.

A run writes its resolved config next to its checkpoints (:func:`save_config_json`).  A
later run in the same workdir compares its config with it key by key, by each key's resume
class (:mod:`resnorm_jax.config`): a ``tree`` key that differs (the model family, its
architecture, the data set) is an error before anything is written
(:func:`check_config_compatible`); ``trajectory`` keys that differ are allowed and reported
(:func:`resume_changes`), and the old config is kept (:func:`archive_config_json`);
``neutral`` keys are silent.  :func:`config_fingerprint` hashes the keys that change the
numbers, so checkpoints from different runs are never mixed (checkpoint averaging).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np

from resnorm_jax import config as config_lib, models, storage
from resnorm_jax.errors import ConfigError

CONFIG_FILE = "config.json"


def config_fingerprint(config_dict: Any) -> str:
  """A hash of every value that changes the numbers of a run (resume classes ``tree`` and
  ``trajectory``, :data:`resnorm_jax.config.SCHEMA`): checkpoints with the same fingerprint
  come from one run of one config.  Neutral keys (evaluation, logging, checkpoint cadence,
  data location) and ``published`` are left out."""
  plain = json.loads(json.dumps(_plain(config_dict), default=_json_default))
  kept = {}
  for section, values in sorted(plain.items()):
    if not isinstance(values, dict):
      continue
    for key, value in sorted(values.items()):
      if config_lib.resume_class(f"{section}.{key}") != config_lib.NEUTRAL:
        kept[f"{section}.{key}"] = value
  return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:16]


def save_config_json(workdir: str, config_dict: Any) -> str:
  """Writes the resolved config to ``<workdir>/config.json`` atomically; returns the path.

  The file is written to a temporary name and renamed, so a crash never leaves a partial
  ``config.json``.  Only process 0 writes (the workdir is shared in multi-process jobs).
  """
  path = storage.join(workdir, CONFIG_FILE)
  if jax.process_index() != 0:
    return path
  storage.makedirs(workdir)
  text = json.dumps(_plain(config_dict), indent=2, sort_keys=True, default=_json_default)
  storage.write_atomic(path, text + "\n")
  return path


def load_config_json(workdir: str) -> ml_collections.ConfigDict:
  """The run's config from ``<workdir>/config.json``, over the schema's defaults (keys the
  schema no longer has are ignored); ConfigError if there is none."""
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    raise ConfigError(f"{path} not found: --workdir must be a training run's workdir")
  saved = json.loads(storage.read_text(path))
  config = config_lib.base_config()
  flat = {}
  for section, values in saved.items():
    if section in config and isinstance(values, dict):
      for key, value in values.items():
        if key in config[section]:
          flat[f"{section}.{key}"] = tuple(value) if isinstance(value, list) else value
  config.update_from_flattened_dict(flat)
  return config


def check_config_compatible(workdir: str, config_dict: Any) -> None:
  """Raises :class:`ConfigError` if ``<workdir>/config.json`` was written with different
  values of keys that change the parameter tree (resume class ``tree`` in
  :data:`resnorm_jax.config.SCHEMA`: the model family and its architecture keys, the data
  set), listing every such key as ``model.norm: checkpoint has 'batch', this run has
  'layer'``.  A workdir without ``config.json`` is compatible with anything."""
  path = storage.join(workdir, CONFIG_FILE)
  diffs = _resume_diffs(workdir, config_dict).get(config_lib.TREE, [])
  if diffs:
    raise ConfigError(
        f"the checkpoint in {workdir} was written with a different config:\n  "
        + "\n  ".join(diffs)
        + f"\nUse a fresh --workdir for this config, or rerun with the settings in {path} "
        "to resume.")


def resume_changes(workdir: str, config_dict: Any) -> list[str]:
  """Lines ``key: checkpoint has X, this run has Y`` for the settings that differ from the
  run that wrote ``<workdir>/config.json`` and change what the continuation computes
  (resume class ``trajectory``: optimizer, schedule and its length ``train.steps``, batch
  size, seed, data, token batching, BatchNorm sync, ``model.dtype``, dropout).  Such a
  resume is allowed (extending ``train.steps`` is the usual one), but the result is the run
  of neither config alone.  ``neutral`` keys (``model.remat``, logging, evaluation, data
  location) are not listed.  [] without a config."""
  return _resume_diffs(workdir, config_dict).get(config_lib.TRAJECTORY, [])


def _resume_diffs(workdir: str, config_dict: Any) -> dict[str, list[str]]:
  """The differing keys of the saved and the current config by resume class."""
  compared = _saved_and_current(workdir, config_dict)
  if compared is None:
    return {}
  saved, current = compared
  model_keys = _family_keys(saved, current)
  out: dict[str, list[str]] = {}
  for section in sorted(set(saved) | set(current)):
    for line in _diff(section, _lookup(saved, section), _lookup(current, section)):
      key = line.split(":", 1)[0]
      out.setdefault(config_lib.resume_class(key, model_keys), []).append(line)
  return out


def _family_keys(saved: Any, current: Any) -> tuple[str, ...] | None:
  """The ``model.*`` keys the model family reads, when both configs name the same
  registered family (then other model keys are neutral); None otherwise."""
  name = _lookup(current, "model.name")
  if name is _MISSING or name != _lookup(saved, "model.name") or name not in models.MODELS:
    return None
  return models.MODELS.entry(name)[0].info.config_keys or None


def archive_config_json(workdir: str) -> str:
  """Copies ``<workdir>/config.json`` to the first free ``config.before_resume_<n>.json``
  (process 0) before a resume with changed settings overwrites it; returns that path."""
  n = 1
  while storage.exists(storage.join(workdir, f"config.before_resume_{n}.json")):
    n += 1
  target = storage.join(workdir, f"config.before_resume_{n}.json")
  if jax.process_index() == 0:
    storage.copy(storage.join(workdir, CONFIG_FILE), target)
  return target


_MISSING = object()


def _saved_and_current(workdir: str, config_dict: Any) -> tuple[Any, Any] | None:
  """(``<workdir>/config.json``, ``config_dict``) as comparable plain JSON trees; None
  without a saved config; ConfigError if it cannot be read."""
  path = storage.join(workdir, CONFIG_FILE)
  if not storage.exists(path):
    return None
  try:
    saved = json.loads(storage.read_text(path))
  except (OSError, ValueError) as e:
    raise ConfigError(f"{path} is unreadable ({e}); restore or remove it, or use a fresh "
                      "--workdir") from e
  return saved, json.loads(json.dumps(_plain(config_dict), default=_json_default))


def _lookup(tree: Any, dotted: str) -> Any:
  """``tree["a"]["b"]`` for ``"a.b"``, or ``_MISSING``."""
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return _MISSING
    tree = tree[part]
  return tree


def _diff(key: str, old: Any, new: Any) -> list[str]:
  """Lines ``key: checkpoint has X, this run has Y`` for every differing leaf below key."""
  if isinstance(old, dict) and isinstance(new, dict):
    return [line for k in sorted(set(old) | set(new))
            for line in _diff(f"{key}.{k}", old.get(k, _MISSING), new.get(k, _MISSING))]
  if old == new:
    return []
  return [f"{key}: checkpoint has {_show(old)}, this run has {_show(new)}"]


def _show(value: Any) -> str:
  return "no such key" if value is _MISSING else repr(value)


def _plain(config: Any) -> Any:
  """A ConfigDict / dataclass / mapping as plain nested dicts."""
  if hasattr(config, "to_dict"):
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  if isinstance(config, Mapping):
    return {str(k): _plain(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [_plain(v) for v in config]
  return config


def _json_default(value: Any) -> Any:
  """JSON fallback: numpy scalars/arrays as Python values, anything else as its string."""
  if isinstance(value, (np.generic, np.ndarray)):
    return value.tolist()
  return str(value)
