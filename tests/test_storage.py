"""gs:// workdirs and data against a real local GCS server (gcp-storage-emulator).

The emulator (tests/gcs_emulator.py: gcp-storage-emulator with the generation headers of
downloads that GCS sends and it omits) runs as its own process on 127.0.0.1 and a free
port for the whole session;
``STORAGE_EMULATOR_HOST`` sends gcsfs (behind etils.epath) there and
``TENSORSTORE_GCS_HTTP_URL`` sends orbax's tensorstore there, in this process and in every
command the tests start.  Nothing is mocked: objects really go over HTTP to the server.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import chex
import jax
import numpy as np
import pytest

from helpers import (CLI_TINY, REPO, TINY_TERMS, assert_states_close, cifar_records,
                     fast_compile_options, read_state,
                     tiny_config, train_cli, write_tarball)
from resnorm_jax import checkpointing, config as config_lib, data as data_lib, errors
from resnorm_jax import storage, training, workdir as workdir_lib
from resnorm_jax.errors import ConfigError, WorkdirLockedError
from resnorm_jax.metrics import MetricWriter, read_metrics

BUCKET = "resnorm-test"
LOCK = workdir_lib.LOCK_FILE


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_emulator(bucket: str) -> tuple[subprocess.Popen, int]:
  """A GCS emulator process on a free port of 127.0.0.1 holding ``bucket``; (process, port)."""
  # No skip: the emulator is in the test extra (pyproject), so a missing one is a broken
  # install and must fail, not silently drop every gs:// test.
  import gcp_storage_emulator  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  port = _free_port()
  server = subprocess.Popen(   # gcp-storage-emulator (see tests/gcs_emulator.py)
      [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(port), bucket],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
  deadline = time.time() + 30
  while True:
    try:
      socket.create_connection(("127.0.0.1", port), timeout=1).close()
      return server, port
    except OSError:
      assert server.poll() is None and time.time() < deadline, "emulator did not start"
      time.sleep(0.1)


def emulator_env(port: int) -> dict:
  return {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
          "TENSORSTORE_GCS_HTTP_URL": f"http://127.0.0.1:{port}",
          "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}


@pytest.fixture(scope="session")
def gcs():
  """A GCS emulator process with bucket ``BUCKET``; yields ``gs://BUCKET``."""
  server, port = start_emulator(BUCKET)
  env = emulator_env(port)
  saved = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  try:
    yield f"gs://{BUCKET}"
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def gdir(gcs):
  """A fresh directory in the bucket."""
  return f"{gcs}/{uuid.uuid4().hex[:10]}"


def _error_lines(stderr):
  return [l for l in stderr.splitlines() if l.strip()]


# ----------------------------------------------------------------------------------------
# The path layer.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["local", "bucket"])
def test_files_roundtrip_through_one_layer(tmp_path, gdir, where):
  root = str(tmp_path) if where == "local" else gdir
  storage.makedirs(storage.join(root, "sub"))
  storage.write_atomic(storage.join(root, "sub", "a.json"), '{"x": 1}\n')
  storage.write_bytes(storage.join(root, "b.bin"), b"\x00\x01")
  assert storage.read_text(storage.join(root, "sub", "a.json")) == '{"x": 1}\n'
  assert storage.read_bytes(storage.join(root, "b.bin")) == b"\x00\x01"
  assert storage.listdir(root) == ["b.bin", "sub"]
  assert storage.isdir(storage.join(root, "sub")) and storage.isfile(storage.join(root, "b.bin"))
  assert not storage.exists(storage.join(root, "missing"))
  assert storage.listdir(storage.join(root, "missing")) == []
  storage.copy(storage.join(root, "b.bin"), storage.join(root, "c.bin"))
  assert storage.read_bytes(storage.join(root, "c.bin")) == b"\x00\x01"
  with storage.local_copy(storage.join(root, "c.bin")) as local:
    assert open(local, "rb").read() == b"\x00\x01"
  storage.remove(storage.join(root, "c.bin"))
  assert not storage.exists(storage.join(root, "c.bin"))
  if where == "local":   # (the emulator ignores preconditions: see the next test)
    with pytest.raises(FileExistsError):
      storage.create_exclusive(storage.join(root, "b.bin"), b"x")


def test_the_emulator_ignores_generation_preconditions_and_that_is_detected(gdir):
  # GCS refuses ifGenerationMatch=0 on an existing object (412); gcp-storage-emulator
  # overwrites it.  The workdir lock needs to know which (see WorkdirLock's docstring).
  path = storage.join(gdir, "object")
  storage.create_exclusive(path, b"first")
  storage.create_exclusive(path, b"second")          # a real bucket raises FileExistsError
  assert storage.read_bytes(path) == b"second"
  storage.replace_if_generation(path, b"third", 1)    # so is a stale compare-and-swap
  assert storage.read_bytes(path) == b"third"
  assert storage.honours_preconditions(gdir + "/probe") is False
  assert not storage.exists(gdir + "/probe.precondition-probe")


@pytest.mark.parametrize("path,message", [
    ("s3://bucket/run", "the scheme s3:// is not supported"),
    ("gs:///run", "names no bucket"),
    ("gs://no-such-bucket-x/run", "the bucket gs://no-such-bucket-x does not exist"),
])
def test_bad_workdirs_are_config_errors(gcs, path, message):
  with pytest.raises(ConfigError, match=message):
    workdir_lib.check_workdir(path)


