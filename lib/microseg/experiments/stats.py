"""The statistics of an experiment analysis, on per-variant sufficient statistics (counts and
sums that Spark aggregates): two-proportion z-test, chi-square tests, lift with confidence
intervals, Welch's t-test, CUPED, a sample ratio mismatch check, Thompson-sampling weights and
the sample size per variant. Plain Python and scipy's distributions; no Spark."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Moments:
    """Per variant: n users; outcome y (conversion 0/1 or revenue); pre-period covariate x."""

    n: int
    sum_y: float
    sum_y2: float
    sum_x: float = 0.0
    sum_x2: float = 0.0
    sum_xy: float = 0.0

    @property
    def mean(self) -> float:
        return self.sum_y / self.n if self.n else math.nan

    @property
    def var(self) -> float:
        """Sample variance of y (n - 1 in the denominator)."""
        if self.n < 2:
            return math.nan
        return max(self.sum_y2 - self.sum_y**2 / self.n, 0.0) / (self.n - 1)


@dataclass(frozen=True)
class ZTest:
    diff: float
    diff_ci: tuple[float, float]
    lift: float
    lift_ci: tuple[float, float]
    z: float
    p_value: float


def _z(alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2))


def two_proportion_ztest(
    conv_c: int, n_c: int, conv_t: int, n_t: int, *, alpha: float = 0.05
) -> ZTest:
    """Treatment vs control. z and p from the pooled proportion (the textbook test); the
    difference's interval from the unpooled standard error; the relative lift's interval
    by the delta method on p_t / p_c (its lower end cut at -100%)."""
    p_c, p_t = conv_c / n_c, conv_t / n_t
    pooled = (conv_c + conv_t) / (n_c + n_t)
    se_pooled = math.sqrt(pooled * (1 - pooled) * (1 / n_c + 1 / n_t))
    z = (p_t - p_c) / se_pooled if se_pooled > 0 else math.nan
    p_value = 2 * float(stats.norm.sf(abs(z))) if se_pooled > 0 else math.nan
    q = _z(alpha)
    var_c, var_t = p_c * (1 - p_c) / n_c, p_t * (1 - p_t) / n_t
    diff = p_t - p_c
    se = math.sqrt(var_c + var_t)
    if p_c > 0:
        lift = p_t / p_c - 1
        se_lift = math.sqrt(var_t / p_c**2 + p_t**2 * var_c / p_c**4)
        # a rate cannot fall below 0, so the lift not below -100%
        lift_ci = (max(lift - q * se_lift, -1.0), lift + q * se_lift)
    else:
        lift, lift_ci = math.nan, (math.nan, math.nan)
    return ZTest(diff, (diff - q * se, diff + q * se), lift, lift_ci, z, p_value)


def chi_square_independence(table: Sequence[Sequence[int]]) -> tuple[float, float]:
    """Pearson's chi-square test of a contingency table (rows: variants; columns: converted,
    not converted), without continuity correction: (statistic, p-value)."""
    observed = np.asarray(table, dtype=float)
    if observed.shape[0] < 2 or (observed.sum(axis=0) == 0).any():
        return math.nan, math.nan
    result = stats.chi2_contingency(observed, correction=False)
    return float(result.statistic), float(result.pvalue)


def sample_ratio_mismatch(observed: Sequence[int], expected_shares: Sequence[float]) -> float:
    """Chi-square goodness of fit of assigned counts to the shares the weights expect: p."""
    total = sum(observed)
    shares = np.asarray(expected_shares, dtype=float)
    if total == 0 or len(observed) < 2:
        return math.nan
    expected = shares / shares.sum() * total
    return float(stats.chisquare(np.asarray(observed, dtype=float), expected).pvalue)


@dataclass(frozen=True)
class MeanTest:
    diff: float
    ci: tuple[float, float]
    p_value: float


def welch(control: Moments, treatment: Moments, *, alpha: float = 0.05) -> MeanTest:
    """Welch's t-test of treatment minus control means."""
    return _welch(
        control.mean, control.var, control.n, treatment.mean, treatment.var, treatment.n, alpha
    )


def _welch(m_c, v_c, n_c, m_t, v_t, n_t, alpha) -> MeanTest:
    diff = m_t - m_c
    if n_c < 2 or n_t < 2:
        return MeanTest(diff, (math.nan, math.nan), math.nan)
    a, b = v_c / n_c, v_t / n_t
    se = math.sqrt(a + b)
    if se == 0:
        return MeanTest(diff, (diff, diff), math.nan if diff == 0 else 0.0)
    dof = (a + b) ** 2 / (a**2 / (n_c - 1) + b**2 / (n_t - 1))
    q = float(stats.t.ppf(1 - alpha / 2, dof))
    p_value = 2 * float(stats.t.sf(abs(diff / se), dof))
    return MeanTest(diff, (diff - q * se, diff + q * se), p_value)


