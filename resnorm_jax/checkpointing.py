"""Checkpointing for the training engine: orbax-backed saves, safe restores, preemption.

:class:`Checkpointer` wraps :class:`orbax.checkpoint.CheckpointManager` with the policy the
training loop needs:

* **Cadence.**  ``should_save(step)`` is ``step % every_steps == 0``; the loop may ``force``
  a save (end of training, preemption).  A step that already exists is never written again
  (``save`` returns ``False``), so nothing on disk is ever overwritten.
* **Retention.**  Only the newest ``keep`` steps survive (orbax ``LatestN`` preservation).
* **Async, durable on demand.**  Saves are asynchronous: ``save`` returns once the arrays are
  copied to host memory (so the next, possibly donating, train step may run), and the write
  finishes in the background.  ``wait()`` blocks until every started save is committed.
* **Atomic steps.**  Orbax writes each step into ``<step>.orbax-checkpoint-tmp*`` and renames
  it when complete; such temporary directories are never listed as steps, and leftovers from a
  crashed run are removed when the :class:`Checkpointer` is created.
* **Topology-free restore.**  ``restore(abstract_tree)`` reads every array straight into the
  shardings of ``abstract_tree`` (``jax.ShapeDtypeStruct`` with ``.sharding`` for the current
  mesh), so a checkpoint written on 8 devices restores onto 1 and vice versa.
* **Corruption fallback.**  If the newest step cannot be read (a truncated or deleted file), a
  warning names the step and the error and the previous step is tried, and so on.
* **Wrong-model detection.**  If the stored tree's keys or shapes differ from
  ``abstract_tree``, :class:`ConfigError` names a few differences and suggests a fresh
  ``--workdir``.

Handler choice: the state is one item, ``"state"``, written with orbax's
``StandardSave``/``StandardRestore`` (``StandardCheckpointHandler``).  It is orbax's standard
handler for pytrees of ``jax.Array`` / ``np.ndarray`` / Python scalars -- exactly what a train
state is -- and a thin, validating layer over ``PyTreeCheckpointHandler``: every process writes
only the shards it owns (into its own OCDBT sub-database, merged on commit) while the primary
process writes the metadata, so multi-process saves need nothing more than every process
calling :meth:`Checkpointer.save`.  Unlike ``PyTreeRestore``, ``StandardRestore`` takes the
abstract tree (with shardings) directly, with no hand-built ``RestoreArgs``.  Naming the item
(rather than orbax's unnamed default item) leaves room for further items later, e.g. a data
iterator state, without changing the layout of existing checkpoints.

:class:`PreemptionGuard` turns SIGTERM (and optionally SIGINT) into a flag the loop polls;
:func:`save_config_json` / :func:`check_config_compatible` keep the resolved config next to the
checkpoints and refuse to resume a workdir written by a different model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from resnorm_jax import config as config_lib, errors, storage, workdir as workdir_lib
from resnorm_jax.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

ITEM = "state"          # the orbax item name the train state is stored under
CONFIG_FILE = "config.json"
FINGERPRINT = "config_fingerprint"   # a step's custom metadata: config_fingerprint()
_MAX_LISTED = 5         # differences listed in a mismatch message, per kind


def _bound_tensorstore_retries() -> None:
  """Gives every TensorStore context orbax creates the retry budget of
  :data:`resnorm_jax.storage.TENSORSTORE_RETRIES` for GCS requests (TensorStore's default,
  32 retries with delays up to 32 s, kept a run whose store was down for ~15 minutes
  before it could report the failure).  Orbax builds each context with
  ``tensorstore_utils.get_ts_context``, looked up at each call, which is wrapped here."""
  from orbax.checkpoint._src.serialization import tensorstore_utils  # pylint: disable=import-outside-toplevel
  original = tensorstore_utils.get_ts_context
  if getattr(original, "bounded_retries", False):
    return

  def get_ts_context(*args, **kwargs):
    context = original(*args, **kwargs)
    spec = context.spec.to_json() if hasattr(context, "spec") else None
    if spec is None:
      return context
    spec.setdefault("gcs_request_retries", dict(storage.TENSORSTORE_RETRIES))
    import tensorstore as ts  # pylint: disable=import-outside-toplevel
    return ts.Context(spec)
  get_ts_context.bounded_retries = True
  tensorstore_utils.get_ts_context = get_ts_context


_bound_tensorstore_retries()


# --------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------


class Checkpointer:
  """Saves and restores the train state under ``directory`` (see the module docstring).

  Every process of a multi-process job must construct it and call ``save``/``restore``/
  ``wait``/``close`` in the same order with the same steps (orbax synchronises them).
  """

  def __init__(self, directory: str, *, keep: int, every_steps: int, average_keep: int = 0,
               average_every_steps: int = 0, fingerprint: str = ""):
    """``average_keep`` > 0 also keeps the newest ``average_keep`` steps that are multiples
    of ``average_every_steps`` (saved at that cadence too), for checkpoint averaging
    (:mod:`resnorm_jax.averaging`); ``fingerprint`` is recorded in every step's metadata
    (:func:`config_fingerprint`)."""
    if not isinstance(keep, int) or keep < 1:
      raise ConfigError(f"checkpoint keep must be an integer >= 1, got {keep!r}; "
                        "set it to the number of recent checkpoints to retain")
    self.directory = storage.abspath(directory)   # a local path or a gs:// URL
    self.keep = keep
    self.every_steps = int(every_steps)
    self.average_keep = int(average_keep)
    self.average_every_steps = int(average_every_steps)
    self.fingerprint = fingerprint
    with self._io():
      try:
        self._manager = self._create_manager()
      except FileNotFoundError:  # its listing raced with the removal of a partial step
        self._manager = self._create_manager()

  def _create_manager(self) -> ocp.CheckpointManager:
    policy = ocp.checkpoint_managers.LatestN(n=self.keep)
    if self.average_keep > 0 and self.average_every_steps > 0:
      policy = ocp.checkpoint_managers.AnyPreservationPolicy([policy, (
          ocp.checkpoint_managers.EveryNSteps(interval_steps=self.average_every_steps,
                                              max_to_keep=self.average_keep))])
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            enable_async_checkpointing=True,
            cleanup_tmp_directories=True,
            create=True,
        ),
        handler_registry=ocp.handlers.create_default_handler_registry(
            **{ITEM: ocp.StandardCheckpointHandler()}),
    )

  def _io(self):
    """The I/O boundary of orbax and TensorStore: a storage failure raised inside, whatever
    its class, leaves as a one-line :class:`StorageError` naming the checkpoint directory
    (see :func:`resnorm_jax.errors.storage_error`); anything else is unchanged."""
    return _CheckpointIO(self.directory)

  # -- queries ---------------------------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Steps on disk (or being written by this process), ascending; temp dirs excluded.
    A prefix without objects (gcsfs lists it as FileNotFoundError) holds no step."""
    with self._io():
      try:
        return sorted(int(s) for s in self._manager.all_steps())
      except FileNotFoundError:
        return []

  def latest_step(self) -> int | None:
    """The newest step, or ``None`` when there is no checkpoint."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def should_save(self, step: int) -> bool:
    """Periodic cadence: ``step % every_steps == 0`` (never when ``every_steps <= 0``), and
    the averaging cadence ``step % average_every_steps == 0`` when averaging is kept."""
    averaged = (self.average_keep > 0 and self.average_every_steps > 0
                and step % self.average_every_steps == 0)
    return averaged or (self.every_steps > 0 and step % self.every_steps == 0)

  def step_fingerprint(self, step: int) -> str:
    """The config fingerprint saved with ``step`` ('' for steps saved without one)."""
    metadata = self._manager.metadata(step)
    return str((getattr(metadata, "custom_metadata", None) or {}).get(FINGERPRINT, ""))

  # -- save ------------------------------------------------------------------------------------

  def save(self, step: int, tree: Any, *, force: bool = False) -> bool:
    """Starts an async save of ``tree`` at ``step`` if due (or ``force``); returns whether.

    ``tree`` is a pytree of ``jax.Array`` (any sharding), ``np.ndarray``, numpy scalars and
    Python scalars.  An existing step is never overwritten: saving it again returns ``False``.
    Older steps beyond ``keep`` are deleted once this save is committed.
    """
    step = int(step)
    if not (force or self.should_save(step)):
      return False
    if step in self.all_steps():
      log.info("checkpoint step %d already exists in %s; not saving it again",
               step, self.directory)
      return False
    # Cadence is decided above, so orbax is always told to save (force=True); orbax still
    # refuses an existing step, which the check above has ruled out.
    # A failure of the previous (asynchronous) save is raised here.
    with self._io():
      return bool(self._manager.save(
          step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardSave(tree)}), force=True,
          custom_metadata={FINGERPRINT: self.fingerprint} if self.fingerprint else None))

  def wait(self) -> None:
    """Blocks until every started save is committed to disk (and old steps pruned)."""
    with self._io():
      self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's background resources."""
    with self._io():
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  # -- restore ---------------------------------------------------------------------------------

  def restore(self, abstract_tree: Any) -> tuple[int, Any] | None:
    """Restores the newest readable step into the layout of ``abstract_tree``.

    ``abstract_tree`` mirrors the saved tree: ``jax.ShapeDtypeStruct`` leaves with
    ``.sharding`` set for the current mesh (concrete ``jax.Array`` leaves are accepted and
    used for their shape/dtype/sharding only); Python and numpy scalar leaves come back as
    the same kind.  Dtypes are cast to ``abstract_tree``'s, shapes and keys must match.

    Returns ``(step, tree)``, or ``None`` when there is no checkpoint.  A step that fails to
    read is skipped with a warning; if none can be read, or the checkpoint was written for a
    different tree (model/config), raises :class:`ConfigError`.  A store that does not
    answer (timeouts, HTTP 429/5xx after the retries, refused credentials) is not a damaged
    step: it raises :class:`StorageError` (exit 5) instead of falling back to older steps.
    """
    self.wait()  # a save still in flight from this process must land before we read
    with self._io():
      try:
        self._manager.reload()
      except FileNotFoundError:   # a gs:// prefix without objects: nothing to resume
        return None
    steps = self.all_steps()
    if not steps:
      return None
    target = jax.tree.map(_abstract_leaf, abstract_tree)
    failures = []
    for step in reversed(steps):
      tree, error = self._try_restore_step(step, abstract_tree, target)
      if error is not None:
        failures.append((step, error))
        log.warning("checkpoint step %d in %s is unreadable (corrupt or partial), falling "
                    "back to an older step: %s", step, self.directory, _describe(error))
        continue
      if failures:
        log.warning("restored checkpoint step %d in %s after skipping unreadable step(s) %s",
                    step, self.directory, [s for s, _ in failures])
      return step, tree
    raise ConfigError(
        f"no checkpoint in {self.directory} could be restored; tried steps "
        f"{[s for s, _ in failures]}: "
        + "; ".join(f"step {s}: {_describe(e)}" for s, e in failures)
        + ". Use a fresh --workdir, or remove the broken step directories to start over.")

  def restore_step(self, step: int, abstract_tree: Any) -> Any:
    """The tree of ``step`` (as :meth:`restore`, without falling back to another step):
    ConfigError if it is unreadable or of another tree."""
    tree, error = self._try_restore_step(step, abstract_tree,
                                         jax.tree.map(_abstract_leaf, abstract_tree))
    if error is not None:
      raise ConfigError(f"checkpoint step {step} in {self.directory} is unreadable: "
                        f"{_describe(error)}")
    return tree

  def _try_restore_step(self, step: int, abstract_tree: Any,
                        target: Any) -> tuple[Any, Exception | None]:
    """``(tree, None)``, or ``(None, error)`` if step ``step`` cannot be read.

    A mismatching tree raises :class:`ConfigError` instead: an older step of the same run
    would not fit either.  All processes agree on the outcome, so that none falls back to a
    different step than the others.
    """
    try:
      tree, error = self._restore_step(step, abstract_tree, target), None
    except ConfigError:
      raise
    except Exception as e:  # pylint: disable=broad-except  (tensorstore raises bare ones)
      tree, error = None, e
    if error is not None and errors.store_unavailable(error):
      failure = errors.storage_error(error, f"{self.directory} (step {step})")
      if failure is not None:
        raise failure from error
    if not _all_processes_agree(error is None) and error is None:
      tree, error = None, RuntimeError(f"step {step} failed to restore on another process")
    return tree, error

  def _restore_step(self, step: int, abstract_tree: Any, target: Any) -> Any:
    """Checks the stored tree against ``abstract_tree``, then restores step ``step``."""
    metadata = self._manager.item_metadata(step)
    stored = metadata.get(ITEM) if metadata is not None else None
    if stored is None:
      raise FileNotFoundError(f"step {step} has no readable '{ITEM}' tree metadata")
    _check_same_tree(self.directory, step, stored.tree, abstract_tree)
    restored = self._manager.restore(
        step, args=ocp.args.Composite(**{ITEM: ocp.args.StandardRestore(target)}))[ITEM]
    return jax.tree.map(_like_abstract, abstract_tree, restored)


