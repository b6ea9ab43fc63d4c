"""A minimal reproduction of where the CPU floor sits: one 3x3 convolution, XLA vs oneDNN.

A PreAct-ResNet-110 step is 109 convolutions, each run three times (forward, gradient
w.r.t. the input, gradient w.r.t. the kernel), plus O(activation) elementwise work.  This
script times exactly those three operations for the three stage shapes of a CIFAR ResNet
at batch 128 (NHWC 32x32x16, 16x16x32, 8x8x64, 3x3 kernel, stride 1, padding 1), as jitted
XLA programs and as PyTorch (oneDNN) calls on channels-last tensors, in the same process.
The XLA programs are compiled with the engine's options (``cpu_workarounds.compiler_options``:
XLA's own convolution kernels on a jaxlib that would send them to YNNPACK);
``--jaxlib_default`` compiles them with jaxlib's own default instead.

Then it adds them up the way ResNet-110 uses them (36 convolutions per stage; the stem,
downsampling and projection convolutions are left out, so the sum is an underestimate)
and prints the sum next to nothing else: if XLA's convolutions alone take longer than
PyTorch's whole training step, no formulation of the rest of the step can close the gap,
and the floor is in XLA's CPU convolution kernels.

Usage: ``python benchmarks/conv_floor.py [--batch 128] [--repeats 10] [--jaxlib_default]``.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

from resnorm_jax import cpu_workarounds  # noqa: E402

STAGES = ((32, 16), (16, 32), (8, 64))  # (spatial size, channels)
CONVS_PER_STAGE = 36  # ResNet-110: 18 units x 2 convolutions


def conv(x, k):
  return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)),
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def xla_times(batch: int, size: int, channels: int, repeats: int,
              options: dict) -> dict[str, float]:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
  k = jnp.asarray(0.1 * rng.standard_normal((3, 3, channels, channels), np.float32))
  dy = jnp.asarray(rng.standard_normal((batch, size, size, channels), np.float32))
  jit = lambda f: jax.jit(f, compiler_options=options)
  forward = jit(conv)
  grad_input = jit(lambda x, k, dy: jax.vjp(lambda x: conv(x, k), x)[1](dy)[0])
  grad_kernel = jit(lambda x, k, dy: jax.vjp(lambda k: conv(x, k), k)[1](dy)[0])
  t = lambda f, *a: common.median(common.time_calls(lambda: f(*a), repeats=repeats))
  return {"forward": t(forward, x, k), "grad input": t(grad_input, x, k, dy),
          "grad kernel": t(grad_kernel, x, k, dy)}


def torch_times(torch, batch: int, size: int, channels: int, repeats: int) -> dict:
  cl = torch.channels_last
  x = torch.randn(batch, channels, size, size).contiguous(memory_format=cl)
  w = (0.1 * torch.randn(channels, channels, 3, 3)).contiguous(memory_format=cl)
  dy = torch.randn(batch, channels, size, size).contiguous(memory_format=cl)
  f = torch.nn.functional.conv2d
  x_req, w_req = x.clone().requires_grad_(), w.clone().requires_grad_()
  out = f(x_req, w_req, padding=1)
  t = lambda fn: common.median(common.time_calls(fn, repeats=repeats, sync=lambda r: r))
  with torch.no_grad():
    forward = t(lambda: f(x, w, padding=1))
  # Backward-only costs, as autograd runs them: the graph is kept and re-walked.
  grad_input = t(lambda: torch.autograd.grad(out, x_req, dy, retain_graph=True))
  grad_kernel = t(lambda: torch.autograd.grad(out, w_req, dy, retain_graph=True))
  return {"forward": forward, "grad input": grad_input, "grad kernel": grad_kernel}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--json", default="")
  p.add_argument("--jaxlib_default", action="store_true",
                 help="compile with jaxlib's default library fusions (YNNPACK convolutions "
                      "on jaxlib 0.10.x) instead of the engine's options")
  args = p.parse_args(argv)
  platform = jax.default_backend()
  options = (dict(cpu_workarounds.JAXLIB_DEFAULT_OPTIONS)
             if args.jaxlib_default and cpu_workarounds.library_fusions_known()
             else cpu_workarounds.compiler_options(platform))
  torch = common.torch_or_none()
  rows, totals = [], {"xla": 0.0, "torch": 0.0}
  for size, channels in STAGES:
    ours = xla_times(args.batch, size, channels, args.repeats, options)
    ref = torch_times(torch, args.batch, size, channels, args.repeats) if torch else {}
    flops = 2 * args.batch * size * size * channels * channels * 9
    for op, t in ours.items():
      totals["xla"] += CONVS_PER_STAGE * t
      row = {"shape": f"{args.batch}x{size}x{size}x{channels}", "op": op, "xla ms": 1e3 * t,
             "xla GFLOP/s": flops / t / 1e9}
      if ref:
        totals["torch"] += CONVS_PER_STAGE * ref[op]
        row.update({"onednn ms": 1e3 * ref[op], "onednn GFLOP/s": flops / ref[op] / 1e9,
                    "xla / onednn (time)": t / ref[op]})
      rows.append(row)
  common.print_table(f"3x3 convolution, batch {args.batch}, float32, "
                     f"{common.environment()['device']}", rows,
                     ["shape", "op", "xla ms", "onednn ms", "xla GFLOP/s", "onednn GFLOP/s",
                      "xla / onednn (time)"])
  print(f"\nResNet-110's 108 3x3 convolutions (forward + both gradients): XLA "
        f"{totals['xla']:.3f} s" + (f", oneDNN {totals['torch']:.3f} s, ratio "
                                    f"{totals['xla'] / totals['torch']:.2f}" if torch else ""))
  result = {"rows": rows, "totals_s": totals, "compiler_options": options}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
