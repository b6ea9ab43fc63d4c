"""Cold start of the CIFAR ResNet train step: init, tracing, lowering, XLA compile, first step.

    python benchmarks/compile_time.py                             # ResNet-110, -164, -1001
    python benchmarks/compile_time.py --depths 1001 --modes scanned --steps 1
    python benchmarks/compile_time.py --depths 110 --modes scanned-slowconv --steps 1
    python benchmarks/compile_time.py --depths 1001 --modes scanned --warm_cache

Every case (depth x mode) runs in a fresh Python process with JAX's persistent compilation
cache disabled and one CPU device, through the framework's own functions on the config
``configs/cifar_resnet.py:resnet<depth>`` (synthetic CIFAR-shaped data, batch 128):

* ``init``: ``training.make_init`` (parameters, BatchNorm statistics and optimizer state),
  split into trace, lower, compile and run of that jitted initializer;
* ``trace``, ``lower``, ``compile``: ``training.make_train_step``'s jitted step through JAX's
  AOT stages (``step.trace(...)``, ``.lower()``, ``.compile()``);
* ``first step``: the first call of the compiled step (execution only);
* ``cold``: init + trace + lower + compile, the time before the first step can start (the
  issue's goal: under 20 s for ResNet-1001 on CPU);
* ``step``: the steady-state step time (median of ``--steps`` calls after the first).

Modes: ``unrolled`` (``model.scan_stages=False``: one traced and compiled body per unit),
``scanned`` (``model.scan_stages=True``: ``nn.scan`` over each stage's identical units), and
``scanned-slowconv``: scanned without ``resnorm_jax.cpu_workarounds``'s rewrite, i.e. XLA:CPU's
naive convolution kernels for the gradients inside the loops (what scanning cost before).

Absolute times on a shared CPU are noisy; ``cpu s`` (process CPU time, all threads) is less
sensitive to other load, and the ratios scanned/unrolled are taken between cases run
back-to-back.  ``--warm_cache`` adds a second run of every case with a persistent
compilation cache that the first run filled (the user-facing option
``JAX_COMPILATION_CACHE_DIR``); the cold figures are always without it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import common  # noqa: E402  (also puts the repository on sys.path)

MODES = ("unrolled", "scanned", "scanned-slowconv")
GOAL_DEPTH, GOAL_SECONDS = 1001, 20.0
RESULT_TAG = "COMPILE_TIME_RESULT "
PROGRESS_TAG = "COMPILE_TIME_PHASE "


class _Clock:
  """Wall and process-CPU seconds of named phases."""

  def __init__(self, progress=None):
    self.wall, self.cpu, self.progress = {}, {}, progress

  def run(self, name, fn, *args):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args)
    self.wall[name] = time.perf_counter() - w
    self.cpu[name] = time.process_time() - c
    if self.progress:   # a case killed later (e.g. out of memory) still reports these
      print(f"{PROGRESS_TAG}{json.dumps({name + ' s': self.wall[name]})}", file=self.progress,
            flush=True)
    return out


def measure(depth: int, mode: str, *, batch: int = 128, data: str = "synthetic",
            width: int = 16, steps: int = 3, remat: bool = False,
            run_step: bool = True, progress=None) -> dict:
  """One case, in this process: the phases' wall and CPU seconds (see the module doc)."""
  import jax
  from configs import cifar_resnet
  from resnorm_jax import config as config_lib, cpu_workarounds, data as data_lib, parallelism
  from resnorm_jax import validation
  from resnorm_jax import training

  if mode not in MODES:
    raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
  config = cifar_resnet.get_config()
  config.model.depth = depth
  config.model.width = width
  config.model.scan_stages = mode != "unrolled"
  config.model.remat = remat
  config.data.name = data
  config.data.synthetic_train_size = max(config.data.synthetic_train_size, batch)
  config.train.batch_size = batch
  config.parallel.num_devices = 1
  validation.validate(config, jax.device_count())
  if mode == "scanned-slowconv":  # the step as it was before the layout rewrite
    conv_layout_fn = cpu_workarounds.canonicalize_convs
    cpu_workarounds.canonicalize_convs = lambda fn: fn
  clock = _Clock(progress)
  try:
    mesh = parallelism.make_mesh(1)
    dataset = data_lib.load_dataset(config)
    task = training.build_task(config, mesh)

    init, key = training.make_init(task)
    traced = clock.run("init trace", init.trace, key)
    lowered = clock.run("init lower", traced.lower)
    compiled = clock.run("init compile", lowered.compile)
    state = clock.run("init run", lambda: jax.block_until_ready(compiled(key)))

    replicated = parallelism.replicated(mesh)
    images, labels = (parallelism.host_to_global(a, replicated)
                      for a in (dataset.train_images, dataset.train_labels))
    idx = parallelism.host_to_global(
        data_lib.batch_indices(0, 0, len(dataset.train_labels), batch),
        parallelism.batch_sharded(mesh))
    step = training.make_train_step(task)
    traced = clock.run("trace", step.trace, state, (images, labels, idx))
    lowered = clock.run("lower", traced.lower)
    compiled = clock.run("compile", lowered.compile)
    holder = [state]

    def one_step():
      holder[0], metrics = compiled(holder[0], (images, labels, idx))
      return holder[0], metrics

    times, step_error = [], None if run_step else "not run (--skip_steps)"
    try:  # a deep net at batch 128 may not fit in memory; the compile figures still stand
      if run_step:
        clock.run("first step", lambda: jax.block_until_ready(one_step()))
      if run_step and steps > 0:
        times = common.time_calls(one_step, warmup=0, repeats=steps)
    except Exception as e:  # noqa: BLE001  (XlaRuntimeError: RESOURCE_EXHAUSTED, ...)
      step_error = str(e).splitlines()[0][:160]
  finally:
    if mode == "scanned-slowconv":
      cpu_workarounds.canonicalize_convs = conv_layout_fn

  init_phases = ("init trace", "init lower", "init compile", "init run")
  cold = init_phases + ("trace", "lower", "compile")
  row = {"depth": depth, "mode": mode + (" +remat" if remat else ""), "batch": batch,
         "data": data, "width": width}
  row.update({f"{k} s": v for k, v in clock.wall.items()})
  row["init s"] = sum(clock.wall[k] for k in init_phases)
  row["cold s"] = sum(clock.wall[k] for k in cold)
  row["cold cpu s"] = sum(clock.cpu[k] for k in cold)
  row["compile cpu s"] = clock.cpu["compile"]
  row["init cpu s"] = sum(clock.cpu[k] for k in init_phases)
  row["step s"] = common.median(times) if times else float("nan")
  if step_error:
    row["first step s"] = row["step s"] = "skipped" if not run_step else "failed"
    row["step error"] = step_error
  row["step times"] = times
  row["parameters"] = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))
  return row


