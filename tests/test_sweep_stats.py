"""resnorm_jax.sweep.stats against scipy (the reference implementation of each statistic)."""

import math

import numpy as np
import pytest
from scipy import special, stats

from resnorm_jax.sweep import stats as S


@pytest.mark.parametrize("values", [[6.61], [6.1, 6.9], [7.0, 6.2, 6.5],
                                    [5.1, 5.9, 5.4, 6.3, 5.0, 7.7, 5.5]])
def test_summary_matches_numpy(values):
  s = S.summarize(values)
  assert s["n"] == len(values)
  np.testing.assert_allclose(s["median"], np.median(values), rtol=1e-15)
  np.testing.assert_allclose(s["mean"], np.mean(values), rtol=1e-15)
  if len(values) > 1:
    np.testing.assert_allclose(s["sd"], np.std(values, ddof=1), rtol=1e-12)
  else:
    assert math.isnan(s["sd"])


def test_summary_of_nothing_is_nan():
  s = S.summarize([])
  assert s["n"] == 0 and math.isnan(s["median"]) and math.isnan(s["mean"])


@pytest.mark.parametrize("a,b", [(0.5, 0.5), (2.0, 0.5), (0.75, 0.5), (50.0, 0.5),
                                 (3.3, 7.1), (400.0, 0.5)])
def test_regularized_beta_matches_scipy(a, b):
  for x in (1e-6, 0.01, 0.2, 0.5, 0.77, 0.95, 0.999999):
    np.testing.assert_allclose(S.regularized_beta(x, a, b), special.betainc(a, b, x),
                               rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("dof", [1.0, 1.37, 2.0, 2.9, 4.0, 7.5, 30.0, 1e3, 1e5])
def test_t_quantile_matches_scipy(dof):
  for p in (0.5, 0.6, 0.9, 0.975, 0.995, 0.025, 0.001):
    np.testing.assert_allclose(S.t_quantile(p, dof), stats.t.ppf(p, dof), rtol=1e-9,
                               atol=1e-12)
    np.testing.assert_allclose(S.t_sf(stats.t.ppf(p, dof), dof), 1 - p, rtol=1e-9,
                               atol=1e-14)


def test_t_quantile_rejects_bad_arguments():
  for p, dof in ((0.0, 3), (1.0, 3), (0.5, 0), (0.5, math.nan)):
    with pytest.raises(ValueError, match="0 < p < 1 and dof > 0"):
      S.t_quantile(p, dof)


@pytest.mark.parametrize("variant,baseline", [
    ([6.2, 6.5, 6.9], [6.6, 6.8, 7.4]),
    ([5.46, 5.61, 5.30, 5.52, 5.70], [5.93, 6.02, 5.88]),
    ([12.0, 14.5], [6.61, 6.65, 6.70, 6.50]),      # very unequal spreads: small ν
    ([27.1, 27.6, 27.3], [26.9, 27.2, 27.4]),       # BLEU
])
def test_welch_interval_matches_scipy(variant, baseline):
  ours = S.welch_interval(variant, baseline)
  ref = stats.ttest_ind(variant, baseline, equal_var=False)
  ci = ref.confidence_interval(0.95)
  np.testing.assert_allclose([ours["low"], ours["high"]], [ci.low, ci.high], rtol=1e-9)
  np.testing.assert_allclose(ours["difference"], np.mean(variant) - np.mean(baseline))
  np.testing.assert_allclose(ours["dof"], ref.df, rtol=1e-12)
  np.testing.assert_allclose(ours["half_width"], (ci.high - ci.low) / 2, rtol=1e-9)


def test_welch_interval_needs_two_seeds_each_and_handles_zero_spread():
  assert S.welch_interval([6.5], [6.6, 6.7]) is None
  assert S.welch_interval([6.5, 6.7], [6.6]) is None
  ci = S.welch_interval([7.0, 7.0], [6.0, 6.0])
  assert (ci["low"], ci["high"], ci["half_width"]) == (1.0, 1.0, 0.0)


def _scipy_half_width(n, sd_v, sd_b):
  """The Welch half-width with n seeds each and the given spreads, from scipy."""
  var = sd_v ** 2 / n + sd_b ** 2 / n
  dof = var ** 2 / ((sd_v ** 2 / n) ** 2 / (n - 1) + (sd_b ** 2 / n) ** 2 / (n - 1))
  return stats.t.ppf(0.975, dof) * math.sqrt(var)


@pytest.mark.parametrize("gap,sd_v,sd_b", [(0.24, 0.2, 0.16), (1.56, 0.2, 0.3),
                                           (0.1, 0.25, 0.25), (0.05, 0.3, 0.02)])
def test_seeds_to_resolve_is_the_first_n_below_the_gap(gap, sd_v, sd_b):
  n = S.seeds_to_resolve(gap, sd_v, sd_b)
  assert n is not None and n >= 2
  assert _scipy_half_width(n, sd_v, sd_b) < gap
  if n > 2:
    assert _scipy_half_width(n - 1, sd_v, sd_b) >= gap


def test_seeds_to_resolve_edge_cases():
  assert S.seeds_to_resolve(0.0, 0.2, 0.2) is None            # no gap to resolve
  assert S.seeds_to_resolve(0.001, 0.5, 0.5) is None          # beyond MAX_SEEDS
  assert S.seeds_to_resolve(0.3, 0.0, 0.0) == 2
  assert S.seeds_to_resolve(-0.24, 0.2, 0.16) == S.seeds_to_resolve(0.24, 0.2, 0.16)


def test_compare_marks_zero_and_unresolvable_gaps():
  # He 2016 Table 2: full_preact 6.37 vs original 6.61, gap −0.24, with seeds 0.3 apart.
  variant, baseline = [6.1, 6.4, 6.7], [6.4, 6.6, 7.0]
  c = S.compare(variant, baseline, 6.37 - 6.61)
  assert c["includes_zero"] is True and c["resolvable"] is False
  assert c["seeds_needed"] == S.seeds_to_resolve(-0.24, np.std(variant, ddof=1),
                                                 np.std(baseline, ddof=1))
  assert c["seeds_needed"] > 3
  # A large gap, tight seeds: resolved and excluding 0.
  c = S.compare([12.3, 12.4, 12.35], [6.6, 6.62, 6.58], 12.35 - 6.61)
  assert c["includes_zero"] is False and c["resolvable"] is True
  assert c["seeds_needed"] is None
  # No published gap: an interval, nothing to resolve.
  c = S.compare([5.0, 5.2], [6.0, 6.1], None)
  assert c["interval"] is not None and c["resolvable"] is None
  # One seed: no interval, nothing judged.
  c = S.compare([5.0], [6.0, 6.1], -1.0)
  assert c["interval"] is None and c["includes_zero"] is None and c["resolvable"] is None
