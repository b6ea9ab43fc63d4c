"""The training engine: execution styles, exact resume, topology changes, errors, CLI."""

import json
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnorm_jax import config as config_lib, optim, training
from resnorm_jax.errors import ConfigError

from helpers import (CLI_TINY, REPO, TINY_TERMS, assert_states_close, read_state, run_steps,
                     tiny_config, train_cli as cli)


def test_three_execution_styles_equal_single_device():
  reference = run_steps(tiny_config(**{"parallel.num_devices": 1}))
  for mode in ("jit", "shard_map", "pmap"):
    state = run_steps(tiny_config(**{"parallel.mode": mode, "parallel.num_devices": 8}))
    assert_states_close(state, reference, 3 * TINY_TERMS, f"{mode}, 3 steps:")
    assert int(state.step) == 3


# The default suite: global statistics in every style (above); local and group statistics
# in each style, tests/test_bn_sync.py.
@pytest.mark.slow
@pytest.mark.parametrize("bn_sync", ["local", "group:4"])
def test_styles_agree_for_local_and_group_sync(bn_sync):
  states = [run_steps(tiny_config(**{"parallel.mode": mode, "parallel.bn_sync": bn_sync}))
            for mode in ("jit", "shard_map", "pmap")]
  for state in states[1:]:
    assert_states_close(state, states[0], 3 * TINY_TERMS, f"{bn_sync}, 3 steps:")
  # Ghost statistics differ from global ones: the sync mode really changes the math.
  global_state = run_steps(tiny_config())
  diff = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()),
                                states[0].batch_stats, global_state.batch_stats)
  assert max(jax.tree_util.tree_leaves(diff)) > 1e-4


def test_learning_rate_schedules():
  c = config_lib.base_config().train
  c.steps, c.boundaries, c.warmup_steps, c.warmup_learning_rate = 64_000, (32_000, 48_000), \
      400, 0.01
  lr = optim.learning_rate_schedule(c, c.steps)
  got = [float(lr(jnp.int32(s))) for s in (0, 399, 400, 31_999, 32_000, 48_000, 63_999)]
  np.testing.assert_allclose(got, [0.01, 0.01, 0.1, 0.1, 0.01, 0.001, 0.001], rtol=1e-6)
  c.schedule, c.warmup_learning_rate, c.warmup_steps, c.steps = "cosine", 0.0, 10, 110
  lr = optim.learning_rate_schedule(c, c.steps)
  np.testing.assert_allclose([float(lr(jnp.int32(s))) for s in (0, 9, 10, 60, 110)],
                             [0.01, 0.1, 0.1, 0.05, 0.0], atol=1e-6)
  c.schedule, c.warmup_steps = "rsqrt", 4
  lr = optim.learning_rate_schedule(c, c.steps)
  np.testing.assert_allclose([float(lr(jnp.int32(s))) for s in (3, 4, 16)],
                             [0.1, 0.1, 0.05], rtol=1e-6)


def test_weight_decay_skips_norm_parameters_and_biases():
  params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "norm": {"scale": jnp.ones(2),
            "bias": jnp.ones(2)}, "dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  assert optim.decay_mask(params) == {"conv": {"kernel": True}, "norm": {
      "scale": False, "bias": False}, "dense": {"kernel": True, "bias": False}}


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143),
                                      pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow)])
def test_signal_then_resume_is_bitwise_exact(tmp_path, sig, code):
  # SIGINT (Ctrl-C) is handled like SIGTERM: save the current step, exit with its code.
  total = 200
  steps = f"--config.train.steps={total}"
  uninterrupted = cli(tmp_path / "a", steps)
  interrupted = cli(tmp_path / "b", steps)
  metrics = tmp_path / "b" / "metrics.jsonl"
  deadline = time.time() + 120
  while time.time() < deadline and interrupted.poll() is None:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      interrupted.send_signal(sig)
      break
    time.sleep(0.02)
  out, err = interrupted.communicate(timeout=120)
  assert interrupted.returncode == code, err
  assert f"{signal.Signals(sig).name} received" in err and "Traceback" not in err
  assert not (tmp_path / "b" / ".resnorm.lock").exists()   # released
  stopped_at, _ = read_state(tmp_path / "b")
  assert 5 <= stopped_at < total
  resumed = cli(tmp_path / "b", steps)
  out, err = resumed.communicate(timeout=180)
  assert resumed.returncode == 0, err
  assert f"resumed from step {stopped_at}" in out
  out, err = uninterrupted.communicate(timeout=180)
  assert uninterrupted.returncode == 0, err
  step_a, a = read_state(tmp_path / "a")
  step_b, b = read_state(tmp_path / "b")
  assert step_a == step_b == total
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  # Metrics of both halves are kept: one train line per step, none lost or repeated.
  lines = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert sorted(l["step"] for l in lines if l["split"] == "train") == list(range(1, total + 1))


