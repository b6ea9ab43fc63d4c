"""Checkpoint averaging (resnorm_jax/averaging.py): retention at an interval, the average's
evaluation beside the run's metrics, the command and its refusals, a gs:// workdir."""

import contextlib
import json
import os
import subprocess
import sys

import jax
import pytest

from resnorm_jax import averaging, checkpointing, parallelism, storage, training
from resnorm_jax.errors import ConfigError

from helpers import REPO, assert_trees_close_to_rounding, tiny_config
from test_storage import gcs, gdir  # noqa: F401  (the emulator fixtures)

AVERAGED = {"train.steps": 6, "checkpoint.every_steps": 0, "checkpoint.keep": 1,
            "parallel.num_devices": 1}


def averaged_config(**overrides):
  c = tiny_config(**{**AVERAGED, **overrides})
  c.checkpoint.average_last = 3
  c.checkpoint.average_every_steps = 2
  return c


def average_cli(workdir, *flags):
  return subprocess.run([sys.executable, "-m", "resnorm_jax.average",
                         f"--workdir={workdir}", *flags], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ))


def records(workdir, split):
  text = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  return [r for r in map(json.loads, text.splitlines()) if r["split"] == split]


@contextlib.contextmanager
def checkpoints_of(workdir, config):
  """(the run's checkpoints, the abstract state of ``config``)."""
  task = training.build_task(config, parallelism.make_mesh(1))
  ckpt = checkpointing.Checkpointer(storage.join(workdir, "checkpoints"), keep=10 ** 9,
                                    every_steps=0)
  try:
    yield ckpt, training.abstract_state(task)
  finally:
    ckpt.close()


def train_and_average(workdir, last, steps):
  """A run of :func:`averaged_config` checked by :func:`check_run`, then the command's
  average of its ``last`` checkpoints (``steps``)."""
  config = averaged_config()
  check_run(workdir, config, training.train_and_evaluate(config, workdir))
  proc = average_cli(workdir, f"--last={last}")
  assert proc.returncode == 0, proc.stderr
  assert f"average of the {last} checkpoints of steps {steps}: test error" in proc.stdout
  assert [r["averaged_steps"] for r in records(workdir, "average")] == [steps]


def check_run(workdir, config, summary):
  """Kept: the newest 3 steps at the interval (and the newest step); the run's own average
  record; the average is the mean of those checkpoints' parameters."""
  assert sorted(int(n) for n in storage.listdir(storage.join(workdir, "checkpoints"))
                if n.isdigit()) == [2, 4, 6]
  average = summary["average"]
  assert average["averaged_steps"] == [2, 4, 6] and 0 <= average["error"] <= 1
  [record] = records(workdir, "average")
  assert record["step"] == 6 and record["averaged_steps"] == [2, 4, 6]
  assert record["error"] == pytest.approx(average["error"])
  with checkpoints_of(workdir, config) as (ckpt, abstract):
    params = [jax.device_get(ckpt.restore_step(s, abstract).params) for s in (2, 4, 6)]
    state = averaging.averaged_state(ckpt, abstract, [2, 4, 6])
  mean = jax.tree_util.tree_map(lambda a, b, c: (a + b + c) / 3, *params)
  # (a + b + c) / 3 in float32 both ways: equal to the rounding of a sum of 3 terms.
  assert_trees_close_to_rounding(jax.device_get(state.params), mean, 3, "average ")


def test_training_keeps_the_interval_and_evaluates_the_average(tmp_path):
  workdir = str(tmp_path / "run")
  # The command: the same average again (the record is replaced, not duplicated) ...
  train_and_average(workdir, 3, [2, 4, 6])
  # ... and its refusals, one line, exit 2, nothing written.
  before = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  proc = average_cli(workdir, "--last=4")
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("resnorm-average: error: --last=4 needs 4 checkpoints at "
                             "multiples of 2 steps but ")
  assert "keeps 3 (2, 4, 6)" in lines[0]
  assert storage.read_text(storage.join(workdir, "metrics.jsonl")) == before

  # A resume with other training settings: the newest checkpoints span two configs.
  resumed = averaged_config(**{"train.steps": 8, "train.learning_rate": 0.01})
  assert training.train_and_evaluate(resumed, workdir)["average"] is None  # (with a note)
  before = storage.read_text(storage.join(workdir, "metrics.jsonl"))
  proc = average_cli(workdir, "--last=3")
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert "were written under different configs" in lines[0]
  assert "averaging across runs is refused" in lines[0]
  assert storage.read_text(storage.join(workdir, "metrics.jsonl")) == before


def test_checkpoints_of_another_tree_are_refused(tmp_path):
  workdir = str(tmp_path / "run")
  config = averaged_config(**{"train.steps": 4})
  config.checkpoint.average_last = 2
  training.train_and_evaluate(config, workdir)
  with checkpoints_of(workdir, averaged_config(**{"model.width": 8})) as (ckpt, abstract):
    with pytest.raises(ConfigError, match="checkpoint step 2 cannot be averaged"):
      averaging.averaged_state(ckpt, abstract, [2, 4])


def test_a_short_run_skips_the_average_with_a_note(tmp_path, capsys):
  config = averaged_config(**{"train.steps": 3})
  summary = training.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["average"] is None and summary["status"] == "completed"
  assert "checkpoint averaging skipped: --last=3 needs 3 checkpoints" in \
      capsys.readouterr().err


@pytest.mark.slow   # the default suite: averaging on a local disk, a run resumed in a bucket
def test_average_of_a_gs_workdir(gdir):
  train_and_average(gdir, 2, [4, 6])
