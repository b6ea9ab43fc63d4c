"""resnorm-sweep over seeds: every experiment config's plan (--dry_run), a tiny end-to-end
sweep (2 variants x 3 seeds: table, statistics, figure), kept finished runs, --collect,
the SLURM job array run locally with the scheduler's environment, xpk JobSets, bad input."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from scipy import stats

from resnorm_jax import experiments, sweep, training
from helpers import fast_compile_options, CLI_TINY, REPO

CONFIGS = ("he2016_shortcuts", "he2016_units", "he2016_preact", "liu2020_resnet",
           "liu2020_translation", "liu2020_bn_for_ln")
SHORTCUTS = os.path.join(REPO, "configs", "he2016_shortcuts.py")
TINY = CLI_TINY + ["--config.train.steps=3", "--config.train.warmup_steps=0"]
VARIANTS = ("identity", "constant_0.5_0.5")


def _config_path(name):
  return os.path.join(REPO, "configs", f"{name}.py")


def _tree_state(root):
  """{path: (size, mtime_ns)} of every file under ``root``."""
  out = {}
  for base, _, files in os.walk(root):
    for name in files:
      st = os.stat(os.path.join(base, name))
      out[os.path.join(base, name)] = (st.st_size, st.st_mtime_ns)
  return out


@pytest.fixture(scope="module")
def fast_compile():
  """Tiny programs: XLA code quality traded for compile time (here and in subprocesses)."""
  with fast_compile_options():
    yield


# ----------------------------------------------------------------------------------------
# Flags and plans.
# ----------------------------------------------------------------------------------------
def test_parse_seeds():
  assert sweep.parse_seeds("3") == [0, 1, 2]
  assert sweep.parse_seeds("1") == [0]
  assert sweep.parse_seeds("0,3,7") == [0, 3, 7]
  assert sweep.parse_seeds("7,") == [7]
  assert sweep.parse_seeds(" 4 , 2 ") == [4, 2]
  for spec, message in (("0,1,1", "names seed 1 twice"), ("2,0,2,0", "seeds 0, 2 twice"),
                        ("0", "at least one seed"), ("-1,2", "neither a count"),
                        ("a", "neither a count"), (",", "neither a count")):
    with pytest.raises(sweep.UsageError, match=message):
      sweep.parse_seeds(spec)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_experiment_config_plans_with_dry_run(name, tmp_path, capsys):
  """Every seed-paper table is a sweep config: all variants resolve and validate, every
  BASELINE names a variant, and the plan lists one directory per (variant, seed)."""
  module = experiments.load_config_module(_config_path(name))
  baselines = sweep.baselines_of(module, name, None)
  assert set(baselines) == set(module.VARIANTS)          # every variant has a baseline
  assert set(baselines.values()) <= set(module.VARIANTS)
  argv = ["resnorm-sweep", f"--config={_config_path(name)}", "--variants=all",
          "--seeds=0,5", f"--workdir={tmp_path}", "--dry_run"]
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  heads = [line for line in out.splitlines() if not line.startswith(" ")]
  assert [h.split(":")[0] for h in heads] == list(module.VARIANTS)
  for variant in module.VARIANTS:
    for seed in (0, 5):
      assert f"seed {seed} -> {tmp_path}/{variant}/seed_{seed}\n" in out
  assert os.listdir(tmp_path) == []                       # nothing written


def test_print_commands_one_resnorm_train_line_per_run(tmp_path, capsys):
  argv = ["resnorm-sweep", f"--config={SHORTCUTS}", "--variants=all", "--seeds=2",
          f"--workdir={tmp_path}", "--config.train.steps=100", "--print_commands"]
  assert sweep.main(argv) == 0
  lines = capsys.readouterr().out.splitlines()
  assert len(lines) == 14
  assert lines[3] == (f"resnorm-train --config={SHORTCUTS}:constant_0.5_1 "
                      f"--workdir={tmp_path}/constant_0.5_1/seed_1 --config.train.seed=1 "
                      "--config.train.steps=100")
  assert os.listdir(tmp_path) == []


def test_translation_configs_set_their_variants_and_bleu():
  mt = experiments.load_config_module(_config_path("liu2020_translation"))
  c = mt.get_config("wmt14_rskip_ln_3")
  assert (c.model.name, c.data.name, c.model.skip, c.model.skip_lambda) == (
      "transformer", "wmt14_ende", "rskip_ln", 3.0)
  assert mt.get_config("wmt14_post_ln").published.bleu == 27.3
  assert mt.get_config("iwslt15_pre_ln").model.skip == "pre_ln"
  assert mt.get_config("iwslt15_pre_ln").published.bleu is None
  # Vaswani's 27.3 is tokenized, compound-split BLEU: the table compares that measure.
  assert sweep.metric_of(c)["key"] == "bleu_tokenized"
  bn = experiments.load_config_module(_config_path("liu2020_bn_for_ln"))
  c = bn.get_config("iwslt15_xskip_bn_2")
  assert (c.data.name, c.model.skip, c.model.skip_lambda) == ("iwslt15_envi", "xskip_bn", 2.0)
  assert bn.BASELINE["iwslt15_xskip_bn_2"] == "iwslt15_xskip_ln_2"
  assert bn.get_config("iwslt15_xskip_ln_2").model.skip == "xskip_ln"


# ----------------------------------------------------------------------------------------
# End to end: 2 variants x 3 seeds.
# ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory, fast_compile):
  workdir = str(tmp_path_factory.mktemp("sweep") / "table1")
  argv = ["resnorm-sweep", f"--config={SHORTCUTS}", f"--variants={','.join(VARIANTS)}",
          "--seeds=3", f"--workdir={workdir}"] + TINY
  assert sweep.main(argv) == 0
  return workdir, argv


def _final_error(run):
  evals = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))
           if '"eval"' in line]
  return 100 * evals[-1]["error"]


def test_end_to_end_table_statistics_and_figure(finished_sweep):
  workdir, _ = finished_sweep
  rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
  assert [r["variant"] for r in rows] == list(VARIANTS)
  values = {}
  for r in rows:
    assert r["n"] == 3 and r["seeds"] == [0, 1, 2] and r["steps"] == [3]
    runs = [os.path.join(workdir, r["variant"], f"seed_{s}") for s in range(3)]
    values[r["variant"]] = [_final_error(run) for run in runs]
    np.testing.assert_allclose(r["values"], values[r["variant"]])
    for seed, run in enumerate(runs):
      saved = json.load(open(os.path.join(run, "config.json")))
      assert saved["train"]["seed"] == seed and saved["train"]["steps"] == 3
      assert json.load(open(os.path.join(run, "result.json")))["status"] == "completed"
  table = open(os.path.join(workdir, "results.md")).read()
  assert ("| variant | n | steps | median | mean ± sd | published | median − published | "
          "Δ mean vs identity [95% CI] | published Δ | notes |") in table
  ident, const = values["identity"], values["constant_0.5_0.5"]
  assert (f"| identity | 3 | 3 | {np.median(ident):.2f} | {np.mean(ident):.2f} ± "
          f"{np.std(ident, ddof=1):.2f} | 6.61 | {np.median(ident) - 6.61:+.2f} | baseline |"
          ) in table
  ci = stats.ttest_ind(const, ident, equal_var=False).confidence_interval(0.95)
  row = next(line for line in table.splitlines() if line.startswith("| constant_0.5_0.5 |"))
  assert (f"| {np.mean(const) - np.mean(ident):+.2f} [{ci.low:+.2f}, {ci.high:+.2f}]"
          + (" ∘" if ci.low <= 0 <= ci.high else "") + " | +5.74 |") in row
  half = (ci.high - ci.low) / 2
  assert ("too few seeds to resolve a difference the size of the published gap +5.74" in row) == (half >= 5.74)
  assert "He et al. 2016, Table 1" in table
  import matplotlib.image
  png = matplotlib.image.imread(os.path.join(workdir, "results.png"))
  assert png.ndim == 3 and png.shape[0] > 200 and png.shape[1] > 600


def test_rerun_keeps_finished_runs_untouched(finished_sweep, capsys):
  workdir, argv = finished_sweep
  runs = {v: _tree_state(os.path.join(workdir, v)) for v in VARIANTS}
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert out.count("(completed: kept)") == 6
  assert {v: _tree_state(os.path.join(workdir, v)) for v in VARIANTS} == runs


def test_collect_lists_unfinished_runs_and_reads_runs_of_resnorm_train(finished_sweep,
                                                                       tmp_path, capsys):
  workdir = str(tmp_path / "copy")
  shutil.copytree(finished_sweep[0], workdir)
  # A run still going (config.json, no final evaluation) ...
  going = os.path.join(workdir, "identity", "seed_7")
  os.makedirs(going)
  shutil.copy(os.path.join(workdir, "identity", "seed_0", "config.json"), going)
  # ... and a finished run trained by resnorm-train (no result.json): read from metrics.jsonl.
  os.remove(os.path.join(workdir, "constant_0.5_0.5", "seed_2", "result.json"))
  assert sweep.main(["resnorm-sweep", f"--workdir={workdir}", "--collect"]) == 0
  out = capsys.readouterr().out
  row = next(line for line in out.splitlines() if line.startswith("| identity |"))
  assert row.startswith("| identity | 3 |")
  assert "not finished (running or stopped): seed 7" in row
  rows = json.load(open(os.path.join(workdir, "results.json")))["rows"]
  assert rows[1]["n"] == 3 and rows[1]["values"] == json.load(
      open(os.path.join(finished_sweep[0], "results.json")))["rows"][1]["values"]


def test_an_earlier_single_seed_sweep_stays_readable(finished_sweep, tmp_path, capsys):
  """<workdir>/<variant> of the one-seed sweep counts as the seed it was trained with."""
  workdir = str(tmp_path / "old")
  shutil.copytree(os.path.join(finished_sweep[0], "identity", "seed_0"),
                  os.path.join(workdir, "identity"))
  os.remove(os.path.join(workdir, "identity", "result.json"))
  json.dump({"config": SHORTCUTS, "rows": []}, open(os.path.join(workdir, "results.json"),
                                                     "w"))
  assert sweep.main(["resnorm-sweep", f"--workdir={workdir}", "--collect"]) == 0
  assert "| identity | 1 | 3 |" in capsys.readouterr().out
  argv = ["resnorm-sweep", f"--config={SHORTCUTS}", "--variants=identity", "--seeds=2",
          f"--workdir={workdir}", "--dry_run"] + TINY
  assert sweep.main(argv) == 0
  out = capsys.readouterr().out
  assert f"seed 0 -> {workdir}/identity (completed: kept)" in out
  assert f"seed 1 -> {workdir}/identity/seed_1\n" in out


def test_diverged_and_preempted_runs(tmp_path, monkeypatch, capsys):
  config = sweep.resolve_config(SHORTCUTS, "identity", TINY, seed=4)
  run = str(tmp_path / "identity" / "seed_4")
  os.makedirs(run)
  monkeypatch.setattr(sweep.local, "train_run", lambda c, p: (_ for _ in ()).throw(
      training.NonFiniteLossError("non-finite loss at step 2")))
  assert sweep.run_one("identity", 4, config, run) == "diverged"
  assert sweep.read_run(run, sweep.metric_of(config))["status"] == "diverged"
  monkeypatch.setattr(sweep.local, "train_run", lambda c, p: {"status": "preempted", "step": 1})
  other = str(tmp_path / "identity" / "seed_5")
  os.makedirs(other)
  assert sweep.run_one("identity", 5, config, other) == "preempted"
  assert not os.path.exists(os.path.join(other, "result.json"))   # not finished: resumes
  assert "non-finite loss at step 2" in capsys.readouterr().err
  for seed, path in ((4, run), (5, other)):      # training writes config.json first
    json.dump({"train": {"seed": seed, "steps": 3}}, open(os.path.join(path, "config.json"),
                                                          "w"))
  row, = sweep.collect_rows(str(tmp_path), {"identity": config}, ("identity",),
                            {"identity": "identity"})
  assert row["n"] == 0 and row["diverged"] == [4] and row["unfinished"] == [5]
  notes = "; ".join(sweep.row_notes(row))
  assert "diverged: seed 4" in notes and "not finished (running or stopped): seed 5" in notes
  assert "| identity | 0 | 3 | – | – | 6.61 | – | baseline |" in sweep.results_markdown(
      SHORTCUTS, [row])


def test_translation_tables_report_bleu(tmp_path):
  """Rows and table of a translation sweep: BLEU (higher is better), against Post-LN."""
  path = _config_path("liu2020_translation")
  bleu = {"wmt14_post_ln": [27.0, 27.4, 26.9], "wmt14_rskip_ln_2": [27.9, 28.3, 28.0]}
  configs = {}
  for variant, values in bleu.items():
    configs[variant] = sweep.resolve_config(path, variant, [])
    for seed, value in enumerate(values):
      run = tmp_path / variant / f"seed_{seed}"
      run.mkdir(parents=True)
      (run / "config.json").write_text(json.dumps({"train": {"seed": seed, "steps": 5}}))
      (run / "result.json").write_text(json.dumps(
          {"status": "completed", "step": 5, "steps": 5, "metric": "bleu_tokenized",
           "value": value}))
  module = experiments.load_config_module(path)
  rows = sweep.collect_rows(str(tmp_path), configs, module.VARIANTS,
                            sweep.baselines_of(module, path, None))
  table = sweep.results_markdown(path, rows)
  assert "Final test BLEU (tokenized, compound-split) over seeds" in table
  assert f"| wmt14_post_ln | 3 | 5 | 27.00 | {np.mean(bleu['wmt14_post_ln']):.2f} ± " in table
  assert "| 27.30 | -0.30 | baseline |" in table
  ci = stats.ttest_ind(bleu["wmt14_rskip_ln_2"], bleu["wmt14_post_ln"],
                       equal_var=False).confidence_interval(0.95)
  assert f"[{ci.low:+.2f}, {ci.high:+.2f}] |" in table
  assert "Liu et al. 2020 report this BLEU" in table


def test_figure_for_seven_variants_and_five_seeds(tmp_path):
  from resnorm_jax.analysis import plots
  rng = np.random.default_rng(0)
  rows = []
  for i, v in enumerate(("identity", "constant_0.5_1", "constant_0.5_0.5", "exclusive_gate",
                         "shortcut_gate", "conv1x1", "dropout")):
    values = list(6.5 + i + 0.3 * rng.standard_normal(5))
    rows.append({"variant": v, "metric": "error", "label": "test error %", "values": values,
                 "n": 5,
                 "median": float(np.median(values)),
                 "published": None if i in (1, 6) else 6.6 + i})
  path = plots.sweep_figure(rows, str(tmp_path), title="he2016_shortcuts.py")
  import matplotlib.image
  assert matplotlib.image.imread(path).shape[0] > 400


UNSEEN_CONFIG = """
from resnorm_jax import config as config_lib

