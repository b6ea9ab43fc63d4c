"""The training engine: optimizer, train/eval steps in three execution styles, the loop.

``train_and_evaluate(config, workdir)`` validates the config, loads the data, resumes from
the newest checkpoint in ``workdir`` if there is one, trains with periodic evaluation,
checkpointing (also on SIGTERM) and metrics, and returns a summary.

Randomness is a pure function of ``(train.seed, step)`` (data order, augmentation,
dropout), so a checkpoint holds only the :class:`TrainState`, and resuming is exact.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax import lax

from resnorm_jax import averaging, checkpointing, cpu_workarounds, errors, preemption, resume
from resnorm_jax import validation
from resnorm_jax import layer_stats as layer_stats_lib, parallelism, storage, tasks
from resnorm_jax import workdir as workdir_lib
from resnorm_jax.errors import (ConfigError, NonFiniteLossError, StorageError,
                                WorkdirLockedError, quiet_storage_logs, storage_error)
from resnorm_jax.metrics import MetricWriter, Progress
from resnorm_jax.tasks.base import Task


@flax.struct.dataclass
class TrainState:
  step: jax.Array             # int32: steps taken (the data position)
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array   # int32: -1, or the first step with a non-finite loss (stop mode)
  skipped_steps: jax.Array    # int32: steps whose update was skipped (skip mode)


# ----------------------------------------------------------------------------------------
# The state: one initializer, its shapes by abstract evaluation.
# ----------------------------------------------------------------------------------------
def build_task(config: ml_collections.ConfigDict, mesh) -> Task:
  """The task ``model.name`` trains with (:mod:`resnorm_jax.tasks`); loads its data."""
  return tasks.task_class(config)(config, mesh)


def _init_fn(task: Task) -> Callable:
  def init(key):
    variables = task.model.init({"params": key, "dropout": key}, *task.example_inputs(),
                                train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=task.tx.init(params),
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      skipped_steps=jnp.zeros((), jnp.int32))
  return init


# The initializer runs once: on CPU, compiling it without LLVM optimizations takes a third
# of the time (ResNet-1001: the init program holds a random draw per parameter, ~400 kernels).
_RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def make_init(task: Task) -> tuple[Callable, jax.Array]:
  """``(init, key)``: the jitted initializer of :func:`init_state` and its key."""
  platform = task.mesh.devices.flat[0].platform
  options = cpu_workarounds.with_options(_RUN_ONCE_OPTIONS.get(platform), platform, task.config)
  return jax.jit(_init_fn(task), out_shardings=parallelism.replicated(task.mesh),
                 compiler_options=options), jax.random.key(task.config.train.seed)


def init_state(task: Task) -> TrainState:
  """Parameters (float32) and optimizer state from ``train.seed``, replicated over the mesh."""
  init, key = make_init(task)
  return init(key)


def abstract_state(task: Task) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of :func:`init_state`'s state, by abstract
  evaluation of the same initializer (nothing is computed)."""
  sharding = parallelism.replicated(task.mesh)
  shapes = jax.eval_shape(_init_fn(task), jax.random.key(0))
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def state_bytes(abstract) -> int:
  """Bytes of a (abstract) train state: what one checkpoint of it stores."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(abstract))


# ----------------------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------------------
def resolve_guard(guard: str, platform: str) -> str:
  """``train.nonfinite_guard`` for ``platform``: ``auto`` is ``cond`` on CPU, where the
  per-leaf selects of ``where`` made the Transformer-base step 1.16-1.26x a bare jitted step
  and ``cond`` 0.98-1.03x (benchmarks/RESULTS.md), and ``where`` on GPU/TPU until timed
  there (``benchmarks/transformer_step.py --guards where,cond``, the device check)."""
  if guard == "auto":
    return "cond" if platform == "cpu" else "where"
  return guard


def apply_gradients(tx, state: TrainState, grads, loss, batch_stats,
                    stop_on_nonfinite: bool, guard: str = "where") -> tuple[TrainState, jax.Array]:
  """One optimizer update, kept only when the loss and the gradient norm are finite (and no
  earlier step was non-finite in ``stop`` mode); returns (new state, ‖g‖₂).

  ``guard`` (``train.nonfinite_guard`` via :func:`resolve_guard`): ``where`` computes the
  update and selects new or old values leaf by leaf; ``cond`` runs the update inside
  ``lax.cond``, so a skipped step does no work and an accepted one no selects.  Both give
  the same state.
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  accept = finite & (state.nonfinite_step < 0)

  def update(_):
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return optax.apply_updates(state.params, updates), batch_stats, opt_state

  if guard == "cond":
    params, batch_stats, opt_state = lax.cond(
        accept, update, lambda _: (state.params, state.batch_stats, state.opt_state), None)
  elif guard == "where":
    keep = lambda new, old: jax.tree_util.tree_map(
        lambda a, b: jnp.where(accept, a, b), new, old)
    params, batch_stats, opt_state = keep(
        update(None), (state.params, state.batch_stats, state.opt_state))
  else:
    raise ValueError(f"unknown non-finite guard {guard!r}; valid choices: where, cond")
  first_bad = (~finite) & (state.nonfinite_step < 0) & stop_on_nonfinite
  new_state = TrainState(
      step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state,
      nonfinite_step=jnp.where(first_bad, state.step, state.nonfinite_step),
      skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
  return new_state, grad_norm


def microbatches(batch, k: int, groups: int, mesh=None):
  """``batch`` (leading axis B) as k microbatches stacked on a new leading axis.

  The batch is ``groups`` contiguous device shares (one under ``shard_map``/``pmap``, the
  mesh's devices under ``jit``); microbatch j holds rows j·b .. (j+1)·b − 1 of every share
  (b = B / (groups·k)), so under ``jit`` each device's rows stay on it and microbatch j is
  the per-device program's microbatch j on every device.  ``mesh`` (under jit): the
  microbatches keep the batch sharding on their second axis.
  """
  def split(a):
    b = a.shape[0] // (groups * k)
    a = jnp.swapaxes(a.reshape((groups, k, b) + a.shape[1:]), 0, 1)
    a = a.reshape((k, groups * b) + a.shape[3:])
    if mesh is not None:
      a = lax.with_sharding_constraint(a, jax.sharding.NamedSharding(
          mesh, jax.sharding.PartitionSpec(None, parallelism.DATA_AXIS)))
    return a
  return jax.tree_util.tree_map(split, batch)


def accumulate_gradients(grad_fn, params, key, batch, k: int, groups: int, mesh=None):
  """``train.accumulate_steps = k``: :func:`microbatches` of ``batch`` through ``grad_fn``
  (``(params, key, batch) -> ((loss, LossOutput), grads)``, the loss already divided by the
  global batch's N) in a ``lax.scan``, so one microbatch's activations are live at a time.

  Returns (loss, grads, sums, new variables, the last microbatch): the loss, gradients and
  sums are the sums over the microbatches (= the global batch's, up to float32 summation
  order); dropout key of microbatch j: ``fold_in(key, j)``.  BatchNorm: each microbatch is
  a ghost batch (its statistics normalize it, as on k times the devices with
  ``bn_sync=local``), and the running statistics are updated once per step with the mean
  of the microbatches' statistics: every microbatch updates from the step's running
  statistics r, and the update r' = m·r + (1 − m)·s is linear in s, so the mean of the k
  updated values is m·r + (1 − m)·mean_j s_j.  Other collections (layer-statistics taps)
  are those of the last microbatch.
  """
  xs = microbatches(batch, k, groups, mesh)
  first = jax.tree_util.tree_map(lambda a: a[0], xs)
  (_, out0), grads0 = jax.eval_shape(grad_fn, params, key, first)
  zeros = lambda tree: jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), tree)
  taps_key = layer_stats_lib.TAPS

  def body(carry, x):
    (loss_acc, grads_acc, sums_acc, stats_acc), _ = carry
    j, mb = x
    (loss, out), grads = grad_fn(params, jax.random.fold_in(key, j), mb)
    new_vars = out.new_variables
    acc = jax.tree_util.tree_map(jnp.add, (loss_acc, grads_acc, sums_acc, stats_acc),
                                 (loss, grads, out.sums, new_vars.get("batch_stats", {})))
    return (acc, new_vars.get(taps_key, {})), None

  init = ((jnp.zeros((), jnp.float32), zeros(grads0), zeros(out0.sums),
           zeros(out0.new_variables.get("batch_stats", {}))),
          zeros(out0.new_variables.get(taps_key, {})))
  ((loss, grads, sums, stats), taps), _ = lax.scan(body, init, (jnp.arange(k), xs))
  new_vars = {"batch_stats": jax.tree_util.tree_map(lambda a: a / k, stats)}
  if taps_key in out0.new_variables:
    new_vars[taps_key] = taps
  last = jax.tree_util.tree_map(lambda a: a[-1], xs)
  return loss, grads, sums, new_vars, last


