"""PreAct-ResNet training-step throughput: the framework vs PyTorch, a bare step, the peak.

One run times, interleaved round by round so that any background load hits all alike:

* ``framework``  – the image task's step of resnorm-train: host batch indices, transfer,
  on-device gather + crop/flip augmentation + normalization, the train step with its
  non-finite guard, gradient norm and metrics (configs/cifar_resnet.py, synthetic data);
* ``bare jit``   – the same Flax model and SGD-Nesterov update in one ``jax.jit`` with
  donated buffers and the framework's CPU compiler options
  (``cpu_workarounds.compiler_options``) and nothing else (the framework's overhead is
  framework / bare, the median of the per-round ratios); ``--guards auto,where,cond`` adds a
  framework row per further ``train.nonfinite_guard``; ``--library_convs`` adds ``bare jit,
  YNNPACK convs``: the same step with jaxlib's default library fusions (what the framework
  compiled before XLA's own convolutions became its CPU default);
* ``torch cl`` / ``torch nchw`` – the same network written in PyTorch, eager, channels-last
  and default layout (He et al. 2016's full pre-activation unit, 1x1 projection shortcuts
  at the stage transitions, same widths, BatchNorm momentum, SGD-Nesterov, weight decay);
  ``--dtype bfloat16`` uses ``torch.autocast`` there (AMP);
* ``vs torch`` – PyTorch channels-last's time over the row's (above 1: faster than
  PyTorch): of the medians, of the minima, and the median of the per-round ratios;
* MFU – analytic model FLOPs (``resnorm-summary``'s count, x3 for forward + backward) per
  second over the device's measured dense matmul peak (``benchmarks/common.py``).

Usage: ``python benchmarks/resnet_step.py [--depth 110] [--batch 128] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from resnorm_jax import cpu_workarounds, models, parallelism, summary, training  # noqa: E402
from resnorm_jax.experiments import load_config_module  # noqa: E402
from resnorm_jax.summary import model_summary  # noqa: E402


def make_config(depth: int, batch: int, dtype: str, scan_stages: bool = False):
  cfg = load_config_module(os.path.join(common.REPO, "configs", "cifar_resnet.py")).get_config(
      "resnet110")  # He et al.'s recipe; any basic-unit depth 6n+2
  cfg.model.depth = depth
  cfg.data.name = "synthetic"
  cfg.data.synthetic_train_size = max(4 * batch, 512)
  cfg.data.synthetic_test_size = 128
  cfg.train.batch_size = batch
  cfg.train.nesterov = True
  cfg.model.dtype = dtype
  cfg.model.scan_stages = scan_stages
  cfg.parallel.num_devices = 1
  return cfg


def forward_flops(cfg) -> float:
  """Analytic forward FLOPs per example (convolutions and the classifier, 2 per MAC)."""
  model, inputs, kwargs, extra = summary.summary_inputs(cfg)
  _, _, flops = model_summary(model, inputs, init_kwargs=kwargs, apply_kwargs=kwargs,
                              extra_flops=extra)
  return flops / inputs[0].shape[0]


class FrameworkStep:
  """resnorm-train's own per-step work, without its logging and checkpoint checks."""

  def __init__(self, cfg):
    mesh = parallelism.make_mesh(1)
    self.task = training.build_task(cfg, mesh)
    self.task.setup("")
    self.state = training.init_state(self.task)
    self.train_step = training.make_train_step(self.task)
    self.step_index = 0

  def __call__(self):
    self.state, metrics = self.train_step(self.state, self.task.inputs(self.step_index))
    self.step_index += 1
    return metrics["loss"]


class BareStep:
  """The same model and optimizer in one jitted function: no guards, no data pipeline."""

  def __init__(self, cfg, compiler_options=None):
    n = cfg.train.batch_size
    self.model = models.build_model(cfg, models.norm_context(cfg, 1, None),
                                    models.DataInfo(10, (32, 32, 3)))
    rng = np.random.default_rng(0)
    self.x = jnp.asarray(rng.standard_normal((n, 32, 32, 3), np.float32))
    self.y = jnp.asarray(rng.integers(0, 10, n).astype(np.int32))
    variables = self.model.init(jax.random.key(0), self.x[:1])
    self.tx = optax.chain(optax.add_decayed_weights(cfg.train.weight_decay),
                          optax.sgd(0.1, 0.9, nesterov=True))
    params = variables["params"]
    self.state = (params, variables.get("batch_stats", {}), self.tx.init(params))
    if compiler_options is None:
      compiler_options = cpu_workarounds.compiler_options(jax.default_backend(), cfg)
    self.step = jax.jit(self._step, donate_argnums=0, compiler_options=compiler_options)

  def _step(self, state, x, y):
    params, batch_stats, opt_state = state

    def loss_fn(p):
      logits, new_vars = self.model.apply({"params": p, "batch_stats": batch_stats}, x,
                                          train=True, mutable=["batch_stats"])
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_vars

    (loss, new_vars), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = self.tx.update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), new_vars["batch_stats"], opt_state), loss

  def __call__(self):
    self.state, loss = self.step(self.state, self.x, self.y)
    return loss


