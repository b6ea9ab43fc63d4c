"""Failure paths: the workdir lock, a second Ctrl-C, full and read-only disks, bad workdirs,
metrics repair, validation of every numeric key, exit codes, and augmentation that does not
depend on the device count.

Real parts throughout: several real processes on one workdir, ``kill -9``, signals, and
tmpfs mounts that really fill up or are really read-only (root only; skipped elsewhere).
"""

import json
import math
import os
import signal
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from resnorm_jax import config as config_lib, data as data_lib, errors, experiments
from resnorm_jax import validation
from resnorm_jax import training, workdir as workdir_lib
from resnorm_jax.errors import ConfigError, WorkdirLockedError
from resnorm_jax.metrics import MetricWriter, read_metrics

from helpers import (CLI_TINY, REPO, TINY_TERMS, assert_states_close, read_state, run_steps,
                     tiny_config, train_cli)

LOCK = workdir_lib.LOCK_FILE


def error_lines(stderr: str, prog: str = "resnorm-train") -> list[str]:
  """The command's own error lines (the progress bar also writes to stderr)."""
  return [l for l in stderr.splitlines() if l.startswith(f"{prog}: error:")]


def wait_for(predicate, timeout=120.0, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if predicate():
      return True
    if proc is not None and proc.poll() is not None:
      return False
    time.sleep(0.05)
  return False


def train_lines(workdir) -> int:
  path = os.path.join(workdir, "metrics.jsonl")
  return len(open(path).read().splitlines()) if os.path.exists(path) else 0


def assert_same_state(dir_a, dir_b):
  step_a, a = read_state(dir_a)
  step_b, b = read_state(dir_b)
  assert step_a == step_b
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)


def assert_one_record_per_step(workdir, steps):
  records = read_metrics(str(workdir))
  keys = [(r["step"], r["split"]) for r in records]
  assert len(keys) == len(set(keys)), "duplicate (step, split) records"
  assert sorted(s for s, split in keys if split == "train") == list(range(1, steps + 1))
  return records


# ----------------------------------------------------------------------------------------
# The workdir lock.
# ----------------------------------------------------------------------------------------
def test_lock_refuses_a_live_holder_and_is_released(tmp_path):
  first = workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  with pytest.raises(WorkdirLockedError, match=rf"in use by another run \(pid {os.getpid()} "):
    workdir_lib.WorkdirLock(str(tmp_path)).acquire()
  first.release()
  assert not (tmp_path / LOCK).exists()
  with workdir_lib.WorkdirLock(str(tmp_path)):
    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()


def test_stale_locks_are_taken_over(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  record = lock._record()
  # Same host, the process is gone (kill -9, a crash): taken over at once.
  (tmp_path / LOCK).write_text(json.dumps(dict(record, pid=dead.pid, token="old")))
  lock.acquire()
  assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
  lock.release()
  # Another host: judged by its heartbeat.
  other = dict(record, host="another-host", token="other")
  (tmp_path / LOCK).write_text(json.dumps(other))
  with pytest.raises(WorkdirLockedError, match="pid .* on another-host"):
    workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=300).acquire()
  old = time.time() - 301
  os.utime(tmp_path / LOCK, (old, old))
  with workdir_lib.WorkdirLock(str(tmp_path), stale_seconds=300) as taken:
    assert json.loads((tmp_path / LOCK).read_text())["token"] == taken.token
  assert list(tmp_path.iterdir()) == []   # no leftovers of the takeover


def test_takeover_never_removes_a_lock_renewed_meanwhile(tmp_path, monkeypatch):
  # A contender replaces the stale lock between our judgement and our rename: the live lock
  # must survive and this run must report the workdir as locked.
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock = workdir_lib.WorkdirLock(str(tmp_path))
  (tmp_path / LOCK).write_text(json.dumps(dict(lock._record(), pid=dead.pid, token="old")))
  live = json.dumps(dict(lock._record(), token="live"))
  judge = workdir_lib.WorkdirLock.stale_reason

  def judge_then_lose_the_race(self, owner, age):
    reason = judge(self, owner, age)
    (tmp_path / LOCK).write_text(live)   # the contender's fresh lock
    return reason
  monkeypatch.setattr(workdir_lib.WorkdirLock, "stale_reason", judge_then_lose_the_race)
  with pytest.raises(WorkdirLockedError, match="just locked by another run"):
    lock.acquire()
  assert (tmp_path / LOCK).read_text() == live
  assert [p.name for p in tmp_path.iterdir()] == [LOCK]