def make_train_step(task: Task, layer_stats: bool = False) -> Callable:
  """``train_step(state, inputs) -> (state, metrics)`` for ``inputs = task.inputs(step)``.

  The one step of every task (see :mod:`resnorm_jax.tasks.base` for the math): the task
  prepares the global batch from ``fold_in(seed, step)``, then the per-replica function
  computes the task's loss sum over its slice divided by the global count N (counted and
  ``psum``-ed first: it does not depend on the parameters), so ``psum`` of the gradients is
  the global-batch gradient in every execution style (``jit``, ``shard_map``, ``pmap``;
  :func:`resnorm_jax.parallelism.data_parallel`).  Metrics: ``loss``, ``grad_norm``,
  ``learning_rate`` and the task's (:meth:`Task.step_metrics`).  With ``layer_stats`` the
  same update also returns ``metrics["layer_stats"]``
  (:func:`resnorm_jax.layer_stats.step_stats`).  With ``train.accumulate_steps = k > 1`` the
  per-replica loss and gradients are summed over k microbatches in a ``lax.scan``
  (:func:`accumulate_gradients`), divided by the same global N, before the one update.
  On CPU the compiler workarounds of :mod:`resnorm_jax.cpu_workarounds` apply
  (``train.cpu_workarounds``).
  """
  config = task.config
  seed_key = jax.random.key(config.train.seed)
  stop_on_nonfinite = config.train.on_nonfinite == "stop"
  platform = task.mesh.devices.flat[0].platform
  guard = resolve_guard(config.train.nonfinite_guard, platform)
  apply_kwargs = layer_stats_lib.apply_kwargs(layer_stats)
  accumulate = config.train.accumulate_steps

  def make_fn(axis_name):
    model = task.model_for(axis_name)

    def step_fn(state: TrainState, key, batch):
      if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))
      weight = task.weight(batch)
      if axis_name is not None:
        weight = lax.psum(weight, axis_name)
      denominator = jnp.maximum(weight, 1.0)

      def loss_fn(params, key, batch):
        out = task.loss(model, {"params": params, "batch_stats": state.batch_stats}, batch,
                        key, apply_kwargs)
        return out.loss_sum / denominator, out

      grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
      if accumulate == 1:
        (loss, out), grads = grad_fn(state.params, key, batch)
        sums, new_vars = out.sums, out.new_variables
      else:
        groups = task.mesh.devices.size if axis_name is None else 1
        loss, grads, sums, new_vars, batch = accumulate_gradients(
            grad_fn, state.params, key, batch, accumulate, groups,
            task.mesh if axis_name is None else None)
      if axis_name is not None:
        grads, loss, sums = lax.psum((grads, loss, sums), axis_name)
      new_state, grad_norm = apply_gradients(task.tx, state, grads, loss,
                                             new_vars.get("batch_stats", {}),
                                             stop_on_nonfinite, guard)
      metrics = dict(loss=loss, **task.step_metrics(sums, weight), grad_norm=grad_norm,
                     learning_rate=task.schedule(state.step))
      if layer_stats:
        metrics["layer_stats"] = layer_stats_lib.step_stats(
            grads, state.params, new_state.params, new_vars.get(layer_stats_lib.TAPS, {}),
            axis_name=axis_name,
            weights_for=task.layer_stats_weights(batch) or layer_stats_lib.unweighted)
      return new_state, metrics
    return step_fn

  parallel_step = parallelism.data_parallel(make_fn, config.parallel.mode, task.mesh, 2, 1)

  def prepare(step, inputs):
    return task.prepare(jax.random.fold_in(seed_key, step), inputs)

  options = cpu_workarounds.compiler_options(platform, config)
  if config.parallel.mode == "pmap":  # pmap cannot live inside jit: prepare first
    prepare_jit = jax.jit(prepare, compiler_options=options)
    return lambda state, inputs: parallel_step(state, *prepare_jit(state.step, inputs))

  def train_step(state, inputs):
    return parallel_step(state, *prepare(state.step, inputs))
  train_step = cpu_workarounds.apply(train_step, config, platform, task.model)
  return jax.jit(train_step, donate_argnums=0, compiler_options=options)