def _abstract_leaf(x: Any) -> Any:
  """An ``abstract_tree`` leaf in a form ``StandardRestore`` accepts."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  if isinstance(x, np.generic):
    return np.zeros((), x.dtype)  # numpy scalars are stored as 0-d arrays
  return x


def _like_abstract(abstract: Any, value: Any) -> Any:
  """Turns a restored leaf back into the kind of the ``abstract_tree`` leaf."""
  if isinstance(abstract, np.generic):
    return np.asarray(value, abstract.dtype)[()]
  return value


def _all_processes_agree(ok: bool) -> bool:
  """True when ``ok`` on every process (trivially ``ok`` in a single-process job)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class _CheckpointIO:
  """See :meth:`Checkpointer._io`."""

  def __init__(self, directory: str):
    self.directory = directory

  def __enter__(self):
    return self

  def __exit__(self, kind, error, traceback) -> bool:
    if error is None or isinstance(error, (ConfigError, StorageError)) \
        or not isinstance(error, Exception):
      return False
    failure = errors.storage_error(error, self.directory)
    if failure is not None:
      raise failure from error
    return False


def _describe(e: BaseException, limit: int = 300) -> str:
  """``Type: first line`` of the innermost cause of ``e``, shortened.

  Orbax wraps tensorstore read errors in a bare ``Exception`` whose message is mostly a
  TensorStore spec; the cause it chains says what actually broke (``DATA_LOSS: ...``).
  """
  while e.__cause__ is not None:
    e = e.__cause__
  return errors.one_line(e, limit)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """``{"params.conv.kernel": shape}`` for every leaf, keyed as orbax names them."""
  return {k: tuple(getattr(v, "shape", np.shape(v)))
          for k, v in ocp.tree.to_flat_dict(tree, sep=".").items()}