VARIANTS = ("narrow", "wide")
BASELINE = "narrow"


def get_config(arg):
  config = config_lib.base_config()
  config.model.name = "unseen_mlp"
  config.data.name = "unseen_fn"
  config.published.source = "nowhere: " + arg
  return config
"""


@pytest.fixture
def unseen_task():
  """A task the package has never seen (headline metric rmse, "test RMSE", lower is better,
  no published number) and a model family trained with it, registered for one test."""
  from resnorm_jax import models, tasks
  from resnorm_jax.registry import Registry
  data_sets = Registry("unseen data set")
  data_sets.register("unseen_fn", "y = sin(x)")(lambda arg, config: None)
  info = tasks.TaskInfo(headline=tasks.Metric("rmse", "test RMSE", False), data_sets=data_sets)
  tasks.register_task("unseen_regression", "regression", info)(type("Unseen", (tasks.Task,), {}))
  models.register_model("unseen_mlp", "an MLP", models.ModelFamily(
      task="unseen_regression", example_inputs=lambda config, data: ()))(lambda arg, **_: None)
  yield
  models.MODELS.unregister("unseen_mlp")
  tasks.TASKS.unregister("unseen_regression")


def test_a_task_the_package_has_never_seen_is_planned_and_tabulated_with_its_own_metric(
    unseen_task, tmp_path, capsys):
  """--dry_run, the table, results.json and the figure of a sweep of an outside task take its
  metric, label and direction from the task, and a missing published number is none."""
  path = tmp_path / "unseen.py"
  path.write_text(UNSEEN_CONFIG)
  assert sweep.main(["resnorm-sweep", f"--config={path}", "--dry_run", "--seeds=2"]) == 0
  out = capsys.readouterr().out
  assert "narrow: model=unseen_mlp " in out and "published=– seeds=0, 1" in out
  metric = sweep.metric_of(sweep.resolve_config(str(path), "narrow", []))
  assert metric == {"key": "rmse", "label": "test RMSE", "higher_is_better": False,
                    "scale": 1.0, "published": None}
  assert sweep.metric_value({"rmse": 0.25, "loss": 1.0}, metric) == 0.25
  workdir = tmp_path / "sweep"
  for variant, values in {"narrow": [0.30, 0.32], "wide": [0.21, 0.20]}.items():
    for seed, value in enumerate(values):
      run = workdir / variant / f"seed_{seed}"
      run.mkdir(parents=True)
      (run / "config.json").write_text(json.dumps({"train": {"seed": seed, "steps": 5}}))
      (run / "result.json").write_text(json.dumps(
          {"status": "completed", "step": 5, "steps": 5, "metric": "rmse", "value": value}))
  assert sweep.main(["resnorm-sweep", f"--config={path}", f"--workdir={workdir}",
                     "--collect"]) == 0
  table = (workdir / "results.md").read_text()
  assert "Final test RMSE over seeds" in table and "error" not in table.lower()
  assert re.search(r"\| wide \| 2 \| 5 \| 0\.2\d \| 0\.2\d ± 0\.01 \| – \| – \| -0\.1\d \[",
                   table), table
  rows = json.loads((workdir / "results.json").read_text())["rows"]
  assert {r["label"] for r in rows} == {"test RMSE"} and rows[0]["published"] is None
  assert os.path.getsize(workdir / "results.png") > 0


# ----------------------------------------------------------------------------------------
# Cluster submission.
# ----------------------------------------------------------------------------------------
FAKE_SBATCH = """#!/usr/bin/env bash
# The scheduler, locally: runs every task of --array=0-N one after another with the
# environment SLURM gives an array task.
set -euo pipefail
array=""; args=()
for a in "$@"; do   # sbatch's options, then the script and its arguments
  if [[ ${#args[@]} -eq 0 && "$a" == --* ]]; then
    [[ "$a" == --array=* ]] && array="${a#--array=}"
  else
    args+=("$a")
  fi
done
last="${array#0-}"
for i in $(seq 0 "$last"); do
  SLURM_ARRAY_JOB_ID=4242 SLURM_ARRAY_TASK_ID="$i" SLURM_JOB_ID=$((4243 + i)) \\
  SLURM_ARRAY_TASK_COUNT=$((last + 1)) SLURM_SUBMIT_DIR="$PWD" SLURM_NTASKS=1 \\
  SLURM_JOB_NAME=sweep bash "${args[@]}" > "$FAKE_SLURM_LOG.$i" 2>&1 \\
    || { echo "task $i failed"; cat "$FAKE_SLURM_LOG.$i"; exit 1; }
done
echo "Submitted batch job 4242"
"""
FAKE_SRUN = """#!/usr/bin/env bash
# One task on this machine: srun's own options dropped.
while [[ "${1:-}" == --* ]]; do shift; done
exec "$@"
"""


def _executable(path, text):
  path.write_text(text)
  path.chmod(path.stat().st_mode | stat.S_IEXEC)


# The default suite: the array's files and command without sbatch; the slow one also runs
# the array's tasks through a fake sbatch.
@pytest.mark.parametrize("run_tasks", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_slurm_job_array_runs_each_task_locally(finished_sweep, tmp_path, capfd,
                                                monkeypatch, run_tasks):
  workdir = str(tmp_path / "array")
  # A finished run is kept: only seeds 1 and 2 become array tasks.
  shutil.copytree(os.path.join(finished_sweep[0], "identity", "seed_0"),
                  os.path.join(workdir, "identity", "seed_0"))
  kept = _tree_state(os.path.join(workdir, "identity", "seed_0"))
  argv = ["resnorm-sweep", f"--config={SHORTCUTS}", "--variants=identity", "--seeds=3",
          f"--workdir={workdir}", "--submit=slurm"] + TINY
  # Without sbatch: the files and the command to run on the cluster.
  monkeypatch.setenv("PATH", "/usr/bin:/bin")
  assert sweep.main(argv) == 0
  out = capfd.readouterr().out
  assert "1 finished run kept" in out and "no sbatch here" in out
  tasks = json.load(open(os.path.join(workdir, "slurm", "tasks_0.json")))["tasks"]
  assert [(t["variant"], t["seed"]) for t in tasks] == [("identity", 1), ("identity", 2)]
  submit = open(os.path.join(workdir, "slurm", "submit_0.sh")).read()
  assert (f"sbatch --array=0-1 --job-name=sweep-he2016_shortcuts --output={workdir}/slurm/"
          f"%A_%a.out --nodes=1 --ntasks-per-node=1 --gpus-per-node=1 "
          f"{REPO}/launch/slurm.sbatch --sweep_tasks={workdir}/slurm/tasks_0.json") in submit
  if not run_tasks:
    return
  # With a scheduler that runs the array here: launch/slurm.sbatch per task.
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "sbatch", FAKE_SBATCH)
  _executable(bin_dir / "srun", FAKE_SRUN)
  monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
  monkeypatch.setenv("PYTHON", sys.executable)
  monkeypatch.setenv("PYTHONPATH", REPO)
  monkeypatch.setenv("FAKE_SLURM_LOG", str(tmp_path / "task"))
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
  assert sweep.main(argv) == 0
  out = capfd.readouterr().out
  assert "Submitted batch job 4242" in out, out
  assert f"--sweep_tasks={workdir}/slurm/tasks_1.json" in open(
      os.path.join(workdir, "slurm", "submit_1.sh")).read()     # the first file is kept
  for seed in (1, 2):
    result = json.load(open(os.path.join(workdir, "identity", f"seed_{seed}", "result.json")))
    assert (result["status"], result["seed"], result["steps"]) == ("completed", seed, 3)
    saved = json.load(open(os.path.join(workdir, "identity", f"seed_{seed}", "config.json")))
    assert saved["train"]["seed"] == seed
  assert _tree_state(os.path.join(workdir, "identity", "seed_0")) == kept
  assert sweep.main(["resnorm-sweep", f"--workdir={workdir}", "--collect"]) == 0
  assert "| identity | 3 | 3 |" in capfd.readouterr().out
  # Everything finished: nothing left to submit.
  assert sweep.main(argv) == 0
  assert "nothing to submit" in capfd.readouterr().out


def test_xpk_writes_one_jobset_per_run(tmp_path, capsys):
  workdir = str(tmp_path / "xpk_sweep")
  argv = ["resnorm-sweep", f"--config={SHORTCUTS}", "--variants=identity,conv1x1",
          "--seeds=0,3", f"--workdir={workdir}", "--submit=xpk",
          "--config.train.steps=100"]
  assert sweep.main(argv) == 0
  files = sorted(os.listdir(os.path.join(workdir, "xpk")))
  assert files == ["conv1x1-seed0.yaml", "conv1x1-seed3.yaml", "identity-seed0.yaml",
                   "identity-seed3.yaml"]
  template = yaml.safe_load(open(os.path.join(REPO, "launch", "xpk_workload.yaml")))
  names = set()
  for name in files:
    doc = yaml.safe_load(open(os.path.join(workdir, "xpk", name)))
    variant, seed = re.fullmatch(r"(.+)-seed(\d)\.yaml", name).groups()
    assert doc["kind"] == "JobSet"
    assert re.fullmatch(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?", doc["metadata"]["name"])
    names.add(doc["metadata"]["name"])
    pod = doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["command"] == ["resnorm-sweep"]
    assert container["args"] == [
        "--config=configs/he2016_shortcuts.py", f"--workdir={workdir}",
        f"--variants={variant}", f"--seeds={seed},", "--distributed=on",
        "--config.train.steps=100"]
    tpl_pod = template["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert container["resources"] == tpl_pod["containers"][0]["resources"]
    assert pod["nodeSelector"] == tpl_pod["nodeSelector"]
  assert len(names) == 4
  assert "kubectl apply -f" in capsys.readouterr().out


def test_k8s_names_are_dns_labels_and_stay_distinct_when_cut():
  assert sweep.k8s_name("resnorm", "he2016_units", "full_preact_164", "s3") == (
      "resnorm-he2016-units-full-preact-164-s3")
  long = [sweep.k8s_name("resnorm", "x" * 60, v, "s0") for v in ("a_1", "a_2")]
  assert len(set(long)) == 2
  for name in long:
    assert len(name) <= 63 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name)


def test_a_task_of_the_array_with_a_bad_index_is_one_line(tmp_path, capsys):
  tasks = tmp_path / "tasks.json"
  tasks.write_text(json.dumps({"tasks": [{"argv": []}]}))
  assert sweep.main(["resnorm-sweep", f"--sweep_tasks={tasks}", "--task_index=3"]) == 2
  assert "--task_index=3 is not a task" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------
# Bad input: one line, exit 2, nothing trained or written.
# ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("args,message", [
    (["--variants=identity,constnt"], "unknown variant 'constnt' of .*he2016_shortcuts.py; "
                                      "valid: identity, constant_0.5_1, .*dropout \\(or all\\)"),
    (["--variants=identity", "--seeds=0,1,0"], "--seeds=0,1,0 names seed 0 twice"),
    (["--variants=identity", "--seeds=x"], "neither a count nor a comma list"),
    (["--variants=identity", "--config.train.seed=3"], "give the seeds with --seeds"),
    (["--variants=identity", "--baseline=identty"], "--baseline: unknown variant 'identty'"),
    (["--variants=identity", "--submit=xpk", "--dry_run"], "exclude each other"),
    (["--variants=identity", "--collect"], "--collect tabulates every run in --workdir; "
                                           "drop --variants"),
    (["--variants=identity", "--config.train.stps=3"], "no config key 'stps'"),
    (["--variants=identity", "--workdir=s3://b/sweep"], "the scheme s3:// is not supported"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, message):
  argv = ["resnorm-sweep", f"--config={SHORTCUTS}", f"--workdir={tmp_path}"] + args
  assert sweep.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("resnorm-sweep: error: ") and "\n" not in err
  assert re.search(message, err), err
  assert os.listdir(tmp_path) == []


def test_collect_on_a_directory_without_runs(tmp_path, capsys):
  for workdir, argv_extra in ((tmp_path / "missing", []),
                              (tmp_path, [f"--config={SHORTCUTS}"])):
    assert sweep.main(["resnorm-sweep", f"--workdir={workdir}", "--collect"]
                      + argv_extra) == 2
    err = capsys.readouterr().err.strip()
    assert re.match(r"resnorm-sweep: error: no runs in .*; ", err) and "\n" not in err


def test_a_sweep_directory_of_another_config_or_setting_is_refused(finished_sweep, capsys):
  workdir, argv = finished_sweep
  before = _tree_state(workdir)
  units = ["resnorm-sweep", f"--config={_config_path('he2016_units')}",
           "--variants=original_110", f"--workdir={workdir}"] + TINY
  assert sweep.main(units) == 2
  err = capsys.readouterr().err
  assert f"{workdir} holds a sweep of {SHORTCUTS}, not of" in err and "another --workdir" in err
  # The same config with another length: the finished runs are not retrained.
  assert sweep.main(argv + ["--config.train.steps=5"]) == 2
  err = capsys.readouterr().err.strip()
  assert "finished with other settings (train.steps: checkpoint has 3, this run has 5)" in err
  assert "\n" not in err
  # Another model in a run directory.
  assert sweep.main(argv + ["--config.model.width=8"]) == 2
  assert "holds a run of another config (model.width" in capsys.readouterr().err
  assert _tree_state(workdir) == before