# ----------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------
def _mean_metrics(history: list[dict]) -> dict[str, float]:
  fetched = parallelism.to_host(history)
  return {k: float(np.mean([h[k] for h in fetched])) for k in fetched[0]}


def _is_main_process() -> bool:
  return jax.process_index() == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates ``config`` in ``workdir``; resumes from its newest checkpoint.

  The engine (state, step, checkpointing, metrics, preemption, non-finite handling) is
  shared by every task; the task (:mod:`resnorm_jax.tasks`, chosen by ``model.name``'s
  family) supplies the data, the loss of a batch and the evaluation.

  Failure paths (each a one-line error, see ``resnorm_jax/errors.py`` for the exit codes):
  bad config, data or workdir raise :class:`ConfigError` before anything is written; a
  workdir another live run holds raises :class:`WorkdirLockedError` before anything is
  written; a full, read-only or failing disk raises :class:`StorageError` (the last
  complete checkpoint is kept); a non-finite loss raises :class:`NonFiniteLossError`.
  SIGTERM and SIGINT save the current step and return with ``status`` ``"preempted"`` /
  ``"interrupted"``; a second SIGINT exits at once.
  """
  t0 = time.perf_counter()
  lock = workdir_lib.WorkdirLock(workdir)
  with preemption.PreemptionGuard(sigint=True, on_abort=lock.release) as guard, \
      quiet_storage_logs():
    workdir_lib.check_workdir(workdir, parent_must_exist=False)   # URL, file, read-only
    validation.validate(config, jax.device_count())
    mesh = parallelism.make_mesh(config.parallel.num_devices)
    task = build_task(config, mesh)                       # a data error writes nothing
    store_failed = False
    try:
      _acquire(lock, workdir)
      return _run(config, workdir, task, guard, t0)
    except (ConfigError, NonFiniteLossError, WorkdirLockedError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (classified, else re-raised)
      failure = storage_error(e, workdir)
      if failure is None:
        raise
      store_failed = True
      errors.within(errors.CLEANUP_SECONDS, lock.release)   # the store may be down
      raise _storage_failure(workdir, failure) from e
    finally:
      if not store_failed:
        lock.release()


def _storage_failure(workdir: str, failure: StorageError) -> StorageError:
  """The one line of a storage failure: the workdir, the cause, what is kept and what to do
  (unchanged if the message already says it, like the free-space check's)."""
  text = str(failure)
  if text.startswith(str(workdir)):
    return failure
  return StorageError(f"{workdir}: {text}; the last complete checkpoint is kept: fix the "
                      "storage (space, permissions, connectivity), then rerun the same "
                      "command to resume")


def _close_after_failure(error: BaseException, workdir: str, *closers) -> None:
  """Runs ``closers`` in order while ``error`` propagates.  After a storage failure each
  gets at most :data:`errors.CLEANUP_SECONDS` (they talk to the store that failed; a
  pending asynchronous save or a metrics upload would retry for minutes), and their errors
  are dropped (the failure is reported); after any other error they run in full
  (:func:`_close_all`)."""
  if isinstance(error, Exception) and storage_error(error, workdir) is not None:
    for close in closers:
      errors.within(errors.CLEANUP_SECONDS, close)
  else:
    _close_all(*closers)


def _close_all(*closers) -> None:
  """Runs every one of ``closers`` in order, also when one raises (the first error
  propagates)."""
  if closers:
    try:
      closers[0]()
    finally:
      _close_all(*closers[1:])


def _acquire(lock: workdir_lib.WorkdirLock, workdir: str) -> None:
  """Process 0 takes the workdir lock; every process learns whether it got it."""
  error = None
  if _is_main_process():
    try:
      storage.makedirs(workdir)
      lock.acquire()
    except (WorkdirLockedError, StorageError, OSError) as e:
      error = e
  if parallelism.any_process(error is not None):
    if error is None:
      error = WorkdirLockedError(f"process 0 could not lock {workdir} (see its message)")
    raise error


def _eval_lines(config, ev: dict, workdir: str) -> list[str]:
  """The task's lines for the final evaluation (:attr:`resnorm_jax.tasks.TaskInfo.summary_lines`)."""
  if not ev:
    return []
  info = tasks.task_info(config)
  return info.summary_lines(info, ev, workdir)


def _prepare_workdir(config, workdir: str, task: Task, abstract) -> tuple[list[str], str | None]:
  """Before anything is written: the checkpoint's config must allow this one, and a
  checkpoint must fit; then ``config.json`` (the earlier one archived when settings that
  change the continuation differ) and the task's set-up.  Returns (the changed settings,
  the archived config's path)."""
  config_dict = config.to_dict()
  resume.check_config_compatible(workdir, config_dict)
  changes = resume.resume_changes(workdir, config_dict)
  if _is_main_process():  # a save that cannot fit would fail after the first interval
    workdir_lib.check_free_space(
        workdir, workdir_lib.checkpoint_bytes_needed(state_bytes(abstract)))
  previous_config = resume.archive_config_json(workdir) if changes else None
  resume.save_config_json(workdir, config_dict)
  task.setup(workdir)
  return changes, previous_config


def _checkpointer(config, workdir: str) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(
      storage.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
      every_steps=config.checkpoint.every_steps, average_keep=config.checkpoint.average_last,
      average_every_steps=averaging.average_interval(config),
      fingerprint=resume.config_fingerprint(config.to_dict()))


def _restore_or_init(task: Task, ckpt: checkpointing.Checkpointer, abstract,
                     workdir: str) -> TrainState:
  """The newest checkpoint's state, or a fresh one."""
  try:
    restored = ckpt.restore(abstract)
  except BaseException as e:
    _close_after_failure(e, workdir, ckpt.close)
    raise
  if restored is None:
    return init_state(task)
  logging.info("resumed from the checkpoint of step %d in %s", restored[0], workdir)
  return restored[1]


class _Loop:
  """The training loop of one run: steps, logging, evaluation, checkpoints, each a method.

  Holds the state between steps; every process runs the same calls in the same order (the
  decisions that depend on one process, a signal or a non-finite step, are agreed first)."""

  def __init__(self, config, workdir: str, task: Task, ckpt, state: TrainState, abstract):
    self.config, self.workdir, self.task, self.ckpt = config, workdir, task, ckpt
    self.state, self.abstract = state, abstract
    self.start_step = int(parallelism.to_host(state.step))
    self.step = self.start_step
    t = config.train
    # Records after the restored step are dropped: the continuing run writes them again.
    self.writer = MetricWriter(workdir, enabled=_is_main_process(), resume_step=self.start_step)
    self.progress = Progress(t.steps, self.start_step, enabled=_is_main_process())
    self.stats_every = t.layer_stats_every_steps
    self.call_order = (layer_stats_lib.module_call_order(
        task.model, *task.layer_stats_inputs(), train=False)
        if self.stats_every and self.writer.enabled else [])
    self.steps = {False: make_train_step(task)}   # with layer statistics: on first use
    self.history: list[dict] = []
    self.last_eval: dict[str, float] = {}
    self.average: dict | None = None
    self.train_time = 0.0
    self.tick = time.perf_counter()

  def closers(self) -> tuple:
    return (self.ckpt.close, self.progress.close, self.writer.close)

  def train_step(self) -> None:
    """One step (with the layer statistics every ``train.layer_stats_every_steps``)."""
    with_stats = self.stats_every > 0 and (self.step + 1) % self.stats_every == 0
    if with_stats not in self.steps:
      self.steps[with_stats] = make_train_step(self.task, layer_stats=True)
    self.state, metrics = self.steps[with_stats](self.state, self.task.inputs(self.step))
    if with_stats:
      layer_stats_lib.write(self.writer, self.step + 1, metrics.pop("layer_stats"),
                            self.call_order)
    self.history.append(metrics)
    self.step += 1

  def log(self) -> None:
    """The mean of the metrics since the last record, and the throughput."""
    self.check_finite()
    summary = _mean_metrics(self.history)
    elapsed = time.perf_counter() - self.tick
    self.train_time += elapsed
    summary["steps_per_sec"] = len(self.history) / elapsed
    rates = self.task.throughput(summary, summary["steps_per_sec"])
    summary.update(rates)
    self.writer.write(self.step, "train", summary)
    self.progress.update(self.step, rates, loss=f"{summary['loss']:.3f}")
    self.history, self.tick = [], time.perf_counter()

  def evaluate(self) -> None:
    self.last_eval = self.task.evaluate(self.state, self.step)
    self.writer.write(self.step, "eval", self.last_eval)
    self.progress.write(f"step {self.step}: {self.task.describe(self.last_eval)}")

  def check_finite(self) -> None:
    """:class:`NonFiniteLossError` once a step was non-finite (``train.on_nonfinite=stop``)."""
    bad = int(parallelism.to_host(self.state.nonfinite_step))
    if bad >= 0:
      kept = self.ckpt.latest_step()
      raise NonFiniteLossError(
          f"non-finite loss or gradients at step {bad}; training stopped. The last good "
          f"checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) is kept in "
          f"{self.ckpt.directory}. Lower train.learning_rate, set train.grad_clip_norm, or "
          f"use --config.train.on_nonfinite=skip")

  def save(self, force: bool = False) -> None:
    self.check_finite()
    if self.ckpt.save(self.step, self.state, force=force):
      self.writer.sync()   # the metrics up to a checkpoint are as durable as the checkpoint

  def run(self, guard) -> str:
    """Steps until ``train.steps`` or a signal on any process (then every process saves
    the same step); returns the run's status."""
    config, t = self.config, self.config.train
    while self.step < t.steps:
      if parallelism.any_process(guard.requested):
        self.save(force=True)
        self.progress.write(f"{guard.signal or 'signal'} received: saved the checkpoint of "
                            f"step {self.step}; rerun the same command to resume")
        return "interrupted" if guard.signal == "SIGINT" else "preempted"
      self.train_step()
      if self.step % t.log_every_steps == 0 or self.step == t.steps:
        self.log()
      if config.eval.every_steps and self.step % config.eval.every_steps == 0 and \
          self.step < t.steps:
        self.evaluate()
      if self.ckpt.should_save(self.step):
        self.save()
    self.check_finite()
    self.evaluate()
    self.save(force=True)
    return "completed"

  def finish(self, status: str) -> None:
    """Waits for the saves, then evaluates the checkpoint average (a completed run with
    ``checkpoint.average_last``)."""
    self.ckpt.wait()
    if status == "completed" and self.config.checkpoint.average_last:
      self.average = self.evaluate_average()
    self.writer.sync()

  def evaluate_average(self) -> dict | None:
    """``checkpoint.average_last``: the average of the newest checkpoints at the averaging
    cadence, evaluated and written (:mod:`resnorm_jax.averaging`); None, with a note, when
    the run kept fewer (a run shorter than N intervals) or they span configs (a resume with
    other settings): the checks come before anything is written."""
    try:
      result = averaging.evaluate_average(self.config, self.workdir, self.task, self.ckpt,
                                          self.abstract, self.config.checkpoint.average_last,
                                          self.writer)
    except ConfigError as e:
      self.progress.write(f"checkpoint averaging skipped: {e}")
      return None
    self.progress.write(averaging.describe(result, self.task))
    return result


def _run(config, workdir: str, task: Task, guard, t0: float) -> dict[str, Any]:
  """The run of :func:`train_and_evaluate`, in a locked workdir."""
  abstract = abstract_state(task)
  changes, previous_config = _prepare_workdir(config, workdir, task, abstract)
  ckpt = _checkpointer(config, workdir)
  state = _restore_or_init(task, ckpt, abstract, workdir)
  loop = _Loop(config, workdir, task, ckpt, state, abstract)
  if changes:
    loop.progress.write(
        f"resuming {workdir} with settings that change the continuation (the result is the "
        f"run of neither config alone; the earlier config is kept in {previous_config}):\n  "
        + "\n  ".join(changes))
  try:
    status = loop.run(guard)
    loop.finish(status)
  except BaseException as e:
    _close_after_failure(e, workdir, *loop.closers())
    raise
  _close_all(*loop.closers())
  return {
      "status": status,
      "step": loop.step,
      "start_step": loop.start_step,
      "eval": loop.last_eval,
      "eval_lines": _eval_lines(config, loop.last_eval, workdir),   # the task's lines
      "average": loop.average,   # checkpoint.average_last: the averaged checkpoints' eval
      "skipped_steps": int(parallelism.to_host(loop.state.skipped_steps)),
      "train_seconds": loop.train_time,
      "total_seconds": time.perf_counter() - t0,
      "workdir": workdir,
      "metrics": loop.writer.path,
      "layer_stats": (storage.join(workdir, layer_stats_lib.FILENAME) if loop.stats_every
                      else None),
      "checkpoints": ckpt.directory,
      "resume_changes": changes,          # settings changed on resume (see resume_changes)
      "previous_config": previous_config,  # the config they replaced, kept
      "state": loop.state,
  }