def _check_same_tree(directory: str, step: int, stored: Any, abstract_tree: Any) -> None:
  """Raises :class:`ConfigError` if the stored keys/shapes differ from ``abstract_tree``."""
  have, want = _leaf_shapes(stored), _leaf_shapes(abstract_tree)
  only_ckpt = sorted(set(have) - set(want))
  only_run = sorted(set(want) - set(have))
  shapes = sorted(k for k in set(have) & set(want) if have[k] != want[k])
  if not (only_ckpt or only_run or shapes):
    return
  parts = []
  if only_ckpt:
    parts.append("in the checkpoint only: " + _few(only_ckpt))
  if only_run:
    parts.append("in this run only: " + _few(only_run))
  if shapes:
    parts.append("shape mismatch: " + _few(
        [f"{k} checkpoint {have[k]} vs this run {want[k]}" for k in shapes]))
  raise ConfigError(
      f"the checkpoint in {directory} (step {step}) was written by a different model/config: "
      + "; ".join(parts)
      + ". Use a fresh --workdir for this config, or rerun with the config that wrote it.")


def _few(items: list[str]) -> str:
  """The first few items, comma-separated, with a count of the rest."""
  shown = ", ".join(items[:_MAX_LISTED])
  rest = len(items) - _MAX_LISTED
  return shown + (f" (and {rest} more)" if rest > 0 else "")


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------