def test_runs_started_together_on_one_workdir_one_wins(tmp_path):
  runs = [train_cli(tmp_path, "--config.train.steps=30") for _ in range(2)]
  results = [p.communicate(timeout=300) + (p.returncode,) for p in runs]
  codes = sorted(code for _, _, code in results)
  assert codes == [0, errors.EXIT_LOCKED], [err[-2000:] for _, err, _ in results]
  loser = next(err for _, err, code in results if code == errors.EXIT_LOCKED)
  assert len(error_lines(loser)) == 1 and "is in use by another run" in loser
  assert "Traceback" not in loser
  assert_one_record_per_step(tmp_path, 30)


@pytest.mark.slow   # the default suite: the lock's unit tests above, a SIGTERM resume
def test_locked_workdir_then_kill_9_then_resume_is_exact_and_metrics_unique(tmp_path):
  # The lock with real processes, and kill -9 at a random point after a checkpoint: the
  # second run exits 4 writing nothing; after the kill the lock is stale and the next run
  # takes it over, resumes exactly and leaves one metrics record per step.
  steps = ["--config.train.steps=300", "--config.checkpoint.every_steps=25"]
  reference = train_cli(tmp_path / "reference", *steps)
  run = tmp_path / "run"
  first = train_cli(run, *steps)
  assert wait_for(lambda: train_lines(run) >= 40, proc=first), first.communicate()[1][-2000:]
  before = sorted(p.name for p in run.iterdir())
  second = train_cli(run, *steps)
  out, err = second.communicate(timeout=120)
  assert second.returncode == errors.EXIT_LOCKED, err[-2000:]
  assert error_lines(err) == [l for l in err.splitlines() if l.strip()]  # one line only
  assert f"pid {first.pid} " in err and "another --workdir" in err
  assert sorted(p.name for p in run.iterdir()) == before   # nothing written
  assert not (run / "config.before_resume_1.json").exists()
  first.kill()                                             # kill -9 after >= 40 steps
  first.communicate()
  killed_at = train_lines(run)
  assert killed_at < 300 and (run / LOCK).exists()         # left behind by the dead run
  third = train_cli(run, *steps)
  out, err = third.communicate(timeout=300)
  assert third.returncode == 0, err[-3000:]
  assert "resumed from step" in out and "Traceback" not in err
  reference.communicate(timeout=300)
  assert reference.returncode == 0
  assert_same_state(tmp_path / "reference", run)
  records = assert_one_record_per_step(run, 300)
  ref = {(r["step"], r["split"]): r for r in read_metrics(str(tmp_path / "reference"))}
  for r in records:   # the records of the continuing run are the uninterrupted run's
    assert r["loss"] == ref[(r["step"], r["split"])]["loss"]
  assert not (run / LOCK).exists()


# ----------------------------------------------------------------------------------------
# Signals: a second Ctrl-C.
# ----------------------------------------------------------------------------------------
def test_second_ctrl_c_exits_at_once_and_corrupts_nothing(tmp_path):
  # Without the suite's compilation cache (tests/conftest.py): the second Ctrl-C must come
  # while XLA compiles.
  proc = train_cli(tmp_path, "--config.train.steps=60", "--config.checkpoint.every_steps=20",
                   env={"JAX_ENABLE_COMPILATION_CACHE": "false"})
  assert wait_for(lambda: (tmp_path / LOCK).exists(), proc=proc)   # data loaded, starting
  proc.send_signal(signal.SIGINT)
  time.sleep(0.3)
  sent = time.time()
  proc.send_signal(signal.SIGINT)      # while compiling: Python handlers could not run
  _, err = proc.communicate(timeout=60)
  assert time.time() - sent < 5, "the second Ctrl-C did not exit at once"
  assert proc.returncode == errors.EXIT_INTERRUPTED, err[-2000:]
  assert "Second interrupt: exiting now" in err and "Traceback" not in err
  assert not (tmp_path / LOCK).exists()
  rerun = train_cli(tmp_path, "--config.train.steps=60", "--config.checkpoint.every_steps=20")
  _, err = rerun.communicate(timeout=300)
  assert rerun.returncode == 0, err[-2000:]
  assert_one_record_per_step(tmp_path, 60)


