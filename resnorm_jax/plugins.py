"""Loading model families and tasks: the package's own, then outside code.

Outside code is a Python module that registers what it adds, exactly as the package's own
modules do (:func:`resnorm_jax.models.register_model`, :func:`resnorm_jax.tasks.register_task`,
or any other registry).  It is loaded when ``resnorm_jax`` is first imported, before any
config is read, from two places:

* ``RESNORM_PLUGINS``: a comma-separated list of module names (importable from
  ``sys.path``, e.g. ``my_project.mlp``) or paths of ``.py`` files;
* the entry points of the group ``resnorm_jax.plugins`` of installed distributions (in
  ``pyproject.toml``: ``[project.entry-points."resnorm_jax.plugins"] mlp = "my_project.mlp"``).

A plug-in that cannot be imported is not raised here (it would surface as a traceback from
an import); it is recorded in :data:`resnorm_jax.config.LOAD_ERRORS`, and the first
:func:`resnorm_jax.config.base_config` turns it into the one-line error of every command.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

from resnorm_jax import config as config_lib
from resnorm_jax import models as _models  # noqa: F401  (the package's model families)
from resnorm_jax import tasks as _tasks  # noqa: F401  (the package's tasks)

ENV_VAR = "RESNORM_PLUGINS"
ENTRY_POINT_GROUP = "resnorm_jax.plugins"
_LOADED: dict[str, object] = {}


def _import_file(path: str):
  name = "resnorm_plugin_" + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module          # dataclasses and pickling look modules up by name
  try:
    spec.loader.exec_module(module)
  except BaseException:
    del sys.modules[name]
    raise
  return module


def load_one(spec: str, origin: str):
  """Imports the plug-in ``spec`` (a module name or a ``.py`` path), once."""
  if spec in _LOADED:
    return _LOADED[spec]
  try:
    if spec.endswith(".py") or os.sep in spec:
      path = os.path.abspath(os.path.expanduser(spec))
      if not os.path.isfile(path):
        raise FileNotFoundError(f"no file {path}")
      module = _import_file(path)
    else:
      module = importlib.import_module(spec)
  except Exception as e:  # pylint: disable=broad-except  (reported by base_config)
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    config_lib.LOAD_ERRORS.append(
        f"{origin}: cannot load plug-in {spec!r} ({type(e).__name__}: {text}); fix or remove "
        f"it from {origin}")
    return None
  _LOADED[spec] = module
  return module


def requested() -> list[tuple[str, str]]:
  """(spec, origin) of every plug-in to load: entry points, then ``RESNORM_PLUGINS``."""
  out = []
  for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
    out.append((entry_point.value.split(":")[0].strip(),
                f"entry point {entry_point.name!r} of group {ENTRY_POINT_GROUP}"))
  for spec in os.environ.get(ENV_VAR, "").split(","):
    if spec.strip():
      out.append((spec.strip(), ENV_VAR))
  return out


def load() -> None:
  """Loads every requested plug-in (the package's own families and tasks are imported by
  this module)."""
  for spec, origin in requested():
    load_one(spec, origin)
