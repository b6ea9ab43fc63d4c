"""Statistics of a multi-seed sweep (``resnorm-sweep --seeds``): pure functions on lists of
per-seed results (final test error in %, or BLEU).

* :func:`summarize`: n, median, mean and sample standard deviation
  s = sqrt(Σ (x_i − x̄)² / (n − 1)) of one variant's seeds.
* :func:`welch_interval`: the difference of two variants' means with a 95% confidence
  interval from Welch's t (unequal variances).
* :func:`seeds_to_resolve` / :func:`compare`: whether the seeds run can resolve a published
  gap between two variants, and about how many would.

Why Welch's t and not a bootstrap over seeds: a sweep has 3 to 5 seeds per variant.  A
percentile bootstrap of a mean difference from n = 3 can never reach beyond the observed
range (there are only 3³ = 27 resamples of each group) and is known to cover far less than
its nominal 95% at such n; Welch's interval widens with the t quantile of its
Welch–Satterthwaite degrees of freedom exactly when the seeds are few, at the price of
assuming roughly normal seed-to-seed noise (a fair model of final test error over seeds).
The Student-t quantile is computed here (regularized incomplete beta by its continued
fraction, then bisection) so that training never needs scipy; the tests check it against
scipy.
"""

from __future__ import annotations

import math
from typing import Sequence

CONFIDENCE = 0.95
MAX_SEEDS = 1000     # seeds_to_resolve searches up to this many seeds per variant


# ----------------------------------------------------------------------------------------
# Descriptive statistics.
# ----------------------------------------------------------------------------------------
def median(values: Sequence[float]) -> float:
  """The middle value (mean of the two middle ones for even n); nan for no values."""
  xs = sorted(values)
  n = len(xs)
  if n == 0:
    return math.nan
  mid = n // 2
  return float(xs[mid]) if n % 2 else 0.5 * (xs[mid - 1] + xs[mid])


def mean(values: Sequence[float]) -> float:
  """x̄ = Σ x_i / n; nan for no values."""
  return math.fsum(values) / len(values) if len(values) else math.nan


def sample_sd(values: Sequence[float]) -> float:
  """s = sqrt(Σ (x_i − x̄)² / (n − 1)) (Bessel-corrected); nan for n < 2."""
  n = len(values)
  if n < 2:
    return math.nan
  m = mean(values)
  return math.sqrt(math.fsum((x - m) ** 2 for x in values) / (n - 1))


def summarize(values: Sequence[float]) -> dict[str, float]:
  """{"n", "median", "mean", "sd"} of one variant's per-seed results."""
  return {"n": len(values), "median": median(values), "mean": mean(values),
          "sd": sample_sd(values)}


# ----------------------------------------------------------------------------------------
# Student's t distribution.
# ----------------------------------------------------------------------------------------
def _beta_continued_fraction(x: float, a: float, b: float) -> float:
  """K = 1 + d_1/(1 + d_2/(1 + ...)) of the expansion
  I_x(a, b) = x^a (1 − x)^b / (a B(a, b)) / K, with (m = 0, 1, ...)
  d_{2m+1} = −(a + m)(a + b + m) x / ((a + 2m)(a + 2m + 1)),
  d_{2m+2} = (m + 1)(b − m − 1) x / ((a + 2m + 1)(a + 2m + 2)),
  evaluated front to back by the modified Lentz method; converges fast for
  x < (a + 1) / (a + b + 2)."""
  tiny, eps = 1e-300, 1e-15
  k, c, d = 1.0, 1.0, 0.0
  for j in range(1, 2000):
    m = (j - 1) // 2
    if j % 2:
      coeff = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
    else:
      coeff = (m + 1) * (b - m - 1) * x / ((a + 2 * m + 1) * (a + 2 * m + 2))
    d = 1.0 + coeff * d
    d = 1.0 / (d if abs(d) > tiny else tiny)
    c = 1.0 + coeff / c
    c = c if abs(c) > tiny else tiny
    k *= c * d
    if abs(c * d - 1.0) < eps:
      break
  return k


def regularized_beta(x: float, a: float, b: float) -> float:
  """I_x(a, b) = B(x; a, b) / B(a, b), using I_x(a, b) = 1 − I_{1−x}(b, a) where the
  continued fraction converges slowly."""
  if x <= 0.0:
    return 0.0
  if x >= 1.0:
    return 1.0
  if x > (a + 1.0) / (a + b + 2.0):
    return 1.0 - regularized_beta(1.0 - x, b, a)
  log_front = (a * math.log(x) + b * math.log1p(-x)
               - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)))
  return math.exp(log_front) / a / _beta_continued_fraction(x, a, b)


def t_sf(t: float, dof: float) -> float:
  """P(T > t) for Student's t with ``dof`` (real, > 0) degrees of freedom:
  ½ I_{ν/(ν+t²)}(ν/2, ½) for t ≥ 0, by symmetry for t < 0."""
  tail = 0.5 * regularized_beta(dof / (dof + t * t), 0.5 * dof, 0.5)
  return tail if t >= 0 else 1.0 - tail


