"""A task and a model family the package has never seen, from files outside it, through the
commands a researcher uses: README "Adding a model family or a task" is this test.

``examples/regression_plugin.py`` (regression of a smooth function, test RMSE, an MLP with
any ``model.norm``) and ``examples/regression_config.py`` are copied out of the repository
and loaded through ``RESNORM_PLUGINS``; no file of the package names them.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("--config.train.steps=6", "--config.train.log_every_steps=2",
         "--config.eval.every_steps=0", "--config.checkpoint.every_steps=3",
         "--config.train.batch_size=32", "--config.regression.train_size=128",
         "--config.regression.test_size=64", "--config.model.hidden=16")


@pytest.fixture(scope="module")
def outside(tmp_path_factory):
  """The plug-in and its config in a directory outside the repository, and the environment
  that loads the plug-in."""
  root = tmp_path_factory.mktemp("outside")
  for name in ("regression_plugin.py", "regression_config.py"):
    shutil.copy(os.path.join(REPO, "examples", name), root / name)
  env = dict(os.environ, RESNORM_PLUGINS=str(root / "regression_plugin.py"))
  return root, env


def command(module, *flags, env, cwd):
  return subprocess.run([sys.executable, "-m", module, *flags], env=env, cwd=cwd,
                        capture_output=True, text=True, timeout=900)


def test_a_plugin_task_and_family_train_resume_sweep_and_summarize(outside, tmp_path):
  root, env = outside
  config = f"--config={root / 'regression_config.py'}:layer"
  run = tmp_path / "run"

  first = command("resnorm_jax.train", config, f"--workdir={run}", *STEPS, env=env,
                  cwd=tmp_path)
  assert first.returncode == 0, first.stderr[-3000:]
  assert "completed at step 6" in first.stdout
  assert "test RMSE" in first.stdout and "accuracy" not in first.stdout
  records = [json.loads(line) for line in open(run / "metrics.jsonl")]
  evals = [r for r in records if r["split"] == "eval"]
  assert evals and evals[-1]["step"] == 6 and 0 < evals[-1]["rmse"] < 2
  saved = json.load(open(run / "config.json"))
  assert saved["model"]["name"] == "mlp_regressor" and saved["regression"]["input_dim"] == 4

  # Resumed with more steps: continues from the last checkpoint and reports the change.
  resumed = command("resnorm_jax.train", config, f"--workdir={run}", *STEPS,
                    "--config.train.steps=9", env=env, cwd=tmp_path)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 6" in resumed.stdout
  assert "train.steps: checkpoint has 6, this run has 9" in resumed.stderr
  # A key of the family's own schema changes the parameter tree: refused, nothing written.
  refused = command("resnorm_jax.train", config, f"--workdir={run}", *STEPS,
                    "--config.model.hidden=8", env=env, cwd=tmp_path)
  assert refused.returncode == 2
  assert "model.hidden: checkpoint has 16, this run has 8" in refused.stderr
  # Its own keys are checked like the package's.
  bad = command("resnorm_jax.train", config, f"--workdir={tmp_path / 'bad'}", *STEPS,
                "--config.regression.input_dim=0", env=env, cwd=tmp_path)
  assert bad.returncode == 2 and "regression.input_dim=0 must be a positive integer" in \
      bad.stderr.strip().splitlines()[-1]

  summary = command("resnorm_jax.summary", config, env=env, cwd=tmp_path)
  assert summary.returncode == 0, summary.stderr[-3000:]
  assert "mlp_regressor hidden=64 layers=3 norm=layer" in summary.stdout
  assert "parameters: 0.009M" in summary.stdout

  sweep_dir = tmp_path / "sweep"
  sweep_flags = (f"--config={root / 'regression_config.py'}", "--variants=layer,none",
                 "--seeds=2", f"--workdir={sweep_dir}", *STEPS)
  dry = command("resnorm_jax.sweep", *sweep_flags, "--dry_run", env=env, cwd=tmp_path)
  assert dry.returncode == 0, dry.stderr[-3000:]
  assert "published=–" in dry.stdout
  swept = command("resnorm_jax.sweep", *sweep_flags, env=env, cwd=tmp_path)
  assert swept.returncode == 0, swept.stderr[-3000:]
  table = (sweep_dir / "results.md").read_text()
  assert "Final test RMSE over seeds" in table and "error" not in table
  assert "| layer | 2 | 6 |" in table and "| none | 2 | 6 |" in table
  rows = json.load(open(sweep_dir / "results.json"))["rows"]
  assert {r["label"] for r in rows} == {"test RMSE"} and all(r["published"] is None
                                                             for r in rows)


def test_a_plugin_that_cannot_load_is_one_line_exit_2(tmp_path):
  env = dict(os.environ, RESNORM_PLUGINS="no_such_plugin_module")
  proc = command("resnorm_jax.train", f"--workdir={tmp_path / 'run'}", env=env, cwd=tmp_path)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert lines[-1].startswith("resnorm-train: error: ")
  assert lines[-1].endswith("RESNORM_PLUGINS: cannot load plug-in 'no_such_plugin_module' "
                            "(ModuleNotFoundError: No module named 'no_such_plugin_module'); "
                            "fix or remove it from RESNORM_PLUGINS")
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "run").exists()
