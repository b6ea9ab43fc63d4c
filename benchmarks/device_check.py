"""One command for an accelerator (and the CPU smoke check): numerics, speed ratios, a report.

    make device-check                                  # = python benchmarks/device_check.py
    python benchmarks/device_check.py --out DIR [--scale auto|cpu|full] [--budget_s 450]
                                      [--sections numerics,gating,speed]

It detects the backend (``jax.default_backend()``; ``--scale auto`` is ``full`` on a GPU or
TPU and ``cpu`` on a CPU host, where every size is shrunk so the run takes minutes) and runs
these sections, each passed, failed (with the error) or skipped (over ``--budget_s``):

numerics (on this backend, each a normalized error max|a − b| / max|b| against a stated
tolerance):
  * every norm of the registry in every BatchNorm sync mode (global, local, group:k for every
    k dividing the local device count) and execution style (``jit`` on a sharded batch,
    ``shard_map``, ``pmap``) on all local devices, forward, running statistics and gradients,
    against the single-device result of each statistics group (on a CPU host the command
    asks XLA for 4 host devices, so the styles really split the batch);
  * every skip combinator in every unit ordering (a conv unit) and in a Transformer,
    forward loss and gradients, at the backend's default matmul precision against float32
    ``highest`` (on a GPU the default runs float32 products in TF32);
  * attention: ``jax.nn.dot_product_attention`` as the model calls it (``auto``; cuDNN on a
    GPU in bfloat16) against the written-out formula at float32 ``highest``;
  * cached decoding: the incremental decoder's logits against the full pass, and the beam
    search's scores against the full pass's scores of the hypotheses it returns;
  * bfloat16 against float32: loss and gradient direction of a ResNet and a Transformer from
    the same parameters, norm statistics float32;
gating: the CPU-only workarounds (``materialize_grad``'s conditional, the convolution layout
rewrite, XLA's own convolution kernels by compiler option where the jaxlib is verified) are on
exactly when the backend is the CPU; the attention implementation chosen;
speed (ratios measured in this run, each by its benchmark script's ``main``):
  * PreAct-ResNet-110, batch 128, float32 and bfloat16: framework and bare step against
    PyTorch (AMP bfloat16, channels-last and NCHW) when torch is importable
    (``benchmarks/resnet_step.py``);
  * Transformer base bfloat16: tokens/s, MFU against the measured bf16 matmul peak, both
    non-finite guards (``benchmarks/transformer_step.py``);
  * one moments draw at the paper's scale, width 512 and 500 units
    (``benchmarks/moments_throughput.py``);
  * compile times of the ResNet-110 train step, unrolled and scanned, each in a fresh
    process (``benchmarks/compile_time.py``).

The report, ``device_check.json`` and ``device_check.md`` in ``--out`` (default
``device_check_<platform>_<UTC time>``), holds the device, the software versions, the exact
command, every check and every benchmark's figures.  Exit status 1 when a section failed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform as platform_lib
import shlex
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import common  # noqa: E402  (puts the repository on sys.path; imports no jax)

HOST_DEVICES = 4   # CPU hosts: XLA host devices, so the execution styles split the batch

# Tolerances on the normalized error max|a - b| / max|b| (stated in the report).
TOL = {
    "norms": 1e-4,            # float32 elementwise, reduction order only
    "precision": 2e-2,        # default matmul precision (TF32 on GPU) vs float32 highest
    "attention_f32": 1e-2,    # fused vs formula, float32 inputs (TF32 products on GPU)
    "attention_bf16": 3e-2,   # bfloat16 inputs vs the float32 formula
    "decode_cpu": 1e-5,       # tests/test_transformer.py's tolerance
    "decode_accelerator": 2e-3,  # incremental vs full pass with TF32 products
    "bf16_loss": 3e-2,        # relative loss difference, bfloat16 vs float32 compute
    "bf16_grad": 2e-2,        # 1 - cosine of the bfloat16 and float32 gradients
}

# (combinator, λ) for the conv units and the Transformer.
CONV_COMBINATORS = [("skip", None), ("xskip", 2.0), ("xskip_ln", 2.0), ("xskip_bn", 2.0),
                    ("rskip_ln", 2), ("rskip_bn", 2), ("pre_ln", None), ("post_ln", None),
                    ("rezero", None), ("skipinit", None), ("deepnorm", None)]
TRANSFORMER_COMBINATORS = [("post_ln", None), ("pre_ln", None), ("xskip_ln", 2.0),
                           ("rskip_ln", 2), ("deepnorm", None), ("rezero", None),
                           ("xskip_bn", 2.0), ("rskip_bn", 2)]

# Benchmark arguments per scale.  "full": the sizes on one accelerator; "cpu": the
# same code paths at sizes a 2-core host runs in a few minutes.
SCALES = {
    "full": {
        "resnet": ["--depth", "110", "--batch", "128", "--warmup", "2", "--repeats", "5",
                   "--peak_sizes", "4096,8192"],
        "transformer": ["--dtype", "bfloat16", "--src_len", "128", "--tgt_len", "128",
                        "--batch_tokens", "8192", "--warmup", "2", "--repeats", "5",
                        "--guards", "where,cond", "--peak_sizes", "4096,8192"],
        "moments": ["--width", "512", "--units", "500", "--draws", "1", "--repeats", "2"],
        # No address-space cap: CUDA reserves far more virtual memory than it uses.
        "compile": ["--depths", "110", "--modes", "unrolled,scanned", "--steps", "1",
                    "--platform", "", "--max_memory_gb", "0"],
        "decode_preset": "base", "decode_vocab": 1000, "numerics_width": 64,
    },
    "cpu": {
        "resnet": ["--depth", "8", "--batch", "8", "--warmup", "1", "--repeats", "2",
                   "--peak_sizes", "256"],
        "transformer": ["--preset", "tiny", "--layers", "1", "--vocab", "64", "--batch", "4",
                        "--src_len", "8", "--tgt_len", "8", "--dtype", "bfloat16", "--warmup",
                        "1", "--repeats", "2", "--guards", "where,cond", "--peak_sizes", "256"],
        "moments": ["--width", "8", "--units", "3", "--batch", "4", "--draws", "1",
                    "--repeats", "1"],
        "compile": ["--depths", "8", "--modes", "unrolled,scanned", "--width", "4", "--data",
                    "digits", "--batch", "8", "--steps", "1", "--platform", "cpu",
                    "--max_memory_gb", "0"],
        "decode_preset": "tiny", "decode_vocab": 11, "numerics_width": 8,
    },
}


# ----------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------
def normalized_error(a, b) -> float:
  """max|a - b| / max|b| over every leaf of two pytrees (0 when both are all zeros)."""
  import jax
  import numpy as np
  la = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(a)]
  lb = [np.asarray(x, np.float64) for x in jax.tree_util.tree_leaves(b)]
  if len(la) != len(lb):
    raise ValueError(f"trees differ: {len(la)} vs {len(lb)} leaves")
  diff = max((float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(la, lb)),
             default=0.0)
  scale = max((float(np.max(np.abs(y))) if y.size else 0.0 for y in lb), default=0.0)
  if not np.isfinite(diff):
    return float("inf")
  return diff / scale if scale > 0 else diff


def check(name: str, error: float, tol: float) -> dict:
  return {"check": name, "error": float(error), "tolerance": tol,
          "ok": bool(error <= tol)}


def cosine_distance(a, b) -> float:
  import jax
  import numpy as np
  va = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(a)])
  vb = np.concatenate([np.ravel(np.asarray(x, np.float64)) for x in jax.tree_util.tree_leaves(b)])
  return float(1.0 - va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


# ----------------------------------------------------------------------------------------
# Numerics.
# ----------------------------------------------------------------------------------------
def numerics_norms(scale) -> dict:
  """Every norm x sync mode x execution style on all local devices vs single-device groups."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  from resnorm_jax.layers import NORMS, NormContext, make_norm

  devices = jax.local_devices()
  n, per, channels = len(devices), 2, 8
  mesh = jax.make_mesh((n,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices)
  rng = np.random.default_rng(0)
  shape = (n * per, 4, 4, channels)
  offsets = np.repeat(rng.normal(scale=2.0, size=(n, 1, 1, channels)), per, axis=0)
  x = (rng.normal(size=shape) * rng.uniform(0.5, 2.0, size=(shape[0], 1, 1, 1))
       + offsets).astype(np.float32)
  w = rng.normal(size=shape).astype(np.float32)
  modes = ["global", "local"] + [f"group:{k}" for k in range(2, n) if n % k == 0]
  specs = ["group:2" if name == "group" else name for name in NORMS.names()]
  ctx = lambda **kw: NormContext(momentum=0.9, epsilon=1e-5, **kw)

  def step(model, params, stats, x, w):
    def loss(params, x):
      y, upd = model.apply({"params": params, "batch_stats": stats}, x, train=True,
                           mutable=["batch_stats"])
      return jnp.sum(y * w), (y, upd.get("batch_stats", {}))
    (_, (y, new_stats)), (g_params, g_x) = jax.value_and_grad(
        loss, argnums=(0, 1), has_aux=True)(params, x)
    return y, new_stats, g_params, g_x

  checks = []
  for spec in specs:
    variables = make_norm(spec, ctx()).init(jax.random.key(1), x[:per], train=True)
    params = jax.tree_util.tree_map(
        lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
        variables.get("params", {}))
    stats = variables.get("batch_stats", {})
    for mode in modes:
      k = 1 if mode == "local" else n if mode == "global" else int(mode.split(":")[1])
      single = make_norm(spec, ctx())

      @jit_once
      def reference(params, x, w):
        ys, new, total = [], [], 0.0
        gp = jax.tree_util.tree_map(jnp.zeros_like, params)
        gx = []
        for start in range(0, x.shape[0], per * k):
          sl = slice(start, start + per * k)
          y, s, g_p, g_x = step(single, params, stats, x[sl], w[sl])
          ys.append(y), new.append(s), gx.append(g_x)
          gp = jax.tree_util.tree_map(jnp.add, gp, g_p)
        mean_stats = jax.tree_util.tree_map(lambda *a: sum(a) / len(a), *new)
        return jnp.concatenate(ys), mean_stats, gp, jnp.concatenate(gx)

      with jax.default_device(devices[0]):
        ref = jax.device_get(reference(params, x, w))
      got = {}
      jit_model = make_norm(spec, ctx(bn_sync=mode, num_replicas=n))
      batch, rep = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
      got["jit"] = jit_once(lambda p, s, x, w: step(jit_model, p, s, x, w))(
          jax.device_put(params, rep), jax.device_put(stats, rep), jax.device_put(x, batch),
          jax.device_put(w, batch))
      axis_model = make_norm(spec, ctx(bn_sync=mode, num_replicas=n, axis_name="data"))

      def per_device(p, s, x, w):
        y, new, g_p, g_x = step(axis_model, p, s, x, w)
        return y, new, jax.lax.psum(g_p, "data"), g_x

      got["shard_map"] = jit_once(jax.shard_map(
          per_device, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
          out_specs=(P("data"), P(), P(), P("data")), check_vma=False))(params, stats, x, w)
      split = lambda a: a.reshape((n, a.shape[0] // n) + a.shape[1:])
      y, new, g_p, g_x = jax.pmap(per_device, axis_name="data", devices=devices,
                                  in_axes=(None, None, 0, 0))(params, stats, split(x), split(w))
      # Replicated outputs: every device's copy must equal the reference.
      got["pmap"] = (y.reshape(x.shape), new, g_p, g_x.reshape(x.shape))
      for style, out in got.items():
        out = jax.device_get(out)
        if style == "pmap":
          for leaf in jax.tree_util.tree_leaves((out[1], out[2])):
            checks.append(check(f"{spec} {mode} pmap replicas agree",
                                normalized_error(leaf, np.broadcast_to(leaf[0], leaf.shape)),
                                0.0))
          out = (out[0], jax.tree_util.tree_map(lambda a: a[0], out[1]),
                 jax.tree_util.tree_map(lambda a: a[0], out[2]), out[3])
        names = ("output", "running stats", "param grads", "input grads")
        for what, a, b in zip(names, out, ref):
          checks.append(check(f"{spec} {mode} {style} {what}", normalized_error(a, b),
                              TOL["norms"]))
  return {"checks": checks, "devices": n, "modes": modes, "norms": specs}


# CPU scale: each small program runs once, so XLA:CPU's code quality is traded for compile
# time (the settings tests/test_transformer.py uses); accelerators compile normally.
FAST_CPU_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def jit_once(fn):
  import jax
  from resnorm_jax import cpu_workarounds
  backend = jax.default_backend()
  options = FAST_CPU_COMPILE if backend == "cpu" else None
  return jax.jit(fn, compiler_options=cpu_workarounds.with_options(options, backend))


def _precision_pair(fn, *args):
  """``fn(*args)`` traced at the default matmul precision and at float32 ``highest``, in one
  compiled program."""
  import jax

  def both(*a):
    default = fn(*a)
    with jax.default_matmul_precision("highest"):
      highest = fn(*a)
    return default, highest
  return jax.device_get(jit_once(both)(*args))


def numerics_skip(scale) -> dict:
  """Every combinator in every unit ordering (conv unit) and in a Transformer: loss and
  gradients at the default precision vs float32 highest."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from resnorm_jax.layers.residual import UNIT_ORDERINGS, conv_unit
  from resnorm_jax.models.transformer import Transformer, shift_right, transformer_preset

  width = SCALES[scale]["numerics_width"]
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 8, 8, width)), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  checks = []
  for ordering in UNIT_ORDERINGS.names():
    residual = UNIT_ORDERINGS.build(ordering).residual
    for skip, lam in (CONV_COMBINATORS if residual else [("skip", None)]):
      unit = conv_unit(width, ordering=ordering, norm="batch", skip=skip, skip_lambda=lam)
      variables = unit.init(jax.random.key(0), x, train=True)

      def loss(params, x, unit=unit, variables=variables):
        y, _ = unit.apply({**variables, "params": params}, x, train=True,
                          mutable=["batch_stats"])
        return jnp.sum(y * w)

      default, highest = _precision_pair(
          lambda p, x, loss=loss: jax.value_and_grad(loss, argnums=(0, 1))(p, x),
          variables["params"], x)
      name = f"conv unit {ordering} {skip}"
      checks.append(check(f"{name} loss", normalized_error(default[0], highest[0]),
                          TOL["precision"]))
      checks.append(check(f"{name} grads", normalized_error(default[1], highest[1]),
                          TOL["precision"]))
  src = jnp.asarray(rng.integers(3, 11, (3, 7)), jnp.int32).at[0, 5:].set(0)
  tgt = jnp.asarray(rng.integers(3, 11, (3, 5)), jnp.int32).at[2, 3:].set(0)
  for skip, lam in TRANSFORMER_COMBINATORS:
    model = Transformer(transformer_preset("tiny", 11, skip=skip, skip_lambda=lam,
                                           num_encoder_layers=2, num_decoder_layers=2,
                                           dropout_rate=0.0))
    variables = model.init(jax.random.key(0), src, shift_right(tgt, 1))

    def loss(params, model=model, variables=variables):
      logits, _ = model.apply({**variables, "params": params}, src, shift_right(tgt, 1),
                              train=True, mutable=["batch_stats"])
      return jnp.sum(jax.nn.log_softmax(logits)[..., 3] * (tgt != 0))

    default, highest = _precision_pair(jax.value_and_grad(loss), variables["params"])
    checks.append(check(f"transformer {skip} loss", normalized_error(default[0], highest[0]),
                        TOL["precision"]))
    checks.append(check(f"transformer {skip} grads", normalized_error(default[1], highest[1]),
                        TOL["precision"]))
  return {"checks": checks}


def numerics_attention(scale) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from resnorm_jax.models.transformer import (attention_implementation, einsum_attention,
                                              fused_attention)
  b, t, heads, d = (4, 128, 8, 64) if scale == "full" else (2, 16, 2, 8)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(b, t, heads, d)), jnp.float32) for _ in range(3))
  lengths = np.array([t, t // 2] + [t - 3] * (b - 2))[:b]
  keys = np.arange(t)[None, :] < lengths[:, None]
  masks = {"padding": keys[:, None, None, :],
           "causal and padding": keys[:, None, None, :] & np.tril(np.ones((t, t), bool))}
  checks, chosen = [], {}
  for kind, mask in masks.items():
    mask = jnp.asarray(mask)
    with jax.default_matmul_precision("highest"):
      ref = jax.device_get(jax.jit(einsum_attention)(q, k, v, mask))
      ref_grads = jax.device_get(jax.jit(jax.grad(
          lambda q, k, v: jnp.sum(einsum_attention(q, k, v, mask) ** 2), argnums=(0, 1, 2)))(
              q, k, v))
    for dtype, tol in ((jnp.float32, TOL["attention_f32"]),
                       (jnp.bfloat16, TOL["attention_bf16"])):
      name = jnp.dtype(dtype).name
      chosen[name] = attention_implementation("auto", dtype)
      args = [a.astype(dtype) for a in (q, k, v)]
      out = jax.jit(lambda q, k, v: fused_attention(q, k, v, mask, "auto"))(*args)
      grads = jax.jit(jax.grad(
          lambda q, k, v: jnp.sum(fused_attention(q, k, v, mask, "auto").astype(jnp.float32)
                                  ** 2), argnums=(0, 1, 2)))(*args)
      checks.append(check(f"{kind} {name} ({chosen[name]}) output",
                          normalized_error(out, ref), tol))
      checks.append(check(f"{kind} {name} ({chosen[name]}) grads",
                          normalized_error(grads, ref_grads), 2 * tol))
  cudnn = "not a GPU"
  if jax.default_backend() == "gpu":
    try:
      args = [a.astype(jnp.bfloat16) for a in (q, k, v)]
      out = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(
          q, k, v, mask=jnp.asarray(masks["padding"]), implementation="cudnn"))(*args)
      cudnn = "available"
      checks.append(check("padding bfloat16 explicit cudnn output",
                          normalized_error(out, jax.device_get(jax.jit(einsum_attention)(
                              q, k, v, jnp.asarray(masks["padding"])))),
                          TOL["attention_bf16"]))
    except Exception as e:  # recorded: the model then runs XLA's attention
      cudnn = f"unavailable: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return {"checks": checks, "auto_implementation": chosen, "cudnn": cudnn,
          "shape": [b, t, heads, d]}


def numerics_decoding(scale) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from resnorm_jax.tasks.translation import decoding
  from resnorm_jax.models.transformer import Transformer, transformer_preset
  cfg = SCALES[scale]
  vocab = cfg["decode_vocab"]
  model = Transformer(transformer_preset(cfg["decode_preset"], vocab, dropout_rate=0.0,
                                         max_len=64))
  rng = np.random.default_rng(0)
  src = np.asarray(rng.integers(3, vocab, (3, 9)), np.int32)
  src[0, 6:] = 0
  src[:, -1] = np.where(src[:, -1] == 0, 0, 2)
  tgt_in = np.asarray(rng.integers(3, vocab, (3, 8)), np.int32)
  tgt_in[:, 0] = 1
  src, tgt_in = jnp.asarray(src), jnp.asarray(tgt_in)
  variables = jax.jit(model.init)(jax.random.key(0), src, tgt_in)
  src_mask = src != 0

  @jax.jit
  def incremental_and_full(variables):
    encoded = model.apply(variables, src, method=model.encode)
    cache = model.apply(variables, encoded, src_mask, tgt_in.shape[1], method=model.init_cache)

    def step(cache, token):
      logits, cache = model.apply(variables, token, cache, src_mask, method=model.decode_step)
      return cache, logits
    _, logits = jax.lax.scan(step, cache, tgt_in.T)
    return jnp.swapaxes(logits, 0, 1), model.apply(variables, src, tgt_in)

  incremental, full = jax.device_get(incremental_and_full(variables))
  tol = TOL["decode_cpu"] if jax.default_backend() == "cpu" else TOL["decode_accelerator"]
  checks = [check("incremental logits vs full pass", normalized_error(incremental, full), tol)]
  out = decoding.beam_search(model, variables, src, beam_size=4, alpha=0.6, max_decode_len=8)
  tokens = np.asarray(out.tokens).reshape(-1, np.asarray(out.tokens).shape[-1])
  _, scores = decoding.score_sequences(model, variables, jnp.repeat(src, 4, axis=0),
                                       jnp.asarray(tokens), 0.6)
  checks.append(check("beam-search scores vs full-pass scores",
                      normalized_error(np.asarray(out.scores).ravel(), np.asarray(scores)), tol))
  return {"checks": checks, "preset": cfg["decode_preset"]}


def numerics_bf16(scale) -> dict:
  """bfloat16 compute against float32 from the same parameters; statistics stay float32."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from resnorm_jax.models.resnet import CifarResNet
  from resnorm_jax.models.transformer import Transformer, shift_right, transformer_preset
  checks = []
  rng = np.random.default_rng(0)
  # ResNet-8 at every scale: the random-label gradient of a deeper PreAct-ResNet at init is
  # ill-conditioned (measured on CPU in float32: scaling the inputs by 1 + 0.4 % noise, bf16's
  # rounding, moves the gradient direction by 1 - cos = 0.037 at depth 20 and 0.20 at depth
  # 56, as much as bfloat16 compute does), so a deep net would test the net, not the dtype.
  depth = 8
  images = jnp.asarray(rng.normal(size=(32, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 32), jnp.int32)
  nets = {d: CifarResNet(depth=depth, num_classes=10, dtype=d)
          for d in (jnp.float32, jnp.bfloat16)}
  variables = jax.jit(lambda k: nets[jnp.float32].init(k, images[:1]))(jax.random.key(0))

  def resnet_loss(net):
    def loss(params):
      logits, upd = net.apply({**variables, "params": params}, images, train=True,
                              mutable=["batch_stats"])
      ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))
      return ce, upd["batch_stats"]
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])

  (l32, s32), g32 = jax.device_get(resnet_loss(nets[jnp.float32]))
  (l16, s16), g16 = jax.device_get(resnet_loss(nets[jnp.bfloat16]))
  stats_f32 = all(np.asarray(a).dtype == np.float32 for a in jax.tree_util.tree_leaves(s16))
  checks.append(check(f"resnet-{depth} bf16 batch statistics are float32",
                      0.0 if stats_f32 else 1.0, 0.0))
  checks.append(check(f"resnet-{depth} loss", abs(l16 - l32) / abs(l32), TOL["bf16_loss"]))
  checks.append(check(f"resnet-{depth} grads (1 - cos)", cosine_distance(g16, g32),
                      TOL["bf16_grad"]))
  preset = "base" if scale == "full" else "tiny"
  src = jnp.asarray(rng.integers(3, 1000 if scale == "full" else 11, (8, 24)), jnp.int32)
  tgt = jnp.asarray(rng.integers(3, 1000 if scale == "full" else 11, (8, 24)), jnp.int32)
  models = {d: Transformer(transformer_preset(preset, 1000 if scale == "full" else 11,
                                              dropout_rate=0.0, dtype=d))
            for d in (jnp.float32, jnp.bfloat16)}
  tv = jax.jit(models[jnp.float32].init)(jax.random.key(0), src, shift_right(tgt, 1))

  def transformer_grads(model):
    def loss(params):
      logits = model.apply({"params": params}, src, shift_right(tgt, 1))
      return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tgt[..., None], -1))
    return jax.jit(jax.value_and_grad(loss))(tv["params"])

  l32, g32 = jax.device_get(transformer_grads(models[jnp.float32]))
  l16, g16 = jax.device_get(transformer_grads(models[jnp.bfloat16]))
  checks.append(check(f"transformer {preset} loss", abs(l16 - l32) / abs(l32),
                      TOL["bf16_loss"]))
  checks.append(check(f"transformer {preset} grads (1 - cos)", cosine_distance(g16, g32),
                      TOL["bf16_grad"]))
  return {"checks": checks}


