"""Transformer-base training throughput: framework step vs bare jitted step vs PyTorch eager.

    python benchmarks/transformer_step.py                   # CPU default: 16 rows x 64 tokens
    python benchmarks/transformer_step.py --dtype bfloat16  # GPU default: 4096 tokens/side

The model is ``configs/wmt14_ende_transformer.py`` (Vaswani et al. 2017 "base": Post-LN,
6+6 layers, d 512, 8 heads, FFN 2048, dropout 0.1, one 37k embedding shared by source,
target and the output projection, label smoothing 0.1, Adam(0.9, 0.98, 1e-9), rsqrt
schedule), trained on a synthetic batch (random ids, no padding, ``--batch`` rows of
``--src_len`` source and ``--tgt_len`` target tokens).  Rows of the table, all timed in
one process, interleaved round by round (median over ``--repeats`` rounds):

* ``pytorch eager``: the same architecture written here in PyTorch (``TorchTransformer``:
  same layers, widths, tied embeddings, Post-LN, dropout sites, the same label-smoothed
  loss and Adam, ``fused=True`` where the build has it), started from a copy of the JAX
  initial weights, eager mode, on the same device (``torch.autocast`` bfloat16 with
  ``--dtype bfloat16``; float32 matmuls in TF32 on GPU, as JAX runs them by default);
* ``bare jit``: our Flax model in a minimal ``jax.jit`` step (``value_and_grad`` of the
  mean loss, computed by ``Transformer.loss_sum`` as the task computes it; the framework's
  optax Adam, parameters and optimizer state donated);
* ``framework``: the real train step, ``training.make_train_step`` of the translation task
  (``resnorm_jax.tasks.translation.task``: dropout keys from the step, global-batch token
  normalization, gradient norm, non-finite guard, metrics), on a 1-device mesh, with the
  first guard of ``--guards`` (``train.nonfinite_guard``); each further guard adds a row
  ``framework, <guard> guard``.

``time / bare`` is the median over rounds of each round's ratio (the two calls of a round
run back to back, so a load change between rounds cancels out); ``min ms`` is the fastest
round.

Before timing, the two implementations are checked to have the same parameter count and,
with the same weights and dropout off, the same loss on the batch.

FLOPs (MFU = FLOPs per step / median step time / measured matmul peak: the better of
``common.matmul_peak_flops`` before and after the timed rounds):
the forward FLOPs are ``resnorm_jax.summary.model_summary``'s analytic count for one
S-token source and T-token target (2·D_in·D_out per position for every dense layer) plus
the terms that are not layers, as ``summary.summary_inputs`` counts them for S = T:

    attention = 4·d·(N·S² + M·T² + M·T·S)      (QKᵀ and AV, full squares: causal not halved)
    logits    = 2·T·d·V                         (tied output projection)
    FLOPs/step = 3 · batch · (dense + attention + logits)   (backward = 2 x forward)

Embedding lookups, norms, softmax, dropout and the optimizer are not counted.  Throughput
is target tokens per second (what the translation task's ``throughput`` reports); source tokens
are as many again when S = T.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
  sys.path.insert(0, HERE)

import common  # noqa: E402  (also puts the repository on sys.path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from resnorm_jax import cpu_workarounds  # noqa: E402

CONFIG_FILE = os.path.join(common.REPO, "configs", "wmt14_ende_transformer.py")


# ----------------------------------------------------------------------------------------
# Config, model, batch, FLOPs.
# ----------------------------------------------------------------------------------------
def make_config(args):
  """The WMT'14 Transformer config (Post-LN) with this run's vocabulary, lengths, dtype."""
  spec = importlib.util.spec_from_file_location("wmt14_config", CONFIG_FILE)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(args.skip)
  c.model.preset = args.preset
  if args.vocab:
    c.model.vocab_size = args.vocab
  c.model.max_len = max(c.model.max_len, args.src_len, args.tgt_len)
  c.model.dtype = args.dtype
  c.model.summary_length = args.src_len
  c.parallel.num_devices = 1
  return c


def build_model(config, layers: int = 0, axis_name=None):
  """``models.build_model``'s Transformer, with ``layers`` + ``layers`` layers when > 0."""
  from resnorm_jax import models
  from resnorm_jax.models.transformer import Transformer
  model = models.build_model(config, models.norm_context(config, 1, axis_name),
                             models.DataInfo())
  if layers:
    model = Transformer(dataclasses.replace(model.config, num_encoder_layers=layers,
                                            num_decoder_layers=layers))
  return model


