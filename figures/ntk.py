"""Figure: wider MLPs approach kernel gradient flow (``ftsim run ntk-width``).

Drawn from the run's tidy tables only: ``results.jsonl`` (one row per width and seed) and ``predictions.jsonl``
(test outputs of the first seed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from figures import style
from ftsim.core.io import read_jsonl

__all__ = ["draw", "redraw"]


def _by_width(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    widths = np.array(sorted({r["width"] for r in rows}))
    mean, std = [], []
    for w in widths:
        vals = np.array([r[key] for r in rows if r["width"] == w and key in r], float)
        mean.append(vals.mean())
        std.append(vals.std(ddof=1) if len(vals) > 1 else 0.0)
    return widths, np.array(mean), np.array(std)


def _slope_lines(ax, widths, anchor):
    """Reference slopes: n^{-1/2} (the Lee et al. 2019 bound) and n^{-1} (Dyer & Gur-Ari 2020's typical rate)."""
    w = np.array([widths[0], widths[-1]], float)
    ax.plot(w, anchor * (w / w[0]) ** -0.5, color="0.45", ls=":", lw=1, label=r"$\propto n^{-1/2}$")
    ax.plot(w, anchor * (w / w[0]) ** -1.0, color="0.65", ls="-.", lw=1, label=r"$\propto n^{-1}$")


def draw(rows: list[dict], preds: list[dict], stem: str | Path) -> list[Path]:
    """Three panels: (a) distance to kernel gradient flow vs width, (b) kernel movement vs width, (c) trained vs
    predicted test outputs at the narrowest and widest width."""
    fig, (a, b, c) = style.figure(ncols=3, width=style.TEXT_WIDTH, height=2.35)
    seeds = len({r["seed"] for r in rows})

    w, m, s = _by_width(rows, "dist_gf_test")
    a.errorbar(w, m, yerr=s, marker="o", capsize=2, color=style.color(0), label="net vs kernel gradient flow")
    w2, m2, s2 = _by_width(rows, "dist_lin_test")
    a.errorbar(w2, m2, yerr=s2, marker="s", mfc="none", ls="--", capsize=2, color=style.color(1),
               label="net vs linearised net (same GD)")
    w3, m3, _ = _by_width(rows, "discretization_test")
    a.plot(w3, m3, ls="--", marker="^", ms=3, color=style.color(2), label="GD vs flow, linear model")
    _slope_lines(a, w, m[0])
    a.set_xscale("log", base=2)
    a.set_yscale("log")
    a.set_xlabel("hidden width n")
    a.set_ylabel(r"$\|f_T - f^{\rm pred}_T\| \,/\, \|f^{\rm pred}_T - f_0\|$ (test)")
    a.set_title("(a) trained net vs kernel prediction")
    a.legend(loc="lower left", bbox_to_anchor=(0.0, 0.14), fontsize=5.5, title=f"mean $\\pm$ sd, {seeds} seeds",
             title_fontsize=5.5)

    w, m, s = _by_width(rows, "kernel_move")
    b.errorbar(w, m, yerr=s, marker="o", capsize=2, color=style.color(0), label="eNTK on train+test")
    _slope_lines(b, w, m[0])
    b.set_xscale("log", base=2)
    b.set_yscale("log")
    b.set_xlabel("hidden width n")
    b.set_ylabel(r"$\|K_T - K_0\|_F \,/\, \|K_0\|_F$")
    b.set_title("(b) kernel movement during training")
    b.legend(loc="lower left", fontsize=5.5)

    if preds:
        widths = sorted({p["width"] for p in preds})
        lims = []
        for i, wd in enumerate([widths[0], widths[-1]] if len(widths) > 1 else widths):
            sub = [p for p in preds if p["width"] == wd]
            gf, net = np.array([p["gf"] for p in sub]), np.array([p["net"] for p in sub])
            c.scatter(gf, net, s=6, alpha=0.7, color=style.color(3 + i), marker=style.MARKERS[i],
                      label=f"n = {wd}")
            lims += [gf.min(), gf.max(), net.min(), net.max()]
        lo, hi = min(lims), max(lims)
        c.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, ls="--", label="y = x")
        c.set_xlabel("kernel gradient-flow prediction")
        c.set_ylabel("trained network output")
        c.set_title(f"(c) test outputs, seed {preds[0]['seed']}")
        c.legend(loc="upper left", fontsize=6)
    return style.save(fig, stem)


def redraw(run_dir: Path) -> list[Path]:
    """Redraw ``<run_dir>/ntk_width.{pdf,png}`` from the run's tables."""
    run_dir = Path(run_dir)
    rows = read_jsonl(run_dir / "results.jsonl")
    preds_path = run_dir / "predictions.jsonl"
    preds = read_jsonl(preds_path) if preds_path.exists() else []
    return draw(rows, preds, run_dir / "ntk_width")