def gating(scale) -> dict:
  """CPU-only workarounds on exactly when the backend is the CPU: tests/test_residual.py's
  compiled-HLO check of ``materialize_grad`` (one conditional per unit on CPU, none
  elsewhere) run on this backend, and ``cpu_workarounds.for_platform``."""
  import importlib.util
  import jax
  import jax.numpy as jnp
  import jaxlib
  from resnorm_jax import cpu_workarounds
  from resnorm_jax.models.transformer import attention_implementation
  backend = jax.default_backend()
  on_cpu = backend == "cpu"
  spec = importlib.util.spec_from_file_location(
      "device_check_test_residual", os.path.join(common.REPO, "tests", "test_residual.py"))
  tests = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(tests)
  try:
    tests.test_unit_gradients_are_materialized_once_per_unit_on_cpu()
    materialized = 0.0
  except AssertionError:
    materialized = 1.0
  rewrite_fn = lambda a: a
  platform = jax.devices()[0].platform
  rewrite_on = cpu_workarounds.for_platform(rewrite_fn, platform) is not rewrite_fn
  # XLA's own convolutions (compiler options): on CPU with a verified jaxlib, never elsewhere.
  options_on = bool(cpu_workarounds.compiler_options(platform))
  options_expected = on_cpu and cpu_workarounds.library_fusions_known()
  checks = [
      check(f"materialize_grad conditionals {'on' if on_cpu else 'off'} ({backend})",
            materialized, 0.0),
      check(f"conv layout rewrite {'on' if on_cpu else 'off'} ({backend})",
            0.0 if rewrite_on == on_cpu else 1.0, 0.0),
      check(f"XLA convolution compiler options {'on' if options_expected else 'off'} "
            f"({backend}, jaxlib {jaxlib.__version__})",
            0.0 if options_on == options_expected else 1.0, 0.0),
  ]
  return {"checks": checks, "backend": backend,
          "attention_auto": {d: attention_implementation("auto", getattr(jnp, d))
                             for d in ("float32", "bfloat16")}}


