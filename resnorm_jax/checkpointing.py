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

Preemption (:mod:`resnorm_jax.preemption`) and what resuming with another config means
(:mod:`resnorm_jax.resume`, ``config.json``) live in their own modules.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from resnorm_jax import errors, storage
from resnorm_jax.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

ITEM = "state"          # the orbax item name the train state is stored under
FINGERPRINT = "config_fingerprint"   # a step's custom metadata: resume.config_fingerprint()
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
