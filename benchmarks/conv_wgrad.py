"""One 3x3 stride-1 SAME convolution's forward + backward on XLA:CPU: autodiff's weight
gradient against other formulations of it (issue 22), and the parts of autodiff's version.

Autodiff writes the weight gradient as a convolution with batch and feature swapped, which
XLA:CPU's Eigen kernel takes only after transposing both operands (the activation to C,H,W,N
and the output gradient to H,W,N,C).  The other formulations avoid those transposes:

* ``taps``: one ``dot_general`` per tap, contracting N, H, W of a shifted NHWC slice of the
  padded input with the output gradient.
* ``flat``: the padded input flattened to rows (N·(H+2)·(W+2), C) and the output gradient
  placed in the same grid; tap (a, b) is then a contiguous row window shifted by
  a·(W+2) + b, one matmul per tap.
* ``tflat``: as ``flat`` with the input transposed once to (C, rows), so each tap's matmul
  takes its left operand in (M, K) layout.
* ``im2col_t``: the 9 row windows of ``tflat`` concatenated, one matmul.
* ``hwn``: both operands transposed once to H,W,N,C; per tap a contiguous-row slice and one
  matmul.
* ``conv3d``: no transpose at all: a 3-D convolution whose spatial axes are (N·(H+2), W+2, C)
  with a window of the whole output gradient over the first two and 1 over C.

Every variant keeps autodiff's input gradient.  ``--parts`` times the pieces of autodiff's
version instead: forward, input gradient, weight gradient, and the two transposes alone.
Ratios are autodiff's time over the variant's (above 1: the variant is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from resnorm_jax import cpu_workarounds  # noqa: E402

DN = ("NHWC", "HWIO", "NHWC")


def conv(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN)


def wgrad_autodiff(x, g):
  w = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
  return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]


def _pad(x):
  return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))


def wgrad_taps(x, g):
  _, h, w, c = x.shape
  xp = _pad(x)
  taps = [lax.dot_general(xp[:, a:a + h, b:b + w, :], g, (((0, 1, 2), (0, 1, 2)), ((), ())))
          for a in range(3) for b in range(3)]
  return jnp.stack(taps).reshape(3, 3, c, g.shape[-1])


def _flat(x, g):
  """Rows of the padded input (with 2·(W+2)+2 zero rows appended) and the output gradient in
  the same (H+2)x(W+2) grid, top-left aligned."""
  _, _, w, c = x.shape
  xp = jnp.pad(_pad(x).reshape(-1, c), ((0, 2 * (w + 2) + 2), (0, 0)))
  gp = jnp.pad(g, ((0, 0), (0, 2), (0, 2), (0, 0))).reshape(-1, g.shape[-1])
  return xp, gp, w + 2


def wgrad_flat(x, g):
  xp, gp, wp = _flat(x, g)
  q = gp.shape[0]
  taps = [lax.slice_in_dim(xp, a * wp + b, a * wp + b + q).T @ gp
          for a in range(3) for b in range(3)]
  return jnp.stack(taps).reshape(3, 3, x.shape[-1], g.shape[-1])


def wgrad_tflat(x, g):
  xp, gp, wp = _flat(x, g)
  xt, q = xp.T, gp.shape[0]
  taps = [xt[:, a * wp + b:a * wp + b + q] @ gp for a in range(3) for b in range(3)]
  return jnp.stack(taps).reshape(3, 3, x.shape[-1], g.shape[-1])


def wgrad_im2col_t(x, g):
  xp, gp, wp = _flat(x, g)
  xt, q = xp.T, gp.shape[0]
  cols = jnp.concatenate([xt[:, a * wp + b:a * wp + b + q] for a in range(3)
                          for b in range(3)], 0)
  return (cols @ gp).reshape(3, 3, x.shape[-1], g.shape[-1])


def wgrad_hwn(x, g):
  n, h, w, c = x.shape
  xp = jnp.transpose(_pad(x), (1, 2, 0, 3))
  gt = jnp.transpose(g, (1, 2, 0, 3)).reshape(h * w * n, -1)
  taps = [xp[a:a + h, b:b + w].reshape(h * w * n, c).T @ gt
          for a in range(3) for b in range(3)]
  return jnp.stack(taps).reshape(3, 3, c, g.shape[-1])


def wgrad_conv3d(x, g):
  n, h, w, c = x.shape
  o = g.shape[-1]
  xp = _pad(x).reshape(1, n * (h + 2), w + 2, c, 1)
  gp = jnp.pad(g, ((0, 0), (0, 2), (0, 0), (0, 0))).reshape(n * (h + 2), w, 1, 1, o)
  out = lax.conv_general_dilated(xp, gp[:n * (h + 2) - 2], (1, 1, 1), "VALID",
                                 dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
  return out.reshape(3, 3, c, o)


WGRADS = {"taps": wgrad_taps, "flat": wgrad_flat, "tflat": wgrad_tflat,
          "im2col_t": wgrad_im2col_t, "hwn": wgrad_hwn, "conv3d": wgrad_conv3d}


def with_wgrad(wgrad):
  """The convolution with autodiff's input gradient and ``wgrad``'s weight gradient."""
  @jax.custom_vjp
  def f(x, w):
    return conv(x, w)

  def fwd(x, w):
    return conv(x, w), (x, w)

  def bwd(res, g):
    x, w = res
    return jax.vjp(lambda x: conv(x, w), x)[1](g)[0], wgrad(x, g)
  f.defvjp(fwd, bwd)
  return f


def fwd_bwd(f):
  def step(x, w, g):
    y, vjp = jax.vjp(f, x, w)
    return y, vjp(g)
  return step


PARTS = {
    "forward": lambda x, w, g: conv(x, w),
    "input grad": lambda x, w, g: jax.vjp(lambda x: conv(x, w), x)[1](g)[0],
    "weight grad": lambda x, w, g: wgrad_autodiff(x, g),
    "transpose x to C,H,W,N": lambda x, w, g: jnp.transpose(x, (3, 1, 2, 0)),
    "transpose g to H,W,N,C": lambda x, w, g: jnp.transpose(g, (1, 2, 0, 3)),
}


def time_rounds(fns: dict, args, rounds: int) -> dict:
  for f in fns.values():
    jax.block_until_ready(f(*args))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[name].append(time.perf_counter() - start)
  return {name: np.array(t) for name, t in times.items()}


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--shapes", default="128x32x32x16,128x8x8x64",
                 help="NHWC input shapes, comma-separated (C in = C out)")
  p.add_argument("--variants", default=",".join(WGRADS))
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--parts", action="store_true", help="time autodiff's pieces instead")
  args = p.parse_args(argv)
  options = cpu_workarounds.compiler_options(jax.default_backend())
  load_start = os.getloadavg()
  rows = []
  for text in args.shapes.split(","):
    shape = tuple(int(s) for s in text.split("x"))
    c = shape[-1]
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, shape)
    w = jax.random.normal(kw, (3, 3, c, c)) * 0.1
    g = jax.random.normal(kg, shape)
    if args.parts:
      fns = {name: jax.jit(f, compiler_options=options) for name, f in PARTS.items()}
    else:
      fns = {"autodiff": jax.jit(fwd_bwd(conv), compiler_options=options)}
      reference = fns["autodiff"](x, w, g)[1][1]
      for name in args.variants.split(","):
        fns[name] = jax.jit(fwd_bwd(with_wgrad(WGRADS[name])), compiler_options=options)
        got = fns[name](x, w, g)[1][1]
        error = float(jnp.max(jnp.abs(got - reference)) / jnp.max(jnp.abs(reference)))
        assert error < 1e-4, (name, error)
    times = time_rounds(fns, (x, w, g), args.rounds)
    base = times.get("autodiff")
    for name, t in times.items():
      row = {"shape": text, "program": name, "min ms": 1e3 * t.min(),
             "median ms": 1e3 * np.median(t)}
      if base is not None:
        row.update({"autodiff / this (min)": base.min() / t.min(),
                    "autodiff / this (median)": np.median(base) / np.median(t),
                    "autodiff / this (per round)": float(np.median(base / t))})
      rows.append(row)
  keys = list(rows[0])
  print("| " + " | ".join(keys) + " |")
  print("|" + "---|" * len(keys))
  for row in rows:
    print("| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v)
                            for v in (row.get(k, "") for k in keys)) + " |")
  load_end = os.getloadavg()
  print(f"\n{args.rounds} interleaved rounds after one warm-up call; 1-minute load "
        f"{load_start[0]:.1f} -> {load_end[0]:.1f}; compiler options {options}")
  return {"rows": rows, "load": (load_start[0], load_end[0])}


if __name__ == "__main__":
  main()
