"""Figure: exactness of the synthetic world (sampler vs exact marginals; inference vs hmmlearn as T grows).

Drawn from the tidy rows that :func:`ftsim.app.reproduce.hmm_check_rows` writes (``hmm_checks.jsonl``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import stats

from figures import style


def draw(rows: list[dict], stem: str | Path) -> list[Path]:
    z = np.array([r["z"] for r in rows if r["kind"] == "z"])
    stab = sorted((r for r in rows if r["kind"] == "stability"), key=lambda r: r["length"])
    fig, (ax1, ax2) = style.figure(ncols=2, width=style.TEXT_WIDTH, height=2.3)

    # (a) z-scores of sampled frequencies: if the sampler is exact they are ~ N(0, 1).
    bins = np.linspace(-5, 5, 41)
    ax1.hist(z, bins=bins, density=True, color=style.color(0), alpha=0.6, label=f"{len(z)} cells (states, tokens)")
    grid = np.linspace(-5, 5, 200)
    ax1.plot(grid, stats.norm.pdf(grid), color=style.color(1), label="N(0, 1)")
    thr = stats.norm.isf(1e-3 / (2 * max(len(z), 1)))
    for s in (-thr, thr):
        ax1.axvline(s, color="0.4", ls="--", lw=0.8)
    ax1.set_xlabel("z = (count - N p) / sqrt(N p (1 - p))")
    ax1.set_ylabel("density")
    ax1.set_title("(a) sampler vs exact marginals (dashed: Bonferroni 1e-3)")
    ax1.legend(loc="upper left")

    # (b) agreement with hmmlearn as sequences grow.
    T = [r["length"] for r in stab]
    ax2.loglog(T, [max(r["loglik_rel_err"], 1e-17) for r in stab], "o-", label="rel. error of log P(x)")
    ax2.loglog(T, [max(r["posterior_max_abs_err"], 1e-17) for r in stab], "s-", label="max |posterior error|")
    ax2.loglog(T, [max(r["posterior_sum_err"], 1e-17) for r in stab], "^-", label="max |sum posterior - 1|")
    ax2.axhline(1e-10, color="0.4", ls="--", lw=0.8)
    ax2.set_xlabel("sequence length T")
    ax2.set_ylabel("error (float64; vs hmmlearn)")
    ax2.set_ylim(1e-17, 1e-8)
    ax2.set_title("(b) exact inference stays exact (dashed: 1e-10)")
    ax2.legend(loc="lower right")
    return style.save(fig, stem)