def t_quantile(p: float, dof: float) -> float:
  """t with P(T ≤ t) = p (0 < p < 1), by bisection on :func:`t_sf` (relative tolerance
  1e-12)."""
  if not 0.0 < p < 1.0 or not dof > 0:
    raise ValueError(f"t_quantile needs 0 < p < 1 and dof > 0, got p={p}, dof={dof}")
  if p < 0.5:
    return -t_quantile(1.0 - p, dof)
  target = 1.0 - p
  lo, hi = 0.0, 1.0
  while t_sf(hi, dof) > target:
    lo, hi = hi, 2.0 * hi
  while hi - lo > 1e-12 * max(1.0, hi):
    mid = 0.5 * (lo + hi)
    if t_sf(mid, dof) > target:
      lo = mid
    else:
      hi = mid
  return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------------------
# Welch's interval and the seeds a gap needs.
# ----------------------------------------------------------------------------------------
def welch_dof(var_a: float, n_a: int, var_b: float, n_b: int) -> float:
  """Welch–Satterthwaite ν = (v_a/n_a + v_b/n_b)² / ((v_a/n_a)²/(n_a−1) + (v_b/n_b)²/(n_b−1))
  for sample variances v; nan when both variances are 0."""
  qa, qb = var_a / n_a, var_b / n_b
  denominator = qa * qa / (n_a - 1) + qb * qb / (n_b - 1)
  return (qa + qb) ** 2 / denominator if denominator > 0 else math.nan


def welch_interval(variant: Sequence[float], baseline: Sequence[float],
                   confidence: float = CONFIDENCE) -> dict[str, float] | None:
  """Difference of means d = x̄_variant − x̄_baseline and its Welch interval
  d ± t_{(1+c)/2, ν} · sqrt(s_v²/n_v + s_b²/n_b), ν from :func:`welch_dof`.

  Returns {"difference", "low", "high", "half_width", "dof"}, or None when either side has
  fewer than 2 values (no variance, no interval).  Identical values on both sides give a
  zero-width interval (ν = nan).
  """
  n_v, n_b = len(variant), len(baseline)
  if n_v < 2 or n_b < 2:
    return None
  var_v, var_b = sample_sd(variant) ** 2, sample_sd(baseline) ** 2
  d = mean(variant) - mean(baseline)
  se = math.sqrt(var_v / n_v + var_b / n_b)
  dof = welch_dof(var_v, n_v, var_b, n_b)
  half = 0.0 if se == 0 else t_quantile(0.5 * (1.0 + confidence), dof) * se
  return {"difference": d, "low": d - half, "high": d + half, "half_width": half, "dof": dof}


def seeds_to_resolve(gap: float, sd_variant: float, sd_baseline: float,
                     confidence: float = CONFIDENCE, max_seeds: int = MAX_SEEDS) -> int | None:
  """The smallest n (seeds per variant, the same on both sides) whose Welch half-width
  t_{(1+c)/2, ν(n)} · sqrt((s_v² + s_b²)/n), ν(n) = (s_v² + s_b²)² (n−1) / (s_v⁴ + s_b⁴),
  is below |gap|, taking the observed standard deviations as the true ones.

  At that n an observed difference as large as the gap would just exclude 0 (about 50%
  power), so it is a lower bound on the seeds a real test needs.  None when no n up to
  ``max_seeds`` suffices (or the gap is 0); 2 when both spreads are 0.
  """
  gap = abs(gap)
  total = sd_variant ** 2 + sd_baseline ** 2
  if gap == 0 or math.isnan(total):
    return None
  if total == 0:
    return 2
  dof_per_seed = total ** 2 / (sd_variant ** 4 + sd_baseline ** 4)
  q = 0.5 * (1.0 + confidence)
  half = lambda n: t_quantile(q, dof_per_seed * (n - 1)) * math.sqrt(total / n)
  if half(max_seeds) >= gap:
    return None
  lo, hi = 1, max_seeds          # half(lo) >= gap (or undefined), half(hi) < gap
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if half(mid) < gap:
      hi = mid
    else:
      lo = mid
  return hi


def compare(variant: Sequence[float], baseline: Sequence[float],
            published_gap: float | None, confidence: float = CONFIDENCE) -> dict:
  """A variant's seeds against the baseline's: the Welch interval (or None), whether it
  includes 0, and whether these seeds can resolve ``published_gap`` (the published
  variant − baseline difference; None = not published).

  ``resolvable``: True when the interval is narrower than the gap (half-width < |gap|),
  False when not (then ``seeds_needed`` estimates the seeds per variant that would be,
  see :func:`seeds_to_resolve`), None when there is no gap or no interval to judge.
  """
  ci = welch_interval(variant, baseline, confidence)
  out = {"interval": ci, "includes_zero": None, "published_gap": published_gap,
         "resolvable": None, "seeds_needed": None}
  if ci is None:
    return out
  out["includes_zero"] = ci["low"] <= 0.0 <= ci["high"]
  if published_gap is not None:
    out["resolvable"] = ci["half_width"] < abs(published_gap)
    if not out["resolvable"]:
      out["seeds_needed"] = seeds_to_resolve(published_gap, sample_sd(variant),
                                             sample_sd(baseline), confidence)
  return out
