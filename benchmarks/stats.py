"""The reproduction's statistics, without SciPy: Kendall's tau-b, the paired t-test and the exact
Wilcoxon signed-rank test (two-sided p-values)."""
from __future__ import annotations

import itertools
import math
import statistics


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b of two equally long score lists."""
    concordant = discordant = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                concordant += 1
            else:
                discordant += 1
    n = concordant + discordant
    return (concordant - discordant) / (((n + ties_a) * (n + ties_b)) ** 0.5 or 1)


def paired_t_p(differences: list[float]) -> float:
    """Two-sided p-value of the paired t-test that the mean of ``differences`` is 0."""
    n = len(differences)
    if n < 2:
        raise ValueError(f"a paired t-test needs at least 2 pairs, got {n}")
    sd = statistics.stdev(differences)
    if sd == 0:
        return 0.0 if statistics.mean(differences) else 1.0
    t = statistics.mean(differences) / (sd / math.sqrt(n))
    df = n - 1
    return _incomplete_beta(df / (df + t * t), df / 2, 0.5)


def wilcoxon_p(differences: list[float]) -> float:
    """Exact two-sided p-value of the Wilcoxon signed-rank test (zero differences dropped, tied
    magnitudes given their average rank): every assignment of signs to the ranks, counted."""
    d = [x for x in differences if x != 0]
    if not d:
        return 1.0
    if len(d) > 20:
        raise ValueError(f"the exact test enumerates 2**n sign assignments; {len(d)} pairs is too many")
    ranks = _average_ranks([abs(x) for x in d])
    observed = sum(r for r, x in zip(ranks, d) if x > 0)
    centre = sum(ranks) / 2
    extreme = abs(observed - centre) - 1e-9
    hits = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - centre) >= extreme
               for signs in itertools.product((False, True), repeat=len(d)))
    return hits / 2 ** len(d)


def _average_ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularized incomplete beta function I_x(a, b), by its continued fraction."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-14:
            break
    return front * result / a
