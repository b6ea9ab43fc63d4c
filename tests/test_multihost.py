"""Multi-process runs on 127.0.0.1 (launch/local.sh): the same math as one process, for the
ResNet image task and the Transformer translation task (training, resume, beam-search BLEU).

The default suite runs the image task's 2-process run against one process and the
dead-process test; the per-device styles and the translation task's runs are ``slow``."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from helpers import (CLI_TINY, REPO, TINY_TERMS, assert_states_close,
                     assert_trees_close_to_rounding, read_state)
from resnorm_jax import training
from resnorm_jax.metrics import read_metrics

SINGLE = [f for f in CLI_TINY if not f.startswith("--config.parallel.num_devices")]


def launch(num_processes, workdir, *flags, devices=4, port=None, wait=True, base=SINGLE):
  env = dict(os.environ, DEVICES_PER_PROCESS=str(devices), PYTHON=sys.executable,
             PYTHONUNBUFFERED="1")
  if port:
    env["PORT"] = str(port)
  proc = subprocess.Popen(["bash", os.path.join(REPO, "launch", "local.sh"),
                           str(num_processes), f"--workdir={workdir}", *base, *flags],
                          cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  if not wait:
    return proc
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  return out


# The default suite: 2 processes = 1 process; the slow one also resumes the 2-process
# checkpoint in one process (two more runs).
@pytest.mark.parametrize("resume", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_two_processes_equal_one_process_and_resume_in_one(tmp_path, resume):
  steps = "--config.train.steps=4"
  out = launch(2, tmp_path / "two", steps, port=13411)
  assert "completed at step 4" in out
  launch(1, tmp_path / "one", steps, devices=8, port=13412)
  step_two, two = read_state(tmp_path / "two")
  step_one, one = read_state(tmp_path / "one")
  assert step_two == step_one == 4
  assert_states_close(two, one, 4 * TINY_TERMS, "2 processes vs 1, 4 steps:")
  # Only process 0 writes metrics: one line per step, not one per process.
  lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
  assert sum('"split": "train"' in l for l in lines) == 4
  if not resume:
    return
  # The 2-process checkpoint continues in a single process on 8 devices.
  out = launch(1, tmp_path / "two", "--config.train.steps=6", devices=8, port=13413)
  assert "resumed from step 4" in out and "completed at step 6" in out
  launch(1, tmp_path / "one", "--config.train.steps=6", devices=8, port=13414)
  _, resumed = read_state(tmp_path / "two")
  _, reference = read_state(tmp_path / "one")
  assert_states_close(resumed, reference, 6 * TINY_TERMS, "resumed in 1 process, 6 steps:")


@pytest.fixture(scope="module")
def one_process_three_steps(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("one_process")
  launch(1, workdir, "--config.train.steps=3", devices=8, port=13416)
  return read_state(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("mode,port", [("shard_map", 13417), ("pmap", 13418)])
def test_two_processes_equal_one_process_in_the_per_device_styles(tmp_path, mode, port,
                                                                   one_process_three_steps):
  # The explicit per-device programs (cross-replica BN by psum over processes); pmap with
  # several processes once returned host-local outputs that failed the second step.
  out = launch(2, tmp_path, "--config.train.steps=3", f"--config.parallel.mode={mode}",
               port=port)
  assert "completed at step 3" in out
  step, state = read_state(tmp_path)
  ref_step, ref = one_process_three_steps
  assert step == ref_step == 3
  assert_states_close(state, ref, 3 * TINY_TERMS, f"2 processes, {mode}, 3 steps:")


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


# ----------------------------------------------------------------------------------------
# Translation: configs/toy_translation.py at the size of tests/test_translation.py (a 2+2
# layer d-32 Pre-LN Transformer, 300 toy pairs, global batches of 256 tokens over 8
# devices), with 20 test sentences: two evaluation batches of 16 rows, the second mostly
# padding, so one process holds only padding rows of it.
# ----------------------------------------------------------------------------------------
TRANSLATION = {
    "model.vocab_size": 48, "model.max_len": 32, "translation.max_length": 16,
    "translation.max_tokens": 256, "translation.beam_size": 2,
    "translation.toy_train_size": 300, "translation.toy_test_size": 20,
    "translation.toy_vocab": 12, "translation.toy_max_words": 3,
    "train.warmup_steps": 4, "train.learning_rate": 0.01,
    # Adam's eps 1e-4 instead of the recipe's 1e-9: gradients that are zero in theory (the
    # attention key biases) are float noise whose sum order differs between one and two
    # processes, and g/(sqrt(v) + 1e-9) would turn that noise into full-size updates.
    "train.eps": 1e-4,
    "train.log_every_steps": 1, "eval.every_steps": 0, "eval.batch_size": 16,
    "checkpoint.every_steps": 1000,
}
TRANSLATION_CLI = ["--config=configs/toy_translation.py"] + [
    f"--config.{k}={v}" for k, v in TRANSLATION.items()]
TRAINED = 60   # steps after which the toy model's translations depend on the source
# A translation step's longest reduction: the weight gradients over the 256 token slots of a
# global batch.  The key biases' gradients are zero in theory (helpers.py, ``cancelling``).
TRANSLATION_TERMS = 256
KEY_BIAS = ("['key']['bias']",)


def assert_translation_close(state, reference, steps, what):
  assert_trees_close_to_rounding(state.params, reference.params, steps * TRANSLATION_TERMS,
                                 f"{what}, {steps} steps: params", cancelling=KEY_BIAS)


def translation_config(**overrides):
  """The config ``launch(..., base=TRANSLATION_CLI)`` runs, for a run in this process (one
  process, the 8 devices of tests/conftest.py)."""
  spec = importlib.util.spec_from_file_location(
      "toy_translation", os.path.join(REPO, "configs", "toy_translation.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for key, value in {**TRANSLATION, **overrides}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def train_here(workdir, steps, **overrides):
  """A one-process run (or resume) in ``workdir``; returns its summary, state on the host."""
  summary = training.train_and_evaluate(
      translation_config(**{"train.steps": steps, **overrides}), str(workdir))
  summary["state"] = jax.device_get(summary["state"])
  return summary


def translations(workdir, step):
  with open(os.path.join(workdir, "translations", f"step_{step}.txt"), encoding="utf-8") as f:
    return f.read().splitlines()


def metric_lines(workdir, split):
  return [m for m in read_metrics(str(workdir)) if m["split"] == split]


@pytest.fixture(scope="module")
def trained_translation(tmp_path_factory):
  """An uninterrupted one-process run of TRAINED steps: (workdir, summary)."""
  workdir = tmp_path_factory.mktemp("translation") / "reference"
  summary = train_here(workdir, TRAINED)
  # The comparisons of decoded text below mean something only if the outputs differ.
  assert len(set(translations(workdir, TRAINED))) >= 5, translations(workdir, TRAINED)
  return workdir, summary


@pytest.mark.slow
def test_translation_two_processes_equal_one_process_and_resume_in_one(
    tmp_path, trained_translation):
  two, one = tmp_path / "two", tmp_path / "one"
  out = launch(2, two, "--config.train.steps=4", port=13421, base=TRANSLATION_CLI)
  assert "completed at step 4" in out
  reference = train_here(one, 4)
  step, state = read_state(two)
  assert step == 4
  assert_translation_close(state, reference["state"], 4, "2 processes vs 1")
  # Only process 0 writes metrics: one train line per step, one eval line; each process fed
  # its slice of the same global token batches (same token counts, same losses).
  train_two, train_one = metric_lines(two, "train"), metric_lines(one, "train")
  assert [m["step"] for m in train_two] == [m["step"] for m in train_one] == [1, 2, 3, 4]
  assert [m["tokens"] for m in train_two] == [m["tokens"] for m in train_one]
  np.testing.assert_allclose([m["loss"] for m in train_two],
                             [m["loss"] for m in train_one], rtol=1e-5)
  evals = metric_lines(two, "eval")
  assert [(m["step"], m["sentences"]) for m in evals] == [(4, 20)]
  assert evals[0]["bleu"] == reference["eval"]["bleu"]
  assert translations(two, 4) == translations(one, 4)
  # The 2-process checkpoint continues in one process as if never interrupted.
  reference_dir, uninterrupted = trained_translation
  resumed = train_here(two, TRAINED)
  assert (resumed["start_step"], resumed["step"]) == (4, TRAINED)
  assert_translation_close(resumed["state"], uninterrupted["state"], TRAINED,
                           "resumed in 1 process")
  assert translations(two, TRAINED) == translations(reference_dir, TRAINED)
  assert resumed["eval"]["bleu"] == uninterrupted["eval"]["bleu"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,port", [("pmap", 13422), ("shard_map", 13423)])
def test_translation_per_device_styles_in_two_processes_continue_a_one_process_run(
    tmp_path, trained_translation, mode, port):
  """A one-process checkpoint continues in 2 processes (the per-device styles: pmap,
  shard_map), and their beam search, gathered from both processes, decodes the
  source-dependent outputs of the trained model exactly as one process does."""
  reference_dir, _ = trained_translation
  two, one = tmp_path / "two", tmp_path / "one"
  for workdir in (two, one):
    os.makedirs(workdir)
    for name in ("config.json", "spm.model"):
      shutil.copy(reference_dir / name, workdir / name)
    shutil.copytree(reference_dir / "checkpoints", workdir / "checkpoints")
  steps = TRAINED + 2
  out = launch(2, two, f"--config.train.steps={steps}", f"--config.parallel.mode={mode}",
               port=port, base=TRANSLATION_CLI)
  assert f"completed at step {steps} (resumed from step {TRAINED})" in out
  reference = train_here(one, steps)
  assert reference["start_step"] == TRAINED
  step, state = read_state(two)
  assert step == steps
  assert_translation_close(state, reference["state"], steps, f"2 processes, {mode}")
  assert [m["step"] for m in metric_lines(two, "train")] == [TRAINED + 1, steps]
  evals = metric_lines(two, "eval")
  assert [(m["step"], m["sentences"]) for m in evals] == [(steps, 20)]
  assert evals[0]["bleu"] == reference["eval"]["bleu"]
  decoded = translations(two, steps)
  assert len(set(decoded)) >= 5 and decoded == translations(one, steps)


@pytest.mark.slow
def test_packed_translation_two_processes_equal_one_process(tmp_path):
  """Packed rows (translation.packing): each process builds only its devices' rows of the
  same global batches from the token cache process 0 prepared; 2 processes = 1 process."""
  two, one = tmp_path / "two", tmp_path / "one"
  out = launch(2, two, "--config.train.steps=3", "--config.translation.packing=true",
               port=13424, base=TRANSLATION_CLI)
  assert "completed at step 3" in out
  reference = train_here(one, 3, **{"translation.packing": True})
  step, state = read_state(two)
  assert step == 3
  assert_translation_close(state, reference["state"], 3, "packed, 2 processes vs 1")
  train_two, train_one = metric_lines(two, "train"), metric_lines(one, "train")
  for key in ("tokens", "src_nonpad_fraction", "tgt_nonpad_fraction"):
    assert [m[key] for m in train_two] == [m[key] for m in train_one]
  np.testing.assert_allclose([m["loss"] for m in train_two],
                             [m["loss"] for m in train_one], rtol=1e-5)
  assert os.path.exists(two / "tokens" / "manifest.json")
