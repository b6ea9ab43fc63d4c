"""Optimizers, learning-rate schedules and the classification loss, built from ``train.*``."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from resnorm_jax.errors import ConfigError


def learning_rate_schedule(t: ml_collections.ConfigDict, total_steps: int) -> Callable:
  """lr(step): ``constant``, ``piecewise`` (He 2016: ×decay_factor at each boundary),
  ``cosine`` (to 0 at the last step) or ``rsqrt`` (lr·sqrt(w / max(step, w)), Vaswani et
  al. 2017), after ``warmup_steps`` of warm-up: constant at ``warmup_learning_rate`` when it
  is > 0 (He 2016: 0.01 for 400 steps), else linear from 0."""
  lr, w = float(t.learning_rate), int(t.warmup_steps)
  if t.schedule == "constant":
    base = lambda s: jnp.full((), lr, jnp.float32)
  elif t.schedule == "piecewise":
    bounds = [int(round(b * total_steps)) if b <= 1 else int(b) for b in t.boundaries]
    base = optax.piecewise_constant_schedule(lr, {b: t.decay_factor for b in bounds})
  elif t.schedule == "cosine":
    cosine = optax.cosine_decay_schedule(lr, max(total_steps - w, 1))
    base = lambda s: cosine(jnp.maximum(s - w, 0))
  elif t.schedule == "rsqrt":
    base = lambda s: lr * jnp.sqrt(max(w, 1) / jnp.maximum(s, max(w, 1)).astype(jnp.float32))
  else:
    raise ConfigError(f"unknown train.schedule {t.schedule!r}")
  if w <= 0:
    return base
  warm_lr = float(t.warmup_learning_rate)

  def schedule(step):
    warm = (jnp.full((), warm_lr, jnp.float32) if warm_lr > 0
            else lr * (step.astype(jnp.float32) + 1) / w)
    return jnp.where(step < w, warm, base(step))
  return schedule


def decay_mask(params):
  """Weight decay applies to kernels only: never to norm parameters, biases or gains."""
  return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def make_optimizer(t: ml_collections.ConfigDict, total_steps: int):
  schedule = learning_rate_schedule(t, total_steps)
  parts = []
  if t.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(t.grad_clip_norm))
  if t.optimizer == "adamw":
    parts.append(optax.adamw(schedule, t.b1, t.b2, t.eps, weight_decay=t.weight_decay,
                             mask=decay_mask))
  else:
    if t.weight_decay > 0:  # L2 regularisation coupled to the gradient (He 2016; Adam)
      parts.append(optax.add_decayed_weights(t.weight_decay, decay_mask))
    if t.optimizer == "sgd":
      parts.append(optax.sgd(schedule, t.momentum or None, nesterov=t.nesterov))
    else:
      parts.append(optax.adam(schedule, t.b1, t.b2, t.eps))
  return optax.chain(*parts), schedule


def cross_entropy(logits, labels, smoothing: float = 0.0):
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if smoothing:
    targets = optax.smooth_labels(targets, smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
