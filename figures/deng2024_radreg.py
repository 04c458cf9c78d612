"""Figure: RadReg against plain masked-LM pretraining at equal steps (``ftsim run deng2024``, D2).

Drawn from ``checkpoints.jsonl`` and ``world.jsonl`` only, at the final checkpoint, for the hidden representation
(the h RadReg regularises) at the widths that have RadReg runs: (a) the representation-induced Rademacher term on
the labelled inputs at B = head_norm, (b) the fine-tuned head's downstream excess squared risk at each head norm B,
(c) the pretraining excess risk E_pre; each against the RadReg weight lambda (0 = plain MLM), mean +- sample s.d.
over seeds (the same seeds at every lambda).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from figures import style
from figures.deng2024 import read_run

__all__ = ["build_figure", "build", "redraw", "STEM"]

STEM = "deng2024_radreg"


def _series(rows, lams, key):
    return style.stats_of([[r[key] for r in rows if r["radreg"] == lam] for lam in lams])


def build_figure(tables: dict[str, list[dict]]) -> Figure:
    world = tables["world"][0]
    B0 = world["head_norm"]
    final = [r for r in tables["checkpoints"] if r["step"] == world["steps"] and r["rep"] == "hidden"]
    widths = sorted({r["d_model"] for r in final if r["radreg"] > 0})
    final = [r for r in final if r["d_model"] in widths]
    lams = sorted({r["radreg"] for r in final})
    x = np.arange(len(lams), dtype=float)
    fig = style.new_figure(style.TEXT_WIDTH, 3.0)
    a, b, c = fig.subplots(1, 3)
    ns = []
    for i, d in enumerate(widths):
        at = [r for r in final if r["d_model"] == d and r["head_norm"] == B0]
        m, s, n = _series(at, lams, "rad_mean")
        a.errorbar(style.dodge(x, i, len(widths), 0.08), m, yerr=np.where(np.isfinite(s), s, 0), marker="o",
                   capsize=2, color=style.color(i), label=f"d = {d}")
        m, s, n = _series(at, lams, "pre_excess")
        c.errorbar(style.dodge(x, i, len(widths), 0.08), m, yerr=np.where(np.isfinite(s), s, 0), marker="o",
                   capsize=2, color=style.color(i), label=f"d = {d}")
        ns += list(n)
    norms = sorted({r["head_norm"] for r in final})
    k = 0
    for i, d in enumerate(widths):
        for j, B in enumerate(norms):
            at = [r for r in final if r["d_model"] == d and r["head_norm"] == B]
            m, s, n = _series(at, lams, "excess_mean")
            b.errorbar(style.dodge(x, k, len(widths) * len(norms), 0.07), m, yerr=np.where(np.isfinite(s), s, 0),
                       marker=style.MARKERS[j], capsize=2, color=style.color(j + i * len(norms)),
                       ls=["-", "--", ":"][j % 3], label=f"B = {B:g}" + (f", d = {d}" if len(widths) > 1 else ""))
            ns += list(n)
            k += 1
    labels = ["0 (MLM)" if lam == 0 else f"{lam:g}" for lam in lams]
    for ax in (a, b, c):
        ax.set_xticks(x, labels)
        ax.set_xlabel(r"RadReg weight $\lambda$")
        ax.set_xlim(-0.4, len(lams) - 0.6)
    a.set_ylabel(f"Rademacher term (B = {B0:g})")
    a.set_title(f"(a) Rademacher term, n = {world['num_labelled']}")
    b.set_ylabel("downstream excess squared risk")
    b.set_yscale("log")
    b.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    b.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    b.yaxis.set_minor_formatter(NullFormatter())
    b.set_title("(b) fine-tuned head")
    c.set_ylabel(r"pretraining excess risk $E_{pre}$ (nats)")
    c.set_title(f"(c) after {world['steps']} steps")
    note = style.spread_note(ns, "seed")
    style.legend_below(a, ncol=2, title=note)
    style.legend_below(b, ncol=1, title=note)
    style.legend_below(c, ncol=2, title=note)
    return style.finish(fig)


def build(run_dir: str | Path) -> Figure:
    """The RadReg figure of a deng2024 run directory, not saved."""
    return build_figure(read_run(run_dir))


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/deng2024_radreg.{pdf,png}`` from the run's tables."""
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / STEM)