# ----------------------------------------------------------------------------------------
# Speed: the benchmark scripts' own main().
# ----------------------------------------------------------------------------------------
def speed_resnet(scale) -> dict:
  import resnet_step
  out = {}
  for dtype in ("float32", "bfloat16"):
    result = resnet_step.main(SCALES[scale]["resnet"] + ["--dtype", dtype])
    med = result["medians_s"]
    ratios = {"framework / bare (time)": med["framework"] / med["bare jit"]}
    if "torch channels-last" in med:
      ratios["framework speed / torch channels-last"] = med["torch channels-last"] / med[
          "framework"]
      ratios["framework speed / torch nchw"] = med["torch nchw"] / med["framework"]
    out[dtype] = {"ratios": ratios, "first_call_s": result["first_call_s"], "result": result}
  return {"results": out}


def speed_transformer(scale) -> dict:
  import transformer_step
  result = transformer_step.main(SCALES[scale]["transformer"])
  rows = {r["implementation"]: r for r in result["rows"]}
  summary = {name: {k: r.get(k) for k in ("median ms", "tokens/s", "MFU %", "time / bare",
                                           "time / pytorch", "first call s")}
             for name, r in rows.items()}
  return {"results": {"summary": summary, "result": result}}


def speed_moments(scale) -> dict:
  import moments_throughput
  result = moments_throughput.main(SCALES[scale]["moments"])
  draw = [r for r in result["rows"] if r["row"] == "moments draw"]
  return {"results": {"s per draw": [r["s / draw"] for r in draw],
                      "compile s": [r["compile s"] for r in draw], "result": result}}


