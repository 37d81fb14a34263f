"""Student-t tests without scipy: the t CDF through the regularized incomplete beta function.

The challenge accepts a record when it beats the best by at least 0.005 nats at p < 0.01
(docs/techniques.md#record-significance); records report a one-sample one-sided t-test against
`baseline - margin` or a Welch two-sample test. Everything here is one-sided with the
alternative "the candidate is lower" (lower loss is better), which is the question a record asks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

_EPS = 3e-16
_TINY = 1e-300


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs)


def std(xs: Sequence[float]) -> float:
    """Sample standard deviation (ddof=1); 0.0 for a single value."""
    if len(xs) < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > _TINY else _TINY)
    h = d
    for m in range(1, 10_000):
        m2 = 2 * m
        # Even step of the fraction.
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        h *= d * c
        # Odd step.
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > _TINY else _TINY)
        c = 1.0 + aa / c
        c = c if abs(c) > _TINY else _TINY
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _EPS:
            return h
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"x={x} must lie in [0, 1]")
    if x in (0.0, 1.0):
        return x
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    front = math.exp(log_front)
    # The fraction converges fast for x < (a+1)/(a+b+2); otherwise use I_x(a,b) = 1 - I_{1-x}(b,a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` (possibly fractional) degrees of freedom."""
    if df <= 0:
        raise ValueError(f"degrees of freedom must be positive, got {df}")
    if math.isinf(t):
        return 1.0 if t > 0 else 0.0
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q-quantile of Student's t (bisection on the CDF; only used for power hints)."""
    lo, hi = -1e3, 1e3
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < q:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


@dataclass
class TTest:
    t: float
    df: float
    p: float  # one-sided, alternative: the candidate's mean is lower


def one_sample_less(xs: Sequence[float], mu: float) -> TTest:
    """One-sided one-sample t-test of H1: mean(xs) < mu."""
    n = len(xs)
    if n < 2:
        raise ValueError("a t-test needs at least 2 values")
    se = std(xs) / math.sqrt(n)
    diff = mean(xs) - mu
    t = diff / se if se > 0 else math.copysign(math.inf, diff) if diff else 0.0
    return TTest(t, n - 1, t_cdf(t, n - 1))


def welch_less(a: Sequence[float], b: Sequence[float]) -> TTest:
    """One-sided Welch t-test of H1: mean(a) < mean(b), with Welch-Satterthwaite df."""
    if len(a) < 2 or len(b) < 2:
        raise ValueError("Welch's t-test needs at least 2 values on each side")
    va, vb = std(a) ** 2 / len(a), std(b) ** 2 / len(b)
    se2 = va + vb
    diff = mean(a) - mean(b)
    if se2 == 0:
        t = math.copysign(math.inf, diff) if diff else 0.0
        df = float(len(a) + len(b) - 2)
    else:
        t = diff / math.sqrt(se2)
        df = se2**2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    return TTest(t, df, t_cdf(t, df))


def seeds_needed(delta: float, sd: float, alpha: float, max_n: int = 100) -> int | None:
    """Smallest n at which a one-sample one-sided test of a mean `delta` below the threshold, with
    per-seed spread `sd`, reaches p < alpha (None when delta >= 0 or more than max_n are needed)."""
    if delta >= 0:
        return None
    if sd == 0:
        return 2
    for n in range(2, max_n + 1):
        if -delta / (sd / math.sqrt(n)) > t_ppf(1.0 - alpha, n - 1):
            return n
    return None