def test_bad_bucket_is_one_line_exit_2_before_anything_is_compiled(gcs, tmp_path):
  env = dict(os.environ, PYTHONPATH=REPO)
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.train",
                         "--workdir=gs://no-such-bucket-x/run", *CLI_TINY], cwd=tmp_path,
                        env=env, capture_output=True, text=True, timeout=120)
  err = proc.stderr
  assert proc.returncode == errors.EXIT_USAGE, err
  lines = _error_lines(err)
  assert len(lines) == 1 and lines[0].startswith("resnorm-train: error: --workdir=gs://"
                                                 "no-such-bucket-x/run: the bucket"), err
  assert os.listdir(tmp_path) == []


# ----------------------------------------------------------------------------------------
# The lock on a bucket.
# ----------------------------------------------------------------------------------------
def test_lock_on_a_bucket_refuses_a_live_holder_beats_and_is_released(gdir):
  with workdir_lib.WorkdirLock(gdir, heartbeat_seconds=0.2) as held:
    assert held.on_bucket and not held.preconditions      # the emulator (see above)
    record = json.loads(storage.read_text(held.path))
    assert record["token"] == held.token and record["pid"] == os.getpid()
    _, generation = storage.stat(held.path)
    with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on"):
      workdir_lib.WorkdirLock(gdir).acquire()
    deadline = time.time() + 10
    while storage.stat(held.path)[1] == generation and time.time() < deadline:
      time.sleep(0.05)
    assert storage.stat(held.path)[1] != generation          # the heartbeat rewrote it
    assert json.loads(storage.read_text(held.path))["token"] == held.token
  assert not storage.exists(held.path)
  assert storage.listdir(gdir) == []


def test_stale_locks_on_a_bucket_are_taken_over(gdir):
  path = storage.join(gdir, LOCK)
  dead = subprocess.Popen(["true"])
  dead.wait()
  probe = workdir_lib.WorkdirLock(gdir)
  # A killed run on this host: taken over at once.
  storage.write_atomic(path, json.dumps(dict(probe._record(), pid=dead.pid, token="dead")))
  with workdir_lib.WorkdirLock(gdir) as taken:
    assert json.loads(storage.read_text(path))["token"] == taken.token
  # A run on another host without a heartbeat for longer than stale_seconds.
  storage.write_atomic(path, json.dumps(dict(probe._record(), host="elsewhere",
                                             token="far")))
  with pytest.raises(WorkdirLockedError, match="in use by another run"):
    workdir_lib.WorkdirLock(gdir, stale_seconds=60).acquire()
  time.sleep(1.5)
  with workdir_lib.WorkdirLock(gdir, stale_seconds=1) as taken:
    assert json.loads(storage.read_text(path))["token"] == taken.token
  assert storage.listdir(gdir) == []


# ----------------------------------------------------------------------------------------
# JSON lines and checkpoints on a bucket.
# ----------------------------------------------------------------------------------------
def test_metrics_on_a_bucket_are_uploaded_whole_and_repaired_on_resume(gdir):
  writer = MetricWriter(gdir, tensorboard=True)
  for step in (1, 2, 3):
    writer.write(step, "train", {"loss": 1.0 / step})
  assert not storage.exists(writer.path)     # no append on an object store: kept until...
  writer.sync()                              # ...a checkpoint is saved
  assert [r["step"] for r in read_metrics(gdir)] == [1, 2, 3]
  writer.write(4, "train", {"loss": 0.25})
  writer.write(3, "train", {"loss": 9.0})    # written again: replaces the old record
  writer.close()
  records = read_metrics(gdir)
  assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 0.5), (4, 0.25),
                                                       (3, 9.0)]
  assert storage.glob(storage.join(gdir, "tensorboard"), "events.out.tfevents.*")
  # A cut last line (a crash of a local writer, a hand edit) and steps after the checkpoint
  # are dropped when a resumed run opens the file.
  storage.write_atomic(writer.path, storage.read_bytes(writer.path) + b'{"step": 5, "spl')
  resumed = MetricWriter(gdir, tensorboard=False, resume_step=2)
  resumed.write(3, "train", {"loss": 0.3})
  resumed.close()
  assert [(r["step"], r["loss"]) for r in read_metrics(gdir)] == [(1, 1.0), (2, 0.5),
                                                                  (3, 0.3)]


def _tree(seed):
  rng = np.random.default_rng(seed)
  return {"w": jax.numpy.asarray(rng.normal(size=(4, 3)).astype(np.float32)),
          "step": np.int32(seed)}


def _save_steps_1_and_2(gdir) -> str:
  """Checkpoints of steps 1 and 2 (``_tree``) in the bucket; their directory."""
  directory = storage.join(gdir, "checkpoints")
  with checkpointing.Checkpointer(directory, keep=5, every_steps=1) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _tree(step), force=True)
    ckpt.wait()
  return directory


def test_a_checkpoint_without_its_commit_marker_is_never_taken_as_complete(gdir):
  # On GCS orbax writes a step in place and marks it complete with commit_success.txt last;
  # a write cut by a store error leaves a step without the marker.
  directory = _save_steps_1_and_2(gdir)
  assert storage.listdir(storage.join(directory, "2")).count("commit_success.txt") == 1
  storage.remove(storage.join(directory, "2", "commit_success.txt"))
  with checkpointing.Checkpointer(directory, keep=5, every_steps=1) as ckpt:
    assert ckpt.all_steps() == [1]
    step, tree = ckpt.restore(_tree(0))
  assert step == 1
  np.testing.assert_array_equal(tree["w"], _tree(1)["w"])


def test_an_unreadable_newest_checkpoint_on_a_bucket_falls_back(gdir):
  directory = _save_steps_1_and_2(gdir)
  data = [p for p in storage.files_under(storage.join(directory, "2")) if "/d/" in p]
  assert data
  for p in data:
    storage.remove(p)
  with checkpointing.Checkpointer(directory, keep=5, every_steps=1) as ckpt:
    step, tree = ckpt.restore(_tree(0))
  assert step == 1
  np.testing.assert_array_equal(tree["w"], _tree(1)["w"])


