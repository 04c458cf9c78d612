"""Figure: LP-FT through the NTK (``ftsim run lpft-synthetic`` and ``ftsim run lpft``).

Drawn from the run's tidy tables only (means and sample standard deviations from
:func:`ftsim.core.tables.summarize`):

* (a) head norm ||V||_F against linear-probing GD steps, cross-entropy vs squared loss (``head_norm_curves``), with
  the squared loss's limit ||V_LS|| (its bound);
* (b) feature change ||phi_FT(x) - phi_0(x)|| on ID test inputs against the head norm at the start of FT: the
  initial-head-scale sweep (``head_scale_sweep``) where the run has one, else one point per method (``results``);
* (c) reliability diagram of LP-FT on ID test inputs before and after temperature scaling (``reliability``; bins
  pooled over seeds), with the ECE of the pooled bins (not the mean of the per-seed ECEs in the tables);
* (d) ID and OOD accuracy per method, bars with the sample s.d. over seeds (``results``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from figures import style
from ftsim.core.io import read_jsonl

__all__ = ["build", "build_figure", "redraw", "STEM", "METHODS"]

STEM = "lpft"
METHODS = ("LP", "FT", "LP-FT", "LoRA-FT", "LP-LoRA-FT")


def _read(run_dir: Path, name: str) -> list[dict]:
    path = run_dir / f"{name}.jsonl"
    return read_jsonl(path) if path.exists() else []


def _yerr(sd) -> np.ndarray:
    sd = np.asarray(sd, float)
    return np.where(np.isfinite(sd), sd, 0.0)


def _panel_curves(ax, curves: Sequence[dict]) -> None:
    ax.set_title("(a) head norm during linear probing")
    ax.set_xlabel("GD steps of LP")
    ax.set_ylabel(r"head norm $\|V\|_F$")
    if not curves:
        ax.text(0.5, 0.5, "no LP curves in this run", ha="center", va="center", transform=ax.transAxes)
        return
    ns = []
    for i, (loss, label) in enumerate((("ce", "cross-entropy"), ("mse", "squared loss"))):
        sub = [r for r in curves if r["objective"] == loss and r["step"] > 0]
        steps = sorted({r["step"] for r in sub})
        m, s, n = style.stats_of([r["head_norm"] for r in sub if r["step"] == t] for t in steps)
        ns += list(n)
        ax.plot(steps, m, color=style.color(i), marker=style.MARKERS[i], markevery=max(1, len(steps) // 8),
                label=label)
        ax.fill_between(steps, m - _yerr(s), m + _yerr(s), color=style.color(i), alpha=0.2, lw=0)
    ls = style.stats_of([[r["ls_head_norm"] for r in curves if r["objective"] == "mse" and r["step"] == 0]])[0][0]
    top = max(r["head_norm"] for r in curves)
    if ls <= 3 * top:
        ax.axhline(ls, color="0.4", ls="--", lw=0.9, label=r"$\|V_{LS}\|$ (squared-loss limit)")
    else:  # ill-conditioned features: the bound holds but is far off the plotted range
        ax.plot([], [], color="0.4", ls="--", lw=0.9, label=rf"$\|V_{{LS}}\|$ = {ls:.3g} (limit, off scale)")
    ax.set_xscale("log")
    style.legend_below(ax, ncol=2, title=style.spread_note(ns, "seed"))


def _panel_feature_change(ax, sweep: Sequence[dict], results: Sequence[dict]) -> None:
    ax.set_title("(b) feature change vs initial head norm")
    ax.set_xlabel(r"head norm at the start of FT $\|V_0\|_F$")
    ax.set_ylabel(r"mean $\|\phi_{FT}(x) - \phi_0(x)\|$ (ID test)")
    ns = []
    if sweep:
        # One line per seed and optimizer: the probe (and so every head norm) differs between seeds by orders of
        # magnitude, so a mean over seeds at fixed s would average incomparable x values.
        series = sorted({(r.get("optimizer", ""), r["seed"]) for r in sweep})
        opts = sorted({o for o, _ in series})
        for i, (opt, seed) in enumerate(series):
            sub = sorted((r for r in sweep if r.get("optimizer", "") == opt and r["seed"] == seed),
                         key=lambda r: r["head_norm_start"])
            ns.append(1)
            ax.plot([r["head_norm_start"] for r in sub], [r["feature_change"] for r in sub],
                    marker=style.MARKERS[i % len(style.MARKERS)], color=style.color(opts.index(opt)),
                    ls="-" if opts.index(opt) == 0 else "--", alpha=0.9,
                    label=f"{opt or 'FT'}, seed {seed}")
            zero = [r for r in sub if r["start"] == "zero head"]
            if zero:
                ax.annotate("zero head", (0, zero[0]["feature_change"]), xytext=(3, 3), textcoords="offset points",
                            fontsize=6, color="0.3")
    else:
        for i, method in enumerate(m for m in METHODS if m != "LP"):
            x = [r["value"] for r in results if r["method"] == method and r["metric"] == "head_norm_start"]
            y = [r["value"] for r in results if r["method"] == method and r["metric"] == "feature_change_test"]
            if not x:
                continue
            (xm,), (xs,), _ = style.stats_of([x])
            (ym,), (ys,), (n,) = style.stats_of([y])
            ns.append(n)
            ax.errorbar([xm], [ym], xerr=_yerr([xs]), yerr=_yerr([ys]), marker=style.MARKERS[i], capsize=2, ls="none",
                        color=style.color(i), label=method)
    if not ns:
        ax.text(0.5, 0.5, "no feature changes in this run", ha="center", va="center", transform=ax.transAxes)
        return
    ax.set_xscale("symlog", linthresh=0.1)
    xs = [ln.get_xdata() for ln in ax.get_lines()] + [c.get_offsets()[:, 0] for c in ax.collections
                                                       if hasattr(c, "get_offsets") and len(c.get_offsets())]
    top = max([float(np.nanmax(v)) for v in xs if len(v)] + [0.1])
    ax.set_xlim(0, 2.0 * top)  # room for the right-most marker on the symlog axis
    title = ("FT from a zero, a random and the LP head x s: one line per seed (no spread)" if sweep
             else style.spread_note(ns, "seed"))
    style.legend_below(ax, ncol=2, title=title)


def _pooled_bins(rows: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Per bin (lo, hi]: pooled count, confidence and accuracy; and the pooled ECE."""
    bins = sorted({(r["lo"], r["hi"]) for r in rows})
    conf, acc, count = [], [], []
    for lo, hi in bins:
        sub = [r for r in rows if r["lo"] == lo and r["hi"] == hi and r["count"]]
        c = sum(r["count"] for r in sub)
        count.append(c)
        conf.append(sum(r["count"] * r["confidence"] for r in sub) / c if c else np.nan)
        acc.append(sum(r["count"] * r["accuracy"] for r in sub) / c if c else np.nan)
    conf, acc, count = np.array(conf), np.array(acc), np.array(count, float)
    total = count.sum()
    ece = float(np.nansum(count / total * np.abs(acc - conf))) if total else float("nan")
    return conf, acc, count, ece