# ----------------------------------------------------------------------------------------
# Storage: full and read-only disks, workdirs that cannot be one.
# ----------------------------------------------------------------------------------------
@pytest.fixture
def tmpfs(tmp_path):
  """``mount(size_mib, read_only=False) -> path``: tmpfs file systems, unmounted afterwards."""
  mounted = []

  def mount(size_mib, read_only=False):
    path = tmp_path / f"fs{len(mounted)}"
    path.mkdir()
    options = f"size={size_mib}m" + (",ro" if read_only else "")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)],
                          capture_output=True, text=True)
    if proc.returncode:
      pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip()}); needs root")
    mounted.append(path)
    return path
  yield mount
  for path in mounted:
    subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path, options):
  subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True)


def fill(path, leave_bytes):
  """Fills the file system of ``path`` with a file, leaving about ``leave_bytes`` free."""
  free = os.statvfs(path).f_bavail * os.statvfs(path).f_frsize
  with open(path / "filler", "wb") as f:
    f.write(b"\0" * max(free - leave_bytes, 0))
  return path / "filler"


def test_disk_full_mid_run_is_one_line_exit_5_then_resume_is_exact(tmp_path, tmpfs):
  fs = tmpfs(16)
  total = 60
  steps = [f"--config.train.steps={total}", "--config.checkpoint.every_steps=10",
           "--config.checkpoint.keep=2"]
  reference = train_cli(tmp_path / "reference", *steps)
  # Room for what the start-up check asks (one checkpoint, uncompressed, and metadata) and a
  # little more, not for the three checkpoints that coexist while the third is written.
  config = tiny_config()
  task = training.build_task(config, jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",)))
  needed = workdir_lib.checkpoint_bytes_needed(training.state_bytes(
      training.abstract_state(task)))
  filler = fill(fs, needed + 32 * 1024)
  run = fs / "run"
  proc = train_cli(run, *steps)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == errors.EXIT_STORAGE, err[-3000:]
  lines = error_lines(err)
  assert len(lines) == 1 and "no space left on device" in lines[0] and str(run) in lines[0]
  assert "Traceback" not in err and "Event loop is closed" not in err
  kept, _ = read_state(run)                       # the last complete checkpoint is readable
  assert 10 <= kept < total
  # Still full: refused at start, before anything is written, in one line.
  proc = train_cli(run, *steps)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == errors.EXIT_STORAGE, err[-3000:]
  assert len(error_lines(err)) == 1 and "free" in error_lines(err)[0]
  assert "Traceback" not in err and len(err.splitlines()) < 5
  os.remove(filler)                               # space freed: the rerun resumes exactly
  proc = train_cli(run, *steps)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert f"resumed from step {kept}" in out
  reference.communicate(timeout=300)
  assert_same_state(tmp_path / "reference", run)
  assert_one_record_per_step(run, total)


def test_read_only_workdirs_are_one_line_exit_2_and_untouched(tmp_path, tmpfs):
  empty = tmpfs(4, read_only=True)
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train", f"--workdir={empty}",
                         *CLI_TINY], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert error_lines(proc.stderr) == [l for l in proc.stderr.splitlines() if l.strip()]
  assert "read-only file system" in proc.stderr
  finished = tmpfs(16)
  proc = train_cli(finished, "--config.train.steps=3")
  proc.communicate(timeout=300)
  assert proc.returncode == 0
  snapshot = {p: p.stat().st_mtime_ns for p in finished.rglob("*")}
  remount(finished, "ro")
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train", f"--workdir={finished}",
                         *CLI_TINY, "--config.train.steps=6"], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == 2 and "read-only file system" in proc.stderr, proc.stderr[-2000:]
  assert len([l for l in proc.stderr.splitlines() if l.strip()]) == 1
  remount(finished, "rw")
  assert {p: p.stat().st_mtime_ns for p in finished.rglob("*")} == snapshot


