"""Multi-process runs on 127.0.0.1 (launch/local.sh): the same math as one process."""

import os
import signal
import subprocess
import sys
import time

import chex
import pytest

from helpers import CLI_TINY, REPO, read_state

SINGLE = [f for f in CLI_TINY if not f.startswith("--config.parallel.num_devices")]


def launch(num_processes, workdir, *flags, devices=4, port=None, wait=True):
  env = dict(os.environ, DEVICES_PER_PROCESS=str(devices), PYTHON=sys.executable,
             PYTHONUNBUFFERED="1")
  if port:
    env["PORT"] = str(port)
  proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"),
                           str(num_processes), f"--workdir={workdir}", *SINGLE, *flags],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return out


def test_two_processes_equal_one_process_and_resume_in_one(tmp_path):
  steps = "--config.train.steps=4"
  out = launch(2, tmp_path / "two", steps, port=13411)
  assert "completed at step 4" in out
  launch(1, tmp_path / "one", steps, devices=8, port=13412)
  step_two, two = read_state(tmp_path / "two")
  step_one, one = read_state(tmp_path / "one")
  assert step_two == step_one == 4
  chex.assert_trees_all_close(two.params, one.params, atol=2e-5, rtol=1e-4)
  chex.assert_trees_all_close(two.batch_stats, one.batch_stats, atol=2e-5, rtol=1e-4)
  # Only process 0 writes metrics: one line per step, not one per process.
  lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
  assert sum('"split": "train"' in l for l in lines) == 4
  # The 2-process checkpoint continues in a single process on 8 devices.
  out = launch(1, tmp_path / "two", "--config.train.steps=6", devices=8, port=13413)
  assert "resumed from step 4" in out and "completed at step 6" in out
  launch(1, tmp_path / "one", "--config.train.steps=6", devices=8, port=13414)
  _, resumed = read_state(tmp_path / "two")
  _, reference = read_state(tmp_path / "one")
  chex.assert_trees_all_close(resumed.params, reference.params, atol=5e-5, rtol=1e-4)


def test_a_dead_process_stops_the_others_with_an_error(tmp_path):
  proc = launch(2, tmp_path, "--config.train.steps=100000", "--heartbeat_timeout=10",
                port=13415, wait=False)
  log = tmp_path / "process_1.log"
  deadline = time.time() + 120
  while time.time() < deadline and not (tmp_path / "metrics.jsonl").exists():
    time.sleep(0.2)
  assert (tmp_path / "metrics.jsonl").exists(), "training never started"
  victim = subprocess.run(["pgrep", "-f", "--", f"--process_id=1 --workdir={tmp_path}"],
                          capture_output=True, text=True).stdout.split()
  assert victim, "process 1 not found"
  started = time.time()
  for pid in victim:
    os.kill(int(pid), signal.SIGKILL)
  try:
    _, err = proc.communicate(timeout=150)
  except subprocess.TimeoutExpired:
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("the surviving process hung after its peer died")
  assert proc.returncode != 0
  assert time.time() - started < 150
  survivor = (tmp_path / "process_0.log").read_text()
  # JAX's coordination service (or our handler) names the cause instead of hanging.
  assert ("another task died" in survivor or "lost its peers" in survivor), survivor[-2000:]
  assert "launch/local.sh: process 1 exited with" in err
