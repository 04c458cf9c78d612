"""Figure: the transferability plot of Deng et al. (2024) in the HMM world (``ftsim run deng2024``).

Drawn from the run's tidy tables only: ``checkpoints.jsonl`` (one row per run, checkpoint, representation and head
norm B), ``transfer_fit.jsonl`` (the fitted (C_beta, beta) per representation) and ``world.jsonl``. One panel per
representation (the hidden state h, the output distribution q): x is the pretraining excess risk
E_pre = E KL(G || q) of each checkpoint, y the downstream excess squared risk. Points: the transfer term T_B(h) of
every checkpoint of every plain run (filled, one marker per width); the fine-tuned head's excess risk (hollow,
mean +- sample s.d. over seeds at each width and step); the bound with all its terms (grey crosses, mean over
seeds); the fitted curve C_beta E^beta (the envelope constant, solid) and the least-squares curve (dashed); on the
output panel the proven line E_pre / 2 (Pinsker, dotted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from figures import style
from ftsim.core.io import read_jsonl

__all__ = ["build_figure", "build", "redraw", "read_run", "log_axes", "STEM", "REP_TITLES"]

STEM = "deng2024_transfer"
REP_TITLES = {"hidden": "hidden state h (ln_f output / sqrt(d))", "output": "output distribution q"}


def read_run(run_dir: str | Path) -> dict[str, list[dict]]:
    """The tables of a deng2024 run directory that the figures use."""
    run_dir = Path(run_dir)
    return {name: read_jsonl(run_dir / f"{name}.jsonl") for name in ("checkpoints", "transfer_fit", "world", "radreg")
            if (run_dir / f"{name}.jsonl").exists()}


def log_axes(ax) -> None:
    """Log-log axes whose ticks sit at 1, 2, 5 x 10^k with plain labels (minor labels of a short decade collide)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_minor_formatter(NullFormatter())


def _group_mean(rows: Sequence[dict], key: str, by: tuple[str, ...]):
    """Per group of ``by``: (group, mean of pre_excess, mean of key, sample s.d. of key, n) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault(tuple(r[b] for b in by), []).append(r)
    out = []
    for g, sub in sorted(groups.items()):
        mean, sd, n = style.stats_of([[r[key] for r in sub]])
        ex, _, _ = style.stats_of([[r["pre_excess"] for r in sub]])
        out.append((g, float(ex[0]), float(mean[0]), float(sd[0]), int(n[0])))
    return out


def _panel(ax, rows: Sequence[dict], fit: dict | None, rep: str) -> list[int]:
    widths = sorted({r["d_model"] for r in rows})
    ns = []
    for i, d in enumerate(widths):
        sub = [r for r in rows if r["d_model"] == d]
        ax.scatter([r["pre_excess"] for r in sub], [r["transfer"] for r in sub], marker=style.MARKERS[i], s=12,
                   color=style.color(i), zorder=4, label=f"transfer term $T_B(h)$, d = {d}")
        g = _group_mean(sub, "excess_mean", ("step",))
        x, y, s = (np.array([v[k] for v in g]) for k in (1, 2, 3))
        ns += [v[4] for v in g]
        ax.errorbar(x, y, yerr=np.where(np.isfinite(s), s, 0.0), marker=style.MARKERS[i], ms=5, mfc="none",
                    mew=0.9, ls="none", capsize=1.5, color=style.color(i), zorder=3,
                    label=f"fine-tuned head, d = {d}")
    g = _group_mean(rows, "bound_mean", ("d_model", "step"))
    ax.scatter([v[1] for v in g], [v[2] for v in g], marker="x", s=10, color="0.55", zorder=2,
               label="bound, all terms (mean)")
    e = np.array([r["pre_excess"] for r in rows], float)
    xs = np.geomspace(e.min(), e.max(), 50)
    if fit is not None:
        ax.plot(xs, fit["pooled_c_envelope"] * xs ** fit["pooled_beta"], color="k", lw=1.0, zorder=5,
                label=rf"fit $C_\beta E^\beta$: $\beta$ = {fit['pooled_beta']:.2f}, $C_\beta$ = "
                      f"{fit['pooled_c_envelope']:.2g} (envelope)")
        ax.plot(xs, fit["pooled_c_ls"] * xs ** fit["pooled_beta"], color="k", lw=0.8, ls="--", zorder=5,
                label=f"least-squares curve ($C$ = {fit['pooled_c_ls']:.2g})")
        if rep == "output" and fit.get("theorem_c") is not None:
            ax.plot(xs, fit["theorem_c"] * xs ** fit["theorem_beta"], color=style.color(2), lw=1.0, ls=":",
                    zorder=5, label=r"proven: $E_{pre}/2$ (Pinsker, $\beta$ = 1)")
    log_axes(ax)
    ax.set_xlabel(r"pretraining excess risk $E_{pre}$ = E KL(G || q) (nats)")
    ax.set_ylabel("downstream excess squared risk")
    return ns


def build_figure(tables: dict[str, list[dict]]) -> Figure:
    """The two-panel transferability figure from the run's tables."""
    world = tables["world"][0]
    B = world["head_norm"]
    fits = {r["rep"]: r for r in tables.get("transfer_fit", [])}
    rows = [r for r in tables["checkpoints"] if r["radreg"] == 0 and r["head_norm"] == B]
    reps = [rep for rep in REP_TITLES if any(r["rep"] == rep for r in rows)]
    fig = style.new_figure(style.TEXT_WIDTH, 4.4)
    axes = fig.subplots(1, len(reps), squeeze=False)[0]
    for k, (ax, rep) in enumerate(zip(axes, reps)):
        ns = _panel(ax, [r for r in rows if r["rep"] == rep], fits.get(rep), rep)
        ax.set_title(f"({'ab'[k]}) {REP_TITLES[rep]}, B = {B:g}, n = {world['num_labelled']}")
        style.legend_below(ax, ncol=1, title="fine-tuned: " + style.spread_note(ns, "seed"))
    return style.finish(fig)


def build(run_dir: str | Path) -> Figure:
    """The transferability figure of a deng2024 run directory, not saved."""
    return build_figure(read_run(run_dir))


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/deng2024_transfer.{pdf,png}`` from the run's tables."""
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / STEM)