def speed_compile(scale) -> dict:
  import compile_time
  result = compile_time.main(SCALES[scale]["compile"])
  errors = [r for r in result["rows"] if "error" in r]
  if errors:
    raise RuntimeError(f"compile-time cases failed: {errors}")
  return {"results": result}


SECTIONS = [
    ("gating: CPU workarounds", "gating", gating),
    ("numerics: norms x sync x styles", "numerics", numerics_norms),
    ("numerics: skip x ordering", "numerics", numerics_skip),
    ("numerics: attention", "numerics", numerics_attention),
    ("numerics: cached decoding", "numerics", numerics_decoding),
    ("numerics: bf16 vs f32", "numerics", numerics_bf16),
    ("speed: transformer step", "speed", speed_transformer),
    ("speed: resnet step", "speed", speed_resnet),
    ("speed: moments draw", "speed", speed_moments),
    ("speed: compile time", "speed", speed_compile),
]


# ----------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------
def environment() -> dict:
  import jax
  env = common.environment()
  env["backend"] = jax.default_backend()
  env["devices"] = [str(d) for d in jax.local_devices()]
  env["host"] = platform_lib.node()
  for name in ("optax", "orbax.checkpoint", "chex", "ml_collections"):
    try:
      module = __import__(name, fromlist=["__version__"])
      env[name] = getattr(module, "__version__", "?")
    except ImportError:
      env[name] = None
  if env.get("torch"):
    import torch
    env["torch_cuda"] = bool(torch.cuda.is_available())
  return env