@pytest.mark.parametrize("first,second", [pytest.param(8, 1, marks=pytest.mark.slow), (1, 8)])
def test_checkpoint_restores_on_another_device_count(tmp_path, first, second):
  def config(n, steps):
    return tiny_config(**{"parallel.num_devices": n, "train.steps": steps})
  training.train_and_evaluate(config(first, 3), str(tmp_path / "run"))
  summary = training.train_and_evaluate(config(second, 6), str(tmp_path / "run"))
  assert summary["start_step"] == 3 and summary["step"] == 6
  reference = training.train_and_evaluate(config(1, 6), str(tmp_path / "ref"))
  assert_states_close(jax.device_get(summary["state"]), jax.device_get(reference["state"]),
                      6 * TINY_TERMS, f"{first} then {second} devices, 6 steps:")


def test_resume_with_a_different_model_is_a_clear_error(tmp_path):
  training.train_and_evaluate(tiny_config(), str(tmp_path))
  with pytest.raises(ConfigError, match="model.depth"):
    training.train_and_evaluate(tiny_config(**{"model.depth": 14}), str(tmp_path))


@pytest.mark.slow   # the default suite: the keys' resume classes, in the next test
def test_resume_after_changing_only_neutral_model_keys_continues_the_same_run(tmp_path):
  """model.remat and model.summary_length change no number of the run (resume class
  neutral): the resumed run is the uninterrupted one, and only train.steps is reported."""
  run = str(tmp_path / "run")
  training.train_and_evaluate(tiny_config(**{"train.steps": 3}), run)
  resumed = training.train_and_evaluate(
      tiny_config(**{"model.remat": True, "model.summary_length": 16}), run)
  assert resumed["start_step"] == 3 and resumed["step"] == 6
  assert resumed["resume_changes"] == ["train.steps: checkpoint has 3, this run has 6"]
  reference = training.train_and_evaluate(tiny_config(), str(tmp_path / "reference"))
  assert_states_close(jax.device_get(resumed["state"]), jax.device_get(reference["state"]),
                      6 * TINY_TERMS, "remat resume, 6 steps:")


def test_resume_with_another_compute_dtype_is_reported_and_a_new_width_refused(tmp_path):
  run = str(tmp_path / "run")
  training.train_and_evaluate(tiny_config(**{"train.steps": 3}), run)
  resumed = training.train_and_evaluate(tiny_config(**{"model.dtype": "bfloat16"}), run)
  assert resumed["start_step"] == 3 and resumed["step"] == 6
  assert resumed["resume_changes"] == [
      "model.dtype: checkpoint has 'float32', this run has 'bfloat16'",
      "train.steps: checkpoint has 3, this run has 6"]
  with pytest.raises(ConfigError, match=r"model\.width: checkpoint has 4, this run has 8"):
    training.train_and_evaluate(tiny_config(**{"model.width": 8, "train.steps": 9}), run)


def test_every_config_key_has_a_resume_class_and_a_default():
  config = config_lib.base_config()
  for section, keys in config_lib.SCHEMA.items():
    assert set(keys) == set(config[section].keys())
    for name, key in keys.items():
      assert key.resume in config_lib.RESUME_CLASSES, f"{section}.{name}"
  assert config_lib.resume_class("model.remat") == config_lib.NEUTRAL
  assert config_lib.resume_class("model.depth") == config_lib.TREE
  assert config_lib.resume_class("model.depth", model_keys=("preset",)) == config_lib.NEUTRAL
  assert config_lib.resume_class("train.learning_rate") == config_lib.TRAJECTORY
  config.model.dropout_rate = 0.0      # optional keys are independent placeholders
  assert config.model.skip_lambda is None


def test_resume_with_changed_training_settings_says_so_and_keeps_the_old_config(tmp_path,
                                                                                capsys):
  config = tiny_config()
  training.train_and_evaluate(config, str(tmp_path))
  same = training.train_and_evaluate(config, str(tmp_path))      # an exact resume
  assert same["resume_changes"] == [] and same["previous_config"] is None
  first = json.loads((tmp_path / "config.json").read_text())
  steps, lr = config.train.steps, config.train.learning_rate
  changed = tiny_config(**{"train.steps": steps + 2, "train.learning_rate": lr / 2,
                           "train.log_every_steps": 1, "translation.beam_size": 2})
  capsys.readouterr()
  summary = training.train_and_evaluate(changed, str(tmp_path))
  assert summary["start_step"] == steps and summary["step"] == steps + 2
  assert summary["resume_changes"] == [   # logging and decoding settings are not listed
      f"train.learning_rate: checkpoint has {lr!r}, this run has {lr / 2!r}",
      f"train.steps: checkpoint has {steps}, this run has {steps + 2}"]
  assert summary["previous_config"] == str(tmp_path / "config.before_resume_1.json")
  assert json.loads(open(summary["previous_config"]).read()) == first
  assert json.loads((tmp_path / "config.json").read_text())["train"]["learning_rate"] == lr / 2
  err = capsys.readouterr().err
  assert "settings that change the continuation" in err and "train.learning_rate" in err


