"""String-spec registries: variants are data.

Every kind of variant (norms, shortcuts, unit orderings, skip combinators) has one
:class:`Registry` that maps a name to a constructor.  A *spec* is ``"name"`` or
``"name:arg"`` (``"group:32"``, ``"rskip_ln:2"``, ``"constant:0.5,1"``).  Config validation,
error messages and the README table all ask the registry for its names, so a typo is always
answered with the list of valid choices.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

from resnorm_jax import config as config_lib
from resnorm_jax.errors import ConfigError


@dataclasses.dataclass(frozen=True, eq=False)   # one object per name: hashed by identity
class Entry:
  """A registered variant: its constructor, documentation, argument parser and ``info``,
  the typed facts about it that validation and the engine read (an instance of the
  registry's ``info_type``: e.g. :class:`resnorm_jax.layers.norms.NormInfo`,
  :class:`resnorm_jax.models.ModelFamily`, :class:`resnorm_jax.tasks.TaskInfo`)."""
  name: str
  build: Callable[..., Any]
  doc: str
  arg_doc: str | None = None  # e.g. "G: number of groups (default 32)"
  parse_arg: Callable[[str | None], Any] | None = None   # None: the raw ':' string
  info: Any = None


@dataclasses.dataclass(frozen=True)
class Spec:
  """A parsed spec: the entry and its argument, parsed (and defaulted) once."""
  entry: Entry
  arg: Any
  text: str

  @property
  def name(self) -> str:
    return self.entry.name

  @property
  def info(self) -> Any:
    return self.entry.info


def split_spec(spec: str) -> tuple[str, str | None]:
  """``"group:32"`` -> ``("group", "32")``; ``"batch"`` -> ``("batch", None)``."""
  if not isinstance(spec, str) or not spec.strip():
    raise ConfigError(f"a variant spec must be a non-empty string, got {spec!r}")
  name, sep, arg = spec.strip().partition(":")
  return name.strip(), (arg.strip() if sep else None)


class Registry:
  """Maps variant names to constructors ``build(arg: str | None, **context)``."""

  def __init__(self, kind: str, info_type: type | None = None):
    self.kind = kind
    self.info_type = info_type
    self._entries: dict[str, Entry] = {}

  def register(self, name: str, doc: str, arg_doc: str | None = None, *,
               parse=None, info=None):
    """Decorator registering ``build(arg, **context)``; ``parse(arg_text | None)`` turns
    the ``:arg`` text into the value ``build`` and :meth:`parse` callers receive (raise
    ConfigError for a bad one); ``info``: the entry's facts, an instance of the registry's
    ``info_type`` (:attr:`Entry.info`)."""
    if self.info_type is not None and not isinstance(info, self.info_type):
      raise TypeError(f"{self.kind} {name!r}: info must be a {self.info_type.__name__}, got "
                      f"{type(info).__name__}")

    def decorator(build):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = Entry(name, build, doc, arg_doc, parse, info)
      return build
    return decorator

  def unregister(self, name: str) -> None:
    """Removes ``name`` (tests and interactive sessions that register their own entries)."""
    self._entries.pop(name, None)

  def names(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, spec: str) -> bool:
    try:
      return split_spec(spec)[0] in self._entries
    except ConfigError:
      return False

  def __iter__(self) -> Iterator[Entry]:
    return iter(self._entries.values())

  def info(self, spec: str):
    """The :attr:`Entry.info` of ``spec``'s entry (ConfigError listing the valid names)."""
    return self.entry(spec)[0].info

  def entry(self, spec: str) -> tuple[Entry, str | None]:
    name, arg = split_spec(spec)
    if name not in self._entries:
      raise ConfigError(
          f"unknown {self.kind} {spec!r}; valid choices: {', '.join(self.names())}")
    entry = self._entries[name]
    if arg is not None and entry.arg_doc is None:
      raise ConfigError(f"{self.kind} {name!r} takes no ':' argument, got {spec!r}")
    return entry, arg

  def parse(self, spec: str | Spec) -> Spec:
    """The entry of ``spec`` and its parsed argument, without building anything."""
    if isinstance(spec, Spec):
      return spec
    entry, arg = self.entry(spec)
    if entry.parse_arg is not None:
      try:
        arg = entry.parse_arg(arg)
      except ConfigError as e:
        raise ConfigError(f"{self.kind} {spec!r}: {e}") from None
    return Spec(entry, arg, spec)

  def build(self, spec: str | Spec, **context):
    parsed = self.parse(spec)
    return parsed.entry.build(parsed.arg, **context)

  def validate(self, spec: str, **context) -> None:
    """Raises ConfigError if ``spec`` would not build (used before anything compiles)."""
    self.build(spec, **context)

  def markdown_rows(self) -> list[str]:
    rows = []
    for e in self:
      name = f"`{e.name}`" if e.arg_doc is None else f"`{e.name}[:arg]`"
      arg = f"; arg: {e.arg_doc}" if e.arg_doc else ""
      rows.append(f"| {self.kind} | {name} | {e.doc}{arg} |")
    return rows


class KeyedRegistry(Registry):
  """A registry whose entries add config keys to the schema when they register
  (:data:`resnorm_jax.config.SCHEMA`, owner ``"<kind> <name>"``: a model family its
  ``model.*`` keys, a task its sections) and remove them when unregistered."""

  def register_with_keys(self, name: str, doc: str, info, sections):
    """Decorator registering ``name`` with ``info`` and the config keys ``sections``
    (``{section: {key: Key}}``); nothing is added when ``name`` is already taken."""
    registered = self.register(name, doc, info=info)

    def decorator(obj):
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      for section, keys in sections.items():
        config_lib.SCHEMA.add(section, keys, owner=f"{self.kind} {name}")
      return registered(obj)
    return decorator

  def unregister(self, name: str) -> None:
    super().unregister(name)
    config_lib.SCHEMA.remove(f"{self.kind} {name}")


def parse_number(text: str, what: str, *, kind=float, minimum=None, choices_hint=""):
  """Parses a spec argument, raising a ConfigError that names the bad value."""
  try:
    value = kind(text)
  except (TypeError, ValueError):
    raise ConfigError(f"{what} must be a {kind.__name__}, got {text!r}{choices_hint}") from None
  if minimum is not None and value < minimum:
    raise ConfigError(f"{what} must be >= {minimum}, got {value!r}{choices_hint}")
  return value
