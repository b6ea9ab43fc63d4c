"""The training engine: optimizer, train/eval steps in three execution styles, the loop.

``train_and_evaluate(config, workdir)`` validates the config, loads the data, resumes from
the newest checkpoint in ``workdir`` if there is one, trains with periodic evaluation,
checkpointing (also on SIGTERM) and metrics, and returns a summary.

Randomness is a pure function of ``(train.seed, step)`` (data order, augmentation,
dropout), so a checkpoint holds only the :class:`TrainState`, and resuming is exact.
"""

from __future__ import annotations

import dataclasses
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

from resnorm_jax import checkpointing, config as config_lib, cpu_workarounds, data as data_lib
from resnorm_jax import layer_stats as layer_stats_lib, models, parallelism
from resnorm_jax import storage, workdir as workdir_lib
from resnorm_jax.errors import (ConfigError, NonFiniteLossError, StorageError,
                                WorkdirLockedError, quiet_storage_logs, storage_error)
from resnorm_jax.metrics import MetricWriter, Progress


@flax.struct.dataclass
class TrainState:
  step: jax.Array             # int32: steps taken (the data position)
  params: Any
  batch_stats: Any
  opt_state: Any
  nonfinite_step: jax.Array   # int32: -1, or the first step with a non-finite loss (stop mode)
  skipped_steps: jax.Array    # int32: steps whose update was skipped (skip mode)


