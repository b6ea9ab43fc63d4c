"""Submitting a sweep's unfinished runs to a cluster instead of training them here.

``--submit=slurm`` writes ``<workdir>/slurm/tasks_<k>.json`` (one entry per unfinished run)
and ``submit_<k>.sh``, an ``sbatch --array`` of ``launch/slurm.sbatch`` whose task i runs
entry i (``resnorm-sweep --sweep_tasks=<file> --task_index=i``, :func:`task_argv`), and runs
it where ``sbatch`` exists.  ``--submit=xpk`` writes one JobSet per unfinished run, from
``launch/xpk_workload.yaml``, into ``<workdir>/xpk/``.  For a ``gs://`` workdir these files
go to ``runs/<kind>/<bucket>/<path>`` here (the schedulers read local files).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys

from resnorm_jax import storage
from resnorm_jax.cli import PACKAGE_ROOT
from resnorm_jax.errors import EXIT_USAGE
from resnorm_jax.sweep.runs import UsageError, config_id, read_json

SLURM_SCRIPT = os.path.join(PACKAGE_ROOT, "launch", "slurm.sbatch")
XPK_TEMPLATE = os.path.join(PACKAGE_ROOT, "launch", "xpk_workload.yaml")
# sbatch options of every array task: one run on one GPU (edit with --sbatch_args).
DEFAULT_SBATCH_ARGS = "--nodes=1 --ntasks-per-node=1 --gpus-per-node=1"


def _task_argv(config_path: str, workdir: str, variant: str, seed: int,
               overrides: list[str], distributed: str) -> list[str]:
  """The resnorm-sweep arguments of one submitted run."""
  return [f"--config={config_path}", f"--workdir={workdir}", f"--variants={variant}",
          f"--seeds={seed},", f"--distributed={distributed}"] + overrides


def submit_slurm(config_path: str, workdir: str, todo: list[dict], overrides: list[str],
                 sbatch_args: str) -> int:
  """Writes ``<workdir>/slurm/tasks_<k>.json`` and ``submit_<k>.sh`` (k: the first unused
  number; an sbatch job array of launch/slurm.sbatch, one task per run in ``todo``) and
  runs it where sbatch exists."""
  slurm_dir = _submission_dir(workdir, "slurm")
  os.makedirs(slurm_dir, exist_ok=True)
  config_abs, workdir_abs = os.path.abspath(config_path), storage.abspath(workdir)
  tasks = [{"variant": e["variant"], "seed": e["seed"],
            "argv": _task_argv(config_abs, workdir_abs, e["variant"], e["seed"], overrides,
                               "auto")} for e in todo]
  # A new file per submission: tasks of an earlier array still queued keep reading theirs.
  number = 0
  while True:
    tasks_path = os.path.join(slurm_dir, f"tasks_{number}.json")
    try:
      fd = os.open(tasks_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      break
    except FileExistsError:
      number += 1
  with os.fdopen(fd, "w") as f:
    f.write(json.dumps({"config": config_abs, "tasks": tasks}, indent=2) + "\n")
  name = "sweep-" + os.path.splitext(config_id(config_path))[0]
  command = (["sbatch", f"--array=0-{len(tasks) - 1}", f"--job-name={name}",
              f"--output={os.path.join(slurm_dir, '%A_%a.out')}"]
             + shlex.split(sbatch_args) + [SLURM_SCRIPT, f"--sweep_tasks={tasks_path}"])
  script = os.path.join(slurm_dir, f"submit_{number}.sh")
  storage.write_atomic(script, "#!/usr/bin/env bash\n# Written by resnorm-sweep "
                       f"--submit=slurm: {len(tasks)} runs, one array task each.\nset -euo "
                       f"pipefail\ncd {shlex.quote(PACKAGE_ROOT)}\n" + shlex.join(command)
                       + "\n")
  os.chmod(script, 0o755)
  print(f"resnorm-sweep: {len(tasks)} array tasks in {tasks_path}")
  if shutil.which("sbatch") is None:
    print(f"resnorm-sweep: no sbatch here; submit on the cluster with: bash {script}")
    return 0
  done = subprocess.run(["bash", script], check=False)
  if done.returncode != 0:
    print(f"resnorm-sweep: error: sbatch failed (exit {done.returncode}); fix and run "
          f"bash {script}", file=sys.stderr)
    return EXIT_USAGE
  print(f"resnorm-sweep: submitted; tabulate with resnorm-sweep --workdir={workdir} "
        "--collect")
  return 0


def k8s_name(*parts: str) -> str:
  """A JobSet name (DNS label: lowercase letters, digits and '-', at most 63 characters)."""
  name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
  if len(name) > 63:   # cut, with a hash of the whole name so that cut names stay distinct
    digest = hashlib.sha1(name.encode()).hexdigest()[:8]
    name = f"{name[:54].rstrip('-')}-{digest}"
  return name


def xpk_jobset(template: str, name: str, args: list[str]) -> str:
  """``template`` (launch/xpk_workload.yaml) with metadata.name ``name``, the container
  running ``resnorm-sweep`` and its ``args``."""
  lines, out, i = template.splitlines(), [], 0
  while i < len(lines):
    line = lines[i]
    if re.match(r"^  name: ", line):
      out.append(f"  name: {name}")
    elif re.match(r"^\s+command: ", line):
      out.append(re.sub(r"command: .*", 'command: ["resnorm-sweep"]', line))
    elif re.match(r"^\s+args:\s*$", line):
      indent = len(line) - len(line.lstrip()) + 2
      out.append(line)
      out += [" " * indent + "- " + json.dumps(a) for a in args]
      i += 1
      while i < len(lines) and lines[i].strip().startswith("- "):
        i += 1
      continue
    else:
      out.append(line)
    i += 1
  return "\n".join(out) + "\n"


def _submission_dir(workdir: str, kind: str) -> str:
  """Where the files a scheduler reads go: ``<workdir>/<kind>``, or for a bucket workdir
  (``kubectl`` and ``sbatch`` read local files) ``runs/<kind>/<bucket>/<path>`` here."""
  if storage.is_url(workdir):
    return os.path.abspath(os.path.join("runs", kind, workdir.split("://", 1)[1]))
  return os.path.join(os.path.abspath(workdir), kind)


def submit_xpk(config_path: str, workdir: str, todo: list[dict], overrides: list[str]) -> int:
  """Writes one JobSet per run in ``todo`` into ``<workdir>/xpk/``."""
  with open(XPK_TEMPLATE) as f:
    template = f.read()
  xpk_dir = _submission_dir(workdir, "xpk")
  os.makedirs(xpk_dir, exist_ok=True)
  config_rel = os.path.relpath(os.path.abspath(config_path), PACKAGE_ROOT)
  config_arg = config_rel if not config_rel.startswith("..") else config_path
  stem = os.path.splitext(config_id(config_path))[0]
  for e in todo:
    name = k8s_name("resnorm", stem, e["variant"], f"s{e['seed']}")
    text = xpk_jobset(template, name, _task_argv(config_arg, workdir, e["variant"],
                                                 e["seed"], overrides, "on"))
    storage.write_atomic(storage.join(xpk_dir, f"{e['variant']}-seed{e['seed']}.yaml"), text)
  print(f"resnorm-sweep: {len(todo)} JobSets in {xpk_dir}; submit with kubectl apply -f "
        f"{xpk_dir}, tabulate with resnorm-sweep --workdir={workdir} --collect")
  return 0


def task_argv(tasks_path: str, index: int | None) -> list[str]:
  """The argv of task ``index`` of a tasks_<k>.json written by --submit=slurm."""
  saved = read_json(tasks_path)
  if saved is None:
    raise UsageError(f"--sweep_tasks={tasks_path}: no such file; resubmit with "
                     "resnorm-sweep --submit=slurm")
  tasks = saved.get("tasks", [])
  if index is None or not 0 <= index < len(tasks):
    raise UsageError(f"--task_index={index} is not a task of {tasks_path} (0..{len(tasks) - 1});"
                     " set it to SLURM_ARRAY_TASK_ID")
  return ["resnorm-sweep"] + tasks[index]["argv"]
