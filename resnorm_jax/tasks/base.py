"""The task protocol: what the engine asks of a task.

The engine's step (:func:`resnorm_jax.training.make_train_step`) is, for every task,

    inputs = task.inputs(step)                          # host: global arrays of the step
    key, batch = task.prepare(fold_in(seed, step), inputs)   # on the global batch, jitted
    # per replica (axis name in shard_map / pmap, none under jit):
    N = Σ_replicas task.weight(batch)                   # examples or real tokens
    L = Σ_replicas task.loss(model, variables, batch, key).loss_sum / N
    g = ∇L;  metrics = task.step_metrics(Σ sums, N)

so the loss of the global batch is a sum over its examples (or tokens) divided by a count
that does not depend on the parameters, and each style reduces the same sums.  Dropout keys
come from the key ``prepare`` returns (folded with the replica index in a per-device
program).  Initialization traces the model on the family's example inputs
(:func:`resnorm_jax.models.example_inputs`), so the engine needs nothing else to build,
restore or shape the state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import ml_collections

from resnorm_jax import config as config_lib, models, optim
from resnorm_jax.registry import KeyedRegistry, Registry


@dataclasses.dataclass(frozen=True)
class Metric:
  """An evaluation number as tables and plots show it: ``key`` in the evaluation dict,
  ``label`` (e.g. "test error %"), the better direction, and ``scale`` (shown = value ·
  scale, e.g. 100 for an error rate in %)."""
  key: str
  label: str
  higher_is_better: bool
  scale: float = 1.0

  def shown(self, value: float | None) -> float | None:
    return None if value is None else float(value) * self.scale


def _headline_only(info: "TaskInfo", config) -> Metric:
  del config
  return info.headline


def _eval_line(info: "TaskInfo", ev: dict, workdir: str) -> list[str]:
  del workdir
  m = info.headline
  return [f"  {m.label:<14} {m.shown(ev[m.key]):.4g}"] if m.key in ev else []


@dataclasses.dataclass(frozen=True)
class TaskInfo:
  """What the engine and the commands know of a task, besides its class.

  ``headline``: the number papers report (also the key of ``published.<key>`` the task adds
  to the schema, None = none published); ``data_sets``: the registry of its ``data.name``
  choices; ``schema``: config sections and keys it adds, ``{section: {key: Key}}``;
  ``workdir_files`` / ``workdir_directories``: what it writes in a run's workdir besides
  the engine's files; ``measure(info, config)``: the metric of ``published.measure`` (a
  task with several measures of its headline number, e.g. tokenized BLEU);
  ``summary_lines(info, eval, workdir)``: resnorm-train's closing lines for the final
  evaluation."""
  headline: Metric
  data_sets: Registry
  schema: Mapping[str, Mapping[str, config_lib.Key]] = dataclasses.field(default_factory=dict)
  workdir_files: tuple[str, ...] = ()
  workdir_directories: tuple[str, ...] = ()
  measure: Callable[["TaskInfo", Any], Metric] = _headline_only
  summary_lines: Callable[["TaskInfo", dict, str], list[str]] = _eval_line


TASKS = KeyedRegistry("task", TaskInfo)


def register_task(name: str, doc: str, info: TaskInfo):
  """Registers the decorated :class:`Task` subclass as task ``name`` and adds its schema
  sections (and ``published.<headline key>``) to the config schema."""
  published = {} if config_lib.SCHEMA.get("published", info.headline.key) else {
      info.headline.key: config_lib.Key(None, config_lib.NEUTRAL, config_lib.optional_number,
                                        f"published {info.headline.label}", optional=float)}
  sections = {**info.schema,
              "published": {**info.schema.get("published", {}), **published}}
  return TASKS.register_with_keys(name, doc, info, sections)


@flax.struct.dataclass
class LossOutput:
  """A replica's loss over its slice of the global batch, before the division by N."""
  loss_sum: jax.Array
  sums: dict[str, jax.Array]      # other per-replica sums (reduced like the loss)
  new_variables: Any              # mutable collections after the call (batch_stats, ...)


class Task:
  """Base of the tasks: builds the model and the optimizer from the config.

  Subclasses load their data in ``__init__`` (before anything is written, so a data error
  leaves the workdir untouched), set :attr:`data` and implement the methods below.
  """

  data: models.DataInfo

  def __init__(self, config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh):
    self.config, self.mesh = config, mesh
    self.tx, self.schedule = optim.make_optimizer(config.train, config.train.steps)

  # -- model -----------------------------------------------------------------------------
  def model_for(self, axis_name: str | None):
    """The model, with norms reducing over ``axis_name`` in a per-device program (built
    once per axis name: flax modules are immutable)."""
    cache = self.__dict__.setdefault("_models", {})
    if axis_name not in cache:
      ctx = models.norm_context(self.config, self.mesh.devices.size, axis_name)
      cache[axis_name] = models.build_model(self.config, ctx, self.data)
    return cache[axis_name]

  @property
  def model(self):
    return self.model_for(None)

  def example_inputs(self) -> tuple:
    return models.example_inputs(self.config, self.data)

  # -- the engine's contract ---------------------------------------------------------------
  @classmethod
  def validate(cls, config, replicas: int) -> None:
    """The task's own config checks (its data keys), before anything loads or compiles."""

  @classmethod
  def static_data(cls, config) -> models.DataInfo:
    """The :class:`DataInfo` of ``config`` without loading data (``resnorm-summary``)."""
    raise NotImplementedError

  def setup(self, workdir: str) -> None:
    """Once the workdir is locked: data onto the devices, anything written to the workdir."""

  def inputs(self, step: int) -> Any:
    """The step's raw inputs as global arrays (the batch order is a function of
    (seed, step), so resuming at ``step`` needs no iterator state)."""
    raise NotImplementedError

  def prepare(self, key: jax.Array, inputs: Any) -> tuple[jax.Array, Any]:
    """(dropout key, model batch) from the step's key and inputs, on the global batch
    (augmentation belongs here, so every execution style sees the same batch)."""
    return key, inputs

  def weight(self, batch: Any) -> jax.Array:
    """This replica's count (examples, real tokens) the loss sum is divided by, summed over
    replicas; it must not depend on the parameters."""
    raise NotImplementedError

  def loss(self, model, variables: dict, batch: Any, key: jax.Array,
           apply_kwargs: dict) -> LossOutput:
    """The loss sum of this replica's slice (``model.apply(variables, ..., train=True,
    rngs={"dropout": key}, mutable=..., **apply_kwargs)``)."""
    raise NotImplementedError

  def step_metrics(self, sums: dict[str, jax.Array], weight: jax.Array) -> dict:
    """Task metrics of a step from the reduced sums and N (e.g. accuracy, tokens)."""
    del sums, weight
    return {}

  def layer_stats_weights(self, batch: Any) -> Callable | None:
    """``weights_for(path)`` masks of the layer statistics (None: every position)."""
    del batch
    return None

  def layer_stats_inputs(self) -> tuple:
    """Inputs the layer statistics' call order is traced on."""
    return self.example_inputs()

  def evaluate(self, state, step: int, name: str = "") -> dict[str, float]:
    """Test metrics of ``state``; ``name`` labels files the evaluation writes (default
    ``step_<step>``; e.g. ``average_<first>-<last>`` for a checkpoint average)."""
    raise NotImplementedError

  def throughput(self, summary: dict, steps_per_sec: float) -> dict[str, float]:
    raise NotImplementedError

  @staticmethod
  def describe(ev: dict) -> str:
    """One line for an evaluation (progress output, checkpoint averages)."""
    raise NotImplementedError