def test_nonfinite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  config = tiny_config(**{"model.norm": "none", "train.learning_rate": 1e9,
                          "train.steps": 12, "checkpoint.every_steps": 1})
  with pytest.raises(training.NonFiniteLossError, match=r"at step \d+") as info:
    training.train_and_evaluate(config, str(tmp_path))
  bad_step = int(str(info.value).split("at step ")[1].split(";")[0])
  from resnorm_jax import checkpointing
  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), keep=3, every_steps=1)
  assert ckpt.all_steps() and max(ckpt.all_steps()) <= bad_step
  ckpt.close()
  config.train.on_nonfinite = "skip"
  summary = training.train_and_evaluate(config, str(tmp_path / "skip"))
  assert summary["status"] == "completed" and summary["skipped_steps"] > 0


def test_unsupported_url_workdir_is_refused_before_anything_is_written(tmp_path):
  # os.makedirs("s3://b/run") would silently create ./s3:/b/run on every host; gs:// is
  # written natively (tests/test_storage.py).
  args = [f for f in CLI_TINY if not f.startswith("--config.parallel.num_devices")]
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train",
                         "--workdir=s3://my-bucket/runs/r20", *args], cwd=tmp_path,
                        capture_output=True, text=True, timeout=120, env=dict(os.environ))
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(
      "resnorm-train: error: --workdir=s3://my-bucket/runs/r20: the scheme s3:// is not "
      "supported; use a local path or gs://BUCKET/PATH"), proc.stderr
  assert os.listdir(tmp_path) == []
  with pytest.raises(ConfigError, match="s3://b: the scheme s3:// is not supported"):
    training.train_and_evaluate(tiny_config(), "s3://b")


@pytest.mark.parametrize("flag,message", [
    ("--config.model.nrom=batch", "no config key 'nrom'"),
    ("--config.model.norm=grop:32", "unknown norm 'grop:32'; valid choices: batch"),
    ("--config.parallel.mode=pjit", "parallel.mode='pjit' is not valid"),
    ("--config.train.batch_size=12", "divisible by the 8 data-parallel devices"),
    ("--config.train.accumulate_steps=3", "train.accumulate_steps=3 must divide each "
     "device's share of the batch, train.batch_size=16 / 8 devices = 2; e.g. use 2"),
    ("--config=configs/cifar_resnet.py:resnet111", "unknown variant 'resnet111'"),
    ("--config.train.layer_stats_every_steps=-1",
     "train.layer_stats_every_steps=-1 must be a non-negative integer"),
])
def test_cli_rejects_bad_config_with_one_line_and_writes_nothing(tmp_path, flag, message):
  workdir = tmp_path / "run"
  args = [f for f in CLI_TINY if not f.startswith("--config.parallel.num_devices")]
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train", f"--workdir={workdir}",
                         *args, flag], cwd=REPO, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ))
  assert proc.returncode == 2, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("resnorm-train: error:"), proc.stderr
  assert message in lines[0]
  assert not workdir.exists()


@pytest.mark.slow
def test_quickstart_reaches_95_percent(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train", f"--workdir={tmp_path}"],
                        cwd=REPO, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr
  accuracy = float(proc.stdout.split("test accuracy")[1].split()[0])
  assert accuracy > 0.95


@pytest.mark.parametrize("options", [
    {"train.optimizer": "adamw", "train.schedule": "rsqrt", "train.warmup_steps": 10,
     "train.learning_rate": 1e-2, "train.label_smoothing": 0.1, "train.grad_clip_norm": 1.0,
     "model.dtype": "bfloat16"},
    {"train.optimizer": "sgd", "train.nesterov": True, "train.schedule": "piecewise",
     "train.boundaries": (0.5, 0.75), "train.warmup_steps": 5,
     "train.warmup_learning_rate": 0.01, "train.learning_rate": 0.1},
    pytest.param({"train.optimizer": "adam", "train.schedule": "cosine",
                  "train.learning_rate": 1e-2, "model.norm": "group:2", "model.skip": "rskip_ln",
                  "model.skip_lambda": 2.0}, marks=pytest.mark.slow),
])
def test_optimizers_and_options_learn_digits(tmp_path, options):
  config = tiny_config(**{"data.name": "digits", "data.augment": "none", "train.steps": 60,
                          "train.batch_size": 64, "eval.batch_size": 360,
                          "parallel.num_devices": 1, "train.log_every_steps": 10, **options})
  summary = training.train_and_evaluate(config, str(tmp_path))
  from resnorm_jax.metrics import read_metrics
  losses = [m["loss"] for m in read_metrics(str(tmp_path)) if m["split"] == "train"]
  assert losses[-1] < 0.5 * losses[0]
  assert summary["eval"]["accuracy"] > 0.6


@pytest.mark.parametrize("rates,shown,absent", [
    ({"examples_per_sec": 2047.6}, "ex_s=2048", "tok_s"),
    ({"tokens_per_sec": 1234.4}, "tok_s=1234", "ex_s"),   # translation: tokens, not examples
])
def test_progress_bar_shows_the_jobs_own_throughput(capsys, rates, shown, absent):
  from resnorm_jax.metrics import Progress
  progress = Progress(10, 0)
  progress.update(5, rates, loss="1.000")
  progress.close()
  err = capsys.readouterr().err
  assert shown in err and "loss=1.000" in err and absent not in err, err
