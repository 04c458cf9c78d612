"""Figure: exactness of the synthetic world (sampler vs exact marginals; inference vs hmmlearn as T grows).

Drawn from the tidy rows of ``hmm_checks.jsonl`` (written by the ``hmm-exactness`` experiment):

* rows ``{"kind": "z", "variable": "state" | "token", "z"}``: one z-score per tested cell (position t, value v),
  z = (count - N p) / sqrt(N p (1 - p)) against the exact marginal p;
* rows ``{"kind": "stability", "length", "loglik_rel_err", "posterior_max_abs_err", "posterior_sum_err"}``.

Panels: (a) the z-scores of states and tokens against N(0, 1), each with its own two-sided Bonferroni threshold
(the number of cells differs, so the thresholds differ); (b) relative error of log P(x) against hmmlearn;
(c) absolute errors of the posterior probabilities: against hmmlearn, and |sum - 1| (no reference needed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy import stats

from figures import style
from ftsim.core.io import read_jsonl

__all__ = ["ALPHA", "bonferroni_threshold", "build_figure", "build", "draw", "redraw", "TABLE", "STEM"]

TABLE = "hmm_checks.jsonl"
STEM = "hmm_exactness"

# Family-wise level of the sampler check, per variable (simulate.verify's claims use 1e-3). The rows do not carry
# it; the figure states it.
ALPHA = 1e-3
# Tolerances of the long-sequence claim at T = 10^4 (simulate.verify), drawn as references.
TOL_LOGLIK_REL, TOL_POSTERIOR, TOL_SUM = 1e-10, 1e-8, 1e-10
FLOOR = 1e-17  # an exact 0 cannot be drawn on a log axis; it is drawn here and said so

_VARIABLES = (("state", "states", style.color(0), "--"), ("token", "tokens", style.color(1), "-."))


def bonferroni_threshold(num_cells: int, alpha: float = ALPHA) -> float:
    """|z| threshold with P(max over ``num_cells`` cells of |z| > threshold) <= alpha (two-sided, Bonferroni)."""
    return float(stats.norm.isf(alpha / (2 * max(num_cells, 1))))


def _floor(values) -> np.ndarray:
    return np.maximum(np.asarray(values, float), FLOOR)


def build_figure(rows: Sequence[dict]) -> Figure:
    """The three-panel figure from the rows of ``hmm_checks.jsonl``."""
    fig = style.new_figure(style.TEXT_WIDTH, 4.4)
    axes = fig.subplot_mosaic([["a", "a"], ["b", "c"]], gridspec_kw={"width_ratios": [1, 1.55]})
    a, b, c = axes["a"], axes["b"], axes["c"]

    # (a) z-scores of sampled frequencies: if the sampler is exact they are ~ N(0, 1).
    bins = np.linspace(-5, 5, 41)
    grid = np.linspace(-5, 5, 201)
    a.plot(grid, stats.norm.pdf(grid), color="k", lw=1.0, label="N(0, 1)")
    for var, plural, col, ls in _VARIABLES:
        z = np.array([r["z"] for r in rows if r["kind"] == "z" and r.get("variable", "state") == var], float)
        if not z.size:
            continue
        a.hist(z, bins=bins, density=True, histtype="step", color=col, lw=1.1,
               label=f"{plural}: {z.size} cells, max |z| = {np.abs(z).max():.2f}")
        thr = bonferroni_threshold(z.size)
        a.axvline(-thr, color=col, ls=ls, lw=0.9)
        a.axvline(thr, color=col, ls=ls, lw=0.9, label=f"threshold {thr:.2f} ({plural}, {z.size} cells)")
    a.set_xlim(-5, 5)
    a.set_xlabel(r"$z = (\mathrm{count} - Np)\,/\,\sqrt{Np(1-p)}$")
    a.set_ylabel("density")
    a.set_title("(a) sampler vs exact marginals")
    style.legend_right(a, title=f"Bonferroni, two-sided,\n$\\alpha$ = {ALPHA:g} per variable",
                       title_fontsize=6.5, fontsize=6.5)

    stab = sorted((r for r in rows if r["kind"] == "stability"), key=lambda r: r["length"])
    T = np.array([r["length"] for r in stab], float)

    # (b) log-likelihood against hmmlearn.
    b.loglog(T, _floor([r["loglik_rel_err"] for r in stab]), "o-", color=style.color(0))
    b.axhline(TOL_LOGLIK_REL, color="0.4", ls="--", lw=0.8)
    b.text(T[0] if T.size else 10, TOL_LOGLIK_REL * 2, f"check tolerance {TOL_LOGLIK_REL:g}", fontsize=6, color="0.3")
    b.set_ylim(FLOOR / 2, 1e-7)
    b.set_xlabel("sequence length T")
    b.set_ylabel(r"relative error of $\log P(x)$")
    b.set_title(r"(b) $\log P(x)$: ours vs hmmlearn")

    # (c) posterior probabilities: against hmmlearn, and normalisation (no reference).
    b_post = _floor([r["posterior_max_abs_err"] for r in stab])
    b_sum = _floor([r["posterior_sum_err"] for r in stab])
    c.loglog(T, b_post, "s-", color=style.color(2), label=r"$\max_{t,i} |p_{t,i} - p^{\rm hmmlearn}_{t,i}|$")
    c.loglog(T, b_sum, "^--", color=style.color(3), mfc="white",
             label=r"$\max_t |\sum_i p_{t,i} - 1|$ (no reference)")
    c.axhline(TOL_POSTERIOR, color=style.color(2), ls=":", lw=0.8, label=f"tolerance {TOL_POSTERIOR:g} (vs hmmlearn)")
    c.axhline(TOL_SUM, color=style.color(3), ls=":", lw=0.8, label=f"tolerance {TOL_SUM:g} (sum)")
    c.set_ylim(FLOOR / 2, 1e-7)
    c.set_xlabel("sequence length T")
    c.set_ylabel("absolute error of posteriors")
    c.set_title(r"(c) posteriors $p_{t,i} = P(H_t = i \mid x)$")
    style.legend_right(c, fontsize=6.5, title="float64", title_fontsize=6.5)
    if any(min(r["loglik_rel_err"], r["posterior_max_abs_err"], r["posterior_sum_err"]) < FLOOR for r in stab):
        fig.text(0.01, 0.0, f"errors below {FLOOR:g} (exact zeros) are drawn at {FLOOR:g}", fontsize=6,
                 color="0.3", va="bottom")
    return fig


def build(run_dir: str | Path) -> Figure:
    """The figure from ``<run_dir>/hmm_checks.jsonl``, not saved."""
    return build_figure(read_jsonl(Path(run_dir) / TABLE))


def draw(rows: Sequence[dict], stem: str | Path) -> list[Path]:
    """Draw from rows and write ``stem.pdf`` / ``stem.png``."""
    return style.save(build_figure(rows), stem)


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/hmm_exactness.{pdf,png}`` from ``<run_dir>/hmm_checks.jsonl``."""
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / STEM)