def synthetic_batch(batch: int, src_len: int, tgt_len: int, vocab: int, seed: int = 0):
  """Random ids in [4, vocab) (no pad, BOS, EOS): every position is a real token."""
  rng = np.random.default_rng(seed)
  src = rng.integers(4, vocab, (batch, src_len), dtype=np.int32)
  tgt = rng.integers(4, vocab, (batch, tgt_len), dtype=np.int32)
  return src, tgt


def forward_flops(model, src_len: int, tgt_len: int) -> int:
  """Analytic forward FLOPs of one (src_len, tgt_len) example; see the module docstring."""
  from resnorm_jax.summary import model_summary
  cfg, d = model.config, model.config.d_model
  attention = 4 * d * (cfg.num_encoder_layers * src_len ** 2
                       + cfg.num_decoder_layers * (tgt_len ** 2 + tgt_len * src_len))
  logits = 2 * tgt_len * d * cfg.vocab_size if cfg.tie_output else 0
  src = jnp.ones((1, src_len), jnp.int32)
  tgt = jnp.ones((1, tgt_len), jnp.int32)
  _, _, flops = model_summary(model, (src, tgt), init_kwargs={"train": False},
                              apply_kwargs={"train": False}, extra_flops=attention + logits)
  return int(flops)


def num_params(tree) -> int:
  return sum(int(math.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------------------
# JAX: the bare step and the framework step.
# ----------------------------------------------------------------------------------------
def make_bare_step(model, tx, smoothing: float):
  """A minimal jitted train step: loss = mean smoothed CE (``Transformer.loss_sum``),
  value_and_grad, optax update."""
  import optax
  from resnorm_jax.tasks.translation import corpora
  from resnorm_jax.models.transformer import shift_right

  def step(params, opt_state, key, src, tgt):
    def loss_fn(p):
      # The model's own training loss (Transformer.loss_sum: the output projection and the
      # loss over slices of positions, as the translation task computes it).
      total = model.apply({"params": p}, src, shift_right(tgt, corpora.BOS_ID), tgt,
                          smoothing, train=True, rngs={"dropout": key},
                          method=model.loss_sum)
      return total / jnp.sum(tgt != corpora.PAD_ID)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss
  return jax.jit(step, donate_argnums=(0, 1),
                 compiler_options=cpu_workarounds.compiler_options(jax.default_backend()))


def framework_state(params, tx):
  """The TrainState the translation task starts from, for the given parameters."""
  from resnorm_jax.training import TrainState
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                    opt_state=tx.init(params), nonfinite_step=jnp.full((), -1, jnp.int32),
                    skipped_steps=jnp.zeros((), jnp.int32))


def copy_tree(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


def jax_loss(model, params, src, tgt, smoothing: float) -> float:
  """Mean smoothed loss, dropout off (the agreement check)."""
  from resnorm_jax.tasks.translation import corpora
  from resnorm_jax.models.transformer import label_smoothed_cross_entropy, shift_right

  @jax.jit
  def f(params, src, tgt):
    logits = model.apply({"params": params}, src, shift_right(tgt, corpora.BOS_ID))
    total, count = label_smoothed_cross_entropy(logits, tgt, corpora.PAD_ID, smoothing)
    return total / count
  return float(f(params, src, tgt))


# ----------------------------------------------------------------------------------------
# PyTorch reference.
# ----------------------------------------------------------------------------------------
def build_torch_reference(torch, cfg, params, device):
  """``TorchTransformer`` with the architecture of ``cfg`` and a copy of the JAX ``params``."""
  nn, F = torch.nn, torch.nn.functional

  class Attention(nn.Module):
    def __init__(self, d, heads):
      super().__init__()
      self.heads = heads
      self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x, source, mask):
      b, t, d = x.shape
      split = lambda y: y.view(b, y.shape[1], self.heads, d // self.heads).transpose(1, 2)
      q, k, v = split(self.query(x)), split(self.key(source)), split(self.value(source))
      h = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
      return self.out(h.transpose(1, 2).reshape(b, t, d))

  class FeedForward(nn.Module):
    def __init__(self, d, hidden):
      super().__init__()
      self.wi, self.wo = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x):
      return self.wo(F.relu(self.wi(x)))

  class EncoderLayer(nn.Module):   # Post-LN: x <- LN(x + Dropout(F(x)))
    def __init__(self):
      super().__init__()
      self.self_attn = Attention(cfg.d_model, cfg.num_heads)
      self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)
      self.ffn = FeedForward(cfg.d_model, cfg.d_ff)
      self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)

    def forward(self, x, mask, p):
      x = self.self_attn_norm(x + F.dropout(self.self_attn(x, x, mask), p, self.training))
      return self.ffn_norm(x + F.dropout(self.ffn(x), p, self.training))

  class DecoderLayer(nn.Module):
    def __init__(self):
      super().__init__()
      self.self_attn = Attention(cfg.d_model, cfg.num_heads)
      self.self_attn_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)
      self.cross_attn = Attention(cfg.d_model, cfg.num_heads)
      self.cross_attn_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)
      self.ffn = FeedForward(cfg.d_model, cfg.d_ff)
      self.ffn_norm = nn.LayerNorm(cfg.d_model, eps=1e-5)

    def forward(self, x, encoded, self_mask, cross_mask, p):
      drop = lambda y: F.dropout(y, p, self.training)
      x = self.self_attn_norm(x + drop(self.self_attn(x, x, self_mask)))
      x = self.cross_attn_norm(x + drop(self.cross_attn(x, encoded, cross_mask)))
      return self.ffn_norm(x + drop(self.ffn(x)))

  class TorchTransformer(nn.Module):
    """Shared embedding E (scaled by sqrt(d)) + sinusoidal positions, N Post-LN encoder and
    M decoder layers, tied logits h Eᵀ; label-smoothed CE as in the JAX model."""

    def __init__(self):
      super().__init__()
      from resnorm_jax.models.transformer import sinusoidal_positions
      self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
      self.encoder = nn.ModuleList(EncoderLayer() for _ in range(cfg.num_encoder_layers))
      self.decoder = nn.ModuleList(DecoderLayer() for _ in range(cfg.num_decoder_layers))
      self.register_buffer("positions", torch.from_numpy(
          sinusoidal_positions(cfg.max_len, cfg.d_model)), persistent=False)

    def embed_tokens(self, tokens):
      x = self.embed(tokens) * cfg.d_model ** 0.5 + self.positions[:tokens.shape[1]]
      return F.dropout(x, cfg.dropout_rate, self.training)

    def loss(self, src, tgt, smoothing):
      p = cfg.dropout_rate
      src_keys = (src != cfg.pad_id)[:, None, None, :]
      tgt_in = torch.cat([torch.full_like(tgt[:, :1], cfg.bos_id), tgt[:, :-1]], dim=1)
      t = tgt.shape[1]
      tgt_real = (tgt_in != cfg.pad_id)
      tgt_real[:, 0] = True
      causal = torch.ones(t, t, dtype=torch.bool, device=src.device).tril()
      self_mask = causal[None, None] & tgt_real[:, None, None, :]
      x = self.embed_tokens(src)
      for layer in self.encoder:
        x = layer(x, src_keys, p)
      y = self.embed_tokens(tgt_in)
      for layer in self.decoder:
        y = layer(y, x, self_mask, src_keys, p)
      logits = (y @ self.embed.weight.t()).float()
      logp = F.log_softmax(logits, dim=-1)
      nll = -logp.gather(-1, tgt[..., None])[..., 0]
      off = smoothing / (cfg.vocab_size - 1)
      per_token = (1.0 - smoothing - off) * nll - off * logp.sum(-1)
      real = (tgt != cfg.pad_id).float()
      return (per_token * real).sum() / real.sum().clamp(min=1.0)

  model = TorchTransformer()
  # Copy the JAX weights: flax path -> torch name (kernels transposed).
  state = {}
  for path, value in jax.tree_util.tree_flatten_with_path(params)[0]:
    keys = [getattr(k, "key", str(k)) for k in path]
    if keys[0] == "embed":
      state["embed.weight"] = np.array(value)
      continue
    keys = [k.replace("layer_", "") for k in keys]
    keys = [k.replace("_skip", "_norm") for k in keys if k != "post_norm_0"]
    leaf = keys[-1]
    array = np.asarray(value)
    if leaf == "kernel":
      keys[-1], array = "weight", array.T
    elif leaf == "scale":
      keys[-1] = "weight"
    state[".".join(keys)] = np.array(array, copy=True, order="C")
  own = model.state_dict()
  missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
  if missing or extra:
    raise RuntimeError(f"JAX -> PyTorch parameter mapping: missing {missing}, extra {extra}")
  model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
  return model.to(device)