@pytest.mark.parametrize("case", ["workdir_is_a_file", "checkpoints_is_a_file",
                                  "parent_missing", "below_a_file"])
def test_impossible_workdirs_are_one_line_exit_2_writing_nothing(tmp_path, case):
  workdir = tmp_path / "run"
  if case == "workdir_is_a_file":
    workdir.write_text("a file")
  elif case == "checkpoints_is_a_file":
    workdir.mkdir()
    (workdir / "checkpoints").write_text("a file")
  elif case == "parent_missing":
    workdir = tmp_path / "no_such_mount" / "run"
  else:
    (tmp_path / "file").write_text("a file")
    workdir = tmp_path / "file" / "run"
  before = sorted(str(p) for p in tmp_path.rglob("*"))
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train", f"--workdir={workdir}",
                         *CLI_TINY], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("resnorm-train: error:"), proc.stderr
  expected = {"workdir_is_a_file": "is a file, not a directory",
              "checkpoints_is_a_file": "checkpoints is a file",
              "parent_missing": "parent directory", "below_a_file": "is a file, so"}[case]
  assert expected in lines[0]
  assert sorted(str(p) for p in tmp_path.rglob("*")) == before


# ----------------------------------------------------------------------------------------
# Metrics: one complete record per (step, split).
# ----------------------------------------------------------------------------------------
def test_metric_writer_repairs_a_cut_line_and_drops_steps_after_the_checkpoint(tmp_path):
  lines = [json.dumps({"step": s, "split": "train", "loss": float(s)}) for s in (1, 2, 3, 4)]
  text = "\n".join(lines) + "\n" + '{"step": 5, "split": "tr'   # cut by a crash
  (tmp_path / "metrics.jsonl").write_text(text)
  assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2, 3, 4]  # readable
  writer = MetricWriter(str(tmp_path), tensorboard=False, resume_step=3)
  writer.write(4, "train", {"loss": 40.0})
  writer.write(4, "eval", {"loss": 1.0})
  writer.write(4, "eval", {"loss": 2.0})   # written again (a re-evaluation): replaces
  writer.write_record("layer_stats.jsonl", 4, {"x": 1})
  writer.write_record("layer_stats.jsonl", 4, {"x": 2})
  writer.close()
  records = read_metrics(str(tmp_path))
  assert [(r["step"], r["split"], r["loss"]) for r in records] == [
      (1, "train", 1.0), (2, "train", 2.0), (3, "train", 3.0), (4, "train", 40.0),
      (4, "eval", 2.0)]
  assert read_metrics(str(tmp_path), "layer_stats.jsonl") == [{"step": 4, "x": 2}]
  # A damaged line elsewhere than at the end is an error that says where, not a trace.
  (tmp_path / "bad.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ConfigError, match=r"bad.jsonl, line 2, is not JSON"):
    read_metrics(str(tmp_path), "bad.jsonl")


@pytest.mark.slow   # the default suite: the metric writer's repair, above
def test_resume_after_a_crash_mid_line_keeps_one_record_per_step(tmp_path):
  config = tiny_config(**{"train.steps": 6, "checkpoint.every_steps": 3,
                          "train.layer_stats_every_steps": 1})
  training.train_and_evaluate(config, str(tmp_path / "ref"))
  run = str(tmp_path / "run")
  training.train_and_evaluate(config, run)
  # As if killed after step 6's metrics were written but before its checkpoint, in the
  # middle of a line: checkpoint 3 is the newest, and both files end in a cut line.
  import shutil
  shutil.rmtree(os.path.join(run, "checkpoints", "6"))
  for name in ("metrics.jsonl", "layer_stats.jsonl"):
    with open(os.path.join(run, name), "a") as f:
      f.write('{"step": 7, "spl')
  summary = training.train_and_evaluate(config, run)
  assert summary["start_step"] == 3
  records = assert_one_record_per_step(run, 6)
  ref = {(r["step"], r["split"]): r for r in read_metrics(str(tmp_path / "ref"))}
  assert len(records) == len(ref)
  for r in records:
    assert r["loss"] == ref[(r["step"], r["split"])]["loss"]
  stats = read_metrics(run, "layer_stats.jsonl")
  assert [r["step"] for r in stats] == [1, 2, 3, 4, 5, 6]


# ----------------------------------------------------------------------------------------
# Validation of every numeric key.
# ----------------------------------------------------------------------------------------
def _configs():
  return {name: experiments.load_config_module(os.path.join(REPO, "configs", f"{name}.py"))
          for name in ("quickstart", "toy_translation")}


@pytest.mark.parametrize("name", ["quickstart", "toy_translation"])
def test_every_numeric_key_refuses_nonfinite_and_negative_values(name):
  # Systematic over the schema: no key means anything for nan, inf or a negative value, so
  # each must fail validation (and not pass it and fail later, like seed=-1 or lr=nan did).
  module = _configs()[name]
  keys = config_lib.numeric_leaves(module.get_config())
  assert len(keys) > 40
  accepted = []
  for key, value in keys.items():
    bads = (-1,) if isinstance(value, int) else (math.nan, math.inf, -math.inf, -1.0)
    for bad in bads:
      config = module.get_config()
      section, rest = key.split(".", 1)
      if "[" in rest:
        field, index = rest[:-1].split("[")
        seq = list(config[section][field])
        seq[int(index)] = bad
        config[section][field] = tuple(seq)
      else:
        config[section][rest] = bad
      try:
        validation.validate(config, 8)
        accepted.append((key, bad))
      except ConfigError as e:
        assert "\n" not in str(e)
  assert accepted == []


@pytest.mark.parametrize("override,message", [
    ("model.bn_momentum=1.5", "model.bn_momentum=1.5 must be in [0, 1]"),
    ("model.bn_epsilon=0.0", "model.bn_epsilon=0.0 must be in (0, inf]"),
    ("train.b2=1.0", "train.b2=1.0 must be in [0, 1)"),
    ("train.seed=4294967296", "train.seed=4294967296 must be an integer in [0, 4294967295]"),
    ("data.synthetic_test_size=0", "data.synthetic_test_size=0 must be a positive integer"),
])
def test_out_of_range_values_are_config_errors(override, message):
  config = tiny_config()
  key, value = override.split("=")
  section, field = key.split(".")
  config[section][field] = type(config[section][field])(float(value)) \
      if isinstance(config[section][field], float) else int(value)
  if field == "eps":
    config.train.optimizer = "adam"
  with pytest.raises(ConfigError) as info:
    validation.validate(config, 8)
  assert message in str(info.value)


@pytest.mark.parametrize("flag,message", [
    ("--config.train.learning_rate=nan", "train.learning_rate=nan must be a finite number"),
    ("--config.train.learning_rate=inf", "train.learning_rate=inf must be a finite number"),
    ("--config.train.seed=-1", "train.seed=-1 must be"),
])
def test_cli_refuses_values_that_used_to_pass_validation(tmp_path, flag, message):
  workdir = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train", f"--workdir={workdir}",
                         *CLI_TINY, flag], cwd=REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], proc.stderr
  assert not workdir.exists()


