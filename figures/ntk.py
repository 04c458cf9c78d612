"""Figure: wider MLPs approach kernel gradient flow (``ftsim run ntk-width``).

Drawn from the run's tidy tables only: ``results.jsonl`` (one row per hidden width w and seed) and
``predictions.jsonl`` (test outputs of the first seed). Means and sample standard deviations over seeds come from
:func:`ftsim.core.tables.summarize`. The hidden width is written w (n is the vocabulary elsewhere in ftsim).

Panels: (a) distance of the trained network to its kernel gradient-flow prediction, and to its linearisation
trained by the same GD, vs w; (b) relative movement of the eNTK during training vs w; (c) trained vs predicted
test outputs at the narrowest and the widest w. Reference slopes w^-1/2 and w^-1 are labelled on the lines, not
in the legend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from figures import style
from ftsim.core.io import read_jsonl

__all__ = ["build_figure", "build", "draw", "redraw", "STEM"]

STEM = "ntk_width"


def _by_width(rows: Sequence[dict], key: str):
    """(widths, mean, sample s.d., n) of ``key`` over seeds, per width."""
    widths = sorted({r["width"] for r in rows if r.get(key) is not None})
    mean, sd, n = style.stats_of([r.get(key) for r in rows if r["width"] == w] for w in widths)
    return np.array(widths, float), mean, sd, n


def _yerr(sd: np.ndarray) -> np.ndarray:
    return np.where(np.isfinite(sd), sd, 0.0)


def _slope_lines(ax, widths: np.ndarray, anchor: float) -> None:
    """Reference slopes through the first point: w^-1/2 (Lee et al. 2019's bound) and w^-1 (Dyer & Gur-Ari 2020's
    typical rate), labelled at their right end."""
    w = np.array([widths[0], widths[-1]], float)
    for power, ls, text in ((-0.5, ":", r"$\propto w^{-1/2}$"), (-1.0, "-.", r"$\propto w^{-1}$")):
        y = anchor * (w / w[0]) ** power
        ax.plot(w, y, color="0.5", ls=ls, lw=0.9, zorder=1)
        ax.annotate(text, (w[-1], y[-1]), xytext=(3, 0), textcoords="offset points", fontsize=6.5, color="0.3",
                    va="center", ha="left", annotation_clip=False)


def _width_axis(ax) -> None:
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("hidden width w")


def build_figure(rows: Sequence[dict], preds: Sequence[dict]) -> Figure:
    """The three-panel figure from the tidy rows (``results``) and the test predictions."""
    fig = style.new_figure(style.TEXT_WIDTH, 3.3)
    a, b, c = fig.subplots(1, 3)

    # (a) The first two distances coincide to a marker's width (the linearised net trained by GD follows the
    # kernel flow up to the discretisation error, the third series): a large hollow marker around a small filled
    # one keeps both visible, and the panel says by how much they differ.
    w, m, s, n_gf = _by_width(rows, "dist_gf_test")
    a.errorbar(w, m, yerr=_yerr(s), marker="o", ms=3.2, capsize=2, color=style.color(0), zorder=4,
               label="f = net, g = kernel gradient flow")
    w2, m2, s2, n_lin = _by_width(rows, "dist_lin_test")
    if len(w2):
        label = "f = net, g = linearised net (same GD)"
        if len(w2) == len(w) and np.all(w2 == w):
            label += f":\nwithin {100 * float(np.max(np.abs(m2 - m) / m)):.1f}% of the above at every w"
        a.errorbar(w2, m2, yerr=_yerr(s2), marker="s", ms=7.5, mfc="none", mew=1.0, ls="none", capsize=3.5,
                   color=style.color(1), zorder=3, label=label)
    w3, m3, s3, n_disc = _by_width(rows, "discretization_test")
    if len(w3):
        a.errorbar(w3, m3, yerr=_yerr(s3), ls="--", marker="^", ms=3.5, capsize=2, color=style.color(2),
                   label="f = linear model by GD, g = its gradient flow")
    _slope_lines(a, w, m[0])
    _width_axis(a)
    a.set_ylabel(r"$\|f_T - g_T\| \,/\, \|g_T - f_0\|$ on test inputs")
    a.set_title("(a) trained net vs kernel prediction")
    note = style.spread_note(list(n_gf) + list(n_lin) + list(n_disc), "seed")
    style.legend_below(a, title=note, ncol=1)

    # (b) kernel movement.
    w, m, s, n_k = _by_width(rows, "kernel_move")
    b.errorbar(w, m, yerr=_yerr(s), marker="o", capsize=2, color=style.color(0),
               label="eNTK on train + test inputs")
    _slope_lines(b, w, m[0])
    _width_axis(b)
    b.set_ylabel(r"$\|K_T - K_0\|_F \,/\, \|K_0\|_F$")
    b.set_title("(b) kernel movement during training")
    style.legend_below(b, title=style.spread_note(n_k, "seed"), ncol=1)

    # (c) per-output agreement at the extreme widths.
    if preds:
        widths = sorted({p["width"] for p in preds})
        lims = []
        shown = [widths[0], widths[-1]] if len(widths) > 1 else widths
        for i, wd in enumerate(shown):
            sub = [p for p in preds if p["width"] == wd]
            gf, net = np.array([p["gf"] for p in sub]), np.array([p["net"] for p in sub])
            kw = dict(facecolor="none", edgecolor=style.color(3), s=14, lw=0.8) if i == 0 else \
                dict(color=style.color(4), s=5)
            c.scatter(gf, net, marker=style.MARKERS[i], alpha=0.9, zorder=2 + i, label=f"w = {wd}", **kw)
            lims += [gf.min(), gf.max(), net.min(), net.max()]
        lo, hi = min(lims), max(lims)
        c.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--", zorder=1, label="y = x")
        c.set_title(f"(c) test outputs, seed {preds[0]['seed']}")
        style.legend_below(c, ncol=3, title=f"{len(preds) // max(len(widths), 1)} outputs per width")
    else:
        c.text(0.5, 0.5, "no predictions in this run", ha="center", va="center", transform=c.transAxes)
    c.set_xlabel("kernel gradient-flow prediction")
    c.set_ylabel("trained network output")
    if not preds:
        c.set_title("(c) test outputs")
    return style.finish(fig)


def _read(run_dir: Path) -> tuple[list[dict], list[dict]]:
    rows = read_jsonl(run_dir / "results.jsonl")
    preds_path = run_dir / "predictions.jsonl"
    return rows, (read_jsonl(preds_path) if preds_path.exists() else [])


def build(run_dir: str | Path) -> Figure:
    """The figure of an ntk-width run directory, not saved."""
    return build_figure(*_read(Path(run_dir)))


def draw(rows: list[dict], preds: list[dict], stem: str | Path) -> list[Path]:
    """Draw from rows and write ``stem.pdf`` / ``stem.png``."""
    return style.save(build_figure(rows, preds), stem)


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/ntk_width.{pdf,png}`` from the run's tables."""
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / STEM)