# ----------------------------------------------------------------------------------------
# Optimizer and schedules.
# ----------------------------------------------------------------------------------------
def learning_rate_schedule(t: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """lr(step): ``constant``, ``piecewise`` (He 2016: ×decay_factor at each boundary),
  ``cosine`` (to 0 at the last step) or ``rsqrt`` (lr·sqrt(w / max(step, w)), Vaswani et
  al. 2017), after ``warmup_steps`` of warm-up: constant at ``warmup_learning_rate`` when it
  is > 0 (He 2016: 0.01 for 400 steps), else linear from 0."""
  lr, w = float(t.learning_rate), int(t.warmup_steps)
  if t.schedule == "constant":
    base = lambda s: jnp.full((), lr, jnp.float32)
  elif t.schedule == "piecewise":
    bounds = [int(round(b * total_steps)) if b <= 1 else int(b) for b in t.boundaries]
    base = optax.piecewise_constant_schedule(lr, {b: t.decay_factor for b in bounds})
  elif t.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(lr, max(total_steps - w, 1))
    base = lambda s: cosine(jnp.maximum(s - w, 0))
  elif t.schedule == "rsqrt":
    base = lambda s: lr * jnp.sqrt(max(w, 1) / jnp.maximum(s, max(w, 1)).astype(jnp.float32))
  else:
    raise ConfigError(f"unknown train.schedule {t.schedule!r}")
  if w <= 0:
    return base
  warm_lr = float(t.warmup_learning_rate)

  def schedule(step):
    warm = (jnp.full((), warm_lr, jnp.float32) if warm_lr > 0
            else lr * (step.astype(jnp.float32) + 1) / w)
    return jnp.where(step < w, warm, base(step))
  return schedule


def decay_mask(params):
  """Weight decay applies to kernels only: never to norm parameters, biases or gains."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(t: ml_collections.ConfigDict, total_steps: int):
  schedule = learning_rate_schedule(t, total_steps)
  parts = []
  if t.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
  if t.optimizer == "adamw":
    parts.append(optax.adamw(schedule, t.b1, t.b2, t.eps, weight_decay=t.weight_decay,
                             mask=decay_mask))
  else:
    if t.weight_decay > 0:  # L2 regularisation coupled to the gradient (He 2016; Adam)
      parts.append(optax.add_decayed_weights(t.weight_decay, decay_mask))
    if t.optimizer == "sgd":
      parts.append(optax.sgd(schedule, t.momentum or None, nesterov=t.nesterov))
    else:
      parts.append(optax.adam(schedule, t.b1, t.b2, t.eps))
  return optax.chain(*parts), schedule


def cross_entropy(logits, labels, smoothing: float = 0.0):
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


# ----------------------------------------------------------------------------------------
# Steps.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class Task:
  """Everything the steps need, built once from the config."""
  config: ml_collections.ConfigDict
  dataset: data_lib.ImageDataset
  mesh: jax.sharding.Mesh
  model_for: Callable[[str | None], Any]   # axis_name -> model
  tx: optax.GradientTransformation
  schedule: Callable

  @property
  def model(self):
    return self.model_for(None)


def build_task(config, dataset, mesh) -> Task:
  n = mesh.devices.size
  model_for = lambda axis_name: models.build_model(
      config, models.norm_context(config, n, axis_name), dataset.num_classes)
  tx, schedule = make_optimizer(config.train, config.train.steps)
  return Task(config, dataset, mesh, model_for, tx, schedule)


# The initializer runs once: on CPU, compiling it without LLVM optimizations takes a third
# of the time (ResNet-1001: the init program holds a random draw per parameter, ~400 kernels).
_RUN_ONCE_OPTIONS = {"cpu": {"xla_backend_optimization_level": 0}}


def init_state(task: Task) -> TrainState:
  """Initialises parameters (float32) and optimizer state, replicated over the mesh."""
  init, key = make_init(task)
  return init(key)


def make_init(task: Task) -> tuple[Callable, jax.Array]:
  """``(init, key)``: the jitted initializer of :func:`init_state` and its key."""
  shape = (1,) + task.dataset.image_shape

  def init(key):
    variables = task.model.init({"params": key, "dropout": key}, jnp.zeros(shape), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      batch_stats=variables.get("batch_stats", {}),
                      opt_state=task.tx.init(params),
                      nonfinite_step=jnp.full((), -1, jnp.int32),
                      skipped_steps=jnp.zeros((), jnp.int32))

  key = jax.random.key(task.config.train.seed)
  options = _RUN_ONCE_OPTIONS.get(task.mesh.devices.flat[0].platform)
  return jax.jit(init, out_shardings=parallelism.replicated(task.mesh),
                 compiler_options=options), key


def abstract_state(task: Task) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the state, without computing it."""
  shape = (1,) + task.dataset.image_shape
  sharding = parallelism.replicated(task.mesh)

  def init(key):
    variables = task.model.init({"params": key, "dropout": key}, jnp.zeros(shape), train=False)
    return TrainState(jnp.zeros((), jnp.int32), variables["params"],
                      variables.get("batch_stats", {}), task.tx.init(variables["params"]),
                      jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

  shapes = jax.eval_shape(init, jax.random.key(0))
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


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


def make_train_step(task: Task, layer_stats: bool = False) -> Callable:
  """``train_step(state, images, labels, indices) -> (state, metrics)``.

  ``images``/``labels`` are the whole uint8 training set on the devices (replicated);
  ``indices`` the global batch's example indices (batch-sharded).  Gathering, augmentation
  and normalization run on the global batch in every style, so all styles see identical
  inputs; the per-replica function then reduces gradients, metrics and (inside the model)
  BatchNorm statistics by axis name.  With ``layer_stats`` the same update also returns
  ``metrics["layer_stats"]`` (:func:`resnorm_jax.layer_stats.step_stats`).
  """
  config, dataset = task.config, task.dataset
  seed_key = jax.random.key(config.train.seed)
  smoothing = float(config.train.label_smoothing)
  stop_on_nonfinite = config.train.on_nonfinite == "stop"
  guard = resolve_guard(config.train.nonfinite_guard, task.mesh.devices.flat[0].platform)

  def prepare(step, images, labels, indices):
    key = jax.random.fold_in(seed_key, step)
    batch = data_lib.augment(images[indices], jax.random.fold_in(key, 0),
                             pad=config.data.pad, mode=config.data.augment)
    return jax.random.fold_in(key, 1), data_lib.normalize(batch, dataset.mean, dataset.std), \
        labels[indices]

  def make_fn(axis_name):
    model = task.model_for(axis_name)

    def step_fn(state: TrainState, key, x, labels):
      if axis_name is not None:
        key = jax.random.fold_in(key, lax.axis_index(axis_name))

      def loss_fn(params):
        logits, new_vars = model.apply(
            {"params": params, "batch_stats": state.batch_stats}, x, train=True,
            rngs={"dropout": key}, **layer_stats_lib.apply_kwargs(layer_stats))
        return cross_entropy(logits, labels, smoothing).mean(), (logits, new_vars)

      (loss, (logits, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
      if axis_name is not None:
        grads, loss, accuracy = lax.pmean((grads, loss, accuracy), axis_name)
      new_state, grad_norm = apply_gradients(task.tx, state, grads, loss,
                                             new_vars.get("batch_stats", {}),
                                             stop_on_nonfinite, guard)
      metrics = dict(loss=loss, accuracy=accuracy, grad_norm=grad_norm,
                     learning_rate=task.schedule(state.step))
      if layer_stats:
        metrics["layer_stats"] = layer_stats_lib.step_stats(
            grads, state.params, new_state.params, new_vars.get("intermediates", {}),
            axis_name=axis_name)
      return new_state, metrics
    return step_fn

  mode = config.parallel.mode
  parallel_step = parallelism.data_parallel(make_fn, mode, task.mesh, 2, 2)
  if mode == "pmap":  # pmap cannot live inside jit: prepare the global batch first
    prepare_jit = jax.jit(prepare)

    def train_step(state, images, labels, indices):
      key, x, y = prepare_jit(state.step, images, labels, indices)
      return parallel_step(state, key, x, y)
    return train_step

  def train_step(state, images, labels, indices):
    key, x, y = prepare(state.step, images, labels, indices)
    return parallel_step(state, key, x, y)
  if config.model.get("scan_stages"):
    # XLA:CPU leaves the convolution gradients inside the scanned stages' loops on its slow
    # path; rewrite them to its fast layout there (see resnorm_jax/cpu_workarounds.py).
    train_step = cpu_workarounds.for_platform(train_step, task.mesh.devices.flat[0].platform)
  return jax.jit(train_step, donate_argnums=0)


def make_eval_step(task: Task) -> Callable:
  """``eval_step(state, images, labels, indices, weights) -> (loss_sum, correct, count)``."""
  model, dataset = task.model, task.dataset

  @jax.jit
  def eval_step(state, images, labels, indices, weights):
    x = data_lib.normalize(images[indices], dataset.mean, dataset.std)
    logits = model.apply({"params": state.params, "batch_stats": state.batch_stats}, x,
                         train=False)
    y = labels[indices]
    correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
    return (jnp.sum(cross_entropy(logits, y) * weights), jnp.sum(correct * weights),
            jnp.sum(weights))
  return eval_step


def evaluate(task: Task, eval_step, state, images, labels) -> dict[str, float]:
  n, replicas = labels.shape[0], task.mesh.devices.size
  bs = -(-min(task.config.eval.batch_size, n) // replicas) * replicas  # padding is masked
  sharded = parallelism.batch_sharded(task.mesh)
  totals = np.zeros(3)
  for start in range(0, n, bs):
    idx = np.arange(start, start + bs)
    weights = (idx < n).astype(np.float32)
    idx = np.where(idx < n, idx, 0).astype(np.int32)
    out = eval_step(state, images, labels, parallelism.host_to_global(idx, sharded),
                    parallelism.host_to_global(weights, sharded))
    totals += np.array(parallelism.to_host(out), dtype=np.float64)
  loss_sum, correct, count = totals
  return {"loss": loss_sum / count, "accuracy": correct / count, "error": 1 - correct / count}


# ----------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------
def _mean_metrics(history: list[dict]) -> dict[str, float]:
  fetched = parallelism.to_host(history)
  return {k: float(np.mean([h[k] for h in fetched])) for k in fetched[0]}


def _is_main_process() -> bool:
  return jax.process_index() == 0


class ImageJob:
  """The image-classification task of the loop: data on the devices, index batches."""

  def __init__(self, config: ml_collections.ConfigDict, mesh):
    self.config, self.mesh = config, mesh
    self.dataset = data_lib.load_dataset(config)         # a data error writes nothing
    data_lib.steps_per_epoch(len(self.dataset.train_labels), config.train.batch_size)
    self.task = build_task(config, self.dataset, mesh)

  def setup(self, workdir: str) -> None:
    del workdir
    replicated = parallelism.replicated(self.mesh)
    # Every process loads the (small) uint8 data set and keeps it on its devices; each
    # step's global batch is assembled from the per-process slices of its index array.
    self.arrays = [parallelism.host_to_global(a, replicated) for a in (
        self.dataset.train_images, self.dataset.train_labels, self.dataset.test_images,
        self.dataset.test_labels)]
    self.sharded = parallelism.batch_sharded(self.mesh)
    self.train_step, self.eval_step = make_train_step(self.task), make_eval_step(self.task)
    self.stats_step = make_train_step(self.task, layer_stats=True)  # compiled on first use

  def abstract_state(self) -> TrainState:
    return abstract_state(self.task)

  def init_state(self) -> TrainState:
    return init_state(self.task)

  def step(self, state: TrainState, step: int, layer_stats: bool = False):
    t = self.config.train
    idx = data_lib.batch_indices(t.seed, step, len(self.dataset.train_labels), t.batch_size)
    train_step = self.stats_step if layer_stats else self.train_step
    return train_step(state, *self.arrays[:2], parallelism.host_to_global(idx, self.sharded))

  def layer_call_order(self):
    return layer_stats_lib.module_call_order(
        self.task.model, jnp.zeros((1,) + self.dataset.image_shape), train=False)

  def throughput(self, summary: dict, steps_per_sec: float) -> dict:
    return {"examples_per_sec": steps_per_sec * self.config.train.batch_size}

  def evaluate(self, state: TrainState, step: int) -> dict:
    return evaluate(self.task, self.eval_step, state, *self.arrays[2:])

  @staticmethod
  def describe(ev: dict) -> str:
    return f"eval accuracy {ev['accuracy']:.4f} loss {ev['loss']:.4f}"


def make_job(config: ml_collections.ConfigDict, mesh):
  """The task of ``config``: :class:`ImageJob`, or the translation task for Transformers."""
  if config.model.name == "transformer":
    from resnorm_jax.tasks.translation import task as translation_task
    return translation_task.TranslationJob(config, mesh)
  return ImageJob(config, mesh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains and evaluates ``config`` in ``workdir``; resumes from its newest checkpoint.

  The loop (checkpointing, metrics, preemption, non-finite handling) is shared by every task;
  a task (:class:`ImageJob`, ``translation_task.TranslationJob``) supplies the state,
  the step at a given step number and the evaluation.

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
  with checkpointing.PreemptionGuard(sigint=True, on_abort=lock.release) as guard, \
      quiet_storage_logs():
    workdir_lib.check_workdir(workdir, parent_must_exist=False)   # URL, file, read-only
    config_lib.validate(config, jax.device_count())
    mesh = parallelism.make_mesh(config.parallel.num_devices)
    job = make_job(config, mesh)                          # a data error writes nothing
    try:
      _acquire(lock, workdir)
      return _run(config, workdir, job, guard, t0)
    except (ConfigError, NonFiniteLossError, WorkdirLockedError, StorageError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (classified, else re-raised)
      failure = storage_error(e, workdir)
      if failure is None:
        raise
      raise StorageError(f"{workdir}: {failure}; the last complete checkpoint is kept: "
                         "free space or fix the storage, then rerun the same command to "
                         "resume") from e
    finally:
      lock.release()


def _acquire(lock: workdir_lib.WorkdirLock, workdir: str) -> None:
  """Process 0 takes the workdir lock; every process learns whether it got it."""
  error = None
  if _is_main_process():
    try:
      storage.makedirs(workdir)
      lock.acquire()
    except WorkdirLockedError as e:
      error = e
    except OSError as e:
      error = e
  if parallelism.any_process(error is not None):
    if error is None:
      error = WorkdirLockedError(f"process 0 could not lock {workdir} (see its message)")
    raise error


def state_bytes(abstract) -> int:
  """Bytes of a (abstract) train state: what one checkpoint of it stores."""
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree_util.tree_leaves(abstract))


def _run(config, workdir: str, job, guard, t0: float) -> dict[str, Any]:
  """The loop of :func:`train_and_evaluate`, in a locked workdir."""
  config_dict = config.to_dict()
  previous_config = None
  checkpointing.check_config_compatible(workdir, config_dict)
  changes = checkpointing.resume_changes(workdir, config_dict)
  abstract = job.abstract_state()
  if _is_main_process():  # a save that cannot fit would fail after the first interval
    workdir_lib.check_free_space(
        workdir, workdir_lib.checkpoint_bytes_needed(state_bytes(abstract)))

  if changes:   # keep the config the checkpoint was trained with
    previous_config = checkpointing.archive_config_json(workdir)
  checkpointing.save_config_json(workdir, config_dict)
  job.setup(workdir)
  ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"),
                                    keep=config.checkpoint.keep,
                                    every_steps=config.checkpoint.every_steps)
  try:
    restored = ckpt.restore(abstract)
  except BaseException:
    ckpt.close()
    raise
  if restored is None:
    state = job.init_state()
  else:
    state = restored[1]
    logging.info("resumed from the checkpoint of step %d in %s", restored[0], workdir)
  start_step = int(parallelism.to_host(state.step))

  t = config.train
  # Records after the restored step are dropped: the continuing run writes them again.
  writer = MetricWriter(workdir, enabled=_is_main_process(), resume_step=start_step)
  stats_every = t.layer_stats_every_steps
  call_order = job.layer_call_order() if stats_every and writer.enabled else []
  progress = Progress(t.steps, start_step, enabled=_is_main_process())
  if changes:
    progress.write(
        f"resuming {workdir} with settings that change the continuation (the result is the "
        f"run of neither config alone; the earlier config is kept in {previous_config}):\n  "
        + "\n  ".join(changes))
  history: list[dict] = []
  last_eval: dict[str, float] = {}
  status = "completed"
  train_time = 0.0

  def run_eval(step):
    nonlocal last_eval
    last_eval = job.evaluate(state, step)
    writer.write(step, "eval", last_eval)
    progress.write(f"step {step}: {job.describe(last_eval)}")

  def check_finite(step):
    bad = int(parallelism.to_host(state.nonfinite_step))
    if bad >= 0:
      kept = ckpt.latest_step()
      raise NonFiniteLossError(
          f"non-finite loss or gradients at step {bad}; training stopped. The last good "
          f"checkpoint ({'step ' + str(kept) if kept is not None else 'none yet'}) is kept in "
          f"{ckpt.directory}. Lower train.learning_rate, set train.grad_clip_norm, or use "
          f"--config.train.on_nonfinite=skip")

  def save(step, force=False):
    if ckpt.save(step, state, force=force):
      writer.sync()   # the metrics up to a checkpoint are as durable as the checkpoint

  try:
    step = start_step
    tick = time.perf_counter()
    stopped = False   # by a signal on any process: all processes save the same step
    while step < t.steps:
      stopped = parallelism.any_process(guard.requested)
      if stopped:
        break
      with_stats = stats_every > 0 and (step + 1) % stats_every == 0
      state, metrics = job.step(state, step, layer_stats=with_stats)
      if with_stats:
        layer_stats_lib.write(writer, step + 1, metrics.pop("layer_stats"), call_order)
      history.append(metrics)
      step += 1
      if step % t.log_every_steps == 0 or step == t.steps:
        check_finite(step)
        summary = _mean_metrics(history)
        elapsed = time.perf_counter() - tick
        train_time += elapsed
        summary["steps_per_sec"] = len(history) / elapsed
        rates = job.throughput(summary, summary["steps_per_sec"])
        summary.update(rates)
        writer.write(step, "train", summary)
        progress.update(step, rates, loss=f"{summary['loss']:.3f}")
        history, tick = [], time.perf_counter()
      if config.eval.every_steps and step % config.eval.every_steps == 0 and step < t.steps:
        run_eval(step)
      if ckpt.should_save(step):
        check_finite(step)
        save(step)
    if stopped:
      check_finite(step)
      save(step, force=True)
      status = "interrupted" if guard.signal == "SIGINT" else "preempted"
      progress.write(f"{guard.signal or 'signal'} received: saved the checkpoint of step "
                     f"{step}; rerun the same command to resume")
    else:
      check_finite(step)
      run_eval(step)
      save(step, force=True)
    ckpt.wait()
    writer.sync()
  finally:
    try:
      ckpt.close()
    finally:
      progress.close()
      writer.close()

  return {
      "status": status,
      "step": step,
      "start_step": start_step,
      "eval": last_eval,
      "skipped_steps": int(parallelism.to_host(state.skipped_steps)),
      "train_seconds": train_time,
      "total_seconds": time.perf_counter() - t0,
      "workdir": workdir,
      "metrics": writer.path,
      "layer_stats": storage.join(workdir, layer_stats_lib.FILENAME) if stats_every else None,
      "checkpoints": ckpt.directory,
      "resume_changes": changes,          # settings changed on resume (see resume_changes)
      "previous_config": previous_config,  # the config they replaced, kept
      "state": state,
  }