class PreemptionGuard:
  """Context manager turning SIGTERM (and, with ``sigint=True``, SIGINT) into a flag.

  The handler only sets ``self.requested = True`` (and records the first ``self.signal``);
  it never saves.  The training loop polls ``guard.requested`` each step, saves, and exits
  cleanly.  A *second* SIGINT (Ctrl-C pressed again) exits at once with code 130, even while
  the main thread is inside a long XLA compilation or step (where Python signal handlers
  cannot run): a watcher thread reads the signal numbers from ``signal.set_wakeup_fd``, calls
  ``on_abort`` (e.g. releasing the workdir lock) and ends the process with ``os._exit``.
  Nothing is corrupted by that: checkpoints are renamed into place only when complete (a
  partial one is removed at the next start) and a cut metrics line is repaired on resume.
  Further SIGTERMs are ignored: the checkpoint being written is what a scheduler waits for.
  The previous handlers and wakeup fd are restored on exit.  Signal handlers can only be
  installed from the main thread; elsewhere the guard logs a warning and stays inert.
  """

  def __init__(self, *, sigint: bool = False, on_abort=None):
    self.signals = (signal.SIGTERM, signal.SIGINT) if sigint else (signal.SIGTERM,)
    self.requested = False
    self.signal: str | None = None
    self.on_abort = on_abort
    self._previous: dict[int, Any] = {}
    self._interrupts = 0
    self._lock = threading.Lock()
    self._pipe: tuple[int, int] | None = None
    self._previous_wakeup = -1
    self._watcher: threading.Thread | None = None

  def _note(self, signum: int, count: bool = True) -> None:
    """Records a signal; with ``count``, the second SIGINT ends the process."""
    with self._lock:
      self.requested = True
      if self.signal is None:
        self.signal = signal.Signals(signum).name
      if count and signum == signal.SIGINT:
        self._interrupts += 1
        abort = self._interrupts == 2
      else:
        abort = False
    if abort:
      os.write(2, b"\nSecond interrupt: exiting now without saving (the last complete "
                  b"checkpoint is kept; rerun to resume)\n")
      try:
        if self.on_abort is not None:
          self.on_abort()
      finally:
        os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access

  def _handle(self, signum, frame) -> None:  # pylint: disable=unused-argument
    # With a watcher, it counts the interrupts (it sees them even during a long XLA call);
    # the handler still sets the flag at once.
    self._note(signum, count=self._watcher is None)

  def _watch(self, read_fd: int) -> None:
    while True:
      try:
        data = os.read(read_fd, 64)
      except OSError:
        return
      if not data:
        return
      for signum in data:
        if signum in self.signals:
          self._note(signum)

  def __enter__(self) -> "PreemptionGuard":
    if threading.current_thread() is not threading.main_thread():
      log.warning("PreemptionGuard entered outside the main thread; signals not intercepted")
      return self
    for sig in self.signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    try:
      self._previous_wakeup = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    except ValueError:  # not the main thread of the main interpreter
      os.close(read_fd)
      os.close(write_fd)
      return self
    self._pipe = (read_fd, write_fd)
    self._watcher = threading.Thread(target=self._watch, args=(read_fd,),
                                     name="signal-watcher", daemon=True)
    self._watcher.start()
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      # None means the old handler was not installed from Python; fall back to the default.
      signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
    self._previous.clear()
    if self._pipe is not None:
      signal.set_wakeup_fd(self._previous_wakeup)
      os.close(self._pipe[1])        # the watcher reads EOF and ends
      self._watcher.join(timeout=5)
      os.close(self._pipe[0])
      self._pipe, self._watcher = None, None


# --------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------


def config_fingerprint(config_dict: Any) -> str:
  """A hash of every value that changes the numbers of a run (resume classes ``tree`` and
  ``trajectory``, :data:`resnorm_jax.config.SCHEMA`): checkpoints with the same fingerprint
  come from one run of one config.  Neutral keys (evaluation, logging, checkpoint cadence,
  data location) and ``published`` are left out."""
  import hashlib
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
  workdir_lib.write_atomic(path, (text + "\n").encode())
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
  from resnorm_jax import models
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