def torch_matmul_peak(torch, device: str, dtype: str, sizes, sync) -> float:
  """PyTorch's own dense matmul FLOP/s, measured like ``common.matmul_peak_flops``: the
  reference's MFU against its own BLAS tells a slow framework from a slow library."""
  torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  best = 0.0
  for n in sizes:
    a = torch.ones(n, n, dtype=torch_dtype, device=device)
    b = torch.ones(n, n, dtype=torch_dtype, device=device)
    t = common.median(common.time_calls(lambda: a @ b, warmup=1, repeats=5, sync=sync))
    best = max(best, 2 * n ** 3 / t)
  return best


def torch_adam(torch, model, lr: float, b1: float, b2: float, eps: float):
  """Adam with the fused kernel where this torch build has one, else the default."""
  try:
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, fused=True)
  except (RuntimeError, TypeError, ValueError):
    return torch.optim.Adam(model.parameters(), lr=lr, betas=(b1, b2), eps=eps)


# ----------------------------------------------------------------------------------------
# The benchmark.
# ----------------------------------------------------------------------------------------
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--batch", type=int, default=None,
                 help="rows per step (default: 16 on CPU, batch_tokens / length on GPU)")
  p.add_argument("--batch_tokens", type=int, default=None,
                 help="tokens per side per step; sets --batch = batch_tokens // max length "
                      "(default on GPU: 4096)")
  p.add_argument("--src_len", type=int, default=64)
  p.add_argument("--tgt_len", type=int, default=64)
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
  p.add_argument("--warmup", type=int, default=2, help="untimed calls per row (1st compiles)")
  p.add_argument("--preset", default="base", help="transformer preset (tiny for tests)")
  p.add_argument("--layers", type=int, default=0,
                 help="encoder and decoder layers each (0: the preset's 6 + 6)")
  p.add_argument("--vocab", type=int, default=0, help="vocabulary (0: the config's 37,000)")
  p.add_argument("--skip", default="post_ln", help="variant of the WMT config (post_ln)")
  p.add_argument("--peak_sizes", default="1024,2048,4096",
                 help="square matmul sizes for the measured peak")
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch reference")
  p.add_argument("--torch_threads", type=int, default=0,
                 help="torch.set_num_threads (0: PyTorch's default, one per core)")
  p.add_argument("--loss_rtol", type=float, default=None,
                 help="tolerance of the JAX/PyTorch loss agreement (default 1e-4 float32 "
                      "on CPU, 2e-3 float32 (TF32) on GPU, 2e-2 bfloat16)")
  p.add_argument("--guards", default="auto",
                 help="train.nonfinite_guard of the framework row (auto: the config default, "
                      "cond on CPU, where elsewhere), then one row per further guard, e.g. "
                      "where,cond")
  p.add_argument("--cost_analysis", action="store_true",
                 help="also print XLA's bytes accessed and FLOPs of each compiled JAX step")
  p.add_argument("--json", default=None, help="write the figures to this file")
  p.add_argument("--device_note", default="", help="free text recorded with the figures")
  return p.parse_args(argv)


