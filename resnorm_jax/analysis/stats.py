"""Statistics of signal and noise, aggregation over random draws, and decay-law fits.

Definitions (Labatie 2019, "Characterizing Well-Behaved vs. Pathological Deep Neural
Networks", and the authors' moments-dnns code):

* features ``z`` of shape (B, H, W, C) (or (N, C)); feature vectors are the C-vectors at
  every (input, position), pooled over batch and positions;
* centring is per channel over batch and positions: ẑ = z − mean_{b,h,w}(z);
* μ2(x̂) = mean(x̂²) is the signal's second *central* moment; μ2(dx) = mean(dx²) is the
  noise's raw second moment (the noise is centred by construction: it is linear in the
  zero-mean input perturbation);
* normalized sensitivity χ = sqrt(μ2(dx) / μ2(x̂)), divided by its value at the input;
* effective rank r_eff = tr(C) / λ_max(C), C = ẑᵀẑ / n the covariance of the centred
  feature vectors (1 for rank-1 features, C for isotropic ones);
* kurtosis per channel κ_c = μ4 / μ2² of the centred channel, averaged over the channels
  that are not constant.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
_TINY = 1e-30


def feature_matrix(z: Array) -> Array:
  """(..., C) features -> (n, C) feature vectors pooled over every leading axis."""
  return z.reshape(-1, z.shape[-1]).astype(jnp.float32)


def centre(z: Array) -> Array:
  """ẑ = z − mean over every axis but the last (per channel over batch and positions)."""
  axes = tuple(range(z.ndim - 1))
  return z - jnp.mean(z, axis=axes, keepdims=True)


def second_moment(z: Array) -> Array:
  """μ2(z) = mean(z²) over everything (raw; centre first for a central moment)."""
  return jnp.mean(jnp.square(z.astype(jnp.float32)))


def log_chi(x: Array, dx: Array) -> Array:
  """log χ = ½ (log μ2(dx) − log μ2(x̂)), un-normalized (subtract the input's value)."""
  return 0.5 * (jnp.log(second_moment(dx) + _TINY) - jnp.log(second_moment(centre(x)) + _TINY))


def covariance(z: Array) -> Array:
  """C = ẑᵀẑ / n over the pooled, per-channel centred feature vectors."""
  m = centre(feature_matrix(z))
  return m.T @ m / m.shape[0]


def lambda_max(c: Array, iters: int = 0) -> Array:
  """Largest eigenvalue of a symmetric PSD matrix.

  ``iters == 0``: exact (``eigvalsh``).  ``iters > 0``: the Rayleigh quotient vᵀCv after
  ``iters`` power iterations v ← Cv / |Cv| from a fixed generic start; a lower bound of
  λ_max whose relative error shrinks like (λ_2/λ_1)^(2·iters) (accurate where it matters,
  for collapsed, low-rank features; a few percent low for nearly isotropic ones).  Much
  faster than ``eigvalsh`` for C ≥ 256 on GPUs.
  """
  if iters <= 0:
    return jnp.linalg.eigvalsh(c)[-1]
  v0 = jax.random.normal(jax.random.key(1234), (c.shape[0],), c.dtype)

  def body(_, v):
    w = c @ v
    return w / (jnp.linalg.norm(w) + _TINY)

  v = jax.lax.fori_loop(0, iters, body, v0 / jnp.linalg.norm(v0))
  return v @ (c @ v)


def effective_rank(z: Array, iters: int = 0) -> Array:
  """r_eff = tr(C) / λ_max(C) of the centred feature vectors of ``z`` (..., C)."""
  c = covariance(z)
  return jnp.trace(c) / (lambda_max(c, iters) + _TINY)


def kurtosis(z: Array) -> Array:
  """Mean over channels of μ4/μ2² of each centred channel (3 for a Gaussian).

  Channels with no variance (e.g. dead ReLUs) are left out of the mean.
  """
  m = centre(feature_matrix(z))
  return kurtosis_from_moments(jnp.mean(jnp.square(m), axis=0),
                               jnp.mean(jnp.square(jnp.square(m)), axis=0))


def kurtosis_from_moments(mu2: Array, mu4: Array) -> Array:
  """:func:`kurtosis` from the central moments μ2, μ4 of each channel (last axis; leading
  axes are kept): the mean of μ4/μ2² over the channels with variance."""
  live = mu2 > 1e-12 * jnp.maximum(jnp.max(mu2, axis=-1, keepdims=True), _TINY)
  k = jnp.where(live, mu4 / jnp.where(live, jnp.square(mu2), 1.0), 0.0)
  return jnp.sum(k, axis=-1) / jnp.maximum(jnp.sum(live, axis=-1), 1)


def signal_noise_stats(x: Array, dx: Array, iters: int = 0) -> dict[str, Array]:
  """Every per-layer statistic of one draw: log χ (un-normalized), r_eff of signal and
  noise, kurtosis of the signal, and the raw log μ2 of both (for diagnostics)."""
  return {
      "log_chi": log_chi(x, dx),
      "reff_signal": effective_rank(x, iters),
      "reff_noise": effective_rank(dx, iters),
      "kurtosis": kurtosis(x),
  }


# ----------------------------------------------------------------------------------------
# Aggregation over draws.
# ----------------------------------------------------------------------------------------
def aggregate(values, axis: int = 0, low: float = 10, high: float = 90) -> dict[str, list]:
  """Mean and the ``low``/``high`` percentiles over the draws axis, as JSON lists."""
  v = np.asarray(values, np.float64)
  return {"mean": np.mean(v, axis).tolist(), f"p{low:g}": np.percentile(v, low, axis).tolist(),
          f"p{high:g}": np.percentile(v, high, axis).tolist()}


# ----------------------------------------------------------------------------------------
# Fits.
# ----------------------------------------------------------------------------------------
def fit_line(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
  """Least squares y ≈ a + b·x: slope b, intercept a and R² = 1 − SS_res / SS_tot."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  if x.size < 2 or np.ptp(x) == 0:
    return {"slope": float("nan"), "intercept": float("nan"), "r2": float("nan")}
  b, a = np.polyfit(x, y, 1)
  ss_res = float(np.sum((y - (a + b * x)) ** 2))
  ss_tot = float(np.sum((y - y.mean()) ** 2))
  r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
  return {"slope": float(b), "intercept": float(a), "r2": float(r2)}


def fit_growth(depth: Sequence[float], log_y: Sequence[float]) -> dict:
  """Exponential vs power-law fit of a positive quantity y given log y against depth l.

  exponential: log y ≈ a + r·l   (r: rate per unit of depth; y multiplies by e^r per layer)
  power:       log y ≈ a + p·log l  (p: exponent; needs l > 0)

  ``better`` names the fit with the larger R² (both fit log y, so they are comparable).
  """
  depth = np.asarray(depth, np.float64)
  log_y = np.asarray(log_y, np.float64)
  keep = (depth > 0) & np.isfinite(log_y)
  depth, log_y = depth[keep], log_y[keep]
  exp_fit = fit_line(depth, log_y)
  pow_fit = fit_line(np.log(depth), log_y)
  better = None
  if math.isfinite(exp_fit["r2"]) and math.isfinite(pow_fit["r2"]):
    better = "exponential" if exp_fit["r2"] >= pow_fit["r2"] else "power"
  return {
      "exponential": {"rate": exp_fit["slope"], "factor": float(np.exp(exp_fit["slope"]))
                      if math.isfinite(exp_fit["slope"]) else float("nan"),
                      "r2": exp_fit["r2"]},
      "power": {"exponent": pow_fit["slope"], "r2": pow_fit["r2"]},
      "better": better,
      "fit_depths": [float(depth.min()), float(depth.max())] if depth.size else [],
      "points": int(depth.size),
  }