# ----------------------------------------------------------------------------------------
# Exit codes.
# ----------------------------------------------------------------------------------------
def test_exit_codes_are_distinct_and_documented():
  codes = [errors.EXIT_OK, errors.EXIT_NONFINITE, errors.EXIT_USAGE, errors.EXIT_PEER_LOST,
           errors.EXIT_LOCKED, errors.EXIT_STORAGE, errors.EXIT_INTERNAL,
           errors.EXIT_INTERRUPTED, errors.EXIT_PREEMPTED]
  assert len(set(codes)) == len(codes)
  readme = open(os.path.join(REPO, "README.md")).read()
  table = readme.split("### Exit codes")[1].split("\n#")[0]
  for code in codes:
    assert f"| {code} |" in table


def test_nonfinite_loss_is_exit_1_on_the_command_line(tmp_path):
  proc = train_cli(tmp_path, "--config.model.norm=none", "--config.train.learning_rate=1e9",
                   "--config.train.steps=12")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == errors.EXIT_NONFINITE, err[-2000:]
  assert len(error_lines(err)) == 1 and "non-finite loss" in err


def test_a_bug_is_exit_70_with_its_traceback(tmp_path):
  code = ("import sys; from resnorm_jax import training, train\n"
          "def broken(config, workdir): raise KeyError('a bug')\n"
          "training.train_and_evaluate = broken\n"
          f"sys.argv = ['resnorm-train', '--workdir={tmp_path / 'run'}']\n"
          "train.run()\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                        text=True, timeout=120)
  assert proc.returncode == errors.EXIT_INTERNAL, proc.stderr[-2000:]
  assert "Traceback" in proc.stderr and "KeyError" in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(
      "resnorm-train: error: internal error (KeyError")


def test_sweep_and_analysis_refuse_a_locked_workdir_with_exit_4(tmp_path):
  variant = tmp_path / "sweep" / "identity" / "seed_0"
  variant.mkdir(parents=True)
  with workdir_lib.WorkdirLock(str(variant)):        # a live run holds the variant
    proc = subprocess.run(
        [sys.executable, "-m", "resnorm_jax.sweep", "--config=configs/he2016_shortcuts.py",
         "--variants=identity", f"--workdir={tmp_path / 'sweep'}",
         "--config.model.depth=8", "--config.model.width=4", "--config.data.name=synthetic",
         "--config.data.synthetic_train_size=64", "--config.data.synthetic_test_size=32",
         "--config.train.batch_size=16", "--config.train.steps=2",
         "--config.parallel.num_devices=1"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == errors.EXIT_LOCKED, proc.stderr[-2000:]
    assert len(error_lines(proc.stderr, "resnorm-sweep")) == 1
    assert "is in use by another run" in proc.stderr and "Traceback" not in proc.stderr
  analysis = tmp_path / "analysis"
  analysis.mkdir()
  with workdir_lib.WorkdirLock(str(analysis)):
    proc = subprocess.run(
        [sys.executable, "-m", "resnorm_jax.analysis.cli", "--config=configs/moments.py:tiny",
         f"--workdir={analysis}"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == errors.EXIT_LOCKED, proc.stderr[-2000:]
    assert len(error_lines(proc.stderr, "resnorm-analyze")) == 1
  assert sorted(p.name for p in analysis.iterdir()) == []


# ----------------------------------------------------------------------------------------
# Augmentation and dropout do not depend on the device count.
# ----------------------------------------------------------------------------------------
def test_crop_equals_a_numpy_crop_at_the_drawn_offsets():
  images = np.random.default_rng(0).integers(0, 256, (32, 8, 7, 3)).astype(np.uint8)
  key = jax.random.key(3)
  out = np.asarray(data_lib.augment(images, key, pad=2, mode="crop"))
  offsets = np.asarray(jax.random.randint(jax.random.split(key)[0], (32, 2), 0, 5))
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)))
  expected = np.stack([padded[i, a:a + 8, b:b + 7] for i, (a, b) in enumerate(offsets)])
  np.testing.assert_array_equal(out, expected)
  assert len({tuple(o) for o in offsets}) > 10          # the offsets really vary


# The quickstart's longest reductions that differ between device counts: the weight gradients
# of the 8x8 stages and the BatchNorm statistics there, batch 64 x 8 x 8 positions.
QUICKSTART_TERMS = 64 * 8 * 8
# One step: its gradients are what the device count may change, and only by rounding.  Over
# several steps a ReLU input within rounding of zero can take the other side (the report's
# third step: one of 65,536 inputs of stage2_unit1's first ReLU was +9.8e-7 on one device
# count and -1.5e-7 on the other, which moved stage 1's gradients by 2 %), so longer runs
# are equally valid trajectories, not equal to float32 rounding (README).
QUICKSTART_ONE_STEP = ["--config=configs/quickstart.py", "--config.train.steps=1",
                       "--config.train.batch_size=64", "--config.checkpoint.every_steps=1",
                       "--config.parallel.bn_sync=global", "--config.eval.every_steps=0"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["jit", "shard_map", "pmap"])
def test_augmented_quickstart_gives_the_same_gradients_on_1_and_8_devices(mode):
  # The report's setting (digits, random crops, batch 64, global BatchNorm); the optimizer
  # state after one step holds the gradient (momentum trace), compared first.  The default
  # suite's check of the same: test_training.py's
  # test_three_execution_styles_equal_single_device (random crops and flips, global
  # BatchNorm, every style on 8 devices against one device).
  quickstart = _configs()["quickstart"]

  def run(n, mode):
    c = quickstart.get_config()
    c.train.steps, c.parallel.num_devices, c.parallel.mode = 1, n, mode
    c.parallel.bn_sync = "global"
    return run_steps(c, 1)
  assert_states_close(run(8, mode), run(1, "jit"), QUICKSTART_TERMS, f"8 devices, {mode}:")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["jit", "shard_map", "pmap"])
def test_the_cli_computes_the_same_gradients_on_1_and_8_devices_with_crops(tmp_path, mode):
  """The report's command pair as a user runs it, for one step: ``resnorm-train`` on the
  quickstart with random crops in two processes, one and eight host devices; the
  checkpoints (optimizer state = the gradient, BatchNorm statistics, parameters) agree leaf
  by leaf to float32 rounding."""
  kept = [f for f in os.environ.get("XLA_FLAGS", "").split()
          if not f.startswith("--xla_force_host_platform_device_count")]
  states = []
  for n in (1, 8):
    env = dict(os.environ, XLA_FLAGS=" ".join(
        kept + [f"--xla_force_host_platform_device_count={n}"]))
    done = subprocess.run([sys.executable, "-m", "resnorm_jax.train", *QUICKSTART_ONE_STEP,
                           f"--config.parallel.mode={mode}", f"--workdir={tmp_path / str(n)}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    step, state = read_state(str(tmp_path / str(n)))
    assert step == 1
    states.append(state)
  assert_states_close(states[1], states[0], QUICKSTART_TERMS, f"resnorm-train {mode}, 8 vs 1:")


def test_dropout_in_jit_does_not_depend_on_the_device_count():
  # README: dropout masks are drawn on the global batch in the jit style (threefry is
  # partitionable); the per-device styles draw per replica.
  def run(n):
    return run_steps(tiny_config(**{"parallel.num_devices": n,
                                    "model.shortcut": "dropout:0.5"}))
  one, eight = run(1), run(8)
  assert_states_close(eight, one, 3 * TINY_TERMS, "dropout, 8 vs 1 devices, 3 steps:")


def test_closed_event_loop_reports_are_dropped_and_others_kept():
  """The commands drop Python's "Event loop is closed" unraisable reports (TensorStore
  callbacks after orbax closed its loop on a failed write) and keep every other one."""
  import subprocess
  import sys
  code = ("import asyncio, logging\n"
          "from resnorm_jax.errors import quiet_failed_write_reports\n"
          "quiet_failed_write_reports()\n"
          "log = logging.getLogger('asyncio')\n"
          "try:\n"
          "  raise OSError(28, 'No space left on device')\n"
          "except OSError as e:\n"
          "  log.error('Task exception was never retrieved', exc_info=e)\n"
          "log.error('another asyncio error is kept')\n"
          "class Closed:\n"
          "  def __del__(self): raise RuntimeError('Event loop is closed')\n"
          "class Other:\n"
          "  def __del__(self): raise ValueError('kept')\n"
          "Closed(); Other()\n")
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120)
  assert done.returncode == 0
  assert "Event loop is closed" not in done.stderr and "ValueError: kept" in done.stderr
  assert "never retrieved" not in done.stderr and "No space" not in done.stderr
  assert "another asyncio error is kept" in done.stderr


def test_a_collective_that_lost_its_peer_is_not_a_storage_failure():
  """JAX's runtime errors carry an absl status like TensorStore's ("UNKNOWN: ..."); a peer
  that died during an all-gather inside orbax is exit 3's case, not a storage failure."""
  lost_peer = jax.errors.JaxRuntimeError(
      "UNKNOWN: Gloo AllGather failed: Connection closed by peer [127.0.0.1]:17041")
  assert errors.storage_error(lost_peer, "w") is None
  store = ValueError("UNAVAILABLE: Error writing \"x\" in OCDBT database: HTTP response "
                     "code: 503")
  assert "object store failed while accessing w" in str(errors.storage_error(store, "w"))
