"""Figure: SMART against plain fine-tuning (``ftsim run smart`` on real tasks, ``ftsim run smart-synthetic``).

Drawn from tidy rows only (``results.jsonl``: method, seed, metric, value, and task for the real runs). Four dot
plots, one row per method and one colour and marker per task: (a) test accuracy, (b) robust accuracy under l_inf
perturbations of the input embeddings (PGD), (c) local sensitivity -- the symmetric KL between the outputs at x and
at the worst perturbation the ascent finds in the eps-ball (log axis when the values span a decade), (d) distance of the pretrained weights from
their start, ||theta - theta_0|| / ||theta_0||. Each shows the mean over seeds with +-1 sample standard deviation
and every seed's value as a small dot; what the bars are is said in the legend.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from figures import style
from ftsim.core.io import read_jsonl
from ftsim.core.tables import summarize

__all__ = ["METHODS", "PANELS", "build_figure", "build", "build_synthetic", "redraw", "redraw_synthetic"]

# (method in the rows, label on the figure), top to bottom
METHODS: tuple[tuple[str, str], ...] = (
    ("zero-shot", "zero-shot"), ("FT", "FT"), ("FT + R_s", "FT + R_s"), ("FT + R_s + VBPP", "FT + R_s + VBPP"),
    ("FT + R_s + MBPP", "FT + R_s + MBPP"), ("FT + MBPP", "FT + MBPP"),
    ("FT + R_s (public normalisation)", "FT + R_s (public norm.)"),
)
# (metric, panel title, x label, scale, log axis)
PANELS: tuple[tuple[str, str, str, float, bool], ...] = (
    ("accuracy", "(a) test accuracy", "test accuracy (%)", 100.0, False),
    ("robust_accuracy", "(b) robust accuracy", "accuracy under PGD (%)", 100.0, False),
    ("sensitivity", "(c) local sensitivity", "sym. KL found in the ball", 1.0, True),
    ("dist_init", "(d) distance to the pretrained weights", r"$\|\theta - \theta_0\| / \|\theta_0\|$", 1.0, False),
)
TASK_ORDER = ("SST-2", "MR", "CR", "SST-5", "MPQA", "Subj", "TREC")
MODEL_NAMES = {"smollm2": "SmolLM2-135M-Instruct"}


def _tasks(rows: Sequence[dict]) -> list[str]:
    seen = list(dict.fromkeys(r.get("task", "synthetic") for r in rows))
    order = {t: i for i, t in enumerate(TASK_ORDER)}
    return sorted(seen, key=lambda t: (order.get(t, len(order)), seen.index(t)))


def _values(rows, task, method, metric) -> np.ndarray:
    return np.array([float(r["value"]) for r in rows if r.get("task", "synthetic") == task
                     and r["method"] == method and r["metric"] == metric and r.get("value") is not None], float)


def _panel(ax, rows, tasks, present, metric, scale, log, xlabel) -> list[int]:
    rng = np.random.default_rng(0)  # vertical jitter of the per-seed dots only
    everything = scale * np.array([float(r["value"]) for r in rows if r["metric"] == metric
                                   and r.get("value") is not None and np.isfinite(float(r["value"]))], float)
    positive = everything[everything > 0]
    log = log and positive.size > 0 and positive.max() / positive.min() >= 10  # log only across a decade
    if not log and scale == 1.0 and positive.size and not 1e-2 <= positive.max() < 1e3:
        power = int(np.floor(np.log10(positive.max())))  # plot in units of 10^power, said in the label
        scale, xlabel = scale * 10.0 ** -power, f"{xlabel} ($\\times 10^{{{power}}}$)"
    band = 0.7 / max(len(tasks), 1)
    ns, allv = [], []
    for t, task in enumerate(tasks):
        col, mk = style.color(t), style.MARKERS[t % len(style.MARKERS)]
        for j, (method, _) in enumerate(present):
            vals = scale * _values(rows, task, method, metric)
            if log:
                vals = vals[vals > 0]
            if not vals.size:
                continue
            y = j + (t - (len(tasks) - 1) / 2) * band
            st = summarize(vals)
            ns.append(st.n)
            allv.extend(vals)
            if st.n > 1:
                ax.scatter(vals, y + rng.uniform(-0.25, 0.25, vals.size) * band, s=5, color=col, alpha=0.45,
                           linewidths=0, zorder=2)
            if log and np.isfinite(st.std):
                # on a log axis +-1 s.d. may cross 0: draw the bar to the smallest positive value instead
                lo = max(st.mean - st.std, float(vals.min()) * 0.5)
                xerr = [[st.mean - lo], [st.std]]
            else:
                xerr = [st.std] if np.isfinite(st.std) else None
            ax.errorbar([st.mean], [y], xerr=xerr, fmt=mk, color=col, ms=4.5, mew=1.1, capsize=2, elinewidth=0.9,
                        zorder=3)
    ax.set_yticks(range(len(present)))
    ax.set_yticklabels([label for _, label in present])
    ax.set_ylim(len(present) - 0.5, -0.5)  # zero-shot (where every method starts), then FT, on top
    ax.grid(False, axis="y")
    for j in range(1, len(present)):
        ax.axhline(j - 0.5, color="0.9", lw=0.5, zorder=0)
    if log:
        from matplotlib.ticker import NullFormatter

        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
    elif allv and scale == 100.0:
        lo, hi = min(allv), max(allv)
        pad = max(2.0, 0.05 * (hi - lo))
        ax.set_xlim(max(0.0, lo - pad), min(100.0, hi + pad))
    else:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("method")
    return ns


def _setting(rows: Sequence[dict], tasks: Sequence[str], info: dict | None) -> str:
    if "task" not in rows[0]:
        text = "synthetic k-shot task (bag-of-embeddings network)"
        if info and info.get("setting"):
            text = info["setting"]
        return text
    models = ", ".join(dict.fromkeys(MODEL_NAMES.get(r.get("model"), str(r.get("model"))) for r in rows))
    ks = ", ".join(dict.fromkeys(str(r.get("k")) for r in rows))
    return f"{models}, k = {ks} per class, tasks: " + ", ".join(tasks)


def build_figure(rows: Sequence[dict], info: dict | None = None) -> Figure:
    """The four-panel figure from tidy rows (any number of tasks); ``info`` (a ``setting.jsonl`` row) adds the
    setting of a synthetic run."""
    rows = [r for r in rows if r.get("metric") is not None]
    if not rows:
        raise ValueError("no result rows to draw")
    tasks = _tasks(rows)
    present = [(m, lab) for m, lab in METHODS if any(r["method"] == m for r in rows)]
    present += [(m, m) for m in dict.fromkeys(r["method"] for r in rows) if m not in dict(present)]
    h = 0.55 + 0.2 * len(present) * max(1.0, len(tasks) / 2)
    fig = style.new_figure(style.TEXT_WIDTH, 2 * h + 1.3)
    axes = fig.subplot_mosaic([["a", "b"], ["c", "d"], ["key", "key"]], height_ratios=[h, h, 0.45])
    import textwrap

    fig.suptitle("\n".join(textwrap.wrap(_setting(rows, tasks, info), 150)), fontsize=7)
    ns: list[int] = []
    for name, (metric, panel, xlabel, scale, log) in zip("abcd", PANELS):
        ax = axes[name]
        ns += _panel(ax, rows, tasks, present, metric, scale, log, xlabel)
        ax.set_title(panel)
    key = axes["key"]
    key.axis("off")
    handles = [Line2D([], [], color=style.color(t), marker=style.MARKERS[t % len(style.MARKERS)], ls="none",
                      ms=4.5) for t in range(len(tasks))]
    labels = list(tasks)
    if any(n > 1 for n in ns):
        handles.append(Line2D([], [], color="0.4", marker="o", ls="none", ms=2.5, alpha=0.6))
        labels.append("value of one seed")
    key.legend(handles, labels, title=style.spread_note(ns, "seed"), loc="center", ncol=min(5, len(labels)),
               fontsize=6.5, title_fontsize=6.5, borderaxespad=0.0)
    return style.finish(fig)


def _info(run_dir: Path) -> dict | None:
    """The run's one-row ``setting.jsonl`` table (what the synthetic run was), if any."""
    path = run_dir / "setting.jsonl"
    rows = read_jsonl(path) if path.is_file() else []
    return rows[0] if rows else None


def build(run_dir: str | Path) -> Figure:
    """The figure of one ``ftsim run smart`` directory (its ``results.jsonl``), not saved."""
    run_dir = Path(run_dir)
    return build_figure(read_jsonl(run_dir / "results.jsonl"), _info(run_dir))


def build_synthetic(run_dir: str | Path) -> Figure:
    """The figure of one ``ftsim run smart-synthetic`` directory, not saved."""
    return build(run_dir)


def redraw(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/smart.{pdf,png}`` from its tables."""
    run_dir = Path(run_dir)
    return style.save(build(run_dir), run_dir / "smart")


def redraw_synthetic(run_dir: str | Path) -> list[Path]:
    """Redraw ``<run_dir>/smart_synthetic.{pdf,png}`` from its tables."""
    run_dir = Path(run_dir)
    return style.save(build_synthetic(run_dir), run_dir / "smart_synthetic")