def _panel_reliability(ax, rel: Sequence[dict], method: str = "LP-FT") -> None:
    ax.set_title(f"(c) reliability of {method} (ID test)")
    ax.set_xlabel("confidence (top label), 15 equal-width bins")
    ax.set_ylabel("accuracy in bin")
    sub = [r for r in rel if r["method"] == method]
    if not sub:
        ax.text(0.5, 0.5, f"no {method} reliability table", ha="center", va="center", transform=ax.transAxes)
        return
    seeds = len({r["seed"] for r in sub})
    lo = min(r["lo"] for r in sub if r["count"]) if any(r["count"] for r in sub) else 0.0
    ax.plot([0, 1], [0, 1], color="0.5", ls="--", lw=0.8, label="perfect calibration")
    for i, cal in enumerate(("before TS", "after TS")):
        conf, acc, count, ece = _pooled_bins([r for r in sub if r["calibration"] == cal])
        keep = count > 0
        ax.plot(conf[keep], acc[keep], marker=style.MARKERS[i], color=style.color(i + 1),
                mfc="none" if i else None, label=f"{cal}: pooled ECE {100 * ece:.1f}%")
    ax.set_xlim(max(0.0, min(0.5, lo)), 1.0)
    ax.set_ylim(0.0, 1.02)
    style.legend_below(ax, ncol=2, title=f"bins pooled over {seeds} seed{'s' if seeds != 1 else ''}: no spread")


def _panel_bars(ax, results: Sequence[dict]) -> None:
    ax.set_title("(d) accuracy in and out of distribution")
    ax.set_ylabel("test accuracy %")
    ax.set_xlabel("method")
    methods = [m for m in METHODS if any(r["method"] == m and r["metric"] == "id_acc" for r in results)]
    ns = []
    width = 0.38
    x = np.arange(len(methods))
    for j, (metric, label) in enumerate((("id_acc", "ID"), ("ood_acc", "OOD"))):
        m, s, n = style.stats_of(([r["value"] for r in results if r["method"] == meth and r["metric"] == metric]
                                  for meth in methods), scale=100)
        if not np.any(n):
            continue
        ns += list(n)
        spread = _yerr(s) if np.any(np.isfinite(s)) else None  # no error bar at all for single values
        ax.bar(x + (j - 0.5) * width, m, width, yerr=spread, capsize=2, color=style.color(j + 3), label=label)
    bayes = [r["value"] for r in results if r["method"] == "Bayes" and r["metric"] == "id_acc"]
    if bayes:
        ax.axhline(100 * float(np.mean(bayes)), color="0.3", ls=":", lw=0.9, label="Bayes (exact)")
    ax.set_xticks(x, methods, rotation=20)
    ax.set_ylim(0.0, 105.0)  # bars start at 0 (a truncated axis would exaggerate differences)
    style.legend_below(ax, ncol=3, title=style.spread_note(ns, "seed"))


def build_figure(curves, sweep, rel, results) -> Figure:
    fig = style.new_figure(style.TEXT_WIDTH, 6.4)
    (a, b), (c, d) = fig.subplots(2, 2)
    _panel_curves(a, curves)
    _panel_feature_change(b, sweep, results)
    _panel_reliability(c, rel)
    _panel_bars(d, results)
    return style.finish(fig)


def build(run_dir: str | Path) -> Figure:
    """The figure of an lpft / lpft-synthetic run directory, not saved."""
    run_dir = Path(run_dir)
    return build_figure(_read(run_dir, "head_norm_curves"), _read(run_dir, "head_scale_sweep"),
                        _read(run_dir, "reliability"), _read(run_dir, "results"))


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/lpft.{pdf,png}`` from the run's tables."""
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / STEM)