def markdown(report: dict) -> str:
  env = report["environment"]
  lines = [f"# Device check: {env['device']} ({env['backend']}, {env['num_devices']} "
           f"device(s))", "",
           f"- command: `{report['command']}`",
           f"- scale: {report['scale']}; started {report['started']}; "
           f"{report['seconds']:.0f} s in all; status: **{report['status']}**", "",
           "| software | version |", "|---|---|"]
  for key in ("python", "jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "chex",
              "ml_collections", "torch", "XLA_FLAGS"):
    lines.append(f"| {key} | {env.get(key)} |")
  lines += ["", "| section | status | s | checks (failed) |", "|---|---|---|---|"]
  for s in report["sections"]:
    checks = s.get("checks", [])
    failed = sum(not c["ok"] for c in checks)
    lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | "
                 f"{len(checks)} ({failed}) |")
  for s in report["sections"]:
    lines += ["", f"## {s['name']}: {s['status']}"]
    if s.get("error"):
      lines += ["", "```", s["error"].strip()[-3000:], "```"]
    for key in ("auto_implementation", "cudnn", "attention_auto", "devices", "modes"):
      if key in s:
        lines.append(f"- {key}: {s[key]}")
    if s.get("checks"):
      worst = sorted(s["checks"], key=lambda c: (c["ok"], -c["error"] / max(c["tolerance"],
                                                                          1e-30)))
      lines += ["", "| check | error | tolerance | ok |", "|---|---|---|---|"]
      for c in worst if len(worst) <= 40 else worst[:40]:
        lines.append(f"| {c['check']} | {c['error']:.3g} | {c['tolerance']:.3g} | "
                     f"{'yes' if c['ok'] else '**no**'} |")
      if len(worst) > 40:
        lines.append(f"| ... {len(worst) - 40} more (all in the JSON), the 40 above are "
                     f"the failed and the closest to their tolerance | | | |")
    results = s.get("results")
    if s["name"] == "speed: resnet step" and results:
      for dtype, r in results.items():
        lines.append(f"- {dtype}: " + ", ".join(f"{k} {v:.3f}" for k, v in r["ratios"].items())
                     + "; first call (compile + one step) s: " + ", ".join(
                         f"{k} {v:.1f}" for k, v in r["first_call_s"].items()))
    if s["name"] == "speed: transformer step" and results:
      lines += ["", "| row | median ms | tokens/s | MFU % | time / bare | time / pytorch |",
                "|---|---|---|---|---|---|"]
      for name, r in results["summary"].items():
        cell = lambda v: "" if v is None else f"{v:.4g}"
        lines.append(f"| {name} | {cell(r['median ms'])} | {cell(r['tokens/s'])} | "
                     f"{cell(r['MFU %'])} | {cell(r.get('time / bare'))} | "
                     f"{cell(r.get('time / pytorch'))} |")
    if s["name"] == "speed: moments draw" and results:
      lines.append(f"- seconds per draw: {results['s per draw']}; first call (compile + one "
                   f"draw) s: {results['compile s']}")
    if s["name"] == "speed: compile time" and results:
      for r in results["rows"]:
        lines.append(f"- depth {r['depth']} {r['mode']}: compile {r.get('compile s')} s, "
                     f"cold {r.get('cold s')} s")
  return "\n".join(lines) + "\n"