@dataclass(frozen=True)
class Cuped:
    theta: float
    test: MeanTest
    variance_reduction: float


def cuped(control: Moments, treatment: Moments, *, alpha: float = 0.05) -> Cuped:
    """CUPED: y' = y - theta (x - mean x), theta = cov(x, y) / var(x) over both groups
    together; then Welch's test on y'. The adjusted means and variances follow from the
    moments: mean' = mean_y - theta (mean_x - grand mean_x); var' = var_y - 2 theta cov_xy
    + theta^2 var_x within each group."""
    n = control.n + treatment.n
    sx = control.sum_x + treatment.sum_x
    sy = control.sum_y + treatment.sum_y
    sxx = control.sum_x2 + treatment.sum_x2
    sxy = control.sum_xy + treatment.sum_xy
    var_x = (sxx - sx * sx / n) / (n - 1) if n > 1 else 0.0
    cov = (sxy - sx * sy / n) / (n - 1) if n > 1 else 0.0
    theta = cov / var_x if var_x > 0 else 0.0
    grand_x = sx / n if n else 0.0

    def adjusted(g: Moments) -> tuple[float, float]:
        if g.n < 2:
            return math.nan, math.nan
        mx = g.sum_x / g.n
        vx = (g.sum_x2 - g.sum_x**2 / g.n) / (g.n - 1)
        cxy = (g.sum_xy - g.sum_x * g.sum_y / g.n) / (g.n - 1)
        return g.mean - theta * (mx - grand_x), max(g.var - 2 * theta * cxy + theta**2 * vx, 0.0)

    m_c, v_c = adjusted(control)
    m_t, v_t = adjusted(treatment)
    test = _welch(m_c, v_c, control.n, m_t, v_t, treatment.n, alpha)
    raw = (
        control.var / control.n + treatment.var / treatment.n
        if min(control.n, treatment.n) > 1
        else math.nan
    )
    new = v_c / control.n + v_t / treatment.n if min(control.n, treatment.n) > 1 else math.nan
    reduction = 1 - new / raw if raw and raw > 0 else math.nan
    return Cuped(theta, test, reduction)


def sample_size_per_variant(
    baseline: float, mde: float, *, alpha: float = 0.05, power: float = 0.8, relative: bool = True
) -> int:
    """Users per variant to detect a change of the conversion rate from `baseline` by `mde`
    (relative by default: 0.1 is +10%) with a two-sided two-proportion z-test."""
    p1 = baseline
    p2 = baseline * (1 + mde) if relative else baseline + mde
    if not (0 < p1 < 1 and 0 < p2 < 1) or p1 == p2:
        raise ValueError(f"baseline {p1} and target {p2} must be distinct rates in (0, 1)")
    p_bar = (p1 + p2) / 2
    z_a = _z(alpha)
    z_b = float(stats.norm.ppf(power))
    root = z_a * math.sqrt(2 * p_bar * (1 - p_bar)) + z_b * math.sqrt(p1 * (1 - p1) + p2 * (1 - p2))
    return math.ceil(root**2 / (p2 - p1) ** 2)


def thompson_weights(
    exposed: Sequence[int],
    conversions: Sequence[int],
    *,
    floor: float,
    draws: int,
    seed: int,
) -> tuple[list[float], list[float]]:
    """Thompson sampling allocation: P(variant is best) under Beta(1 + conversions,
    1 + exposed - conversions) posteriors, estimated from `draws` joint draws (a fixed seed:
    the same counts give the same weights), then mixed with a floor: weight = floor + (1 -
    k floor) P(best). Returns (weights, P(best))."""
    k = len(exposed)
    if k * floor > 1:
        raise ValueError(f"a floor of {floor} for {k} variants exceeds 1")
    rng = np.random.default_rng(seed)
    alpha = 1 + np.asarray(conversions, dtype=float)
    beta = 1 + np.asarray(exposed, dtype=float) - np.asarray(conversions, dtype=float)
    samples = rng.beta(alpha[:, None], beta[:, None], size=(k, draws))
    wins = np.bincount(samples.argmax(axis=0), minlength=k)
    p_best = wins / draws
    weights = floor + (1 - k * floor) * p_best
    return [float(w) for w in weights], [float(p) for p in p_best]