def resolve_batch(args, platform: str) -> int:
  if args.batch is not None:
    return args.batch
  tokens = args.batch_tokens or (4096 if platform != "cpu" else None)
  if tokens:
    return max(1, tokens // max(args.src_len, args.tgt_len))
  return 16


def main(argv=None) -> dict:
  args = parse_args(argv)
  from resnorm_jax import parallelism, training
  from resnorm_jax.tasks.base import Task
  from resnorm_jax.tasks.translation.task import Translation

  class SyntheticTranslation(Translation):
    """The translation task's step on synthetic batches: no corpus, ``--layers`` layers."""

    def __init__(self, config, mesh):  # pylint: disable=super-init-not-called
      Task.__init__(self, config, mesh)

    def model_for(self, axis_name):
      return build_model(self.config, args.layers, axis_name)

  platform = jax.devices()[0].platform
  batch = resolve_batch(args, platform)
  config = make_config(args)
  mesh = parallelism.make_mesh(1)
  task = SyntheticTranslation(config, mesh)
  model, tx, schedule = task.model, task.tx, task.schedule
  cfg = model.config
  smoothing = float(config.train.label_smoothing)
  src_np, tgt_np = synthetic_batch(batch, args.src_len, args.tgt_len, cfg.vocab_size)
  tokens = batch * args.tgt_len

  flops = 3 * batch * forward_flops(model, args.src_len, args.tgt_len)
  peak_sizes = tuple(int(n) for n in args.peak_sizes.split(","))
  peak = common.matmul_peak_flops(args.dtype, peak_sizes)

  init_tokens = jnp.ones((1, 8), jnp.int32)
  params = jax.jit(lambda key: model.init({"params": key, "dropout": key}, init_tokens,
                                          init_tokens)["params"])(jax.random.key(0))
  jax_params = num_params(params)
  host_params = jax.device_get(params)

  # Framework: the real train step on a 1-device mesh, batch-sharded inputs, per guard.
  replicated, sharded = parallelism.replicated(mesh), parallelism.batch_sharded(mesh)
  src_fw, tgt_fw = jax.device_put(src_np, sharded), jax.device_put(tgt_np, sharded)
  guards = args.guards.split(",")
  framework_rows, programs = {}, {}
  for i, guard in enumerate(guards):
    config.train.nonfinite_guard = guard
    train_step = training.make_train_step(task)
    fw = {"state": jax.device_put(framework_state(copy_tree(params), tx), replicated)}

    def framework_call(fw=fw, train_step=train_step):
      fw["state"], metrics = train_step(fw["state"], {"src": src_fw, "tgt": tgt_fw})
      return fw["state"], metrics
    name = "framework" if i == 0 else f"framework, {guard} guard"
    framework_rows[name] = (framework_call, common.block)
    programs[name] = lambda train_step=train_step, fw=fw: train_step.lower(
        fw["state"], (src_fw, tgt_fw))

  # Bare: value_and_grad + the same optax Adam, no framework.
  bare_step = make_bare_step(model, tx, smoothing)
  bare = {"params": copy_tree(params), "opt": tx.init(params)}
  src_j, tgt_j = jnp.asarray(src_np), jnp.asarray(tgt_np)
  dropout_key = jax.random.key(1)

  def bare_call():
    bare["params"], bare["opt"], loss = bare_step(bare["params"], bare["opt"], dropout_key,
                                                  src_j, tgt_j)
    return loss

  contestants = {**framework_rows, "bare jit": (bare_call, common.block)}
  programs["bare jit"] = lambda: bare_step.lower(bare["params"], bare["opt"], dropout_key,
                                                 src_j, tgt_j)
  cost = {}
  if args.cost_analysis:   # XLA's static figures of each compiled step (load-independent)
    for name, lower in programs.items():
      analysis = lower().compile().cost_analysis()
      analysis = analysis[0] if isinstance(analysis, list) else analysis
      cost[name] = {"GB accessed": analysis.get("bytes accessed", 0.0) / 1e9,
                    "GFLOP": analysis.get("flops", 0.0) / 1e9}
    rows_cost = [{"program": k, **v, "GB / bare": v["GB accessed"] /
                  cost["bare jit"]["GB accessed"]} for k, v in cost.items()]
    common.print_table("XLA cost analysis of the compiled steps", rows_cost,
                       ["program", "GB accessed", "GB / bare", "GFLOP"])

  torch = None if args.no_torch else common.torch_or_none()
  torch_params = torch_peak = None
  losses = {}
  if torch is not None:
    losses["jax"] = jax_loss(model, params, src_j, tgt_j, smoothing)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.torch_threads:
      torch.set_num_threads(args.torch_threads)
    if device == "cuda":   # float32 matmuls as JAX runs them by default on GPU: TF32
      torch.set_float32_matmul_precision("high")
    ref = build_torch_reference(torch, cfg, host_params, device)
    torch_params = sum(p.numel() for p in ref.parameters())
    src_t = torch.from_numpy(src_np).long().to(device)
    tgt_t = torch.from_numpy(tgt_np).long().to(device)
    use_bf16 = args.dtype == "bfloat16"
    autocast = lambda: torch.autocast(device, dtype=torch.bfloat16, enabled=use_bf16)
    ref.eval()
    with torch.no_grad(), autocast():
      losses["pytorch"] = float(ref.loss(src_t, tgt_t, smoothing))
    ref.train()
    t = config.train
    opt = torch_adam(torch, ref, 1.0, t.b1, t.b2, t.eps)
    lr_at = lambda step: float(schedule(jnp.asarray(step, jnp.int32)))
    lr_table = [lr_at(s) for s in range(args.warmup + args.repeats + 1)]
    counter = {"step": 0}

    def torch_call():
      for group in opt.param_groups:   # the same rsqrt schedule, precomputed
        group["lr"] = lr_table[min(counter["step"], len(lr_table) - 1)]
      opt.zero_grad(set_to_none=True)
      with autocast():
        loss = ref.loss(src_t, tgt_t, smoothing)
      loss.backward()
      opt.step()
      counter["step"] += 1
      return loss

    sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)
    torch_peak = torch_matmul_peak(torch, device, args.dtype, peak_sizes, sync)
    contestants = {"pytorch eager": (torch_call, sync), **contestants}

  if torch_params is not None and torch_params != jax_params:
    raise RuntimeError(f"parameter counts differ: JAX {jax_params:,}, PyTorch {torch_params:,}")
  if "pytorch" in losses:
    rtol = args.loss_rtol or (2e-2 if args.dtype == "bfloat16" else
                              2e-3 if device == "cuda" else 1e-4)
    if not math.isclose(losses["jax"], losses["pytorch"], rel_tol=rtol):
      raise RuntimeError(f"initial losses differ beyond rtol {rtol}: JAX {losses['jax']:.6f}, "
                         f"PyTorch {losses['pytorch']:.6f}")

  # Warm-up (the first call compiles), then interleaved rounds.
  first_call, times = common.interleaved_rounds(contestants, warmup=args.warmup,
                                                repeats=args.repeats)

  # The peaks again after the rounds, keeping the better: on a shared machine a single
  # measurement can catch a busy moment and overstate the MFU.
  peak = max(peak, common.matmul_peak_flops(args.dtype, peak_sizes))
  if torch_peak is not None:
    torch_peak = max(torch_peak, torch_matmul_peak(torch, device, args.dtype, peak_sizes,
                                                   contestants["pytorch eager"][1]))

  step = {name: common.median(ts) for name, ts in times.items()}
  rows = []
  for name in contestants:
    row = {"implementation": name, "median ms": 1e3 * step[name],
           "min ms": 1e3 * min(times[name]),
           "tokens/s": tokens / step[name], "MFU %": 100 * flops / step[name] / peak,
           "first call s": first_call[name],
           "params": torch_params if name == "pytorch eager" else jax_params}
    if "pytorch eager" in step:
      row["time / pytorch"] = step[name] / step["pytorch eager"]
      row.update(common.speed_ratios(times["pytorch eager"], times[name], "vs pytorch"))
    if name.startswith("framework"):
      row["time / bare"] = common.median(
          [a / b for a, b in zip(times[name], times["bare jit"])])
    rows.append(row)

  env = common.environment()
  shape = (f"batch {batch} x (src {args.src_len}, tgt {args.tgt_len}), {args.dtype}, "
           f"preset {args.preset}, vocab {cfg.vocab_size}, {args.repeats} rounds")
  columns = ["implementation", "median ms", "min ms", "tokens/s", "time / pytorch",
             *common.SPEED_RATIO_COLUMNS("vs pytorch"), "time / bare", "MFU %", "first call s",
             "params"]
  common.print_table(f"Transformer train step: {shape}", rows, columns)
  print(f"\nFLOPs/step {flops:.4g} (3 x forward, analytic); measured {args.dtype} matmul "
        f"peak {peak:.4g} FLOP/s (JAX; the MFU column)" + (
            f", {torch_peak:.4g} FLOP/s (PyTorch; its step at "
            f"{100 * flops / step['pytorch eager'] / torch_peak:.3g}% of that)"
            if torch_peak else "") + f"; tokens/s = target tokens ({tokens}) / median step")
  if losses:
    print("initial loss, same weights, dropout off: "
          + ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
  print(f"parameters: JAX {jax_params:,}" +
        (f", PyTorch {torch_params:,}" if torch_params is not None else ""))
  env_rows = [{"key": k, "value": v} for k, v in env.items()]
  if torch is not None:
    env_rows.append({"key": "torch_device", "value": device})
  if args.device_note:
    env_rows.append({"key": "device_note", "value": args.device_note})
  common.print_table("Environment", env_rows, ["key", "value"])

  result = {"shape": {"batch": batch, "src_len": args.src_len, "tgt_len": args.tgt_len,
                      "dtype": args.dtype, "preset": args.preset, "vocab": cfg.vocab_size},
            "guards": guards, "cost_analysis": cost,
            "rows": rows, "times_s": times, "flops_per_step": flops, "peak_flops": peak,
            "torch_peak_flops": torch_peak,
            "initial_loss": losses, "params": {"jax": jax_params, "pytorch": torch_params},
            "device_note": args.device_note, "argv": sys.argv[1:] if argv is None else argv}
  common.write_json(args.json, result)
  return result


if __name__ == "__main__":
  # JAX and PyTorch share one accelerator in this process: JAX must not reserve most of its
  # memory up front (read when JAX starts its backend, i.e. in main; no effect on CPU).
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  main()
