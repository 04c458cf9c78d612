"""One way to aggregate and print results: every table and figure of ftsim summarises repeated measurements
(seeds, HMMs, tasks) with :func:`summarize` / :func:`aggregate` and prints them with :func:`mean_std`.

Conventions (said in every caption that uses them):

* ``std`` is the **sample** standard deviation (ddof = 1) over the n repetitions; it is NaN for n = 1 (one
  evaluation has no spread, and printing "+-0.0" would claim one).
* ``ci_low`` / ``ci_high`` bound a two-sided 95% Student-t confidence interval for the mean (NaN for n = 1).
* Paired comparisons (method A vs B on the same seeds) use :func:`paired_difference`: the CI of the mean of the
  per-pair differences, which is what supports a statement "A beats B".
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Stats", "summarize", "aggregate", "paired_difference", "mean_std", "markdown_table"]


@dataclasses.dataclass(frozen=True)
class Stats:
    """Summary of n finite values: mean, sample std, standard error and a 95% t interval for the mean."""

    mean: float
    std: float
    n: int
    sem: float
    ci_low: float
    ci_high: float

    def row(self, prefix: str = "") -> dict[str, float | int]:
        return {f"{prefix}{k}": v for k, v in dataclasses.asdict(self).items()}

    @property
    def excludes_zero(self) -> bool:
        """True when the 95% interval lies strictly on one side of 0."""
        return self.n > 1 and (self.ci_low > 0 or self.ci_high < 0)


def _t_quantile(df: int, level: float = 0.975) -> float:
    from scipy import stats

    return float(stats.t.ppf(level, df))


def summarize(values: Iterable[Any]) -> Stats:
    """Stats of the finite numbers in ``values`` (None, NaN and infinities are dropped)."""
    v = []
    for x in values:
        if x is None:
            continue
        x = float(x)
        if math.isfinite(x):
            v.append(x)
    n = len(v)
    nan = float("nan")
    if n == 0:
        return Stats(nan, nan, 0, nan, nan, nan)
    mean = math.fsum(v) / n
    if n == 1:
        return Stats(mean, nan, 1, nan, nan, nan)
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in v) / (n - 1))
    sem = std / math.sqrt(n)
    half = _t_quantile(n - 1) * sem
    return Stats(mean, std, n, sem, mean - half, mean + half)


def aggregate(rows: Iterable[Mapping[str, Any]], by: Sequence[str], value: str = "value") -> list[dict]:
    """Group ``rows`` by the columns ``by`` and summarise ``value``: one dict per group with the ``by`` columns and
    mean, std, n, sem, ci_low, ci_high, in order of first appearance."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in by), []).append(r.get(value))
    return [{**dict(zip(by, key)), **summarize(vals).row()} for key, vals in groups.items()]


def paired_difference(rows: Iterable[Mapping[str, Any]], column: str, a: Any, b: Any, pair_by: Sequence[str],
                      value: str = "value") -> Stats:
    """Stats of value(a) - value(b) over the pairs of rows that agree on ``pair_by`` (e.g. seed, HMM, task) and
    have ``column`` equal to ``a`` and ``b`` respectively. Pairs where either side is missing are dropped."""
    left: dict[tuple, float] = {}
    right: dict[tuple, float] = {}
    for r in rows:
        key = tuple(r.get(k) for k in pair_by)
        if r.get(column) == a:
            left[key] = r.get(value)
        elif r.get(column) == b:
            right[key] = r.get(value)
    diffs = [float(left[k]) - float(right[k]) for k in left if k in right
             and left[k] is not None and right[k] is not None]
    return summarize(diffs)


def mean_std(stats: Stats | Mapping[str, Any], scale: float = 1.0, digits: int = 1) -> str:
    """``"mean (std)"`` with ``scale`` applied, or just ``"mean"`` for one value, ``""`` for none."""
    if isinstance(stats, Stats):
        mean, std, n = stats.mean, stats.std, stats.n
    else:
        mean, std, n = stats.get("mean"), stats.get("std"), stats.get("n", 0)
    if not n or mean is None or not math.isfinite(float(mean)):
        return ""
    text = f"{scale * float(mean):.{digits}f}"
    if n > 1 and std is not None and math.isfinite(float(std)):
        text += f" ({scale * float(std):.{digits}f})"
    return text


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (cells converted with ``str``; ``|`` escaped)."""
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
