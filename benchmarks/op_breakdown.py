"""Where a CPU train step's time goes, op class by op class: ours (XLA) beside PyTorch's.

    python benchmarks/op_breakdown.py resnet        # PreAct-ResNet-110, batch 128
    python benchmarks/op_breakdown.py transformer   # Transformer base, 16 x (64, 64) tokens

Both sides run the benchmark scripts' own steps (``resnet_step.py``: the framework step and
PyTorch channels-last; ``transformer_step.py``: the bare jitted step, i.e. the same model,
loss (``Transformer.loss_sum``) and Adam without the task's guard and metrics, and PyTorch
eager), ``--steps`` steps each after a warm-up, alternately (JAX, torch, JAX, ...), under a
profiler:

* JAX: ``jax.profiler`` (a Perfetto trace): XLA:CPU records one event per executed thunk,
  named after its HLO instruction; each instruction is classified from the compiled
  program's text (its fused computation's ops and the JAX name stack in its metadata).
  Thunks may run on both cores at once, so the classes' summed thunk times are scaled to the
  step's wall time (the ``ms`` column); ``thunk ms`` is the unscaled sum.
* PyTorch: ``torch.profiler``'s self CPU time per ATen op (intra-op threads inside an op are
  not summed), classified by op name; a convolution's backward is one op there (input and
  weight gradient together).

Classes (ResNet): convolution forward / input gradient / weight gradient, layout transposes
(copies that feed a convolution), norms (reductions: BatchNorm statistics and their
gradients), elementwise (ReLU, residual adds, normalization's scale and shift), optimizer
(update, decay, the non-finite guard), other.  Transformer: matmuls (dense layers),
attention (QKᵀ, AV), softmax / layernorm (reductions), embedding / loss (gather, log-softmax, loss;
the tied output projection is a matmul: PyTorch's profile cannot tell it from the dense
ones), optimizer, elementwise, other.  The times of a
shared-machine run vary with load; the shares and the ratios between the two columns are
what to read.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (benchmarks/ is not a package)

import jax  # noqa: E402

from resnorm_jax import cpu_workarounds  # noqa: E402


# ----------------------------------------------------------------------------------------
# JAX: thunk times from a trace, classes from the compiled program's text.
# ----------------------------------------------------------------------------------------
def _instructions(hlo: str) -> dict[str, tuple[str, str]]:
  """``name -> (instruction line, called computation's text)`` of every instruction."""
  bodies = cpu_workarounds.hlo_computations(hlo)
  out = {}
  for line in hlo.splitlines():
    m = re.match(r"\s*(?:ROOT )?%(\S+) = ", line)
    if m:
      called = re.search(r"calls=%([^,\s]+)", line)
      out[m.group(1)] = (line, bodies.get(called.group(1), "") if called else "")
  return out


def _text_and_names(line: str, body: str) -> tuple[str, str]:
  """An instruction with its fused computation, and the JAX name stacks in its metadata."""
  text = body + line
  return text, " ".join(re.findall(r'op_name="([^"]*)"', text))


def _conv_class(line: str, body: str) -> str | None:
  text = body or line
  conv = re.search(r"= (\S+) convolution\(.*", text)
  if not conv:
    return None
  # The weight gradient convolves the activation with the output gradient: its window is
  # the activation's spatial size (every other convolution here has a 3x3 or 1x1 window).
  window = re.search(r"window=\{size=(\d+)x(\d+)", conv.group(0))
  if window and int(window.group(1)) * int(window.group(2)) > 9:
    return "conv weight grad"
  op_name = re.search(r'op_name="([^"]*)"', conv.group(0))
  return ("conv input grad" if op_name and "transpose(" in op_name.group(1)
          else "conv forward")


def classify_resnet(line: str, body: str) -> str:
  conv = _conv_class(line, body)
  if conv:
    return conv
  text, op_names = _text_and_names(line, body)
  if "transpose_copy" in line or re.search(r"= \S+ transpose\(", body):
    return "layout transposes"
  if not re.search(r"jvp\(", op_names):
    return "optimizer + guard"
  if re.search(r" reduce\(| reduce-window\(", text):
    return "norms"
  if " dot(" in text:
    return "classifier (dot)"
  return "elementwise"


def classify_transformer(line: str, body: str) -> str:
  text, op_names = _text_and_names(line, body)
  if not re.search(r"jvp\(", op_names):
    return "optimizer"
  # The chunked loss (Transformer.loss_sum): the tied output projection and the loss, a
  # slice of positions per iteration of a loop.
  in_loss = re.search(r"loss_sum\)?/while", op_names)
  if " dot(" in text:
    # Dense layers (and the tied output projection, embed.attend) end in their layer's name;
    # PyTorch's profile cannot tell its logits matmul from the dense ones, so neither do we.
    if in_loss or re.search(r"/(query|key|value|out|wi|wo|embed\.attend)/dot_general",
                            op_names):
      return "matmuls (dense + tied logits)"
    return "attention (QK, AV)"
  if in_loss or re.search(r"[Ee]mbed|logits|cross_entropy", op_names):
    return "embedding / loss"
  if " reduce(" in text:
    return "softmax / layernorm"
  return "elementwise"


def jax_profile(call, compiled_text: str, classify, steps: int, trace_dir: str):
  """Runs ``call`` ``steps`` times under jax.profiler; returns (class -> thunk seconds per
  step, wall seconds per step)."""
  call()
  jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
  start = time.perf_counter()
  for _ in range(steps):
    call()
  wall = (time.perf_counter() - start) / steps
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                key=os.path.getmtime)[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  instructions = _instructions(compiled_text)
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in instructions:
      totals[classify(*instructions[e["name"]])] += e.get("dur", 0) * 1e-6 / steps
  return totals, wall


# ----------------------------------------------------------------------------------------
# PyTorch: self CPU time per ATen op.
# ----------------------------------------------------------------------------------------
TORCH_RESNET = (("conv input + weight grad", r"convolution_backward"),
                ("conv forward", r"convolution|conv2d|_convolution"),
                ("norms", r"batch_norm|native_batch_norm"),
                ("optimizer + guard", r"_foreach|sgd|add_|mul_|lerp|addcmul|addcdiv|zero_"),
                ("classifier (dot)", r"addmm|\bmm\b|linear|matmul"),
                ("elementwise", r"relu|threshold|add|mul|mean|sum|copy|clone|empty"))
TORCH_TRANSFORMER = (("attention (QK, AV)", r"scaled_dot_product|_flash|_efficient_attention|bmm|baddbmm"),
                     ("embedding / loss", r"embedding|log_softmax|gather|nll"),
                     ("softmax / layernorm", r"layer_norm|softmax"),
                     ("matmuls (dense + tied logits)", r"addmm|\bmm\b|linear|matmul"),
                     ("optimizer", r"_foreach|_fused_adam|adam|lerp|addcmul|addcdiv|sqrt|zero_"),
                     ("elementwise", r"."))


def torch_profile(torch, call, classes, steps: int):
  call()
  call()
  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
    start = time.perf_counter()
    for _ in range(steps):
      call()
    wall = (time.perf_counter() - start) / steps
  totals = collections.Counter()
  for event in prof.key_averages():
    name = event.key
    if not name.startswith("aten::") and "Optimizer" not in name:
      continue
    for label, pattern in classes:
      if re.search(pattern, name):
        totals[label] += event.self_cpu_time_total * 1e-6 / steps
        break
    else:
      totals["other"] += event.self_cpu_time_total * 1e-6 / steps
  return totals, wall


# ----------------------------------------------------------------------------------------
# The two models.
# ----------------------------------------------------------------------------------------
def resnet_pair(args, torch):
  import resnet_step
  cfg = resnet_step.make_config(args.depth, args.batch, "float32")
  ours = resnet_step.FrameworkStep(cfg)
  lower = lambda: ours.train_step.lower(ours.state, ours.task.inputs(ours.step_index))
  ref = resnet_step.TorchStep(torch, args.depth, args.batch, True, "float32")
  return (lambda: common.block(ours())), lower, ref, classify_resnet, TORCH_RESNET


def transformer_pair(args, torch):
  import jax.numpy as jnp
  import transformer_step as ts
  targs = ts.parse_args(["--batch", str(args.batch or 16)])
  config = ts.make_config(targs)
  from resnorm_jax import optim
  model = ts.build_model(config)
  tx, _ = optim.make_optimizer(config.train, config.train.steps)
  smoothing = float(config.train.label_smoothing)
  src, tgt = ts.synthetic_batch(targs.batch, targs.src_len, targs.tgt_len,
                                model.config.vocab_size)
  init_tokens = jnp.ones((1, 8), jnp.int32)
  params = jax.jit(lambda key: model.init({"params": key, "dropout": key}, init_tokens,
                                          init_tokens)["params"])(jax.random.key(0))
  host_params = jax.device_get(params)
  step = ts.make_bare_step(model, tx, smoothing)
  state = {"params": params, "opt": tx.init(params)}
  key, src_j, tgt_j = jax.random.key(1), jnp.asarray(src), jnp.asarray(tgt)

  def ours():
    state["params"], state["opt"], loss = step(state["params"], state["opt"], key, src_j, tgt_j)
    return common.block(loss)
  lower = lambda: step.lower(state["params"], state["opt"], key, src_j, tgt_j)
  ref_model = ts.build_torch_reference(torch, model.config, host_params, "cpu")
  opt = ts.torch_adam(torch, ref_model, 1e-4, 0.9, 0.98, 1e-9)
  src_t, tgt_t = torch.from_numpy(src).long(), torch.from_numpy(tgt).long()

  def ref():
    opt.zero_grad(set_to_none=True)
    loss = ref_model.loss(src_t, tgt_t, smoothing)
    loss.backward()
    opt.step()
    return loss
  return ours, lower, ref, classify_transformer, TORCH_TRANSFORMER


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("model", choices=("resnet", "transformer"))
  p.add_argument("--depth", type=int, default=110)
  p.add_argument("--batch", type=int, default=None, help="default 128 (ResNet), 16 rows")
  p.add_argument("--steps", type=int, default=3, help="profiled steps per side")
  p.add_argument("--json", default="", help="also write the figures to this file")
  args = p.parse_args(argv)
  if args.model == "resnet":
    args.batch = args.batch or 128
  torch = common.torch_or_none()
  if torch is None:
    raise SystemExit("op_breakdown.py needs PyTorch (see benchmarks/RESULTS.md)")
  make = resnet_pair if args.model == "resnet" else transformer_pair
  ours, lower, ref, classify, torch_classes = make(args, torch)
  ours()
  compiled_text = lower().compile().as_text()
  load_start = os.getloadavg()
  with tempfile.TemporaryDirectory() as trace_dir:
    jax_totals, jax_wall = jax_profile(ours, compiled_text, classify, args.steps, trace_dir)
  torch_totals, torch_wall = torch_profile(torch, ref, torch_classes, args.steps)
  scale = jax_wall / max(sum(jax_totals.values()), 1e-12)
  if "conv weight grad" in jax_totals:   # PyTorch's backward is one op: compare the sum too
    jax_totals["conv input + weight grad"] = (jax_totals.get("conv input grad", 0.0)
                                              + jax_totals["conv weight grad"])
  rows = []
  for label in sorted(set(jax_totals) | set(torch_totals),
                      key=lambda k: -max(jax_totals.get(k, 0) * scale, torch_totals.get(k, 0))):
    ms_ours = 1e3 * jax_totals.get(label, 0.0) * scale
    ms_torch = 1e3 * torch_totals.get(label, 0.0)
    rows.append({"op class": label, "ours ms": ms_ours,
                 "ours thunk ms": 1e3 * jax_totals.get(label, 0.0), "pytorch ms": ms_torch,
                 "ours / pytorch": (ms_ours / ms_torch) if ms_torch else ""})
  rows.append({"op class": "step (wall)", "ours ms": 1e3 * jax_wall, "ours thunk ms":
               1e3 * jax_wall / scale, "pytorch ms": 1e3 * torch_wall,
               "ours / pytorch": jax_wall / torch_wall})
  common.print_table(f"{args.model} train step by op class, batch {args.batch or 16}, "
                     f"{args.steps} profiled steps each (load {load_start} -> "
                     f"{os.getloadavg()})", rows,
                     ["op class", "ours ms", "ours thunk ms", "pytorch ms", "ours / pytorch"])
  result = {"args": vars(args), "rows": rows}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  main()