# ----------------------------------------------------------------------------------------
# Training into a bucket.
# ----------------------------------------------------------------------------------------
def test_a_run_in_a_bucket_resumed_equals_a_local_run_bitwise(tmp_path, gdir):
  with fast_compile_options():
    local = training.train_and_evaluate(tiny_config(**{"train.steps": 6}), str(tmp_path))
    first = training.train_and_evaluate(tiny_config(**{"train.steps": 3}), gdir)
    assert first["status"] == "completed" and first["step"] == 3
    second = training.train_and_evaluate(tiny_config(**{"train.steps": 6}), gdir)
  assert second["start_step"] == 3 and second["resume_changes"]   # train.steps changed
  chex.assert_trees_all_equal(jax.device_get(local["state"]), jax.device_get(second["state"]))
  step, state = read_state(gdir)
  assert step == 6
  chex.assert_trees_all_equal(jax.device_get(local["state"].params), state.params)
  assert storage.exists(storage.join(gdir, "config.before_resume_1.json"))
  ref = {(r["step"], r["split"]): r["loss"] for r in read_metrics(str(tmp_path))}
  got = {(r["step"], r["split"]): r["loss"] for r in read_metrics(gdir)}
  assert got.pop((3, "eval")) and got == ref   # + the first run's final evaluation
  assert not storage.exists(storage.join(gdir, LOCK))
  # A model change is refused as on a local disk.
  with pytest.raises(ConfigError, match="model.width: checkpoint has 4, this run has 8"):
    training.train_and_evaluate(tiny_config(**{"train.steps": 6, "model.width": 8}), gdir)


@pytest.mark.slow
def test_sigterm_then_resume_in_a_bucket_equals_a_local_run_bitwise(tmp_path, gdir):
  steps = ["--config.train.steps=200", "--config.checkpoint.every_steps=20"]
  reference = train_cli(tmp_path / "local", *steps)
  run = train_cli(gdir, *steps)
  marker = storage.join(gdir, "checkpoints", "20", "commit_success.txt")
  deadline = time.time() + 180
  while not storage.exists(marker) and run.poll() is None and time.time() < deadline:
    time.sleep(0.2)
  run.send_signal(signal.SIGTERM)
  out, err = run.communicate(timeout=180)
  assert run.returncode == errors.EXIT_PREEMPTED, err[-3000:]
  assert "SIGTERM received" in err and "Traceback" not in err
  assert not storage.exists(storage.join(gdir, LOCK))
  stopped_at, _ = read_state(gdir)
  assert 20 <= stopped_at < 200
  # Every train record up to the saved step was uploaded with the checkpoint.
  assert sorted(r["step"] for r in read_metrics(gdir)
                if r["split"] == "train") == list(range(1, stopped_at + 1))
  resumed = train_cli(gdir, *steps)
  out, err = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, err[-3000:]
  assert f"resumed from step {stopped_at}" in out
  assert reference.wait(timeout=300) == 0
  step_a, a = read_state(tmp_path / "local")
  step_b, b = read_state(gdir)
  assert step_a == step_b == 200
  chex.assert_trees_all_equal(a.params, b.params)
  chex.assert_trees_all_equal(a.batch_stats, b.batch_stats)
  chex.assert_trees_all_equal(a.opt_state, b.opt_state)
  ref = read_metrics(str(tmp_path / "local"))
  got = read_metrics(gdir)
  assert sorted(r["step"] for r in got if r["split"] == "train") == list(range(1, 201))
  assert ({(r["step"], r["split"]): r["loss"] for r in got}
          == {(r["step"], r["split"]): r["loss"] for r in ref})