def worker_env(cache_dir: str | None = None, platform: str = "cpu") -> dict:
  """The environment of a case's process: one device, persistent cache off (or in a dir)."""
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  env["XLA_FLAGS"] = " ".join(flags)
  if platform:
    env["JAX_PLATFORMS"] = platform
  if cache_dir is None:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  else:
    env["JAX_ENABLE_COMPILATION_CACHE"] = "true"
    env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  return env


def cap_memory(gigabytes: float) -> None:
  """Caps this process's address space: on a shared machine a case that needs more memory
  fails by itself (an allocation error) instead of waking the OOM killer."""
  if gigabytes > 0:
    import resource
    limit = int(gigabytes * 2 ** 30)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def default_memory_gb() -> float:
  try:
    return 0.75 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
  except (ValueError, OSError, AttributeError):
    return 0.0


def run_case(depth: int, mode: str, args, cache_dir: str | None = None) -> dict:
  """``measure`` in a fresh process; its row, or a row with the error."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--depths", str(depth),
         "--modes", mode, "--batch", str(args.batch), "--data", args.data,
         "--width", str(args.width), "--steps", str(args.steps),
         "--skip_steps", args.skip_steps, "--max_memory_gb", str(args.max_memory_gb)] + (
             ["--remat"] if args.remat else [])
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, env=worker_env(cache_dir, args.platform), capture_output=True,
                          text=True, timeout=args.timeout, cwd=common.REPO)
  except subprocess.TimeoutExpired as e:
    output = e.stderr.decode() if isinstance(e.stderr, bytes) else e.stderr
    return _failed(depth, mode, f"timed out after {args.timeout} s", output)
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_TAG):
      row = json.loads(line[len(RESULT_TAG):])
      row["process s"] = time.perf_counter() - start
      return row
  return _failed(depth, mode, f"exit {proc.returncode}", proc.stderr or proc.stdout)


def _failed(depth, mode, why, output) -> dict:
  """The row of a case that did not finish: its error and the phases it completed."""
  row = {"depth": depth, "mode": mode}
  lines = (output or "").splitlines()
  for line in lines:
    if line.startswith(PROGRESS_TAG):
      row.update(json.loads(line[len(PROGRESS_TAG):]))
  last = [l for l in lines if l.strip() and not l.startswith(PROGRESS_TAG)][-1:] or [""]
  done = ", ".join(f"{k} {v:.1f}" for k, v in row.items() if k.endswith(" s")) or "none"
  row["error"] = f"{why} (last message: {last[0][:120]!r}); phases completed: {done}"
  return row


def ratios(rows: list[dict]) -> list[dict]:
  """Per depth and mode: cold, compile and step time relative to the unrolled case."""
  def ratio(a, b):
    ok = all(isinstance(v, (int, float)) and v == v for v in (a, b))
    return a / b if ok and b else "-"

  out = []
  cold = [r for r in rows if "warm" not in r["mode"]]
  base = {r["depth"]: r for r in cold if r["mode"].split()[0] == "unrolled"}
  for r in cold:
    b = base.get(r["depth"])
    if b is None or r is b:
      continue
    out.append({"depth": r["depth"], "mode": f"{r['mode']} / {b['mode']}",
                **{k: ratio(r[f"{k} s"], b[f"{k} s"]) for k in ("cold", "init", "compile", "step")},
                "cold cpu": ratio(r["cold cpu s"], b["cold cpu s"])})
  return out


COLUMNS = ["depth", "mode", "init s", "trace s", "lower s", "compile s", "cold s",
           "cold cpu s", "first step s", "step s"]
INIT_COLUMNS = ["depth", "mode", "init trace s", "init lower s", "init compile s",
                "init run s", "init s", "init cpu s"]


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--depths", default="110,164,1001",
                 help="comma-separated CIFAR ResNet depths (6n+2 basic, 9n+2 bottleneck)")
  p.add_argument("--modes", default="unrolled,scanned", help=f"comma-separated: {MODES}")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--data", default="synthetic", help="synthetic (32x32x3) or digits (8x8x1)")
  p.add_argument("--width", type=int, default=16, help="channels of the first stage")
  p.add_argument("--steps", type=int, default=3,
                 help="steady-state steps timed after the first (0: none)")
  p.add_argument("--remat", action="store_true",
                 help="model.remat=True (rematerialize each unit: less memory for the step)")
  p.add_argument("--skip_steps", default="",
                 help="depth:mode pairs (comma-separated) whose first and steady steps are not "
                      "run, e.g. 1001:unrolled (its activations do not fit in 23 GB)")
  p.add_argument("--max_memory_gb", type=float, default=default_memory_gb(),
                 help="address-space cap of each case's process (default: 75%% of RAM; "
                      "0 = none)")
  p.add_argument("--timeout", type=float, default=3600, help="seconds per case")
  p.add_argument("--platform", default="cpu", help="JAX_PLATFORMS of the cases ('' = any)")
  p.add_argument("--warm_cache", action="store_true",
                 help="also time each case again with a persistent cache filled by a first run")
  p.add_argument("--in_process", action="store_true",
                 help="run the cases in this process (not cold: for smoke tests only)")
  p.add_argument("--json", default=None, help="write the rows and ratios here")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  depths = [int(d) for d in args.depths.split(",") if d]
  modes = [m for m in args.modes.split(",") if m]
  kwargs = dict(batch=args.batch, data=args.data, width=args.width, steps=args.steps,
                remat=args.remat)
  skip = {tuple(p.split(":")) for p in args.skip_steps.split(",") if p}
  run_step = lambda depth, mode: (str(depth), mode) not in skip
  if args.worker:
    cap_memory(args.max_memory_gb)   # before JAX starts
    row = measure(depths[0], modes[0], run_step=run_step(depths[0], modes[0]),
                  progress=sys.stderr, **kwargs)
    print(RESULT_TAG + json.dumps(row), flush=True)
    return row

  rows = []
  for depth in depths:
    for mode in modes:
      if args.in_process:
        row = dict(measure(depth, mode, run_step=run_step(depth, mode), **kwargs),
                   note="in-process (not cold)")
      else:
        row = run_case(depth, mode, args)
      rows.append(row)
      if args.warm_cache and "error" not in row:
        with tempfile.TemporaryDirectory() as cache:
          run_case(depth, mode, args, cache)                    # fills the cache
          warm = run_case(depth, mode, args, cache)
        warm["mode"] = f"{mode} (warm cache)"
        rows.append(warm)
      print(f"depth {depth} {mode}: " + (row.get("error") or
            f"cold {row['cold s']:.1f} s, step {common._fmt(row['step s'])} s"),
            file=sys.stderr)

  ok = [r for r in rows if "error" not in r]
  if not ok:
    print("\nno case finished: " + "; ".join(f"{r['depth']} {r['mode']}: {r['error']}"
                                            for r in rows))
    result = {"rows": rows, "ratios": [], "args": vars(args)}
    common.write_json(args.json, result)
    return result
  common.print_table(f"Cold start of the CIFAR ResNet train step (batch {args.batch}, "
                     f"{args.data}, 1 device; seconds)", ok, COLUMNS)
  common.print_table("Initializer phases (seconds)", ok, INIT_COLUMNS)
  ratio_rows = ratios(ok)
  if ratio_rows:
    common.print_table("Relative to unrolled (same depth)", ratio_rows,
                       ["depth", "mode", "cold", "cold cpu", "init", "compile", "step"])
  for r in rows:
    if "error" in r or ("step error" in r and r["step s"] == "failed"):
      print(f"\ndepth {r['depth']} {r['mode']}: {r.get('error') or r['step error']}")
  goal = [r for r in ok if r["depth"] == GOAL_DEPTH and "warm" not in r["mode"]]
  for r in goal:
    verdict = "met" if r["cold s"] < GOAL_SECONDS else "NOT met"
    print(f"\nResNet-{GOAL_DEPTH} {r['mode']}: cold init + compile {r['cold s']:.1f} s "
          f"(CPU {r['cold cpu s']:.1f} s); goal < {GOAL_SECONDS:.0f} s {verdict}")
  result = {"rows": rows, "ratios": ratio_rows, "args": vars(args)}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