def torch_resnet(torch, depth: int, num_classes: int = 10):
  """He et al. (2016) full pre-activation CIFAR ResNet (basic units, depth 6n+2)."""
  nn = torch.nn
  n = (depth - 2) // 6

  class Unit(nn.Module):
    def __init__(self, cin, cout, stride):
      super().__init__()
      self.bn1, self.bn2 = nn.BatchNorm2d(cin, momentum=0.1), nn.BatchNorm2d(cout, momentum=0.1)
      self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
      self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
      self.project = (nn.Conv2d(cin, cout, 1, stride, bias=False)
                      if stride != 1 or cin != cout else None)

    def forward(self, x):
      h = torch.relu(self.bn1(x))
      shortcut = self.project(h) if self.project is not None else x
      return shortcut + self.conv2(torch.relu(self.bn2(self.conv1(h))))

  class Net(nn.Module):
    def __init__(self):
      super().__init__()
      self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
      units, cin = [], 16
      for stage, width in enumerate((16, 32, 64)):
        for i in range(n):
          units.append(Unit(cin, width, 2 if stage and not i else 1))
          cin = width
      self.units = nn.Sequential(*units)
      self.bn = nn.BatchNorm2d(64)
      self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
      h = torch.relu(self.bn(self.units(self.stem(x))))
      return self.fc(h.mean((2, 3)))

  return Net()


class TorchStep:
  def __init__(self, torch, depth: int, batch: int, channels_last: bool, dtype: str):
    self.torch = torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    self.net = torch_resnet(torch, depth).to(device)
    self.x = torch.randn(batch, 3, 32, 32, device=device)
    self.y = torch.randint(0, 10, (batch,), device=device)
    if channels_last:
      self.net = self.net.to(memory_format=torch.channels_last)
      self.x = self.x.contiguous(memory_format=torch.channels_last)
    self.opt = torch.optim.SGD(self.net.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                               weight_decay=1e-4)
    self.autocast = dtype == "bfloat16"
    self.device = device
    self.num_params = sum(p.numel() for p in self.net.parameters())

  def __call__(self):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
      loss = torch.nn.functional.cross_entropy(self.net(self.x), self.y)
    loss.backward()
    self.opt.step()
    if self.device == "cuda":
      torch.cuda.synchronize()
    return loss


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--depth", type=int, default=110)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--scan_stages", action="store_true",
                 help="also time the framework step with model.scan_stages=true")
  p.add_argument("--guards", default="auto",
                 help="train.nonfinite_guard of the framework row, then one row per further "
                      "guard (e.g. auto,where,cond)")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--library_convs", action="store_true",
                 help="also time the bare step with jaxlib's default library fusions "
                      "(YNNPACK convolutions)")
  p.add_argument("--peak_sizes", default="1024,2048",
                 help="square matmul sizes for the measured peak")
  p.add_argument("--json", default="", help="also write the figures to this file")
  args = p.parse_args(argv)

  cfg = make_config(args.depth, args.batch, args.dtype)
  steps = {}
  for i, guard in enumerate(args.guards.split(",")):
    guarded = make_config(args.depth, args.batch, args.dtype)
    guarded.train.nonfinite_guard = guard
    steps["framework" if i == 0 else f"framework, {guard} guard"] = FrameworkStep(guarded)
  steps["bare jit"] = BareStep(cfg)
  if args.library_convs:
    steps["bare jit, YNNPACK convs"] = BareStep(cfg, cpu_workarounds.JAXLIB_DEFAULT_OPTIONS)
  if args.scan_stages:
    steps["framework, scanned stages"] = FrameworkStep(
        make_config(args.depth, args.batch, args.dtype, scan_stages=True))
  torch = None if args.no_torch else common.torch_or_none()
  torch_params = None
  if torch is not None:
    steps["torch channels-last"] = TorchStep(torch, args.depth, args.batch, True, args.dtype)
    steps["torch nchw"] = TorchStep(torch, args.depth, args.batch, False, args.dtype)
    torch_params = steps["torch nchw"].num_params
  jax_params = sum(x.size for x in jax.tree_util.tree_leaves(steps["bare jit"].state[0]))
  first_call, times = common.interleaved_rounds(
      {k: (fn, common.block) for k, fn in steps.items()}, warmup=args.warmup,
      repeats=args.repeats)

  flops_per_step = 3 * forward_flops(cfg) * args.batch
  peak = common.matmul_peak_flops(
      "bfloat16" if args.dtype == "bfloat16" else "float32",
      sizes=tuple(int(s) for s in args.peak_sizes.split(",")))
  medians = {k: common.median(v) for k, v in times.items()}
  torch_times = times.get("torch channels-last")
  rows = []
  for name, t in medians.items():
    rows.append({
        "step": name, "median s": t, "min s": min(times[name]), "examples/s": args.batch / t,
        **(common.speed_ratios(torch_times, times[name], "vs torch") if torch_times else {}),
        "vs bare (time)": common.median([a / b for a, b in zip(times[name],
                                                                times["bare jit"])]),
        "MFU": flops_per_step / t / peak, "first call s": first_call[name],
    })
  title = (f"PreAct-ResNet-{args.depth}, batch {args.batch}, {args.dtype}, "
           f"{common.environment()['device']} ({jax.default_backend()})")
  common.print_table(title, rows, ["step", "median s", "min s", "examples/s",
                                   *common.SPEED_RATIO_COLUMNS("vs torch"),
                                   "vs bare (time)", "MFU", "first call s"])
  print(f"load average (1, 5, 15 min) at the end: {os.getloadavg()}; framework compiler "
        f"options: {cpu_workarounds.compiler_options(jax.default_backend(), cfg)}")
  print(f"\nparameters: ours {jax_params:,}"
        + (f", torch {torch_params:,}" if torch_params else "")
        + f"; analytic {flops_per_step / 1e9:.1f} GFLOP/step; measured matmul peak "
        f"{peak / 1e9:.0f} GFLOP/s; {args.repeats} interleaved rounds after "
        f"{args.warmup} warm-up")
  result = {"args": vars(args), "medians_s": medians, "times_s": times,
            "first_call_s": first_call,
            "flops_per_step": flops_per_step, "peak_flops": peak,
            "params": {"jax": int(jax_params), "torch": torch_params}}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