@pytest.mark.slow
def test_two_processes_write_one_bucket(tmp_path, gdir):
  env = dict(os.environ, DEVICES_PER_PROCESS="4", PYTHON=sys.executable, PYTHONUNBUFFERED="1",
             PORT=str(_free_port()), LOG_DIR=str(tmp_path / "logs"))
  single = [f for f in CLI_TINY if not f.startswith("--config.parallel.num_devices")]
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "2",
                         f"--workdir={gdir}", *single, "--config.train.steps=4"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "completed at step 4" in proc.stdout
  assert sorted(os.listdir(tmp_path / "logs")) == ["process_0.log", "process_1.log"]
  # One metrics file, from process 0 only: one train record per step.
  records = read_metrics(gdir)
  assert sorted(r["step"] for r in records if r["split"] == "train") == [1, 2, 3, 4]
  step, _ = read_state(gdir)
  assert step == 4
  assert not storage.exists(storage.join(gdir, LOCK))
  # The same run in one local process on 8 devices: the same result.
  env.update(DEVICES_PER_PROCESS="8", PORT=str(_free_port()))
  proc = subprocess.run(["bash", os.path.join(REPO, "launch", "local.sh"), "1",
                         f"--workdir={tmp_path / 'one'}", *single, "--config.train.steps=4"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  _, two = read_state(gdir)
  _, one = read_state(tmp_path / "one")
  assert_states_close(two, one, 4 * TINY_TERMS, "gs:// 2 processes vs local 1, 4 steps:")


# ----------------------------------------------------------------------------------------
# Data from a bucket.
# ----------------------------------------------------------------------------------------
def test_cifar_tarball_read_from_a_bucket_equals_the_local_one(tmp_path, gdir):
  members = {}
  for i in range(1, 6):
    members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = cifar_records(4, 1, 10, seed=i)[0]
  members["cifar-10-batches-bin/test_batch.bin"] = cifar_records(3, 1, 10, seed=9)[0]
  write_tarball(tmp_path / "cifar-10-binary.tar.gz", members)
  storage.copy(tmp_path / "cifar-10-binary.tar.gz",
               storage.join(gdir, "cifar-10-binary.tar.gz"))
  configs = []
  for data_dir in (str(tmp_path), gdir):
    c = config_lib.base_config()
    c.data.name, c.data.data_dir, c.data.source = "cifar10", data_dir, "tarball"
    configs.append(c)
  local, remote = (data_lib.load_dataset(c) for c in configs)
  np.testing.assert_array_equal(local.train_images, remote.train_images)
  np.testing.assert_array_equal(local.test_labels, remote.test_labels)


def test_iwslt_files_and_the_sentencepiece_model_in_a_bucket(tmp_path, gdir):
  from resnorm_jax.tasks.translation import corpora
  text = {"train.en": "a b c\r\nd e\n", "train.vi": "x y\nz\n", "tst2013.en": "q\n",
          "tst2013.vi": "w\n"}
  for name, body in text.items():
    storage.write_text(storage.join(gdir, "data", name), body)
    (tmp_path / name).write_text(body, newline="")
  remote, local = corpora.read_iwslt15(storage.join(gdir, "data")), \
      corpora.read_iwslt15(str(tmp_path))
  assert remote.train == local.train == (["a b c", "d e"], ["x y", "z"])
  assert remote.test == local.test
  corpus = corpora.TextCorpus("t", "en", "vi", (["a b c d"] * 50, ["x y z w"] * 50),
                              (["a"], ["x"]))
  sp = corpora.load_or_train_sentencepiece(corpus, 16, storage.join(gdir, "run"))
  assert storage.exists(storage.join(gdir, "run", "spm.model"))
  again = corpora.load_or_train_sentencepiece(corpus, 16, storage.join(gdir, "run"))
  assert sp.encode("a b") == again.encode("a b")


@pytest.mark.slow
def test_a_translation_run_keeps_its_vocabulary_and_token_cache_in_a_bucket(tmp_path, gdir):
  """IWSLT'15 files read from the bucket, SentencePiece model and prepared token cache
  written there, translations and checkpoints too; the resumed run reuses the cache (the
  manifest is not rewritten) and ends where a local run of the same steps ends."""
  from test_translation import tiny_config as translation_config
  from resnorm_jax.tasks.translation import cache
  lines = {lang: [" ".join(f"{lang}{(i * 7 + j) % 11}" for j in range(1 + i % 5))
                  for i in range(120)] for lang in ("en", "vi")}
  for split, count in (("train", 120), ("tst2013", 8)):
    for lang in ("en", "vi"):
      body = "".join(l + "\n" for l in lines[lang][:count])
      storage.write_text(storage.join(gdir, "data", f"{split}.{lang}"), body)
      (tmp_path / f"{split}.{lang}").write_text(body)
  overrides = {"train.steps": 2, "parallel.num_devices": 1}
  run = storage.join(gdir, "run")
  with fast_compile_options():
    training.train_and_evaluate(translation_config(storage.join(gdir, "data"), **overrides),
                                run)
    manifest = storage.join(run, cache.TOKENS_DIR, cache.MANIFEST)
    before = storage.read_bytes(manifest)
    assert storage.exists(storage.join(run, "spm.model"))
    assert storage.exists(storage.join(run, "translations", "step_2.txt"))
    overrides["train.steps"] = 3
    resumed = training.train_and_evaluate(
        translation_config(storage.join(gdir, "data"), **overrides), run)
    assert resumed["start_step"] == 2 and storage.read_bytes(manifest) == before
    local = training.train_and_evaluate(translation_config(str(tmp_path), **overrides),
                                        str(tmp_path / "run"))
  chex.assert_trees_all_equal(jax.device_get(resumed["state"].params),
                              jax.device_get(local["state"].params))


# ----------------------------------------------------------------------------------------
# Sweep and analysis into a bucket.
# ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweep_writes_its_runs_and_results_to_a_bucket(gdir):
  from resnorm_jax import sweep
  shortcuts = os.path.join(REPO, "configs", "he2016_shortcuts.py")
  tiny = CLI_TINY + ["--config.train.steps=2", "--config.train.warmup_steps=0"]
  with fast_compile_options():
    assert sweep.main(["resnorm-sweep", f"--config={shortcuts}", "--variants=identity",
                       "--seeds=1", f"--workdir={gdir}"] + tiny) == 0
  rows = json.loads(storage.read_text(storage.join(gdir, "results.json")))["rows"]
  assert rows[0]["variant"] == "identity" and rows[0]["n"] == 1
  assert storage.exists(storage.join(gdir, "results.md"))
  assert storage.read_bytes(storage.join(gdir, "results.png"))[:4] == b"\x89PNG"
  assert json.loads(storage.read_text(
      storage.join(gdir, "identity", "seed_0", "result.json")))["status"] == "completed"
  # --collect reads the bucket back.
  assert sweep.main(["resnorm-sweep", f"--workdir={gdir}", "--collect"]) == 0


@pytest.mark.slow
def test_an_analysis_writes_its_results_and_figures_to_a_bucket(gdir):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "device_count" not in f)
  proc = subprocess.run([sys.executable, "-m", "resnorm_jax.analysis",
                         "--config=configs/moments.py:tiny", "--config.variants=bn_res",
                         "--config.draws=1", f"--workdir={gdir}"], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.loads(storage.read_text(storage.join(gdir, "results.json")))
  assert results["analysis"] == "moments"
  for png in ("moments_chi.png", "moments_reff.png", "moments_kurtosis.png"):
    assert storage.read_bytes(storage.join(gdir, png))[:4] == b"\x89PNG"
  assert not storage.exists(storage.join(gdir, LOCK))


@pytest.mark.slow
def test_a_second_run_on_a_locked_bucket_workdir_is_exit_4_writing_nothing(gdir):
  steps = ["--config.train.steps=2000", "--config.checkpoint.every_steps=1000"]
  first = train_cli(gdir, *steps)
  try:
    deadline = time.time() + 120
    while not storage.exists(storage.join(gdir, "config.json")) and time.time() < deadline:
      assert first.poll() is None, first.communicate()[1][-3000:]
      time.sleep(0.2)
    lock = storage.read_bytes(storage.join(gdir, LOCK))
    config = storage.read_bytes(storage.join(gdir, "config.json"))
    second = train_cli(gdir, *steps)
    _, err = second.communicate(timeout=120)
    assert second.returncode == errors.EXIT_LOCKED, err[-3000:]
    lines = [l for l in err.splitlines() if l.startswith("resnorm-train: error:")]
    assert len(lines) == 1 and f"pid {first.pid} " in lines[0], err[-3000:]
    # Nothing written: the lock still the first run's, its config untouched, no archive.
    assert json.loads(storage.read_bytes(storage.join(gdir, LOCK)))["token"] == \
        json.loads(lock)["token"]
    assert storage.read_bytes(storage.join(gdir, "config.json")) == config
    assert not storage.glob(gdir, "config.before_resume_*")
  finally:
    first.send_signal(signal.SIGTERM)
    first.communicate(timeout=180)
  assert first.returncode == errors.EXIT_PREEMPTED
  assert not storage.exists(storage.join(gdir, LOCK))


@pytest.mark.slow
def test_a_store_that_fails_during_the_run_is_one_line_exit_5(tmp_path):
  # A store of its own, stopped while the run trains: the save on SIGTERM cannot be written
  # (gcsfs retries, then gives up), which is a storage failure, not a crash.
  server, port = start_emulator("failing")
  env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1", **emulator_env(port))
  steps = ["--config.train.steps=5000", "--config.checkpoint.every_steps=5000"]
  run = subprocess.Popen([sys.executable, "-m", "resnorm_jax.train",
                          "--workdir=gs://failing/run", *CLI_TINY, *steps], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  import gcsfs
  store = gcsfs.GCSFileSystem(endpoint_url=f"http://127.0.0.1:{port}", token="anon",
                              skip_instance_cache=True, use_listings_cache=False)
  try:
    deadline = time.time() + 120
    while not store.exists("failing/run/config.json") and time.time() < deadline:
      assert run.poll() is None, run.communicate()[1][-3000:]
      time.sleep(0.2)
  finally:
    server.kill()
    server.wait()
  time.sleep(2)
  run.send_signal(signal.SIGTERM)
  _, err = run.communicate(timeout=300)
  assert run.returncode == errors.EXIT_STORAGE, err[-3000:]
  lines = [l for l in err.splitlines() if l.startswith("resnorm-train: error:")]
  assert len(lines) == 1 and "gs://failing/run" in lines[0], err[-3000:]
  assert "the object store failed" in lines[0] and "Traceback" not in err, err[-3000:]


# ----------------------------------------------------------------------------------------
# Storage failures of every exception class: classified at the I/O boundaries.
# ----------------------------------------------------------------------------------------
def test_storage_failures_of_any_class_are_classified_and_bugs_are_not():
  import gcsfs.retry
  tensorstore_error = ValueError(
      'UNAVAILABLE: Error writing "ocdbt.process_0/manifest.ocdbt" in OCDBT database at '
      'gcs bucket "b": HTTP response code: 503 [source locations=\'x.cc:1\']')
  failing = [tensorstore_error,
             ValueError("DATA_LOSS: Error reading manifest: Malformed StorageGeneration"),
             gcsfs.retry.HttpError({"code": 429, "message": "slow down"}),
             OSError("Forbidden: b/o/x"), FileNotFoundError("b/bkt/o/run%2Fcheckpoints"),
             TimeoutError("read timed out"), ConnectionResetError(104, "reset by peer")]
  for error in failing:
    failure = errors.storage_error(error, "gs://b/run")
    assert failure is not None and "gs://b/run" in str(failure), error
    assert len(str(failure).splitlines()) == 1 and "source locations" not in str(failure)
  wrapped = RuntimeError("orbax: save failed")
  wrapped.__cause__ = tensorstore_error
  assert errors.storage_error(wrapped, "w") is not None
  for bug in (ValueError("operands could not be broadcast"), TypeError("bad"), KeyError("x"),
              RuntimeError("Timeout waiting for key")):
    assert errors.storage_error(bug, "w") is None, bug
  # The store did not answer (no fallback to older checkpoints), or the data is damaged.
  assert errors.store_unavailable(tensorstore_error)
  assert errors.store_unavailable(gcsfs.retry.HttpError({"code": 503, "message": "x"}))
  assert not errors.store_unavailable(ValueError("DATA_LOSS: Error reading manifest"))
  assert not errors.store_unavailable(FileNotFoundError("gone"))


def test_the_path_layer_turns_storage_failures_into_one_line_and_passes_the_rest(tmp_path):
  @storage.io_boundary
  def fails_with(path, error):
    raise error
  with pytest.raises(errors.StorageError, match=f"{tmp_path}.*TimeoutError"):
    fails_with(str(tmp_path), TimeoutError("the store did not answer"))
  for passed in (FileNotFoundError("x"), FileExistsError("x"), ConfigError("x"),
                 TypeError("a bug"), ValueError("a bug")):
    with pytest.raises(type(passed)):
      fails_with(str(tmp_path), passed)
  # A real one: a directory where a file is written is the storage refusing, not a bug.
  (tmp_path / "d").mkdir()
  with pytest.raises(errors.StorageError):
    storage.write_atomic(str(tmp_path / "d"), b"x")


def test_restoring_from_a_bucket_prefix_without_objects_starts_over(gdir):
  with checkpointing.Checkpointer(storage.join(gdir, "checkpoints"), keep=2,
                                  every_steps=1) as ckpt:
    assert ckpt.all_steps() == [] and ckpt.restore(_tree(0)) is None
    # gcsfs lists a prefix whose objects are gone (a partial step orbax has just removed)
    # as FileNotFoundError: nothing to resume, not a crash.
    def listing_fails(*args, **kwargs):
      raise FileNotFoundError("b/bkt/o/run%2Fcheckpoints")
    for method in ("reload", "all_steps"):
      setattr(ckpt._manager, method, listing_fails)
    try:
      assert ckpt.all_steps() == [] and ckpt.restore(_tree(0)) is None
    finally:
      for method in ("reload", "all_steps"):
        delattr(ckpt._manager, method)


# ----------------------------------------------------------------------------------------
# A store that misbehaves: tests/fault_proxy.py between the commands and the emulator.
# ----------------------------------------------------------------------------------------
def test_a_corrupted_response_is_a_storage_failure_and_retried_by_the_path_layer():
  # gcsfs parses a corrupted answer with json.loads and does not retry the ValueError: it is
  # recognised by the storage client's frame in its traceback.
  client = {}
  exec(compile("import json\ndef parse(body):\n  return json.loads(body)\n",
               os.path.join(os.sep, "site-packages", "gcsfs", "core.py"), "exec"), client)
  with pytest.raises(ValueError) as raised:
    client["parse"]("\x1e\x7f{corrupt")
  assert errors.malformed_response(raised.value)
  assert "malformed response" in str(errors.storage_error(raised.value, "gs://x"))
  assert not errors.malformed_response(ValueError("a bug"))
  # The path layer retries its idempotent operations on it, a bounded number of times.
  calls = []

  @storage.io_boundary(idempotent=True)
  def upload(path, failures):
    calls.append(path)
    if len(calls) <= failures:
      client["parse"]("{corrupt")
  upload("gs://b/o", 1)
  assert len(calls) == 2
  calls.clear()
  with pytest.raises(errors.StorageError, match="malformed response"):
    upload("gs://b/o", 10)
  assert len(calls) == storage.MALFORMED_RETRIES + 1
  # Metadata without a valid generation is the store's fault too.
  with pytest.raises(errors.StorageError, match="without a valid generation"):
    storage._generation({"generation": "not-a-number"}, "gs://b/o")


# The README's bound: the process is gone this soon after its one-line storage error.
EXIT_AFTER_ERROR_LINE_SECONDS = 5.0
FAULT_FLAGS = ["--config.train.steps=20", "--config.checkpoint.every_steps=10"]


def _checkpoint_metadata(workdir: str, step: int) -> str:
  """The request pattern of the first upload of checkpoint ``step``'s metadata (by orbax,
  through gcsfs): the save has begun, its arrays are not written yet."""
  return f"name={storage._key(workdir).split('/', 1)[1]}/checkpoints/{step}/_CHECKPOINT_METADATA"


@pytest.fixture
def proxy(gcs):
  """A FaultProxy in front of the session's emulator; the environment of commands sent
  through it is ``proxy.env``."""
  from fault_proxy import FaultProxy
  port = int(os.environ["STORAGE_EMULATOR_HOST"].rsplit(":", 1)[1])
  server = FaultProxy(port)
  server.env = dict(os.environ, PYTHONPATH=REPO, PYTHONUNBUFFERED="1",
                    **emulator_env(server.port))
  yield server
  server.close()


class _Run:
  """A ``resnorm-train`` command (a subprocess) whose stderr lines are timed."""

  def __init__(self, env, workdir, *flags, tiny=True):
    import threading
    self.t0 = time.monotonic()
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "resnorm_jax.train", f"--workdir={workdir}",
         *(CLI_TINY if tiny else []), *flags], cwd=REPO, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    self.lines: list[tuple[float, str]] = []
    self.out = ""
    self._readers = [threading.Thread(target=self._read_err, daemon=True),
                     threading.Thread(target=self._read_out, daemon=True)]
    for reader in self._readers:
      reader.start()

  def _read_err(self):
    for line in self.proc.stderr:
      self.lines.append((time.monotonic(), line.rstrip("\n")))

  def _read_out(self):
    self.out = self.proc.stdout.read()

  def wait(self, timeout=600) -> int:
    self.proc.wait(timeout=timeout)
    self.ended = time.monotonic()
    for reader in self._readers:
      reader.join(timeout=10)
    return self.proc.returncode

  @property
  def err(self) -> str:
    return "\n".join(line for _, line in self.lines)

  def check_one_line_storage_error(self, workdir: str) -> str:
    """Exit 5 with one error line naming ``workdir``, nothing after it, no traceback, and
    the process gone within EXIT_AFTER_ERROR_LINE_SECONDS of the line; the line."""
    assert self.proc.returncode == errors.EXIT_STORAGE, self.err[-3000:]
    errs = [(t, l) for t, l in self.lines if l.startswith("resnorm-train: error:")]
    assert len(errs) == 1 and workdir in errs[0][1], self.err[-3000:]
    assert "Traceback" not in self.err and self.lines[-1][1] == errs[0][1], self.err[-3000:]
    assert self.ended - errs[0][0] < EXIT_AFTER_ERROR_LINE_SECONDS, self.ended - errs[0][0]
    return errs[0][1]


def _assert_same_final_state(reference, workdir, steps=20):
  step_a, a = read_state(reference)
  step_b, b = read_state(workdir)
  assert step_a == step_b == steps
  chex.assert_trees_all_equal(a, b)


@pytest.mark.slow   # about 31 s of gcsfs's retries before the exit, and three runs
def test_a_store_down_during_a_save_is_exit_5_at_once_and_the_rerun_ends_exact(
    tmp_path, gdir, proxy):
  """The store goes down (503 to everything) once the first checkpoint's save has begun,
  for longer than the retry budget: one line, exit 5, the process gone at once; no
  checkpoint is complete, so the rerun starts over and ends bitwise where a run without
  faults ends."""
  from fault_proxy import Fault
  reference = _Run(dict(os.environ, PYTHONPATH=REPO), tmp_path / "ref", *FAULT_FLAGS)
  proxy.add(Fault("status", code=503, arm=_checkpoint_metadata(gdir, 10)))
  run = _Run(proxy.env, gdir, *FAULT_FLAGS)
  run.wait()
  line = run.check_one_line_storage_error(gdir)
  assert "503" in line and "rerun" in line
  assert proxy.faulted()
  assert not storage.exists(storage.join(gdir, "checkpoints", "10", "commit_success.txt"))
  proxy.clear()                                         # the store is back
  rerun = _Run(proxy.env, gdir, *FAULT_FLAGS)
  assert rerun.wait() == 0, rerun.err[-3000:]
  assert "resumed from" not in rerun.out
  assert not storage.exists(storage.join(gdir, LOCK))
  assert reference.wait() == 0, reference.err[-3000:]
  _assert_same_final_state(tmp_path / "ref", gdir)


# The default suite's store fault: two 503s at the first save (retried after 1 s and 2 s);
# the slow one: 5 503s (about 31 s of gcsfs's backoff), 429s and resets at the second.
@pytest.mark.parametrize("burst", ["two_503s",
                                   pytest.param("503s_429s_resets", marks=pytest.mark.slow)])
def test_a_burst_of_503s_during_a_save_is_retried_and_the_run_ends_exact(tmp_path, gdir,
                                                                        proxy, burst):
  from fault_proxy import Fault
  reference = _Run(dict(os.environ, PYTHONPATH=REPO), tmp_path / "ref", *FAULT_FLAGS)
  if burst == "two_503s":
    faults = [Fault("status", code=503, count=2, arm=_checkpoint_metadata(gdir, 10))]
  else:
    faults = [Fault("status", code=503, count=5, arm=_checkpoint_metadata(gdir, 10)),
              Fault("status", code=429, count=2, arm=_checkpoint_metadata(gdir, 20)),
              Fault("reset", count=2, match="^POST ", arm=_checkpoint_metadata(gdir, 20))]
  for fault in faults:
    proxy.add(fault)
  run = _Run(proxy.env, gdir, *FAULT_FLAGS)
  assert run.wait() == 0, run.err[-3000:]
  assert len(proxy.faulted()) == sum(f.count for f in faults) and "Traceback" not in run.err
  assert reference.wait() == 0, reference.err[-3000:]
  _assert_same_final_state(tmp_path / "ref", gdir)


@pytest.mark.slow
def test_a_store_down_during_the_second_save_resumes_from_the_first(tmp_path, gdir, proxy):
  from fault_proxy import Fault
  reference = _Run(dict(os.environ, PYTHONPATH=REPO), tmp_path / "ref", *FAULT_FLAGS)
  proxy.add(Fault("reset", arm=_checkpoint_metadata(gdir, 20)))   # refused from then on
  run = _Run(proxy.env, gdir, *FAULT_FLAGS)
  run.wait()
  run.check_one_line_storage_error(gdir)
  proxy.clear()
  rerun = _Run(proxy.env, gdir, *FAULT_FLAGS)
  assert rerun.wait() == 0, rerun.err[-3000:]
  assert "resumed from step 10" in rerun.out
  assert reference.wait() == 0, reference.err[-3000:]
  _assert_same_final_state(tmp_path / "ref", gdir)


@pytest.mark.slow
def test_faults_while_restoring_at_start(tmp_path, gdir, proxy):
  """Checkpoint reads at start: a burst of 503s is retried and the run resumes exactly; a
  store that stays down is exit 5 in one line (not a fallback to older steps, not a
  'no checkpoint could be restored' exit 2)."""
  from fault_proxy import Fault
  reference = _Run(dict(os.environ, PYTHONPATH=REPO), tmp_path / "ref", *FAULT_FLAGS)
  first = _Run(proxy.env, gdir, "--config.train.steps=10",
               "--config.checkpoint.every_steps=10")
  assert first.wait() == 0, first.err[-3000:]
  step_10 = r"^GET .*checkpoints(/|%2F)10(/|%2F)"    # reads of the step, not the listing
  proxy.add(Fault("status", code=503, match=step_10))
  down = _Run(proxy.env, gdir, *FAULT_FLAGS)
  down.wait()
  assert "checkpoints" in down.check_one_line_storage_error(gdir)
  proxy.clear()
  proxy.add(Fault("status", code=503, count=4, match=step_10))
  rerun = _Run(proxy.env, gdir, *FAULT_FLAGS)
  assert rerun.wait() == 0, rerun.err[-3000:]
  assert "resumed from step 10" in rerun.out and len(proxy.faulted()) >= 4
  assert reference.wait() == 0, reference.err[-3000:]
  _assert_same_final_state(tmp_path / "ref", gdir)


@pytest.mark.slow
def test_faults_during_the_metrics_upload(tmp_path, gdir, proxy):
  """Resets and 503s on metrics.jsonl uploads are retried (the file is complete); an
  outage of the metrics uploads alone is exit 5 in one line naming the workdir."""
  from fault_proxy import Fault
  reference = _Run(dict(os.environ, PYTHONPATH=REPO), tmp_path / "ref", *FAULT_FLAGS)
  proxy.add(Fault("reset", count=2, match="metrics.jsonl"))
  proxy.add(Fault("status", code=503, count=2, match="metrics.jsonl"))
  proxy.add(Fault("corrupt", count=1, match="metrics.jsonl"))
  proxy.add(Fault("delay", delay=3.0, count=1, match="metrics.jsonl"))
  run = _Run(proxy.env, gdir, *FAULT_FLAGS)
  assert run.wait() == 0, run.err[-3000:]
  assert len(proxy.faulted()) == 6
  assert reference.wait() == 0, reference.err[-3000:]
  _assert_same_final_state(tmp_path / "ref", gdir)
  assert ({(r["step"], r["split"]): r["loss"] for r in read_metrics(gdir)}
          == {(r["step"], r["split"]): r["loss"] for r in read_metrics(str(tmp_path / "ref"))})
  other = gdir + "-down"
  proxy.clear()
  proxy.add(Fault("status", code=503, match="metrics.jsonl"))
  down = _Run(proxy.env, other, *FAULT_FLAGS)
  down.wait()
  assert "metrics.jsonl" in down.check_one_line_storage_error(other)


@pytest.mark.slow
def test_faults_of_the_lock_heartbeat_only_warn(tmp_path, gdir, proxy):
  """The store refuses every heartbeat of the lock (its rewrites at the generation last
  written; creating it uses ifGenerationMatch=0): the run goes on (a heartbeat that gcsfs
  gives up on is a one-line warning), ends exact and releases the lock."""
  from fault_proxy import Fault
  flags = ["--config.train.steps=300", "--config.checkpoint.every_steps=100"]
  reference = _Run(dict(os.environ, PYTHONPATH=REPO), tmp_path / "ref", *flags)
  proxy.add(Fault("status", code=503, match=r"\.resnorm\.lock&ifGenerationMatch=[1-9]"))
  run = _Run(proxy.env, gdir, *flags)
  assert run.wait() == 0, run.err[-3000:]
  assert proxy.faulted() and "Traceback" not in run.err
  assert not storage.exists(storage.join(gdir, LOCK))
  assert reference.wait() == 0, reference.err[-3000:]
  _assert_same_final_state(tmp_path / "ref", gdir, steps=300)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["no_generation", "bad_generation"])
def test_downloads_without_a_valid_generation_header(tmp_path, gdir, proxy, kind):
  """Downloads whose x-goog-generation header is missing (gcp-storage-emulator without
  tests/gcs_emulator.py's wrapper) or not a number: TensorStore cannot update its OCDBT
  manifests.  The run either copes or stops with one line (exit 5, not a crash), and the
  rerun against a sound store ends exact."""
  from fault_proxy import Fault
  reference = _Run(dict(os.environ, PYTHONPATH=REPO), tmp_path / "ref", *FAULT_FLAGS)
  proxy.add(Fault(kind, match="alt=media"))
  run = _Run(proxy.env, gdir, *FAULT_FLAGS)
  if run.wait() != 0:
    run.check_one_line_storage_error(gdir)
  assert proxy.faulted()
  proxy.clear()
  rerun = _Run(proxy.env, gdir, *FAULT_FLAGS)
  assert rerun.wait() == 0, rerun.err[-3000:]
  assert reference.wait() == 0, reference.err[-3000:]
  _assert_same_final_state(tmp_path / "ref", gdir)


@pytest.mark.slow
def test_faults_while_preparing_the_token_cache_of_a_translation_run(gdir, proxy):
  """IWSLT'15 files in the bucket, the token cache written there at start: a store that
  refuses the cache's objects is exit 5 in one line; once it works the rerun trains."""
  from fault_proxy import Fault
  for split, count in (("train", 120), ("tst2013", 8)):
    for lang in ("en", "vi"):
      storage.write_text(storage.join(gdir, "data", f"{split}.{lang}"), "".join(
          " ".join(f"{lang}{(i * 7 + j) % 11}" for j in range(1 + i % 5)) + "\n"
          for i in range(count)))
  flags = ["--config.model.name=transformer", "--config.model.preset=tiny",
           "--config.model.vocab_size=48", "--config.model.max_len=32",
           "--config.model.dropout_rate=0.0", "--config.data.name=iwslt15_envi",
           f"--config.data.data_dir={storage.join(gdir, 'data')}",
           "--config.translation.max_length=16", "--config.translation.max_tokens=256",
           "--config.translation.beam_size=2", "--config.train.optimizer=adam",
           "--config.train.steps=2", "--config.train.log_every_steps=1",
           "--config.eval.every_steps=0", "--config.eval.batch_size=16",
           "--config.checkpoint.every_steps=2", "--config.parallel.num_devices=1"]
  run_dir = storage.join(gdir, "run")
  proxy.add(Fault("status", code=503, match="tokens"))
  down = _Run(proxy.env, run_dir, *flags, tiny=False)
  down.wait()
  down.check_one_line_storage_error(run_dir)
  assert proxy.faulted()
  proxy.clear()
  rerun = _Run(proxy.env, run_dir, *flags, tiny=False)
  assert rerun.wait() == 0, rerun.err[-3000:]
  assert storage.exists(storage.join(run_dir, "checkpoints", "2", "commit_success.txt"))