def _jsonable(x):
  import numpy as np
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (str, int, float, bool)) or x is None:
    return x
  return str(x)


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--out", default="", help="report directory (default "
                 "device_check_<platform>_<UTC time>)")
  p.add_argument("--scale", choices=("auto", "cpu", "full"), default="auto",
                 help="auto: full on GPU/TPU, cpu on a CPU host")
  p.add_argument("--sections", default="gating,numerics,speed",
                 help="kinds to run: gating, numerics, speed")
  p.add_argument("--budget_s", type=float, default=None,
                 help="skip the sections that start after this many seconds (default: 450 "
                      "at full scale, none at cpu scale)")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  flags = os.environ.get("XLA_FLAGS", "")
  if "xla_force_host_platform_device_count" not in flags:   # read when jax starts
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={HOST_DEVICES}"
  # JAX and PyTorch share one accelerator: JAX must not take most of its memory up front.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  import jax
  backend = jax.default_backend()
  scale = args.scale if args.scale != "auto" else ("cpu" if backend == "cpu" else "full")
  budget = args.budget_s if args.budget_s is not None else (450.0 if scale == "full" else None)
  started = datetime.datetime.now(datetime.timezone.utc)
  out = args.out or f"device_check_{backend}_{started.strftime('%Y%m%dT%H%M%SZ')}"
  os.makedirs(out, exist_ok=True)
  command = " ".join(shlex.quote(a) for a in [sys.executable, os.path.abspath(__file__)]
                     + (sys.argv[1:] if argv is None else list(argv)))
  kinds = set(args.sections.split(","))
  t0 = time.perf_counter()
  sections = []
  print(f"device check: backend {backend}, scale {scale}, report in {out}", flush=True)
  for name, kind, fn in SECTIONS:
    if kind not in kinds:
      continue
    entry = {"name": name, "status": "skipped", "seconds": 0.0}
    elapsed = time.perf_counter() - t0
    if budget is not None and elapsed > budget:
      entry["error"] = f"not started: {elapsed:.0f} s spent of the {budget:.0f} s budget"
      sections.append(entry)
      print(f"== {name}: skipped (budget)", flush=True)
      continue
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    try:
      entry.update(fn(scale))
      failed = [c for c in entry.get("checks", []) if not c["ok"]]
      entry["status"] = "failed" if failed else "passed"
      if failed:
        entry["error"] = "failed checks: " + "; ".join(
            f"{c['check']} {c['error']:.3g} > {c['tolerance']:.3g}" for c in failed[:20])
    except Exception:
      entry["status"] = "failed"
      entry["error"] = traceback.format_exc()
    entry["seconds"] = time.perf_counter() - start
    print(f"== {name}: {entry['status']} in {entry['seconds']:.1f} s"
          + (f"\n{entry['error'][-2000:]}" if entry.get("error") else ""), flush=True)
    sections.append(entry)
  status = ("failed" if any(s["status"] == "failed" for s in sections) else
            "passed with skipped sections" if any(s["status"] == "skipped" for s in sections)
            else "passed")
  report = {"command": command, "cwd": os.getcwd(), "scale": scale, "budget_s": budget,
            "started": started.isoformat(timespec="seconds"),
            "seconds": time.perf_counter() - t0, "status": status, "tolerances": TOL,
            "environment": environment(), "sections": sections}
  report = _jsonable(report)
  with open(os.path.join(out, "device_check.json"), "w") as f:
    json.dump(report, f, indent=1)
  with open(os.path.join(out, "device_check.md"), "w") as f:
    f.write(markdown(report))
  print(f"\ndevice check {status} in {report['seconds']:.0f} s; report: "
        f"{os.path.join(out, 'device_check.md')}", flush=True)
  return 1 if status == "failed" else 0


if __name__ == "__main__":
  sys.exit(main())
